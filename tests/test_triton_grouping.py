"""Triton grouping (kernels/grouping.py) against the reference: exact integers, and the invariants."""
import importlib

import pytest
import torch

from helpers import routing_case
from smoe_fast import reference
from smoe_fast.kernels import launch, tuning
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


# The GPU's tiles (the interpreter uses wider ones): 256-token sub-tiles compared 16 columns at a time,
# experts in blocks of at most 256, several chunk ranges per expert block
GPU_GROUPING_CASES = [
    pytest.param(1000, 3, "skewed", id="B1000-E3-many-programs"),
    pytest.param(1500, 300, "skewed", id="B1500-E300-several-subtiles-and-expert-blocks"),
    pytest.param(700, 1024, "uniform", id="B700-E1024-E-greater-than-B"),
    pytest.param(3000, 5, "one_expert", id="B3000-E5-all-tokens-on-one-expert-many-chunks"),
]


@pytest.mark.parametrize("batch,num_experts,routing", GPU_GROUPING_CASES)
def test_group_by_expert_with_gpu_tiles(monkeypatch, batch, num_experts, routing):
    def gpu_config(bucket, num_experts, arch):
        return tuning.grouping_config(bucket, num_experts, 90)

    monkeypatch.setattr(grouping_module, "grouping_config", gpu_config)
    # an H100's persistent grid: the scatter grid gets several chunk ranges
    monkeypatch.setattr(grouping_module, "max_programs", lambda device: 264)
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
    assert int(tile_offsets[-1]) <= launch.tile_bound(37, 9, block_m)


# (B*K, E): the work bound must hold at every scale the op accepts, up to 2^31 - 1 assignments
WORK_CASES = [(n, e) for n in (1, 1000, 65_536, 1 << 20, 1 << 24, (1 << 31) - 1) for e in (1, 7, 64, 1024, 65_536)]


@pytest.mark.parametrize("arch", [0, 90], ids=["interpreter-tiles", "sm_90-tiles"])
def test_grouping_work_is_linear_in_tokens_plus_programs_times_experts(arch):
    for n, e in WORK_CASES:
        config = tuning.grouping_config(tuning.bucket_tokens(n), e, arch)
        plan = grouping_module.plan_grouping(n, e, config, target_programs=264)
        p = plan.programs
        assert p * e <= n + e, f"N={n} E={e}: the [P, E] count matrix has {p * e} entries > N + E"
        assert p * plan.tokens_per_program >= n and plan.expert_blocks * config["BLOCK_E"] >= e
        assert plan.chunk_ranges * plan.chunks_per_range >= p
        assert plan.chunk_ranges * p * e <= grouping_module.REPEAT_BUDGET * max(n, p * e)
        reads = plan.elements_read()
        # O(N + P*E) with the constants of the kernels' loops (expert blocks J <= E)
        bound = 9 * n + 2 * (grouping_module.REPEAT_BUDGET + 1) * (n + p * e)
        assert reads["count"] + reads["scatter"] <= bound, f"N={n} E={e}: {reads} > {bound}"
    # the old scatter re-read the whole [P, E] matrix in every program: P^2 * E reads; at N = 2^20,
    # E = 64 that was ~4 G elements, now a few N
    n, e = 1 << 20, 64
    plan = grouping_module.plan_grouping(n, e, tuning.grouping_config(tuning.bucket_tokens(n), e, 90), 264)
    assert sum(plan.elements_read().values()) < 20 * n


def test_more_than_int32_assignments_are_refused_without_allocating():
    huge = torch.zeros(1, dtype=torch.int64).expand(2**31)   # a view: nothing allocated
    with pytest.raises(ValueError, match=r"2\^31 - 1"):
        group_by_expert(huge, 4)


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
