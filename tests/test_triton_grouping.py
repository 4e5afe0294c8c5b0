"""Triton grouping (kernels/grouping.py) against the reference: exact integers, and the invariants."""
import importlib

import pytest
import torch

from helpers import routing_case
from smoe_fast import reference
from smoe_fast.kernels import tuning
from smoe_fast.kernels.grouping import group_by_expert, group_by_expert_tiles

grouping_module = importlib.import_module("smoe_fast.kernels.grouping")


def _topk_case(batch: int, k: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num_experts, generator=g).topk(k, dim=-1).indices


def _skewed_int32(batch: int, num_experts: int) -> torch.Tensor:
    return routing_case("skewed", batch, num_experts).int()


# (expert_idx builder, E), each with the edge it hits
CASES = [
    pytest.param(lambda: routing_case("uniform", 20, 1), 1, id="E1-single-expert"),
    pytest.param(lambda: routing_case("uniform", 50, 7), 7, id="B50-E7-prime-uniform"),
    pytest.param(lambda: routing_case("skewed", 64, 13), 13, id="B64-E13-prime-skewed"),
    pytest.param(lambda: routing_case("uniform", 5, 17), 17, id="B5-E17-E-greater-than-B"),
    pytest.param(lambda: routing_case("one_expert", 40, 6), 6, id="B40-E6-all-tokens-on-last-expert"),
    pytest.param(lambda: routing_case("even_only", 30, 8), 8, id="B30-E8-empty-odd-experts"),
    pytest.param(lambda: routing_case("uniform", 0, 3), 3, id="B0-empty-batch"),
    pytest.param(lambda: routing_case("uniform", 1, 4), 4, id="B1-single-token"),
    pytest.param(lambda: routing_case("uniform", 300, 4), 4, id="B300-E4-several-programs-one-subtile-each"),
    # E > BLOCK_T (64 under the interpreter): programs walk several sub-tiles, the running count carries
    pytest.param(lambda: routing_case("skewed", 500, 100), 100, id="B500-E100-several-subtiles-per-program"),
    pytest.param(lambda: routing_case("uniform", 500, 100), 100, id="B500-E100-uniform-multi-program"),
    pytest.param(lambda: _topk_case(20, 3, 5), 5, id="topk-B20-K3-E5"),
    pytest.param(lambda: _topk_case(33, 2, 64), 64, id="topk-B33-K2-E64"),
    pytest.param(lambda: routing_case("uniform", 9, 65536), 65536, id="B9-E65536-large-E"),
    pytest.param(lambda: _skewed_int32(45, 11), 11, id="int32-expert-idx"),
    pytest.param(lambda: _topk_case(16, 4, 9).t().contiguous().t(), 9, id="topk-non-contiguous-strides"),
]


def check_invariants(routing, expert_idx: torch.Tensor, num_experts: int) -> None:
    counts, offsets, sorted_idx, sorted_pos = (t.long() for t in routing)
    flat = expert_idx.reshape(-1).long()
    n = flat.numel()
    assert all(t.dtype == torch.int32 for t in routing), [t.dtype for t in routing]
    assert counts.shape == (num_experts,) and offsets.shape == (num_experts + 1,)
    assert sorted_idx.shape == (n,) and sorted_pos.shape == (n,)
    assert int(counts.sum()) == n, f"counts sum to {int(counts.sum())}, expected B*K = {n}"
    assert torch.equal(offsets[1:] - offsets[:-1], counts) and int(offsets[0]) == 0, "offsets are not the exclusive scan"
    assert torch.equal(torch.sort(sorted_idx).values, torch.arange(n)), "sorted_token_idx is not a permutation"
    assert torch.equal(sorted_pos[sorted_idx], torch.arange(n)), "token_sorted_pos is not the inverse permutation"
    for e in range(min(num_experts, 200)):
        rows = sorted_idx[offsets[e]:offsets[e + 1]]
        assert bool((flat[rows] == e).all()), f"expert {e}'s rows hold other experts' tokens"
        assert bool((rows[1:] > rows[:-1]).all()), f"expert {e}'s rows are not ascending (unstable)"


