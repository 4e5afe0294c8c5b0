"""The "cpp" backend (csrc/, smoe_fast/extension.py) against the reference, on CPU.

The extension is built once per test session (or loaded from the cache); a failing build fails
these tests, it never skips them. Forward outputs and every gradient are compared with the
reference under the DESIGN.md tolerance (fp32 rel-RMS <= 1e-5, fp64 <= 1e-12); routing tensors
exactly and by invariants.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from helpers import assert_close, random_weights, routing_case
from smoe_fast import extension, ops, reference

DTYPES = [torch.float32, torch.float64]

# (name, B, E, routing): each case names the edge it hits.
HARD_CASES = [
    ("uniform", 37, 5, "uniform"),          # several lane blocks per expert, partial last block
    ("one_expert", 19, 4, "one_expert"),    # all tokens on one expert, the others empty
    ("empty_experts", 23, 6, "even_only"),  # odd experts empty
    ("skewed", 41, 7, "skewed"),            # prime E, very uneven counts
    ("b1", 1, 3, "uniform"),                # B = 1
    ("e_gt_b", 3, 11, "uniform"),           # E > B
    ("b0", 0, 3, "uniform"),                # empty batch
]
SOFT_CASES = [("b13_e3", 13, 3), ("b1_e2", 1, 2), ("e_gt_b", 2, 5), ("b0", 0, 3), ("prime", 17, 7)]
TOPK_CASES = [("k1", 13, 4, 1), ("k2", 17, 5, 2), ("k_eq_e", 11, 3, 3), ("k2_e_gt_b", 3, 7, 2), ("b0", 0, 3, 2)]
KINDS = ["lite", "mlp", "medium"]


@pytest.fixture(scope="session", autouse=True)
def built_extension():
    """Build (or load) the extension once; a build failure is a test failure."""
    extension.load()


def _with_kinds(cases, medium_ok):
    """cases x KINDS as pytest params; medium (~40x lite per token) only where medium_ok(case)."""
    return [pytest.param(*case, kind, id=f"{case[0]}-{kind}") for case in cases for kind in KINDS
            if kind != "medium" or medium_ok(case)]


def _inputs(batch: int, num_experts: int, dtype, seed: int = 0, latent: int = 32):
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(batch, latent, generator=g, dtype=torch.float64).to(dtype)
    return z


def _grads(fn, tensors, weights, kind, seed=0):
    """(output, gradients wrt tensors + every weight) of fn under a fixed random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    wleaves = {k: v.detach().clone().requires_grad_() for k, v in weights.items()}
    out = fn(*leaves, wleaves)
    g = torch.Generator().manual_seed(seed + 7)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    names = extension._weight_list({k: k for k in wleaves}, kind)
    inputs = leaves + [wleaves[n] for n in names]
    if out.numel() == 0:
        return out, [torch.zeros_like(t) for t in inputs], names
    return out, torch.autograd.grad(out, inputs, upstream), names


def _compare_with_grads(fn_cpp, fn_ref, tensors, weights, kind, tensor_names):
    out, grads, names = _grads(fn_cpp, tensors, weights, kind)
    out_ref, grads_ref, _ = _grads(fn_ref, tensors, weights, kind)
    assert_close(out, out_ref, name="output")
    for grad, grad_ref, name in zip(grads, grads_ref, list(tensor_names) + names):
        assert_close(grad, grad_ref, name=f"grad of {name}")


# ------------------------------------------------------------------------------------------------
# Grouping

GROUP_CASES = HARD_CASES + [("large_prime", 1009, 13, "uniform")]


def _check_routing_invariants(r, expert_idx, num_experts):
    flat = expert_idx.reshape(-1).long()
    n = flat.numel()
    assert r.expert_counts.dtype == r.expert_offsets.dtype == r.sorted_token_idx.dtype == torch.int32
    assert torch.equal(r.expert_counts.long(), torch.bincount(flat, minlength=num_experts))
    assert r.expert_offsets[0] == 0 and torch.equal(r.expert_offsets[1:].long(), r.expert_counts.long().cumsum(0))
    assert torch.equal(r.sorted_token_idx.long().sort().values, torch.arange(n))  # a permutation
    assert torch.equal(r.token_sorted_pos.long()[r.sorted_token_idx.long()], torch.arange(n))  # its inverse
    keys = flat[r.sorted_token_idx.long()] * (n + 1) + r.sorted_token_idx.long()
    assert torch.all(keys[1:] > keys[:-1]), "rows must be sorted by expert, ascending (stable) within an expert"


