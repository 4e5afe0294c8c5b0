"""The "cpp" backend's CUDA kernels (csrc/*_cuda.cu) against the reference, on a GPU.

Every test here needs a CUDA GPU (``requires_cuda``; skipped visibly without one). The cpp backend
on CUDA tensors is compared with the reference on the same tensors: forward outputs and every
gradient under the DESIGN.md tolerance (IEEE fp32 rel-RMS <= 1e-5, fp64 <= 1e-12; TF32 <= 1e-3),
routing tensors exactly and against torch.sort. Outputs are NaN-poisoned (conftest), so an element
a kernel never wrote fails.

The kernels cut each slot's rows into chunks of a few tiles of 4 tokens, so even the small cases
below span many chunks: runs that continue an expert across chunks (partial slots and their
segment sums) are exercised everywhere.
"""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close, assert_within_half_tolerance, random_weights, routing_case
from smoe_fast import extension, ops, reference

pytestmark = pytest.mark.requires_cuda

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
KINDS = ["lite", "mlp", "medium"]

# (name, B, E, routing): each case names the edge it hits.
HARD_CASES = [
    ("uniform", 37, 5, "uniform"),          # several tiles per expert, a partial last tile
    ("one_expert", 19, 4, "one_expert"),    # all tokens on one expert, the others empty
    ("empty_experts", 23, 6, "even_only"),  # odd experts empty
    ("skewed", 41, 7, "skewed"),            # prime E, very uneven counts
    ("b1", 1, 3, "uniform"),                # B = 1
    ("e_gt_b", 3, 11, "uniform"),           # E > B
    ("b0", 0, 3, "uniform"),                # empty batch
    ("prime_many", 1009, 13, "uniform"),    # prime B and E, many chunks
]
SOFT_CASES = [("b13_e3", 13, 3), ("b1_e2", 1, 2), ("e_gt_b", 2, 5), ("b0", 0, 3), ("prime", 17, 7),
              ("many_chunks", 131, 3)]
TOPK_CASES = [("k1", 13, 4, 1), ("k2", 17, 5, 2), ("k_eq_e", 11, 3, 3), ("k2_e_gt_b", 3, 7, 2), ("b0", 0, 3, 2),
              ("k2_many", 257, 9, 2)]


@pytest.fixture(scope="module", autouse=True)
def built_extension():
    """Build (or load) the extension with its CUDA kernels; a build failure is a test failure."""
    reason = extension.problem(torch.device("cuda"))
    assert reason is None, reason


def _with_kinds(cases, medium_ok):
    """cases x KINDS as pytest params; medium (~40x lite per token) only where medium_ok(case)."""
    return [pytest.param(*case, kind, id=f"{case[0]}-{kind}") for case in cases for kind in KINDS
            if kind != "medium" or medium_ok(case)]


def _cuda_weights(kind, num_experts, dtype, seed):
    return {k: v.cuda() for k, v in random_weights(kind, num_experts, dtype=dtype, seed=seed).items()}


def _z(batch, dtype, seed=0, latent=32):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, latent, generator=g, dtype=torch.float64).to(dtype).cuda()


