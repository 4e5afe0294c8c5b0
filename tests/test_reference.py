"""The reference backend against independent per-expert torch modules (the authors' formulation)."""
import pytest
import torch

from helpers import assert_close, random_weights, routing_case
from smoe_fast.vae.authors import decoders_from_stacked as build_decoders, per_sample_loop, stacked_soft
from smoe_fast import reference

KINDS = ["lite", "medium", "mlp"]

# (batch B, experts E, routing) with the edge each case hits
ROUTINGS = [
    pytest.param(9, 4, "uniform", id="B9-E4-uniform"),
    pytest.param(8, 5, "one_expert", id="B8-E5-all-tokens-on-one-expert"),
    pytest.param(10, 6, "even_only", id="B10-E6-empty-odd-experts"),
    pytest.param(1, 3, "uniform", id="B1-single-token"),
    pytest.param(3, 7, "uniform", id="B3-E7-E-greater-than-B-prime-E"),
    pytest.param(0, 3, "uniform", id="B0-empty-batch"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,num_experts,routing", ROUTINGS)
def test_experts_hard_equals_per_sample_loop(kind, batch, num_experts, routing):
    weights = random_weights(kind, num_experts, latent_dim=6, hidden_dim=12, dtype=torch.float64)
    z = torch.randn(batch, 6, dtype=torch.float64)
    idx = routing_case(routing, batch, num_experts)
    expected = per_sample_loop(build_decoders(kind, weights), z, idx)
    assert_close(reference.experts_hard(z, idx, weights, kind), expected, name=f"{kind} hard")


@pytest.mark.parametrize("kind", KINDS)
def test_experts_soft_equals_stacked_formulation(kind):
    weights = random_weights(kind, 5, latent_dim=6, hidden_dim=12, dtype=torch.float64)
    z = torch.randn(7, 6, dtype=torch.float64)
    gates = torch.randn(7, 5, dtype=torch.float64).softmax(-1)
    expected = stacked_soft(build_decoders(kind, weights), z, gates)
    assert_close(reference.experts_soft(z, gates, weights, kind), expected, name=f"{kind} soft")


@pytest.mark.parametrize("kind", KINDS)
def test_hard_equals_soft_with_one_hot_gates(kind):
    weights = random_weights(kind, 4, latent_dim=6, hidden_dim=12, dtype=torch.float64)
    z = torch.randn(11, 6, dtype=torch.float64)
    idx = routing_case("skewed", 11, 4)
    one_hot = torch.nn.functional.one_hot(idx, 4).double()
    assert_close(reference.experts_hard(z, idx, weights, kind), reference.experts_soft(z, one_hot, weights, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_k_equal_e_equals_soft(kind):
    weights = random_weights(kind, 4, latent_dim=6, hidden_dim=12, dtype=torch.float64)
    z = torch.randn(6, 6, dtype=torch.float64)
    gates = torch.randn(6, 4, dtype=torch.float64).softmax(-1)
    topk_gates, topk_idx = gates.topk(4, dim=-1)
    assert_close(reference.experts_topk(z, topk_idx, topk_gates, weights, kind),
                 reference.experts_soft(z, gates, weights, kind))


def test_topk_gradients_match_soft_with_k_equal_e():
    weights = random_weights("lite", 3, latent_dim=5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    gates = torch.randn(4, 3, dtype=torch.float64).softmax(-1).requires_grad_()
    inputs = [z, gates, *weights.values()]
    topk_gates, topk_idx = gates.topk(3, dim=-1)
    g_topk = torch.autograd.grad(reference.experts_topk(z, topk_idx, topk_gates, weights, "lite").square().sum(), inputs)
    g_soft = torch.autograd.grad(reference.experts_soft(z, gates, weights, "lite").square().sum(), inputs)
    for name, a, b in zip(["z", "gates", *weights], g_topk, g_soft):
        assert_close(a, b, name=f"grad {name}")


@pytest.mark.parametrize("shape", [(0,), (1,), (13,), (6, 2)], ids=["B0", "B1", "B13", "B6-K2"])
@pytest.mark.parametrize("num_experts", [1, 5, 40], ids=["E1", "E5-prime", "E40-more-than-B"])
def test_group_by_expert_invariants(shape, num_experts):
    idx = torch.randint(0, num_experts, shape, generator=torch.Generator().manual_seed(1))
    r = reference.group_by_expert(idx, num_experts)
    flat = idx.reshape(-1)
    assert r.expert_counts.dtype == r.expert_offsets.dtype == r.sorted_token_idx.dtype == torch.int32
    assert r.expert_counts.tolist() == [int((flat == e).sum()) for e in range(num_experts)]
    assert r.expert_offsets.tolist() == [0] + torch.cumsum(r.expert_counts, 0).tolist()
    order = r.sorted_token_idx.long()
    assert sorted(order.tolist()) == list(range(flat.numel()))  # a permutation
    assert torch.equal(r.token_sorted_pos.long()[order], torch.arange(flat.numel()))  # the inverse
    for e in range(num_experts):  # stable: ascending token order inside each expert
        rows = order[r.expert_offsets[e]:r.expert_offsets[e + 1]]
        assert (flat[rows] == e).all() and rows.tolist() == sorted(rows.tolist())
