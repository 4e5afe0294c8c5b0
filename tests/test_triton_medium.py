"""Triton medium-decoder experts (kernels/experts_medium.py, kernels/grouped_layers.py) against the
reference: soft and top-k gating, forward and every gradient.

Runs in the Triton interpreter on CPU (tests/conftest.py). The medium decoder costs about ten seconds
per forward + backward there even for a handful of rows, so the cases are tiny (B <= 5, E <= 3, latent 4).
"""
from __future__ import annotations

import pytest
import torch

from helpers import assert_grads_close, random_weights
from smoe_fast import reference

triton = pytest.importorskip("triton")
from smoe_fast.kernels.experts_soft import experts_soft  # noqa: E402
from smoe_fast.kernels.experts_topk import experts_topk  # noqa: E402

LATENT = 4


def _inputs(mode: str, batch: int, num_experts: int, top_k: int, strided: bool, seed: int = 0):
    """(z, topk_idx or None, gates, weights, leaves) for 'soft' (gates [B, E]) or 'topk' (gates [B, K]).

    top-k indices never pick the last expert when E > K, so that expert is empty."""
    weights = random_weights("medium", num_experts, LATENT, seed=seed + 1, requires_grad=True)
    g = torch.Generator().manual_seed(seed)
    if mode == "soft":
        idx = None
        gates_value = torch.randn(batch, num_experts, generator=g).softmax(-1)
    else:
        usable = num_experts - 1 if num_experts > top_k else num_experts
        rows = [torch.randperm(usable, generator=g)[:top_k] for _ in range(batch)]
        idx = torch.stack(rows) if rows else torch.zeros(0, top_k, dtype=torch.int64)
        gates_value = torch.rand(batch, top_k, generator=g) + 0.25
    if strided:
        z_leaf = torch.randn(batch, 2 * LATENT, generator=g).requires_grad_(True)
        z = z_leaf[:, ::2]
        assert z.stride(1) == 2
    else:
        z_leaf = z = torch.randn(batch, LATENT, generator=g).requires_grad_(True)
    gates = gates_value.clone().requires_grad_(True)
    return z, idx, gates, weights, [z_leaf, gates, *weights.values()]


def _run(backend, mode, z, idx, gates, weights):
    if mode == "soft":
        return backend.experts_soft(z, gates, weights, "medium")
    return backend.experts_topk(z, idx, gates, weights, "medium")


class _Triton:
    experts_soft = staticmethod(experts_soft)
    experts_topk = staticmethod(experts_topk)


CASES = [
    # (mode, B, E, K, strided z)
    pytest.param("topk", 2, 1, 1, False, id="topk-B2-E1-K1"),                   # E = 1: every row on one expert
    pytest.param("topk", 5, 3, 2, True, id="topk-B5-E3-K2-empty-strided"),     # k = 2, expert 2 empty, strided z
    pytest.param("topk", 1, 3, 1, False, id="topk-B1-E3-K1"),                   # one token, k = 1, two empty experts
    pytest.param("soft", 2, 3, 3, True, id="soft-B2-E3-strided"),               # soft: every (token, expert) row
    pytest.param("soft", 1, 1, 1, False, id="soft-B1-E1"),                      # soft with E = 1, one token
]


@pytest.mark.parametrize("mode, batch, num_experts, top_k, strided", CASES)
def test_forward_and_gradients_match_reference(mode, batch, num_experts, top_k, strided):
    z, idx, gates, weights, leaves = _inputs(mode, batch, num_experts, top_k, strided)
    expected = _run(reference, mode, z, idx, gates, weights)
    actual = _run(_Triton, mode, z, idx, gates, weights)
    assert_grads_close(actual, expected, leaves, ["z", "gates", *weights])


@pytest.mark.parametrize("mode", ["soft", "topk"])
def test_empty_batch(mode):
    # B = 0: an empty result and zero gradients
    z, idx, gates, weights, leaves = _inputs(mode, 0, 3, 2, False)
    out = _run(_Triton, mode, z, idx, gates, weights)
    assert out.shape == (0, 1, 28, 28)
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    for name, g, leaf in zip(["z", "gates", *weights], grads, leaves):
        assert g is None or (g.shape == leaf.shape and not g.any()), name


def test_weight_gradients_are_deterministic():
    # two backward runs of one graph: per-tile partials and segment sums, no atomics, so bitwise equal
    z, idx, gates, weights, leaves = _inputs("topk", 3, 2, 2, False)
    out = _run(_Triton, "topk", z, idx, gates, weights)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    first = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    second = torch.autograd.grad(out, leaves, grad_out)
    for name, a, b in zip(["z", "gates", *weights], first, second):
        assert torch.equal(a, b), f"d {name} differs between two identical backward runs"


def test_soft_runs_in_expert_chunks(monkeypatch):
    # 4 (token, expert) rows per chunk with B = 2, E = 5 (E > B): chunks of 2, 2 and 1 experts, each
    # recomputed in the backward; dz summed over the chunks, weight gradients written per chunk
    from smoe_fast.kernels import experts_medium
    monkeypatch.setattr(experts_medium, "SOFT_CHUNK_ROWS", 4)
    assert [(e0, e1) for e0, e1, _ in experts_medium._soft_chunks(2, 5, torch.device("cpu"))] == [(0, 2), (2, 4), (4, 5)]
    z, idx, gates, weights, leaves = _inputs("soft", 2, 5, 5, False)
    expected = _run(reference, "soft", z, idx, gates, weights)
    actual = _run(_Triton, "soft", z, idx, gates, weights)
    assert_grads_close(actual, expected, leaves, ["z", "gates", *weights])


def test_soft_backward_keeps_only_the_inputs():
    # nothing of size B x E x activations is kept for the backward: autograd saves z, gates, weights
    z, idx, gates, weights, _ = _inputs("soft", 2, 3, 3, False)
    inputs = {t.data_ptr() for t in (z, gates, *weights.values())}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        experts_soft(z, gates, weights, "medium")
    assert saved and all(t.data_ptr() in inputs for t in saved), [tuple(t.shape) for t in saved]
