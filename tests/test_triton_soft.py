"""Triton soft-gated experts (kernels/experts_soft.py) against the reference: forward and every gradient.

Runs the kernels in the Triton interpreter on CPU (tests/conftest.py); shapes are small because the
interpreter is slow (lite costs about a second per (16-token block, expert) pair).
"""
from __future__ import annotations

import pytest
import torch

from helpers import assert_close, assert_grads_close, random_weights
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