@pytest.mark.parametrize("name,batch,num_experts,routing", GROUP_CASES, ids=[c[0] for c in GROUP_CASES])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_group_by_expert_matches_reference(name, batch, num_experts, routing, index_dtype):
    expert_idx = routing_case(routing, batch, num_experts).to(index_dtype)
    r = extension.group_by_expert(expert_idx, num_experts)
    expected = reference.group_by_expert(expert_idx.long(), num_experts)
    for got, want, field in zip(r, expected, expected._fields):
        assert torch.equal(got, want), f"{field}: {got.tolist()} != {want.tolist()}"
    _check_routing_invariants(r, expert_idx, num_experts)


@pytest.mark.parametrize("batch,num_experts,k", [(13, 5, 2), (7, 3, 3), (1, 4, 1)], ids=["k2", "k_eq_e", "b1"])
def test_group_by_expert_topk(batch, num_experts, k):
    g = torch.Generator().manual_seed(3)
    topk_idx = torch.rand(batch, num_experts, generator=g).topk(k, dim=1).indices
    r = ops.group_by_expert(topk_idx, num_experts, backend="cpp")
    expected = reference.group_by_expert(topk_idx, num_experts)
    for got, want, field in zip(r, expected, expected._fields):
        assert torch.equal(got, want), field
    _check_routing_invariants(r, topk_idx, num_experts)


def test_group_by_expert_rejects_out_of_range():
    with pytest.raises(RuntimeError, match=r"out of range \[0, 3\)"):
        torch.ops.smoe_fast.cpp_group_by_expert(torch.tensor([0, 3]), 3)


# ------------------------------------------------------------------------------------------------
# Hard-gated experts

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,batch,num_experts,routing,kind", _with_kinds(HARD_CASES, lambda c: c[1] <= 23))
def test_experts_hard_matches_reference(name, batch, num_experts, routing, kind, dtype):
    weights = random_weights(kind, num_experts, dtype=dtype, seed=1)
    z = _inputs(batch, num_experts, dtype)
    expert_idx = routing_case(routing, batch, num_experts)
    with torch.no_grad():
        out = ops.experts_hard(z, expert_idx, weights, kind=kind, backend="cpp")
    assert_close(out, reference.experts_hard(z, expert_idx, weights, kind), name="x_hat")


@pytest.mark.parametrize("poison", ["1", "0"], ids=["poisoned", "plain"])
def test_large_outputs_on_huge_pages_are_ordinary_tensors(poison, monkeypatch):
    # B = 1,031 (prime): a 3.2 MB output, past the 2 MiB from which csrc/common.h allocates on huge
    # pages; its values, and a storage torch can free, resize and copy like any other.
    monkeypatch.setenv("SMOE_FAST_POISON_OUTPUTS", poison)
    weights = random_weights("lite", 9, seed=3)
    z = _inputs(1031, 9, torch.float32)
    expert_idx = routing_case("skewed", 1031, 9)
    with torch.no_grad():
        out = ops.experts_hard(z, expert_idx, weights, kind="lite", backend="cpp")
    assert out.untyped_storage().nbytes() == 1031 * 784 * 4
    assert_close(out, reference.experts_hard(z, expert_idx, weights, "lite"), name="x_hat")
    copy = out.clone()
    out.resize_(2 * 1031, 1, 28, 28)  # the storage grows (and copies) through its allocator
    assert torch.equal(out[:1031], copy)
    del out


def test_a_reused_large_output_is_fully_rewritten(monkeypatch):
    # csrc/common.h keeps a freed huge-page output for the next one of its size. The first output is
    # NaN-filled before it is freed, so a second call that gets its block (poisoning off) and leaves
    # any element unwritten fails the comparison.
    monkeypatch.setenv("SMOE_FAST_POISON_OUTPUTS", "0")
    weights = random_weights("lite", 5, seed=4)
    z = _inputs(1031, 5, torch.float32)
    expert_idx = routing_case("skewed", 1031, 5)
    with torch.no_grad():
        first = ops.experts_hard(z, routing_case("one_expert", 1031, 5), weights, kind="lite", backend="cpp")
        first.fill_(float("nan"))
        del first
        second = ops.experts_hard(-z, expert_idx, weights, kind="lite", backend="cpp")
    assert_close(second, reference.experts_hard(-z, expert_idx, weights, "lite"), name="x_hat")


