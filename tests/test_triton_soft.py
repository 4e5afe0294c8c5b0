"""Triton soft-gated experts (kernels/experts_soft.py) against the reference: forward and every gradient.

Runs the kernels in the Triton interpreter on CPU (tests/conftest.py); shapes are small because the
interpreter is slow (lite costs about a second per (16-token block, expert) pair).
"""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close, assert_grads_close, assert_within_half_tolerance, random_weights
from smoe_fast import reference

triton = pytest.importorskip("triton")
from smoe_fast.kernels.experts_soft import experts_soft  # noqa: E402

LATENT = 32


def _gates(batch: int, num_experts: int, style: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_experts, generator=g)
    if style == "skewed":
        logits = logits + torch.linspace(6.0, -6.0, num_experts)
    gates = logits.softmax(-1)
    if style == "zeros":
        gates = gates * (torch.rand(batch, num_experts, generator=g) > 0.5)
    return gates


def _inputs(kind: str, batch: int, num_experts: int, style: str, strided: bool, seed: int = 0):
    """(z, gates, weights, leaves): z and gates are strided views of bigger leaves when ``strided``."""
    weights = random_weights(kind, num_experts, LATENT, seed=seed + 1, requires_grad=True)
    g = torch.Generator().manual_seed(seed)
    gates_value = _gates(batch, num_experts, style, seed)
    if strided:
        z_leaf = torch.randn(batch, 2 * LATENT, generator=g).requires_grad_(True)
        gates_leaf = torch.stack([gates_value, gates_value], -1).reshape(batch, 2 * num_experts).requires_grad_(True)
        z, gates = z_leaf[:, ::2], gates_leaf[:, ::2]
        assert z.stride(1) == 2 and gates.stride(1) == 2
    else:
        z_leaf = z = torch.randn(batch, LATENT, generator=g).requires_grad_(True)
        gates_leaf = gates = gates_value.clone().requires_grad_(True)
    return z, gates, weights, [z_leaf, gates_leaf, *weights.values()]


def _check_against_reference(kind, batch, num_experts, style, strided):
    z, gates, weights, leaves = _inputs(kind, batch, num_experts, style, strided)
    expected = reference.experts_soft(z, gates, weights, kind)
    actual = experts_soft(z, gates, weights, kind)
    assert_grads_close(actual, expected, leaves, ["z", "gates", *weights])


CASES = [
    # (kind, B, E, gate style, strided z/gates)
    pytest.param("mlp", 1, 1, "uniform", False, id="mlp-B1-E1"),                  # one token, one expert
    pytest.param("mlp", 5, 17, "skewed", False, id="mlp-B5-E17-skewed"),          # prime E > B, near one-hot gates
    pytest.param("mlp", 64, 8, "zeros", True, id="mlp-B64-E8-zero-gates-strided"),  # 4 full token blocks, exact zero gates, strided views
    pytest.param("mlp", 17, 3, "uniform", True, id="mlp-B17-E3-strided"),         # one row past a block boundary
    pytest.param("lite", 5, 3, "uniform", False, id="lite-B5-E3"),                # partial block, several experts
    pytest.param("lite", 17, 1, "skewed", True, id="lite-B17-E1-strided"),        # block boundary, single expert, strided
    pytest.param("lite", 1, 8, "zeros", False, id="lite-B1-E8-zero-gates"),       # one token, exact zero gates
]


@pytest.mark.parametrize("kind, batch, num_experts, style, strided", CASES)
def test_forward_and_gradients_match_reference(kind, batch, num_experts, style, strided):
    _check_against_reference(kind, batch, num_experts, style, strided)


