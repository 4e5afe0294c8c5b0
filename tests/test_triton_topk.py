"""Triton top-k experts (kernels/experts_topk.py) against the reference: forward and every gradient.

Runs the kernels in the Triton interpreter on CPU (tests/conftest.py); shapes are small because the
interpreter is slow (lite costs about a second per 16-row expert tile).
"""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close, assert_grads_close, assert_within_half_tolerance, random_weights, routing_case
from smoe_fast import reference

triton = pytest.importorskip("triton")
from smoe_fast.kernels.experts_topk import experts_topk  # noqa: E402

LATENT = 32


def _topk(batch: int, num_experts: int, top_k: int, routing: str, seed: int):
    """(topk_idx [B,K], renormalised topk gates [B,K]) for a named routing."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_experts, generator=g)
    if routing in ("one_expert", "even_only"):
        # top-1 cases straight from the shared routing catalogue
        assert top_k == 1
        idx = routing_case(routing, batch, num_experts, seed)[:, None]
        return idx, torch.rand(batch, 1, generator=g) + 0.5
    if routing == "skewed":
        logits = logits + torch.linspace(6.0, -6.0, num_experts)
    values, idx = logits.softmax(-1).topk(top_k, dim=-1)
    gates = values / values.sum(-1, keepdim=True)
    if routing == "zeros":
        gates = gates * (torch.rand(batch, top_k, generator=g) > 0.5)
    return idx, gates


def _inputs(kind, batch, num_experts, top_k, routing, strided, seed=0):
    weights = random_weights(kind, num_experts, LATENT, seed=seed + 1, requires_grad=True)
    idx, gates_value = _topk(batch, num_experts, top_k, routing, seed)
    g = torch.Generator().manual_seed(seed + 2)
    if strided:
        z_leaf = torch.randn(batch, 2 * LATENT, generator=g).requires_grad_(True)
        gates_leaf = torch.stack([gates_value, gates_value], -1).reshape(batch, 2 * top_k).requires_grad_(True)
        z, gates = z_leaf[:, ::2], gates_leaf[:, ::2]
        assert z.stride(1) == 2 and gates.stride(1) == 2
    else:
        z_leaf = z = torch.randn(batch, LATENT, generator=g).requires_grad_(True)
        gates_leaf = gates = gates_value.clone().requires_grad_(True)
    return z, idx, gates, weights, [z_leaf, gates_leaf, *weights.values()]


CASES = [
    # (kind, B, E, K, routing, strided z/gates)
    pytest.param("mlp", 5, 1, 1, "uniform", False, id="mlp-B5-E1-K1"),               # k = E = 1
    pytest.param("mlp", 64, 17, 2, "skewed", False, id="mlp-B64-E17-K2-skewed"),      # prime E, multi-tile and empty experts
    pytest.param("mlp", 5, 3, 3, "uniform", True, id="mlp-B5-E3-K3-strided"),         # k = E: every expert, strided views
    pytest.param("mlp", 1, 8, 2, "zeros", True, id="mlp-B1-E8-K2-zero-gates"),        # one token, exact zero gates, strided
    pytest.param("mlp", 33, 8, 1, "one_expert", False, id="mlp-B33-E8-K1-one-expert"),  # all rows on one expert, 3 tiles
    pytest.param("mlp", 5, 8, 8, "zeros", False, id="mlp-B5-E8-K8-zero-gates"),       # k = E = 8, exact zero gates
    pytest.param("lite", 5, 3, 2, "uniform", False, id="lite-B5-E3-K2"),              # several experts, partial tiles
    pytest.param("lite", 5, 17, 1, "even_only", True, id="lite-B5-E17-K1-even-only"),  # E > B, odd experts empty, strided
    pytest.param("lite", 17, 8, 1, "one_expert", False, id="lite-B17-E8-K1-one-expert"),  # one expert, tile boundary
]


@pytest.mark.parametrize("kind, batch, num_experts, top_k, routing, strided", CASES)
def test_forward_and_gradients_match_reference(kind, batch, num_experts, top_k, routing, strided):
    z, idx, gates, weights, leaves = _inputs(kind, batch, num_experts, top_k, routing, strided)
    expected = reference.experts_topk(z, idx, gates, weights, kind)
    actual = experts_topk(z, idx, gates, weights, kind)
    assert_grads_close(actual, expected, leaves, ["z", "topk_gates", *weights])


def test_lite_forward_with_half_maps_is_within_the_half_tolerance(monkeypatch):
    # The GPU's half GEMM modes keep the forward's maps in bf16 (decoder_tiles.map_dtype); the
    # interpreter runs IEEE dots, so this checks the half maps' addressing in the gated mode (one
    # (token, slot) row per image) against the reference run in bf16.
    import importlib

    monkeypatch.setattr(importlib.import_module("smoe_fast.kernels.experts_topk"), "map_dtype", lambda dot: "bf16")
    z, idx, gates, weights, _ = _inputs("lite", 5, 3, 2, "uniform", False)
    with torch.no_grad():
        exact = reference.experts_topk(z.double(), idx, gates.double(), {k: w.double() for k, w in weights.items()},
                                       "lite")
        in_bf16 = reference.experts_topk(z.bfloat16(), idx, gates.bfloat16(),
                                         {k: w.bfloat16() for k, w in weights.items()}, "lite")
        assert_within_half_tolerance(experts_topk(z, idx, gates, weights, "lite"), exact, in_bf16,
                                     name="lite bf16 maps")


@pytest.mark.parametrize("tile", [
    pytest.param({"BM": 16, "TS": 2, "BR": 64, "num_warps": 16}, id="gpu-TS2-BR64"),  # the GPU default tile
    pytest.param({"BM": 16, "TS": 4, "BR": 32, "num_warps": 8}, id="TS4-BR32"),       # 4 token groups per tile
])
def test_lite_gpu_tiles_match_reference(tile, monkeypatch):
    # the interpreter's default lite tile is one group of 16 tokens; the GPU's loops over groups of TS
    # tokens with a last, partial group (stale slots masked), and over BR-row steps
    import importlib
    module = importlib.import_module("smoe_fast.kernels.experts_topk")
    monkeypatch.setattr(module, "training_lite_fwd_config", lambda arch, *mode: dict(tile))
    monkeypatch.setattr(module, "training_lite_bwd_config", lambda arch, *mode: dict(tile))
    z, idx, gates, weights, leaves = _inputs("lite", 13, 3, 2, "uniform", False)
    expected = reference.experts_topk(z, idx, gates, weights, "lite")
    actual = experts_topk(z, idx, gates, weights, "lite")
    assert_grads_close(actual, expected, leaves, ["z", "topk_gates", *weights])


@pytest.mark.parametrize("block_n", [16, 32], ids=["BN16-gpu-ieee-small-smem", "BN32-gpu"])
def test_mlp_gpu_tiles_match_reference(block_n, monkeypatch):
    # the GPU's output-pixel tiles (the interpreter takes 64): 784 = 49 x 16, and 24.5 x 32 (a masked tail)
    import importlib
    module = importlib.import_module("smoe_fast.kernels.experts_topk")
    tile = {"BM": 16, "BN": block_n, "num_warps": 8, "num_stages": 1}
    monkeypatch.setattr(module, "training_mlp_config", lambda arch, *args: dict(tile))
    z, idx, gates, weights, leaves = _inputs("mlp", 13, 3, 2, "uniform", False)
    expected = reference.experts_topk(z, idx, gates, weights, "mlp")
    actual = experts_topk(z, idx, gates, weights, "mlp")
    assert_grads_close(actual, expected, leaves, ["z", "topk_gates", *weights])


@pytest.mark.parametrize("kind", ["mlp", "lite"])
def test_empty_batch(kind):
    # B = 0: an empty result and zero gradients
    z, idx, gates, weights, leaves = _inputs(kind, 0, 3, 2, "uniform", False)
    out = experts_topk(z, idx, gates, weights, kind)
    assert out.shape == (0, 1, 28, 28)
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    for name, g, leaf in zip(["z", "topk_gates", *weights], grads, leaves):
        assert g is None or (g.shape == leaf.shape and not g.any()), name


@pytest.mark.parametrize("kind, batch, num_experts, top_k", [
    pytest.param("mlp", 40, 2, 2, id="mlp-B40-E2-K2"),  # several tiles per expert, segment-summed
    pytest.param("lite", 17, 1, 1, id="lite-B17-E1-K1"),  # two tiles of one expert, segment-summed
])
def test_weight_gradients_are_deterministic(kind, batch, num_experts, top_k):
    z, idx, gates, weights, leaves = _inputs(kind, batch, num_experts, top_k, "uniform", False)
    grad_out = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    first = torch.autograd.grad(experts_topk(z, idx, gates, weights, kind), leaves, grad_out)
    second = torch.autograd.grad(experts_topk(z, idx, gates, weights, kind), leaves, grad_out)
    for name, a, b in zip(["z", "topk_gates", *weights], first, second):
        assert torch.equal(a, b), f"d {name} differs between two identical backward runs"


def test_opcheck():
    # schema, fake tensor, autograd registration and AOT dispatch of the custom op
    from smoe_fast.kernels.decoder_blocks import BLOCK_M, kernel_weights
    from smoe_fast.kernels.launch import tile_offsets
    z, idx, gates, weights, _ = _inputs("mlp", 3, 2, 2, "uniform", False)
    routing = reference.group_by_expert(idx, 2)
    ws = [w.detach().requires_grad_(True) for w in kernel_weights(weights, "mlp")]
    args = (z, gates, routing.sorted_token_idx, routing.expert_offsets, tile_offsets(routing.expert_counts, BLOCK_M), ws, "mlp")
    torch.library.opcheck(torch.ops.smoe_fast.triton_experts_topk.default, args)


def test_medium_runs_layer_by_layer():
    # medium is not fused: it goes layer by layer (kernels/experts_medium.py; gradients in test_triton_medium.py)
    z, idx, gates, weights, _ = _inputs("medium", 2, 2, 1, "uniform", False)
    assert_close(experts_topk(z, idx, gates, weights, "medium"),
                 reference.experts_topk(z, idx, gates, weights, "medium"), name="x_hat")


def test_torch_compile_traces_forward_and_backward():
    # fullgraph: grouping, tile offsets and the custom op trace without a host synchronisation
    z, idx, gates, weights, leaves = _inputs("mlp", 3, 2, 2, "uniform", False)

    def loss(z, gates):
        return (experts_topk(z, idx, gates, weights, "mlp") - 0.5).pow(2).mean()

    want = torch.autograd.grad(loss(z, gates), leaves)
    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(z, gates), leaves)
    for name, g_actual, g_expected in zip(["z", "topk_gates", *weights], got, want):
        assert_close(g_actual, g_expected, name=f"d {name}")
