"""The expert stage alone, per backend and against the pure-PyTorch baselines (benchmarks/baselines.py).

| test                      | stage timed                                     | DESIGN.md target it measures          |
|---------------------------|-------------------------------------------------|---------------------------------------|
| test_experts_hard         | hard-gated lite experts, inference              | B=65,536: E=1,024 within 1.25x of E=8; |
|                           |                                                 | E >= 64: >= 3x the best pure-PyTorch  |
|                           |                                                 | row, >= 100x the authors' loop; GB/s  |
|                           |                                                 | >= half the measured copy bandwidth   |
| test_experts_hard_mlp     | hard-gated mlp experts, vs torch grouped_mm     | (the grouped-GEMM comparison)         |
| test_experts_hard_skewed  | hard-gated, skewed routing (expert e ~ 2^-e/4)  | (load imbalance)                      |
| test_experts_soft_train   | soft-gated forward + backward                   | B=1,024, E=256: >= 5x the reference,  |
|                           |                                                 | <= 1/8 of its peak memory             |
| test_experts_topk_train   | top-2 forward + backward                        | E=1,024 within 1.5x of E=8, equal B   |
"""
import pytest
import torch

import baselines
from harness import (BACKENDS, DENSE_MAX_PAIRS, DENSE_TRAIN_MAX_PAIRS, DEVICE, EXPERTS, HARD_BATCHES, INPUT_SETS, LATENT,
                     MLP_HIDDEN, SOFT_MAX_PAIRS, TOP_K, TOPK_BATCHES, TRAIN_BATCHES, Work, check_close, reference_output,
                     authors_loop_tokens, require_backend, rotating, run_case, skip_if_too_many_pairs)
from smoe_fast import ops, reference
from smoe_fast.experts import random_weights
from smoe_fast.measure import random_routing, stage_bytes, stage_flops

HARD_IMPLS = (*BACKENDS, "authors_per_sample_loop", "per_expert_loop", "dense_gather")
MLP_IMPLS = (*BACKENDS, "per_expert_loop", "dense_gather", "grouped_mm")
SOFT_IMPLS = (*BACKENDS, "authors_stacked_soft", "dense_soft")
TOPK_IMPLS = (*BACKENDS, "dense_masked_topk")


def _weights(kind: str, num_experts: int, requires_grad: bool = False):
    return random_weights(kind, num_experts, LATENT, MLP_HIDDEN, device=DEVICE, requires_grad=requires_grad)


def _hard_sets(batch: int, num_experts: int, routing: str = "uniform"):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, LATENT, generator=g).to(DEVICE), random_routing(batch, num_experts, routing, g).to(DEVICE))
            for _ in range(INPUT_SETS)]


def _hard_fn(impl: str, kind: str, weights, batch: int, num_experts: int):
    """(function of (z, expert_idx), tokens it processes) for one implementation; skips with the reason."""
    if impl in BACKENDS:
        backend = require_backend(impl)
        return (lambda z, idx: ops.experts_hard(z, idx, weights, kind=kind, backend=backend, check_indices=False)), batch
    if impl == "authors_per_sample_loop":
        decoders = baselines.authors_decoders(kind, weights)
        tokens = authors_loop_tokens(batch, HARD_BATCHES)
        return (lambda z, idx: baselines.authors_per_sample_loop(decoders, z[:tokens], idx[:tokens])), tokens
    if impl == "per_expert_loop":
        return (lambda z, idx: baselines.per_expert_loop(z, idx, weights, kind)), batch
    if impl == "dense_gather":
        skip_if_too_many_pairs(batch, num_experts, DENSE_MAX_PAIRS, "the dense path")
        return (lambda z, idx: baselines.dense_gather(z, idx, weights, kind)), batch
    if impl == "grouped_mm":
        problem = baselines.grouped_mm_problem(DEVICE)
        if problem:
            pytest.skip(problem)
        return (lambda z, idx: baselines.grouped_mm_hard_mlp(z, idx, weights)), batch
    raise AssertionError(impl)


def _bench_hard(benchmark, impl, kind, num_experts, batch, routing="uniform", stage="hard"):
    with torch.no_grad():
        weights = _weights(kind, num_experts)
        sets = _hard_sets(batch, num_experts, routing)
        fn, tokens = _hard_fn(impl, kind, weights, batch, num_experts)
        touched = int(torch.unique(sets[0][1][:tokens]).numel())
        work = Work(tokens, stage_bytes("hard", tokens, num_experts, touched, kind, LATENT, MLP_HIDDEN),
                    stage_flops("hard", tokens, num_experts, kind, LATENT, MLP_HIDDEN))
        out = run_case(benchmark, stage=stage, impl=impl, num_experts=num_experts, batch=batch, kind=kind,
                       call=rotating(sets, fn), work=work)
        if impl != "reference":
            z, idx = sets[0]
            expected = reference_output(stage, kind, num_experts, batch,
                                        lambda: reference.experts_hard(z, idx, weights, kind))
            check_close(out, expected[:tokens], impl)


@pytest.mark.parametrize("batch", HARD_BATCHES)
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("impl", HARD_IMPLS)
def test_experts_hard(benchmark, impl, num_experts, batch):
    _bench_hard(benchmark, impl, "lite", num_experts, batch)