def test_lite_forward_with_half_maps_is_within_the_half_tolerance(monkeypatch):
    # The GPU's half GEMM modes keep the forward's maps in bf16 (decoder_tiles.map_dtype); the
    # interpreter runs IEEE dots, so this checks the half maps' addressing in the gated-accumulate
    # mode (three experts summed in place) against the reference run in bf16.
    import importlib

    monkeypatch.setattr(importlib.import_module("smoe_fast.kernels.experts_soft"), "map_dtype", lambda dot: "bf16")
    z, gates, weights, _ = _inputs("lite", 5, 3, "uniform", False)
    with torch.no_grad():
        exact = reference.experts_soft(z.double(), gates.double(), {k: w.double() for k, w in weights.items()}, "lite")
        in_bf16 = reference.experts_soft(z.bfloat16(), gates.bfloat16(), {k: w.bfloat16() for k, w in weights.items()},
                                         "lite")
        assert_within_half_tolerance(experts_soft(z, gates, weights, "lite"), exact, in_bf16, name="lite bf16 maps")


@pytest.mark.parametrize("kind", ["mlp", "lite"])
def test_empty_batch(kind):
    # B = 0: an empty result and empty / zero gradients, no launch
    z, gates, weights, leaves = _inputs(kind, 0, 3, "uniform", False)
    out = experts_soft(z, gates, weights, kind)
    assert out.shape == (0, 1, 28, 28)
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    for name, g, leaf in zip(["z", "gates", *weights], grads, leaves):
        assert g is None or (g.shape == leaf.shape and not g.any()), name


@pytest.mark.parametrize("kind, batch, num_experts", [
    pytest.param("mlp", 33, 3, id="mlp-B33-E3"),   # three token blocks reduced per expert
    pytest.param("lite", 17, 1, id="lite-B17-E1"),  # two token runs of one expert summed as partials
])
def test_weight_gradients_are_deterministic(kind, batch, num_experts):
    z, gates, weights, leaves = _inputs(kind, batch, num_experts, "uniform", False)
    grad_out = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    first = torch.autograd.grad(experts_soft(z, gates, weights, kind), leaves, grad_out)
    second = torch.autograd.grad(experts_soft(z, gates, weights, kind), leaves, grad_out)
    for name, a, b in zip(["z", "gates", *weights], first, second):
        assert torch.equal(a, b), f"d {name} differs between two identical backward runs"


@pytest.mark.parametrize("kind", ["mlp", "lite"])
def test_grid_splits_match_reference(kind, monkeypatch):
    # a 6-program grid with B = 20 (2 token blocks), E = 5: the forward splits the experts into 3
    # groups of 2, 2 and 1 (partial outputs summed over groups); the backward into 3 groups x 2 token
    # runs (dz added expert by expert into each group's partial row, weight partials summed over runs)
    import importlib

    from smoe_fast.kernels import decoder_blocks
    monkeypatch.setattr(importlib.import_module("smoe_fast.kernels.experts_soft"), "max_programs", lambda device: 6)
    weights_per_expert = sum(decoder_blocks.partial_layout(kind, LATENT, 256))
    assert decoder_blocks.soft_forward_split(20, 5, 6, 16) == (2, 3, 2)
    assert decoder_blocks.soft_backward_split(20, 5, 6, 16, weights_per_expert, LATENT) == (3, 2, 2, 1)
    _check_against_reference(kind, 20, 5, "uniform", False)


@pytest.mark.parametrize("tile", [
    pytest.param({"BM": 16, "TS": 2, "BR": 64, "num_warps": 16}, id="gpu-TS2-BR64"),  # the GPU default tile
    pytest.param({"BM": 16, "TS": 4, "BR": 32, "num_warps": 8}, id="TS4-BR32"),       # 4 token groups per tile
])
def test_lite_gpu_tiles_match_reference(tile, monkeypatch):
    # B = 19: a full token block then 3 tokens (a partial last group of TS with stale slots), E = 2
    import importlib
    module = importlib.import_module("smoe_fast.kernels.experts_soft")
    monkeypatch.setattr(module, "training_lite_fwd_config", lambda arch, *mode: dict(tile))
    monkeypatch.setattr(module, "training_lite_bwd_config", lambda arch, *mode: dict(tile))
    _check_against_reference("lite", 19, 2, "uniform", True)