@pytest.mark.parametrize("kind", ["lite", "mlp"])
def test_nan_and_inf_propagate_like_the_reference(kind):
    # Token 1 is NaN, token 2 +inf, token 3 -inf: the vectorised exp must not clamp NaN away.
    weights = random_weights(kind, 2, seed=12)
    z = _inputs(6, 2, torch.float32)
    z[1, 0], z[2, :], z[3, :] = float("nan"), float("inf"), float("-inf")
    expert_idx = torch.tensor([0, 1, 0, 1, 0, 1])
    with torch.no_grad():
        out = extension.experts_hard(z, expert_idx, weights, kind)
        expected = reference.experts_hard(z, expert_idx, weights, kind)
    assert torch.equal(torch.isnan(out), torch.isnan(expected)), "NaN pattern differs from the reference"
    finite = torch.isfinite(expected)
    assert_close(out[finite], expected[finite], name="finite outputs")


@pytest.mark.parametrize("kind", ["lite", "mlp"])
def test_experts_hard_gradients(kind):
    # Under autograd experts_hard runs as top-1 with unit gates: every gradient matches the reference.
    weights = random_weights(kind, 4, seed=2)
    z = _inputs(21, 4, torch.float32)
    expert_idx = routing_case("skewed", 21, 4)
    _compare_with_grads(lambda z_, w: extension.experts_hard(z_, expert_idx, w, kind),
                        lambda z_, w: reference.experts_hard(z_, expert_idx, w, kind), [z], weights, kind, ["z"])


# ------------------------------------------------------------------------------------------------
# Soft-gated and top-k experts: forward and every gradient

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,batch,num_experts,kind", _with_kinds(SOFT_CASES, lambda c: c[2] <= 3))
def test_experts_soft_forward_and_gradients(name, batch, num_experts, kind, dtype):
    weights = random_weights(kind, num_experts, dtype=dtype, seed=3)
    z = _inputs(batch, num_experts, dtype)
    gates = torch.randn(batch, num_experts, generator=torch.Generator().manual_seed(5), dtype=torch.float64).softmax(-1).to(dtype)
    _compare_with_grads(lambda z_, g_, w: ops.experts_soft(z_, g_, w, kind=kind, backend="cpp"),
                        lambda z_, g_, w: reference.experts_soft(z_, g_, w, kind), [z, gates], weights, kind,
                        ["z", "gates"])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,batch,num_experts,k,kind", _with_kinds(TOPK_CASES, lambda c: c[1] <= 3 or c[3] == 1))