def _grads(fn, tensors, weights, kind, seed=0):
    """(output, gradients wrt tensors + every weight) of fn under a fixed random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    wleaves = {k: v.detach().clone().requires_grad_() for k, v in weights.items()}
    out = fn(*leaves, wleaves)
    g = torch.Generator().manual_seed(seed + 7)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    names = extension._weight_list({k: k for k in wleaves}, kind)
    inputs = leaves + [wleaves[n] for n in names]
    if out.numel() == 0:
        return out, [torch.zeros_like(t) for t in inputs], names
    return out, torch.autograd.grad(out, inputs, upstream), names


def _compare_with_grads(fn_cuda, fn_ref, tensors, weights, kind, tensor_names, rtol_rms=None):
    out, grads, names = _grads(fn_cuda, tensors, weights, kind)
    out_ref, grads_ref, _ = _grads(fn_ref, tensors, weights, kind)
    assert out.is_cuda
    assert_close(out, out_ref, rtol_rms=rtol_rms, name="output")
    for grad, grad_ref, name in zip(grads, grads_ref, list(tensor_names) + names):
        assert_close(grad, grad_ref, rtol_rms=rtol_rms, name=f"grad of {name}")


def _topk_routing(batch, num_experts, k, dtype, seed=6):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, num_experts, generator=g, dtype=torch.float64)
    topk_gates, topk_idx = scores.topk(k, dim=1)
    return (topk_gates / topk_gates.sum(-1, keepdim=True)).to(dtype).cuda(), topk_idx.cuda()


def _soft_gates(batch, num_experts, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_experts, generator=g, dtype=torch.float64).softmax(-1).to(dtype).cuda()


# ------------------------------------------------------------------------------------------------
# Grouping: exact against a stable torch.sort, and by invariants

def _sort_routing(expert_idx, num_experts):
    """The routing tensors from torch's own stable sort + bincount + cumsum (the specification)."""
    flat = expert_idx.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    order = torch.sort(flat, stable=True).indices
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    return [t.int() for t in (counts, offsets, order, pos)]


def _check_routing_invariants(r, expert_idx, num_experts):
    flat = expert_idx.reshape(-1).long()
    n = flat.numel()
    assert all(t.dtype == torch.int32 and t.is_cuda for t in r)
    assert torch.equal(r.expert_counts.long(), torch.bincount(flat, minlength=num_experts))
    assert r.expert_offsets[0] == 0 and torch.equal(r.expert_offsets[1:].long(), r.expert_counts.long().cumsum(0))
    arange = torch.arange(n, device=flat.device)
    assert torch.equal(r.sorted_token_idx.long().sort().values, arange)  # a permutation
    assert torch.equal(r.token_sorted_pos.long()[r.sorted_token_idx.long()], arange)  # its inverse
    keys = flat[r.sorted_token_idx.long()] * (n + 1) + r.sorted_token_idx.long()
    assert torch.all(keys[1:] > keys[:-1]), "rows must be sorted by expert, ascending (stable) within an expert"


GROUP_CASES = HARD_CASES + [
    ("one_block_boundary", 1024, 7, "uniform"),   # exactly one grouping block's rows
    ("many_blocks", 65536, 1024, "uniform"),      # 64 grouping blocks; the DESIGN.md benchmark size
    ("many_blocks_skewed", 100003, 64, "skewed"),  # prime B, blocks with very uneven keys
    ("keys_beyond_shared", 20000, 20000, "uniform"),  # histogram too large for shared memory: global path
]


@pytest.mark.parametrize("name,batch,num_experts,routing", GROUP_CASES, ids=[c[0] for c in GROUP_CASES])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_group_by_expert_matches_torch_sort(name, batch, num_experts, routing, index_dtype):
    expert_idx = routing_case(routing, batch, num_experts).to(index_dtype).cuda()
    r = ops.group_by_expert(expert_idx, num_experts, backend="cpp")
    for got, want, field in zip(r, _sort_routing(expert_idx, num_experts), r._fields):
        assert torch.equal(got, want), f"{field} differs from torch.sort"
    _check_routing_invariants(r, expert_idx, num_experts)


@pytest.mark.parametrize("batch,num_experts,k", [(13, 5, 2), (7, 3, 3), (1, 4, 1), (4099, 33, 4)],
                         ids=["k2", "k_eq_e", "b1", "k4_many_blocks"])
def test_group_by_expert_topk(batch, num_experts, k):
    g = torch.Generator().manual_seed(3)
    topk_idx = torch.rand(batch, num_experts, generator=g).topk(k, dim=1).indices.cuda()
    r = ops.group_by_expert(topk_idx, num_experts, backend="cpp")
    for got, want, field in zip(r, reference.group_by_expert(topk_idx, num_experts), r._fields):
        assert torch.equal(got, want), field
    _check_routing_invariants(r, topk_idx, num_experts)