@pytest.mark.parametrize("batch", HARD_BATCHES)
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("impl", MLP_IMPLS)
def test_experts_hard_mlp(benchmark, impl, num_experts, batch):
    _bench_hard(benchmark, impl, "mlp", num_experts, batch)


@pytest.mark.parametrize("impl", (*BACKENDS, "per_expert_loop"))
def test_experts_hard_skewed(benchmark, impl):
    _bench_hard(benchmark, impl, "lite", EXPERTS[-1], HARD_BATCHES[-1], routing="skewed", stage="hard-skewed")


def _train_call(fn, params):
    """Forward + backward: gradients of the output (against a fixed random grad_out) for z, gates, weights."""
    def call(z, gates, grad_out, *rest):
        y = fn(z, gates, *rest)
        return torch.autograd.grad(y, [z, gates, *params], grad_out)
    return call


@pytest.mark.parametrize("batch", TRAIN_BATCHES)
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("impl", SOFT_IMPLS)
def test_experts_soft_train(benchmark, impl, num_experts, batch):
    kind = "lite"
    skip_if_too_many_pairs(batch, num_experts, SOFT_MAX_PAIRS, "soft gating")
    weights = _weights(kind, num_experts, requires_grad=True)
    params = list(weights.values())
    if impl in BACKENDS:
        backend = require_backend(impl)
        fn = lambda z, gates: ops.experts_soft(z, gates, weights, kind=kind, backend=backend)  # noqa: E731
    elif impl == "authors_stacked_soft":
        decoders = baselines.authors_decoders(kind, {n: w.detach() for n, w in weights.items()})
        params = list(decoders.parameters())
        fn = lambda z, gates: baselines.authors_stacked_soft(decoders, z, gates)  # noqa: E731
    else:
        skip_if_too_many_pairs(batch, num_experts, DENSE_TRAIN_MAX_PAIRS, "the dense path (training)")
        fn = lambda z, gates: baselines.dense_soft(z, gates, weights, kind)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    sets = [(torch.randn(batch, LATENT, generator=g).to(DEVICE).requires_grad_(),
             torch.randn(batch, num_experts, generator=g).softmax(-1).to(DEVICE).requires_grad_(),
             torch.rand(batch, 1, 28, 28, generator=g).to(DEVICE)) for _ in range(INPUT_SETS)]
    work = Work(batch, stage_bytes("soft", batch, num_experts, num_experts, kind, LATENT),
                stage_flops("soft", batch, num_experts, kind, LATENT))
    out = run_case(benchmark, stage="soft fwd+bwd", impl=impl, num_experts=num_experts, batch=batch, kind=kind,
                   call=rotating(sets, _train_call(fn, params)), work=work)
    if impl != "reference":
        z, gates, grad_out = sets[0]
        expected = reference_output("soft fwd+bwd", kind, num_experts, batch, lambda: torch.autograd.grad(
            reference.experts_soft(z, gates, weights, kind), [z, gates], grad_out))
        check_close(out[:2], expected[:2], f"{impl} (grad z, grad gates)")


@pytest.mark.parametrize("batch", TOPK_BATCHES)
@pytest.mark.parametrize("num_experts", [e for e in EXPERTS if e >= TOP_K])
@pytest.mark.parametrize("impl", TOPK_IMPLS)
def test_experts_topk_train(benchmark, impl, num_experts, batch):
    kind = "lite"
    weights = _weights(kind, num_experts, requires_grad=True)
    if impl in BACKENDS:
        backend = require_backend(impl)
        fn = lambda z, gates, idx: ops.experts_topk(z, idx, gates, weights, kind=kind, backend=backend,  # noqa: E731
                                                    check_indices=False)
    else:
        skip_if_too_many_pairs(batch, num_experts, DENSE_TRAIN_MAX_PAIRS, "the dense path (training)")
        fn = lambda z, gates, idx: baselines.dense_masked_topk(z, idx, gates, weights, kind)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(INPUT_SETS):
        gates = torch.rand(batch, TOP_K, generator=g) + 0.1
        sets.append((torch.randn(batch, LATENT, generator=g).to(DEVICE).requires_grad_(),
                     (gates / gates.sum(-1, keepdim=True)).to(DEVICE).requires_grad_(),
                     torch.rand(batch, 1, 28, 28, generator=g).to(DEVICE),
                     random_routing(batch, num_experts, "uniform", g, top_k=TOP_K).to(DEVICE)))
    touched = int(torch.unique(sets[0][3]).numel())
    work = Work(batch, stage_bytes("topk", batch, num_experts, touched, kind, LATENT, top_k=TOP_K),
                stage_flops("topk", batch, num_experts, kind, LATENT, top_k=TOP_K))
    out = run_case(benchmark, stage=f"top{TOP_K} fwd+bwd", impl=impl, num_experts=num_experts, batch=batch, kind=kind,
                   call=rotating(sets, _train_call(fn, list(weights.values()))), work=work)
    if impl != "reference":
        z, gates, grad_out, idx = sets[0]
        expected = reference_output(f"top{TOP_K} fwd+bwd", kind, num_experts, batch, lambda: torch.autograd.grad(
            reference.experts_topk(z, idx, gates, weights, kind), [z, gates, *weights.values()], grad_out))
        check_close(out, expected, impl)