@pytest.mark.parametrize("make_idx,num_experts", CASES)
def test_group_by_expert_matches_reference(make_idx, num_experts):
    expert_idx = make_idx()
    routing = group_by_expert(expert_idx, num_experts)
    expected = reference.group_by_expert(expert_idx.long(), num_experts)
    for name, got, want in zip(routing._fields, routing, expected):
        assert torch.equal(got, want), f"{name}: got {got.tolist()[:20]}..., expected {want.tolist()[:20]}..."
    check_invariants(routing, expert_idx, num_experts)


# The GPU's tiles (the interpreter uses wider ones): 256-token sub-tiles compared 16 columns at a time
GPU_GROUPING_CASES = [
    pytest.param(1000, 3, "skewed", id="B1000-E3-many-programs"),
    pytest.param(1500, 300, "skewed", id="B1500-E300-several-subtiles-per-program"),
    pytest.param(700, 1024, "uniform", id="B700-E1024-E-greater-than-B"),
]


@pytest.mark.parametrize("batch,num_experts,routing", GPU_GROUPING_CASES)
def test_group_by_expert_with_gpu_tiles(monkeypatch, batch, num_experts, routing):
    def gpu_config(bucket, num_experts, device):
        block_e = min(tuning.triton_next_power_of_2(num_experts), 256)
        return {"BLOCK_T": 256, "BLOCK_J": 16, "BLOCK_E": block_e, "BLOCK_P": 32, "num_warps": 8}

    monkeypatch.setattr(grouping_module, "grouping_config", gpu_config)
    expert_idx = routing_case(routing, batch, num_experts)
    routing_out = group_by_expert(expert_idx, num_experts)
    expected = reference.group_by_expert(expert_idx, num_experts)
    for name, got, want in zip(routing_out._fields, routing_out, expected):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_tile_offsets_are_scan_of_tiles_per_expert(block_m):
    expert_idx = routing_case("even_only", 37, 9)   # empty experts own no tile
    routing, tile_offsets = group_by_expert_tiles(expert_idx, 9, block_m)
    tiles = (routing.expert_counts.long() + block_m - 1) // block_m
    assert tile_offsets.dtype == torch.int32
    assert tile_offsets.tolist() == [0] + torch.cumsum(tiles, 0).tolist()
    assert int(tile_offsets[-1]) <= -(-37 // block_m) + min(9, 37)


def test_out_of_range_indices_are_left_out_without_stray_writes():
    # what a caller gets with check_indices=False and bad indices: defined, in-bounds outputs
    expert_idx = torch.tensor([2, -1, 0, 5, 2, 1, 99, 0])
    routing = group_by_expert(expert_idx, 3)
    valid = (expert_idx >= 0) & (expert_idx < 3)
    assert routing.expert_counts.tolist() == [2, 1, 2]
    assert routing.expert_offsets.tolist() == [0, 2, 3, 5]
    assert routing.sorted_token_idx.tolist() == [2, 7, 5, 0, 4, -1, -1, -1]
    assert routing.token_sorted_pos[~valid].tolist() == [-1, -1, -1]
    assert routing.token_sorted_pos[valid].tolist() == [3, 0, 4, 2, 1]


@pytest.mark.parametrize("tile_block_m", [0, 4])
def test_grouping_op_passes_opcheck(tile_block_m):
    expert_idx = routing_case("skewed", 12, 5)
    torch.library.opcheck(torch.ops.smoe_fast.triton_group_by_expert.default, (expert_idx, 5, tile_block_m))


def test_grouping_compiles_without_graph_breaks():
    compiled = torch.compile(lambda idx: group_by_expert(idx, 6).sorted_token_idx * 2, backend="aot_eager", fullgraph=True)
    expert_idx = routing_case("uniform", 10, 6)
    assert torch.equal(compiled(expert_idx), reference.group_by_expert(expert_idx, 6).sorted_token_idx * 2)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("batch,num_experts", [(65536, 1024), (4097, 65536), (100_000, 7)])
def test_group_by_expert_on_gpu_large(batch, num_experts):
    expert_idx = routing_case("skewed" if num_experts < 64 else "uniform", batch, num_experts).cuda()
    routing = group_by_expert(expert_idx, num_experts)
    expected = reference.group_by_expert(expert_idx, num_experts)
    for name, got, want in zip(routing._fields, routing, expected):
        assert torch.equal(got, want), name