def test_group_by_expert_is_asynchronous_and_deterministic():
    # No host synchronisation inside (it runs under a CUDA graph capture), the same result every time.
    expert_idx = routing_case("skewed", 50000, 17).cuda()
    first = torch.ops.smoe_fast.cpp_group_by_expert(expert_idx, 17)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.smoe_fast.cpp_group_by_expert(expert_idx, 17)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(first, captured):
        assert torch.equal(a, b)


def test_group_by_expert_out_of_range_sorts_after_every_expert():
    # check_indices=False with indices outside [0, E): no out-of-bounds access; those rows are left
    # out of the counts and placed after every expert's rows, in order (experts_cuda.h).
    expert_idx = torch.tensor([2, 7, 0, -1, 2, 1, 3], device="cuda")
    r = ops.group_by_expert(expert_idx, 3, backend="cpp", check_indices=False)
    assert r.expert_counts.tolist() == [1, 1, 2]
    assert r.expert_offsets.tolist() == [0, 1, 2, 4]
    assert r.sorted_token_idx.tolist() == [2, 5, 0, 4, 1, 3, 6]
    assert torch.equal(r.token_sorted_pos.long()[r.sorted_token_idx.long()], torch.arange(7, device="cuda"))


# ------------------------------------------------------------------------------------------------
# Hard-gated experts

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,batch,num_experts,routing,kind", _with_kinds(HARD_CASES, lambda c: c[1] <= 41))
def test_experts_hard_matches_reference(name, batch, num_experts, routing, kind, dtype):
    weights = _cuda_weights(kind, num_experts, dtype, seed=1)
    z = _z(batch, dtype)
    expert_idx = routing_case(routing, batch, num_experts).cuda()
    with torch.no_grad():
        out = ops.experts_hard(z, expert_idx, weights, kind=kind, backend="cpp")
    assert out.is_cuda
    assert_close(out, reference.experts_hard(z, expert_idx, weights, kind), name="x_hat")


@pytest.mark.parametrize("name,batch,num_experts,routing,kind", _with_kinds(HARD_CASES[:6], lambda c: c[1] <= 23))
def test_experts_hard_gradients(name, batch, num_experts, routing, kind):
    # Under autograd experts_hard runs as top-1 with unit gates: every gradient matches the reference.
    weights = _cuda_weights(kind, num_experts, torch.float32, seed=2)
    expert_idx = routing_case(routing, batch, num_experts).cuda()
    _compare_with_grads(lambda z_, w: ops.experts_hard(z_, expert_idx, w, kind=kind, backend="cpp"),
                        lambda z_, w: reference.experts_hard(z_, expert_idx, w, kind),
                        [_z(batch, torch.float32)], weights, kind, ["z"])