@pytest.mark.parametrize("block_n", [16, 32], ids=["BN16-gpu-ieee-small-smem", "BN32-gpu"])
def test_mlp_gpu_tiles_match_reference(block_n, monkeypatch):
    # the GPU's output-pixel tiles (the interpreter takes 64): 784 = 49 x 16, and 24.5 x 32 (a masked tail)
    import importlib
    module = importlib.import_module("smoe_fast.kernels.experts_soft")
    tile = {"BM": 16, "BN": block_n, "num_warps": 8, "num_stages": 1}
    monkeypatch.setattr(module, "training_mlp_config", lambda arch, *args: dict(tile))
    _check_against_reference("mlp", 19, 2, "uniform", True)


def test_soft_splits_are_bounded_by_the_grid_not_by_experts():
    # an H100's 264 programs at B = 1,024: the partial outputs and partial dz have at most a grid's
    # worth of rows whatever E; only the weight-gradient partials (O(E * weights)) grow with E
    from smoe_fast.kernels.decoder_blocks import soft_backward_split, soft_forward_split
    lite_weights = 392 * LATENT + 392 + 4 * 32 * 16 + 16 + 4 * 64 + 1
    for num_experts in (1, 7, 64, 256, 1024, 8192):
        n_blocks, groups, per_group = soft_forward_split(1024, num_experts, 264, 16)
        assert groups * per_group >= num_experts > (groups - 1) * per_group
        assert n_blocks * groups <= 264 or groups == 1
        groups, per_group, runs, blocks_per_run = soft_backward_split(1024, num_experts, 264, 16, lite_weights, LATENT)
        assert groups * per_group >= num_experts > (groups - 1) * per_group
        assert runs * blocks_per_run >= n_blocks > (runs - 1) * blocks_per_run
        assert groups <= 264 and 8 * groups * runs >= 7 * min(264, num_experts * n_blocks)


@pytest.mark.parametrize("kind", ["mlp", "lite"])
def test_backward_keeps_only_the_inputs(kind):
    # recompute, not store: what autograd saves for the backward is z, the gates and the weights
    z, gates, weights, _ = _inputs(kind, 3, 4, "uniform", False)
    inputs = {t.data_ptr() for t in (z, gates, *weights.values())}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        experts_soft(z, gates, weights, kind)
    assert saved and all(t.data_ptr() in inputs for t in saved), [tuple(t.shape) for t in saved]


def test_opcheck():
    # schema, fake tensor, autograd registration and AOT dispatch of the custom op
    from smoe_fast.kernels.decoder_blocks import kernel_weights
    z, gates, weights, _ = _inputs("mlp", 3, 2, "uniform", False)
    ws = [w.detach().requires_grad_(True) for w in kernel_weights(weights, "mlp")]
    torch.library.opcheck(torch.ops.smoe_fast.triton_experts_soft.default, (z, gates, ws, "mlp"))


def test_medium_runs_layer_by_layer():
    # medium is not fused: it goes layer by layer (kernels/experts_medium.py; gradients in test_triton_medium.py)
    z, gates, weights, _ = _inputs("medium", 2, 2, "uniform", False)
    assert_close(experts_soft(z, gates, weights, "medium"), reference.experts_soft(z, gates, weights, "medium"),
                 name="x_hat")


def test_torch_compile_traces_forward_and_backward():
    # fullgraph: the custom op's fake and registered backward let dynamo/AOT autograd trace a training step
    z, gates, weights, leaves = _inputs("mlp", 3, 2, "uniform", False)

    def loss(z, gates):
        return (experts_soft(z, gates, weights, "mlp") - 0.5).pow(2).mean()

    want = torch.autograd.grad(loss(z, gates), leaves)
    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(z, gates), leaves)
    for name, g_actual, g_expected in zip(["z", "gates", *weights], got, want):
        assert_close(g_actual, g_expected, name=f"d {name}")