def test_experts_topk_forward_and_gradients(name, batch, num_experts, k, kind, dtype):
    weights = random_weights(kind, num_experts, dtype=dtype, seed=4)
    z = _inputs(batch, num_experts, dtype)
    g = torch.Generator().manual_seed(6)
    scores = torch.rand(batch, num_experts, generator=g, dtype=torch.float64)
    topk_gates, topk_idx = scores.topk(k, dim=1)
    topk_gates = (topk_gates / topk_gates.sum(-1, keepdim=True)).to(dtype)
    _compare_with_grads(lambda z_, g_, w: ops.experts_topk(z_, topk_idx, g_, w, kind=kind, backend="cpp"),
                        lambda z_, g_, w: reference.experts_topk(z_, topk_idx, g_, w, kind), [z, topk_gates], weights,
                        kind, ["z", "topk_gates"])


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a strided (every other row, non-contiguous) layout."""
    out = torch.empty((2 * t.shape[0],) + t.shape[1:], dtype=t.dtype)[::2]
    out.copy_(t)
    assert not out.is_contiguous()
    return out


def test_non_contiguous_inputs():
    # z, gates, indices and weights all non-contiguous: the glue must not read them as contiguous.
    kind, batch, num_experts = "lite", 19, 4
    weights = random_weights(kind, num_experts, seed=8)
    weights_nc = {k: _non_contiguous(v) for k, v in weights.items()}
    z = _inputs(batch, num_experts, torch.float32)
    gates = torch.rand(batch, num_experts, generator=torch.Generator().manual_seed(2)).softmax(-1)
    topk_gates, topk_idx = gates.topk(2, dim=1)
    expert_idx = routing_case("uniform", batch, num_experts)
    z_nc, gates_nc = _non_contiguous(z), _non_contiguous(gates)
    with torch.no_grad():
        assert_close(extension.experts_hard(z_nc, _non_contiguous(expert_idx), weights_nc, kind),
                     reference.experts_hard(z, expert_idx, weights, kind), name="hard")
        assert_close(extension.experts_topk(z_nc, _non_contiguous(topk_idx), _non_contiguous(topk_gates), weights_nc, kind),
                     reference.experts_topk(z, topk_idx, topk_gates, weights, kind), name="topk")
    _compare_with_grads(lambda z_, g_, w: extension.experts_soft(z_, g_, w, kind),
                        lambda z_, g_, w: reference.experts_soft(z_, g_, w, kind), [z_nc, gates_nc], weights_nc, kind,
                        ["z", "gates"])


def test_weight_gradients_are_deterministic():
    # B * E = 1,600 rows: several work items per expert, so the partial-sum reduction is exercised.
    kind, batch, num_experts = "lite", 400, 4
    weights = random_weights(kind, num_experts, seed=9)
    z = _inputs(batch, num_experts, torch.float32)
    gates = torch.rand(batch, num_experts, generator=torch.Generator().manual_seed(1)).softmax(-1)
    upstream = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    wl = extension._weight_list(weights, kind)
    first = torch.ops.smoe_fast.cpp_experts_soft_bwd(upstream, z, gates, wl, kind)
    second = torch.ops.smoe_fast.cpp_experts_soft_bwd(upstream, z, gates, wl, kind)
    for a, b in zip([first[0], first[1], *first[2]], [second[0], second[1], *second[2]]):
        assert torch.equal(a, b), "two identical backward runs must give bitwise equal gradients"


# ------------------------------------------------------------------------------------------------
# Block layout: full 16-lane blocks, tails of several experts sharing a block, many experts

# Tokens per expert, in expert order -> the block layout they hit (fp32 blocks hold 16 tokens on
# AVX-512, 8 on AVX2; float64 keeps one-expert blocks): the rows past an expert's full blocks go to
# shared blocks, filled lane by lane with up to 4 experts' tails, a tail running on into the next block.
COUNT_CASES = [
    ("full_and_tails", [40, 16, 3, 4, 5, 8, 9, 1, 0, 12, 2, 7]),  # 2 full + tail 8, exact full, every tail kind
    ("odd_quads", [1, 2, 3, 4, 1]),                                 # a four-expert block and a partial one
    ("odd_pairs", [5, 6, 7]),                                       # three tails in one block
    ("one_big", [0, 0, 97]),                                        # 6 full blocks + tail 1, other experts empty
    ("tails_split_across_blocks", [15, 15, 15, 7]),                 # each tail continues in the next block
    ("four_slots_leave_lanes_empty", [1] * 9),                      # 4 experts per block, 12 (4) lanes unused
    ("few_tokens_most_experts_empty", [3, 0, 0, 0, 0, 0, 0, 2]),    # two short tails in one block
]


def _routing_from_counts(counts, seed=0):
    """A shuffled top-1 routing in which expert e gets counts[e] tokens."""
    idx = torch.cat([torch.full((c,), e, dtype=torch.int64) for e, c in enumerate(counts)])
    return idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["lite", "mlp"])
@pytest.mark.parametrize("name,counts", COUNT_CASES, ids=[c[0] for c in COUNT_CASES])
def test_block_layouts_match_reference(name, counts, kind, dtype):
    expert_idx = _routing_from_counts(counts)
    weights = random_weights(kind, len(counts), dtype=dtype, seed=13)
    z = _inputs(expert_idx.numel(), len(counts), dtype)
    with torch.no_grad():
        out = ops.experts_hard(z, expert_idx, weights, kind=kind, backend="cpp")
    assert_close(out, reference.experts_hard(z, expert_idx, weights, kind), name="x_hat")
    # Top-1 under autograd runs the backward on the same layouts.
    _compare_with_grads(lambda z_, w: extension.experts_hard(z_, expert_idx, w, kind),
                        lambda z_, w: reference.experts_hard(z_, expert_idx, w, kind), [z], weights, kind, ["z"])


@pytest.mark.parametrize("kind", ["lite", "mlp"])
@pytest.mark.parametrize("latent", [7, 64], ids=["L7", "L64"])
def test_block_layouts_with_other_latent_sizes(latent, kind):
    # The linear layers specialise on L = 32 (the paper's); other sizes take the generic loop, in
    # one-expert and shared blocks alike. In the backward, L = 7 (not a multiple of the lanes) keeps
    # the per-lane weight-gradient accumulators and L = 64 takes the dense ones in 2-vector chunks.
    counts = COUNT_CASES[0][1]
    expert_idx = _routing_from_counts(counts)
    weights = random_weights(kind, len(counts), latent_dim=latent, seed=15)
    z = _inputs(expert_idx.numel(), len(counts), torch.float32, latent=latent)
    with torch.no_grad():
        out = ops.experts_hard(z, expert_idx, weights, kind=kind, backend="cpp")
    assert_close(out, reference.experts_hard(z, expert_idx, weights, kind), name="x_hat")
    _compare_with_grads(lambda z_, w: extension.experts_hard(z_, expert_idx, w, kind),
                        lambda z_, w: reference.experts_hard(z_, expert_idx, w, kind), [z], weights, kind, ["z"])


def test_many_experts_small_batch():
    # E = 8,192 > B = 300: almost every expert has 0 or 1 token, so nearly all blocks are shared ones.
    # The reference runs on the used experts only (renumbered), which is the same function and ~100x
    # cheaper than the reference over 8,192 experts.
    kind, batch, num_experts = "lite", 300, 8192
    weights = random_weights(kind, num_experts, seed=14)
    z = _inputs(batch, num_experts, torch.float32)
    expert_idx = torch.randint(0, num_experts, (batch,), generator=torch.Generator().manual_seed(3))
    used, renumbered = torch.unique(expert_idx, return_inverse=True)
    used_weights = {k: v[used] for k, v in weights.items()}
    with torch.no_grad():
        out = ops.experts_hard(z, expert_idx, weights, kind=kind, backend="cpp")
    assert_close(out, reference.experts_hard(z, renumbered, used_weights, kind), name="x_hat")
    # Top-k gradients (first 40 tokens): the used experts' match the reference, all others are exactly zero.
    z = z[:40]
    topk_idx = torch.stack([expert_idx[:40], (expert_idx[:40] + 1) % num_experts], dim=1)
    topk_gates = torch.rand(40, 2, generator=torch.Generator().manual_seed(4)).softmax(-1)
    used, renumbered = torch.unique(topk_idx, return_inverse=True)
    out, grads, names = _grads(lambda z_, g_, w: ops.experts_topk(z_, topk_idx, g_, w, kind=kind, backend="cpp"),
                               [z, topk_gates], weights, kind)
    out_ref, grads_ref, _ = _grads(lambda z_, g_, w: reference.experts_topk(z_, renumbered, g_, w, kind),
                                   [z, topk_gates], {k: v[used] for k, v in weights.items()}, kind)
    assert_close(out, out_ref, name="output")
    unused = torch.ones(num_experts, dtype=torch.bool)
    unused[used] = False
    for grad, grad_ref, name in zip(grads, grads_ref, ["z", "topk_gates"] + names):
        if name in ("z", "topk_gates"):
            assert_close(grad, grad_ref, name=f"grad of {name}")
        else:
            assert_close(grad[used], grad_ref, name=f"grad of {name} (used experts)")
            assert torch.count_nonzero(grad[unused]) == 0, f"grad of {name}: unused experts got gradients"


@pytest.mark.parametrize("kind", ["lite", "mlp"])
@pytest.mark.parametrize("name,counts", COUNT_CASES, ids=[c[0] for c in COUNT_CASES])
def test_block_layouts_keep_nan_per_token_and_top2_gates(name, counts, kind):
    expert_idx = _routing_from_counts(counts, seed=21)
    batch, num_experts = expert_idx.numel(), len(counts)
    weights = random_weights(kind, num_experts, seed=22)
    z = _inputs(batch, num_experts, torch.float32)
    z[batch // 2] = float("nan")  # poisons its own token only, whichever tokens share its block
    with torch.no_grad():
        out = ops.experts_hard(z, expert_idx, weights, kind=kind, backend="cpp")
        assert_close(out, reference.experts_hard(z, expert_idx, weights, kind), name="hard x_hat")
        assert torch.isnan(out[batch // 2]).all() and not torch.isnan(out[torch.arange(batch) != batch // 2]).any()
        # Top-2 forward: slot 2 regroups the same tokens with other experts and gates.
        topk_idx = torch.stack([expert_idx, (expert_idx + 1) % num_experts], dim=1)
        topk_gates = torch.rand(batch, 2, generator=torch.Generator().manual_seed(23)).softmax(-1)
        assert_close(ops.experts_topk(z, topk_idx, topk_gates, weights, kind=kind, backend="cpp"),
                     reference.experts_topk(z, topk_idx, topk_gates, weights, kind), name="top-2 x_hat")


def test_weights_changed_in_place_are_seen():
    # Weights are folded and packed on every call: an in-place update must show in the next call.
    kind, batch, num_experts = "lite", 40, 3
    weights = random_weights(kind, num_experts, seed=15)
    z = _inputs(batch, num_experts, torch.float32)
    expert_idx = routing_case("uniform", batch, num_experts)
    with torch.no_grad():
        first = ops.experts_hard(z, expert_idx, weights, kind=kind, backend="cpp")
        for w in weights.values():
            w.mul_(-1.5)
        second = ops.experts_hard(z, expert_idx, weights, kind=kind, backend="cpp")
    assert not torch.allclose(first, second)
    assert_close(second, reference.experts_hard(z, expert_idx, weights, kind), name="x_hat after the update")


# NaN in token 1 and +-inf in tokens 2, 3: every other token's outputs and gradients are unaffected, and
# the NaN pattern of every output and gradient is the reference's.
NAN_KINDS = ["lite", "mlp", "medium"]


def _poisoned_inputs(batch, num_experts, dtype=torch.float32):
    z = _inputs(batch, num_experts, dtype)
    z[1, 0], z[2, :], z[3, :] = float("nan"), float("inf"), float("-inf")
    return z


def _assert_same_nan_pattern_and_close(out, expected, name):
    assert torch.equal(torch.isnan(out), torch.isnan(expected)), f"{name}: NaN pattern differs from the reference"
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(out)), f"{name}: finite pattern differs from the reference"
    assert_close(out[finite], expected[finite], name=f"{name} (finite entries)")


@pytest.mark.parametrize("kind", NAN_KINDS)
def test_nan_stays_in_its_token_hard(kind):
    batch, num_experts = 21, 2
    weights = random_weights(kind, num_experts, seed=16)
    z = _poisoned_inputs(batch, num_experts)
    expert_idx = torch.arange(batch) % num_experts
    with torch.no_grad():
        out = extension.experts_hard(z, expert_idx, weights, kind)
        expected = reference.experts_hard(z, expert_idx, weights, kind)
    _assert_same_nan_pattern_and_close(out, expected, "x_hat")
    clean = torch.ones(batch, dtype=torch.bool)
    clean[1:4] = False
    assert torch.isfinite(out[clean]).all(), "a non-finite token leaked into another token's output"


@pytest.mark.parametrize("mode", ["soft", "topk"])
@pytest.mark.parametrize("kind", NAN_KINDS)
def test_nan_stays_in_its_token_backward(kind, mode):
    batch, num_experts = 9, 3
    weights = random_weights(kind, num_experts, seed=17)
    z = _poisoned_inputs(batch, num_experts)
    gates = torch.rand(batch, num_experts, generator=torch.Generator().manual_seed(6)).softmax(-1)
    if mode == "soft":
        fn_cpp = lambda z_, g_, w: ops.experts_soft(z_, g_, w, kind=kind, backend="cpp")  # noqa: E731
        fn_ref = lambda z_, g_, w: reference.experts_soft(z_, g_, w, kind)  # noqa: E731
        g = gates
    else:
        g, topk_idx = gates.topk(2, dim=1)
        fn_cpp = lambda z_, g_, w: ops.experts_topk(z_, topk_idx, g_, w, kind=kind, backend="cpp")  # noqa: E731
        fn_ref = lambda z_, g_, w: reference.experts_topk(z_, topk_idx, g_, w, kind)  # noqa: E731
    out, grads, names = _grads(fn_cpp, [z, g], weights, kind)
    out_ref, grads_ref, _ = _grads(fn_ref, [z, g], weights, kind)
    _assert_same_nan_pattern_and_close(out, out_ref, "x_hat")
    clean = torch.ones(batch, dtype=torch.bool)
    clean[1:4] = False
    for grad, grad_ref, name in zip(grads, grads_ref, ["z", "gates"] + names):
        if name in ("z", "gates"):
            assert torch.isfinite(grad[clean]).all(), f"grad of {name}: a non-finite token leaked into another token"
            assert_close(grad[clean], grad_ref[clean], name=f"grad of {name} (clean tokens)")
        assert torch.equal(torch.isnan(grad), torch.isnan(grad_ref)), f"grad of {name}: NaN pattern differs"


def test_weight_gradients_do_not_depend_on_the_thread_count():
    # Work items are cut from the sizes alone and partial sums added in item order: bitwise equal results.
    kind, batch, num_experts = "lite", 300, 3
    weights = random_weights(kind, num_experts, seed=18)
    z = _inputs(batch, num_experts, torch.float32)
    gates = torch.rand(batch, num_experts, generator=torch.Generator().manual_seed(7)).softmax(-1)
    upstream = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    wl = extension._weight_list(weights, kind)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.smoe_fast.cpp_experts_soft_bwd(upstream, z, gates, wl, kind))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip([results[0][0], results[0][1], *results[0][2]], [other[0], other[1], *other[2]]):
            assert torch.equal(a, b), "the gradients changed with the thread count"


def test_model_runs_on_cpp_backend():
    import smoe_fast

    torch.manual_seed(0)
    x = torch.rand(6, 1, 28, 28)
    model = smoe_fast.SMoEVAE(num_experts=3, backend="cpp")
    ref = smoe_fast.SMoEVAE(num_experts=3, backend="reference")
    ref.load_state_dict(model.state_dict())
    for train in (True, False):
        model.train(train)
        ref.train(train)
        out, out_ref = model(x, sample=False), ref(x, sample=False)
        assert_close(out.recon, out_ref.recon, name=f"recon (train={train})")
    model.train()
    smoe_fast.smoe_loss(model(x), x, num_experts=3).total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------
# Op registration: schemas, fakes and autograd (torch.library.opcheck)

def test_opcheck():
    kind, batch, num_experts = "lite", 5, 3
    weights = extension._weight_list(random_weights(kind, num_experts, seed=10), kind)
    z = _inputs(batch, num_experts, torch.float32)
    gates = torch.rand(batch, num_experts).softmax(-1)
    topk_gates, topk_idx = gates.topk(2, dim=1)
    upstream = torch.randn(batch, 1, 28, 28)
    lib = torch.ops.smoe_fast
    torch.library.opcheck(lib.cpp_group_by_expert.default, (topk_idx, num_experts))
    torch.library.opcheck(lib.cpp_experts_hard.default, (z, topk_idx[:, 0], weights, kind))
    torch.library.opcheck(lib.cpp_experts_soft_bwd.default, (upstream, z, gates, weights, kind))
    torch.library.opcheck(lib.cpp_experts_topk_bwd.default, (upstream, z, topk_idx, topk_gates, weights, kind))
    grad_weights = [w.clone().requires_grad_() for w in weights]
    torch.library.opcheck(lib.cpp_experts_soft_fwd.default, (z.requires_grad_(), gates.requires_grad_(), grad_weights, kind))
    torch.library.opcheck(lib.cpp_experts_topk_fwd.default, (z, topk_idx, topk_gates.requires_grad_(), grad_weights, kind))


def test_torch_compile_traces_through():
    # Fakes and autograd registration let torch.compile capture the ops in one graph.
    kind = "lite"
    weights = random_weights(kind, 3, seed=11)
    z = _inputs(5, 3, torch.float32)
    gates = torch.rand(5, 3, generator=torch.Generator().manual_seed(4)).softmax(-1)
    compiled = torch.compile(lambda z_, g_, w: extension.experts_soft(z_, g_, w, kind), fullgraph=True, backend="aot_eager")
    _compare_with_grads(compiled, lambda z_, g_, w: reference.experts_soft(z_, g_, w, kind), [z, gates], weights, kind,
                        ["z", "gates"])


# ------------------------------------------------------------------------------------------------
# Build cache and build errors

# The build uses -march=native, so a machine only ever compiles its own vector path. These compile
# experts_cpu.cpp (at -O0: code generation, where asm constraints and intrinsics are checked, without
# the optimiser's time) for the other paths: AVX2, SSE2 and generic vector widths (SMOE_FAST_VEC_BYTES,
# also wider than the hardware).
OTHER_CPU_PATHS = {
    "avx2": ["-march=x86-64-v3"],
    "sse2": ["-march=x86-64"],
    "generic_64_bytes_on_avx2": ["-march=x86-64-v3", "-DSMOE_FAST_VEC_BYTES=64"],
    "generic_16_bytes": ["-march=x86-64-v2", "-DSMOE_FAST_VEC_BYTES=16"],
}


@pytest.fixture(scope="module")
def other_cpu_path_builds(tmp_path_factory):
    """Starts the compiles of every OTHER_CPU_PATHS entry at once (measured on 2 cores: 32 s, 87 s one by one)."""
    from torch.utils.cpp_extension import include_paths
    out = tmp_path_factory.mktemp("other_cpu_paths")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    builds = {}
    for path, flags in OTHER_CPU_PATHS.items():
        command = ["g++", "-std=c++20", "-O0", "-fPIC", "-Wno-psabi", *extension._parallel_flags(),
                   "-DTORCH_EXTENSION_NAME=smoe_fast_ext", "-DTORCH_API_INCLUDE_EXTENSION_H", *flags, *includes, "-c",
                   str(extension._source_dir() / "experts_cpu.cpp"), "-o", str(out / f"{path}.o")]
        builds[path] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    yield builds
    for build in builds.values():
        build.kill()
        build.wait()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("g++") is None,
                    reason="compile checks of the x86 vector paths need g++ on x86-64")
@pytest.mark.parametrize("path", OTHER_CPU_PATHS, ids=list(OTHER_CPU_PATHS))
def test_other_cpu_vector_paths_compile(path, other_cpu_path_builds):
    _, stderr = other_cpu_path_builds[path].communicate(timeout=600)
    assert other_cpu_path_builds[path].returncode == 0, f"experts_cpu.cpp does not compile for {path}:\n{stderr[-4000:]}"


def test_second_process_reuses_the_build():
    code = ("from smoe_fast import extension; extension.load(); "
            "print('built_here', extension._state['built_here']); print('path', extension._state['path'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    assert "built_here False" in result.stdout, f"the second process rebuilt the extension:\n{result.stdout}"
    assert str(extension._state["path"]) in result.stdout


def _fresh_state(monkeypatch, tmp_path):
    monkeypatch.setattr(extension, "_state", {"outcome": None, "built_here": False, "with_cuda": False, "path": None})
    monkeypatch.setenv("SMOE_FAST_CACHE_DIR", str(tmp_path / "cache"))


def test_broken_build_names_the_log(monkeypatch, tmp_path):
    broken = tmp_path / "csrc"
    broken.mkdir()
    (broken / "torch_bindings.cpp").write_text("this is not C++;\n")
    (broken / "experts_cpu.cpp").write_text("int smoe_fast_unused;\n")
    monkeypatch.setattr(extension, "_source_dir", lambda: broken)
    _fresh_state(monkeypatch, tmp_path)
    with pytest.raises(extension.ExtensionBuildError, match=r"build\.log") as info:
        extension.load()
    log = next((tmp_path / "cache" / "ext").glob("*.build.log"))
    assert str(log) in str(info.value)
    assert "error" in log.read_text().lower(), "the log must hold the compiler's error output"
    assert not [p for p in (tmp_path / "cache" / "ext").iterdir() if p.is_dir()], "a failed build must leave no folder"
    reason = extension.problem(torch.device("cpu"))
    assert reason is not None and str(log) in reason


def test_missing_compiler_is_reported(monkeypatch, tmp_path):
    _fresh_state(monkeypatch, tmp_path)
    monkeypatch.setenv("CXX", "no-such-compiler-smoe")
    reason = extension.problem(torch.device("cpu"))
    assert reason is not None and "no-such-compiler-smoe" in reason and "build.log" in reason
    assert "no-such-compiler-smoe" in extension.status()["buildable"]


def test_status_reports_the_build():
    status = extension.status()
    assert status["built"] == "yes" and status["loaded"] == "yes"
    assert status["cache dir"].startswith(str(extension.cache_dir()))