# ------------------------------------------------------------------------------------------------
# Soft-gated and top-k experts: forward and every gradient

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,batch,num_experts,kind", _with_kinds(SOFT_CASES, lambda c: c[1] * c[2] <= 60))
def test_experts_soft_forward_and_gradients(name, batch, num_experts, kind, dtype):
    weights = _cuda_weights(kind, num_experts, dtype, seed=3)
    _compare_with_grads(lambda z_, g_, w: ops.experts_soft(z_, g_, w, kind=kind, backend="cpp"),
                        lambda z_, g_, w: reference.experts_soft(z_, g_, w, kind),
                        [_z(batch, dtype), _soft_gates(batch, num_experts, dtype)], weights, kind, ["z", "gates"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,batch,num_experts,k,kind", _with_kinds(TOPK_CASES, lambda c: c[1] * c[3] <= 40))
def test_experts_topk_forward_and_gradients(name, batch, num_experts, k, kind, dtype):
    weights = _cuda_weights(kind, num_experts, dtype, seed=4)
    topk_gates, topk_idx = _topk_routing(batch, num_experts, k, dtype)
    _compare_with_grads(lambda z_, g_, w: ops.experts_topk(z_, topk_idx, g_, w, kind=kind, backend="cpp"),
                        lambda z_, g_, w: reference.experts_topk(z_, topk_idx, g_, w, kind),
                        [_z(batch, dtype), topk_gates], weights, kind, ["z", "topk_gates"])


def test_topk_all_tokens_on_one_expert():
    # Every slot of every token on expert 2 (duplicates within a token): one long run per phase.
    kind, batch, num_experts = "lite", 45, 4
    weights = _cuda_weights(kind, num_experts, torch.float32, seed=13)
    topk_idx = torch.full((batch, 2), 2, dtype=torch.int64, device="cuda")
    topk_gates = torch.full((batch, 2), 0.5, device="cuda")
    _compare_with_grads(lambda z_, g_, w: ops.experts_topk(z_, topk_idx, g_, w, kind=kind, backend="cpp"),
                        lambda z_, g_, w: reference.experts_topk(z_, topk_idx, g_, w, kind),
                        [_z(batch, torch.float32), topk_gates], weights, kind, ["z", "topk_gates"])


@pytest.mark.parametrize("kind", ["lite", "medium"])
def test_tf32_setting_is_followed_within_its_tolerance(kind):
    # With torch's TF32 switch on, the wide convolutions and their input gradients run on the tensor
    # cores in TF32 (sm_80+; experts_cuda.h "Precision"): x_hat and every gradient within the TF32
    # tolerance of the IEEE reference.
    batch, num_experts = (33, 5) if kind == "lite" else (9, 3)
    weights = _cuda_weights(kind, num_experts, torch.float32, seed=14)
    gates = _soft_gates(batch, num_experts, torch.float32)
    z = _z(batch, torch.float32)
    expected, expected_grads, names = _grads(lambda z_, g_, w: reference.experts_soft(z_, g_, w, kind), [z, gates],
                                             weights, kind)
    matmul = torch.backends.cuda.matmul  # restored by conftest's _ieee_fp32 fixture
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32"  # the API conftest uses: torch refuses a mix with allow_tf32
    else:
        matmul.allow_tf32 = True
    out, grads, _ = _grads(lambda z_, g_, w: ops.experts_soft(z_, g_, w, kind=kind, backend="cpp"), [z, gates],
                           weights, kind)
    assert_close(out, expected, rtol_rms=1e-3, name="x_hat (TF32 allowed)")
    for g, g_ref, name in zip(grads, expected_grads, ["z", "gates", *names]):
        assert_close(g, g_ref, rtol_rms=1e-3, name=f"grad of {name} (TF32 allowed)")


HALF_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("kind,gating", [("lite", "soft"), ("lite", "topk"), ("mlp", "soft"), ("mlp", "topk"),
                                         ("medium", "topk")])
def test_training_under_autocast(kind, gating, dtype):
    # Autocast: z in the autocast dtype, fp32 weights (masters) and gates. The wide convolutions and
    # their input gradients multiply in that dtype on the tensor cores (sm_80+; experts_cuda.h
    # "Precision"), all else in fp32, everything accumulated in fp32: x_hat and dz in the autocast dtype, weight gradients in fp32, every one
    # within 2x the error of the reference run under the same autocast, against fp64 (DESIGN.md).
    batch, num_experts = (64, 5) if kind != "medium" else (16, 3)
    weights = _cuda_weights(kind, num_experts, torch.float32, seed=15)
    z = _z(batch, torch.float32)
    if gating == "soft":
        gates = _soft_gates(batch, num_experts, torch.float32)
        fns = {"cpp": lambda z_, g_, w: ops.experts_soft(z_, g_, w, kind=kind, backend="cpp"),
               "reference": lambda z_, g_, w: reference.experts_soft(z_, g_, w, kind)}
    else:
        gates, topk_idx = _topk_routing(batch, num_experts, 2, torch.float32)
        fns = {"cpp": lambda z_, g_, w: ops.experts_topk(z_, topk_idx, g_, w, kind=kind, backend="cpp"),
               "reference": lambda z_, g_, w: reference.experts_topk(z_, topk_idx, g_, w, kind)}
    names = ["z", "gates", *extension._weight_list({k: k for k in weights}, kind)]

    def outputs(backend, z_, g_, w, autocast):
        leaves = [z_.detach().clone().requires_grad_(), g_.detach().clone().requires_grad_()]
        wl = {k: v.detach().clone().requires_grad_() for k, v in w.items()}
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            out = fns[backend](leaves[0], leaves[1], wl)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        inputs = leaves + [wl[n] for n in names[2:]]
        return out, torch.autograd.grad(out, inputs, upstream.to(out.dtype).cuda())

    exact, exact_grads = outputs("reference", z.double(), gates.double(), {k: v.double() for k, v in weights.items()}, False)
    got, got_grads = outputs("cpp", z, gates, weights, True)
    ref, ref_grads = outputs("reference", z, gates, weights, True)
    assert got.dtype == dtype and got_grads[0].dtype == torch.float32  # dz back through autocast's cast of z
    for name, g in zip(names[1:], got_grads[1:]):
        assert g.dtype == torch.float32, f"d {name} is {g.dtype}: gate and weight gradients must be fp32"
    for name, g_got, g_ref, g_exact in zip(["x_hat", *names], (got, *got_grads), (ref, *ref_grads), (exact, *exact_grads)):
        assert_within_half_tolerance(g_got, g_exact, g_ref, name=f"{kind} {gating} {dtype} {name}")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_half_model(kind, dtype):
    # A model cast to fp16 / bf16: z and weights in that dtype. The wide convolutions and their input
    # gradients multiply in that dtype on the tensor cores (sm_80+), all else in fp32, accumulated in
    # fp32; x_hat (hard, top-k) and every gradient within DESIGN.md's half tolerance: 2x the error of the
    # reference run in the same dtype, against fp64 on the same (rounded) values.
    batch, num_experts = (29, 5) if kind != "medium" else (9, 3)
    weights = {k: v.to(dtype) for k, v in _cuda_weights(kind, num_experts, torch.float32, seed=16).items()}
    exact_weights = {k: v.double() for k, v in weights.items()}
    z = _z(batch, dtype)
    expert_idx = routing_case("skewed", batch, num_experts).cuda()
    with torch.no_grad():
        out = ops.experts_hard(z, expert_idx, weights, kind=kind, backend="cpp")
        exact = reference.experts_hard(z.double(), expert_idx, exact_weights, kind)
        ref = reference.experts_hard(z, expert_idx, weights, kind)
    assert out.dtype == dtype
    assert_within_half_tolerance(out, exact, ref, name="hard x_hat")
    gates, topk_idx = _topk_routing(batch, num_experts, 2, dtype)
    out, grads, names = _grads(lambda z_, g_, w: ops.experts_topk(z_, topk_idx, g_, w, kind=kind, backend="cpp"),
                               [z, gates], weights, kind)
    topk_reference = lambda z_, g_, w: reference.experts_topk(z_, topk_idx, g_, w, kind)  # noqa: E731
    out_exact, grads_exact, _ = _grads(topk_reference, [z.double(), gates.double()], exact_weights, kind)
    out_ref, grads_ref, _ = _grads(topk_reference, [z, gates], weights, kind)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_within_half_tolerance(out, out_exact, out_ref, name="top-k x_hat")
    for g, g_exact, g_ref, name in zip(grads, grads_exact, grads_ref, ["z", "gates", *names]):
        assert_within_half_tolerance(g, g_exact, g_ref, name=f"grad of {name}")


# ------------------------------------------------------------------------------------------------
# Layouts, NaN, out-of-range indices, determinism

def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a strided (every other row, non-contiguous) layout."""
    out = torch.empty((2 * t.shape[0],) + t.shape[1:], dtype=t.dtype, device=t.device)[::2]
    out.copy_(t)
    assert not out.is_contiguous()
    return out


def test_non_contiguous_inputs():
    # z (also a transposed view), gates, indices and weights non-contiguous.
    kind, batch, num_experts = "lite", 19, 4
    weights = _cuda_weights(kind, num_experts, torch.float32, seed=8)
    weights_nc = {k: _non_contiguous(v) for k, v in weights.items()}
    z = _z(batch, torch.float32)
    z_t = z.t().contiguous().t()
    assert not z_t.is_contiguous()
    gates = _soft_gates(batch, num_experts, torch.float32)
    topk_gates, topk_idx = gates.topk(2, dim=1)
    expert_idx = routing_case("uniform", batch, num_experts).cuda()
    with torch.no_grad():
        assert_close(ops.experts_hard(z_t, _non_contiguous(expert_idx), weights_nc, kind=kind, backend="cpp"),
                     reference.experts_hard(z, expert_idx, weights, kind), name="hard")
        assert_close(ops.experts_topk(_non_contiguous(z), _non_contiguous(topk_idx), _non_contiguous(topk_gates),
                                      weights_nc, kind=kind, backend="cpp"),
                     reference.experts_topk(z, topk_idx, topk_gates, weights, kind), name="topk")
    _compare_with_grads(lambda z_, g_, w: ops.experts_soft(z_, g_, w, kind=kind, backend="cpp"),
                        lambda z_, g_, w: reference.experts_soft(z_, g_, w, kind),
                        [_non_contiguous(z), _non_contiguous(gates)], weights_nc, kind, ["z", "gates"])


@pytest.mark.parametrize("kind", KINDS)
def test_nan_stays_in_its_token(kind):
    # Token 1 is NaN: ELU / sigmoid keep NaN (no fminf/fmaxf-style clamps), and the other tokens of
    # its tile (tiles hold 4 tokens of one expert) are untouched. (No inf here: cuDNN's Winograd
    # convolutions in the reference can turn inf into NaN on their own.)
    weights = _cuda_weights(kind, 2, torch.float32, seed=12)
    z = _z(9, torch.float32)
    z[1, 0] = float("nan")
    expert_idx = torch.tensor([0, 0, 0, 0, 0, 1, 1, 0, 1], device="cuda")
    with torch.no_grad():
        out = ops.experts_hard(z, expert_idx, weights, kind=kind, backend="cpp")
        expected = reference.experts_hard(z, expert_idx, weights, kind)
    assert torch.equal(torch.isnan(out), torch.isnan(expected)), "NaN pattern differs from the reference"
    keep = torch.arange(9, device="cuda") != 1
    assert torch.isnan(out[1]).all() and not torch.isnan(out[keep]).any()
    assert_close(out[keep], expected[keep], name="the other tokens")


def test_nan_token_gradients_stay_in_their_token():
    # Backward with one NaN token: grad_z and grad_gates of the other tokens match the reference.
    kind, batch, num_experts = "lite", 12, 3
    weights = _cuda_weights(kind, num_experts, torch.float32, seed=15)
    z = _z(batch, torch.float32)
    z[5, 3] = float("nan")
    gates = _soft_gates(batch, num_experts, torch.float32)
    upstream = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(3)).cuda()
    wl = extension._weight_list(weights, kind)
    grad_z, grad_gates, _ = torch.ops.smoe_fast.cpp_experts_soft_bwd(upstream, z, gates, wl, kind)
    z_ref, g_ref = z.clone().requires_grad_(), gates.clone().requires_grad_()
    reference.experts_soft(z_ref, g_ref, weights, kind).backward(upstream)
    keep = torch.arange(batch, device="cuda") != 5
    assert torch.isnan(grad_z[5]).all() and torch.isnan(grad_gates[5]).all()
    assert_close(grad_z[keep], z_ref.grad[keep], name="grad_z of the finite tokens")
    assert_close(grad_gates[keep], g_ref.grad[keep], name="grad_gates of the finite tokens")


def test_out_of_range_expert_gives_nan_rows():
    # check_indices=False with bad indices: never out of bounds; those tokens' outputs (and, in the
    # backward, their grad_z and gate gradient) are NaN, every other token is exact (experts_cuda.h).
    kind, batch, num_experts = "lite", 10, 3
    weights = _cuda_weights(kind, num_experts, torch.float32, seed=16)
    z = _z(batch, torch.float32)
    expert_idx = torch.tensor([0, 1, 99, 2, -5, 1, 0, 2, 1, 0], device="cuda")
    good = (expert_idx >= 0) & (expert_idx < num_experts)
    with torch.no_grad():
        out = ops.experts_hard(z, expert_idx, weights, kind=kind, backend="cpp", check_indices=False)
        expected = reference.experts_hard(z[good], expert_idx[good], weights, kind)
    assert torch.isnan(out[~good]).all()
    assert_close(out[good], expected, name="tokens with valid experts")
    topk_idx = torch.stack([expert_idx, (expert_idx.abs() + 1) % num_experts], 1)
    topk_gates = torch.full((batch, 2), 0.5, device="cuda")
    upstream = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(4)).cuda()
    wl = extension._weight_list(weights, kind)
    grad_z, grad_gates, grad_weights = torch.ops.smoe_fast.cpp_experts_topk_bwd(upstream, z, topk_idx, topk_gates, wl, kind)
    assert torch.isnan(grad_z[~good]).all() and torch.isnan(grad_gates[~good, 0]).all()
    assert not torch.isnan(grad_z[good]).any() and not torch.isnan(grad_gates[:, 1]).any()
    assert all(torch.isfinite(g).all() for g in grad_weights), "an out-of-range row touched a weight gradient"


@pytest.mark.parametrize("mode", ["soft", "topk"])
def test_weight_gradients_are_bitwise_deterministic(mode):
    # Many chunks per expert (partial slots and their segment sums): two runs must agree bitwise.
    kind, batch, num_experts = "lite", 2000, 4
    weights = _cuda_weights(kind, num_experts, torch.float32, seed=9)
    z = _z(batch, torch.float32)
    upstream = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(2)).cuda()
    wl = extension._weight_list(weights, kind)
    if mode == "soft":
        gates = _soft_gates(batch, num_experts, torch.float32)
        run = lambda: torch.ops.smoe_fast.cpp_experts_soft_bwd(upstream, z, gates, wl, kind)  # noqa: E731
    else:
        topk_gates, topk_idx = _topk_routing(batch, num_experts, 2, torch.float32)
        run = lambda: torch.ops.smoe_fast.cpp_experts_topk_bwd(upstream, z, topk_idx, topk_gates, wl, kind)  # noqa: E731
    first, second = run(), run()
    for a, b in zip([first[0], first[1], *first[2]], [second[0], second[1], *second[2]]):
        assert torch.equal(a, b), "two identical backward runs must give bitwise equal gradients"


def test_model_runs_on_cpp_backend_on_gpu():
    import smoe_fast

    torch.manual_seed(0)
    x = torch.rand(6, 1, 28, 28, device="cuda")
    model = smoe_fast.SMoEVAE(num_experts=3, backend="cpp").cuda()
    ref = smoe_fast.SMoEVAE(num_experts=3, backend="reference").cuda()
    ref.load_state_dict(model.state_dict())
    for train in (True, False):
        model.train(train)
        ref.train(train)
        assert_close(model(x, sample=False).recon, ref(x, sample=False).recon, name=f"recon (train={train})")
    model.train()
    smoe_fast.smoe_loss(model(x), x, num_experts=3).total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_opcheck_on_cuda():
    kind, batch, num_experts = "lite", 5, 3
    weights = extension._weight_list(_cuda_weights(kind, num_experts, torch.float32, seed=10), kind)
    z = _z(batch, torch.float32)
    gates = _soft_gates(batch, num_experts, torch.float32)
    topk_gates, topk_idx = gates.topk(2, dim=1)
    upstream = torch.randn(batch, 1, 28, 28, device="cuda")
    lib = torch.ops.smoe_fast
    torch.library.opcheck(lib.cpp_group_by_expert.default, (topk_idx, num_experts))
    torch.library.opcheck(lib.cpp_experts_hard.default, (z, topk_idx[:, 0], weights, kind))
    torch.library.opcheck(lib.cpp_experts_soft_bwd.default, (upstream, z, gates, weights, kind))
    torch.library.opcheck(lib.cpp_experts_topk_bwd.default, (upstream, z, topk_idx, topk_gates, weights, kind))
