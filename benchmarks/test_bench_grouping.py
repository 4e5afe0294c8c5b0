"""Grouping alone: expert_idx [B] -> Routing, every backend against torch.sort + bincount + cumsum.

DESIGN.md target: at B=65,536, E=1,024 the grouping is at least 3x faster than the textbook baseline
(read the 'x ref' column of the torch_sort_bincount_cumsum row against the backend rows).
"""
import pytest
import torch

import baselines
from harness import (BACKENDS, DEVICE, EXPERTS, HARD_BATCHES, INPUT_SETS, Work, reference_output, require_backend,
                     rotating, run_case)
from smoe_fast import ops, reference

IMPLS = (*BACKENDS, "torch_sort_bincount_cumsum")


def routing_bytes(batch: int, num_experts: int) -> int:
    """Read expert_idx (int64); write counts, offsets, sorted_token_idx and token_sorted_pos (int32)."""
    return batch * 8 + (2 * num_experts + 1) * 4 + 2 * batch * 4


@pytest.mark.parametrize("batch", HARD_BATCHES)
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_group_by_expert(benchmark, impl, num_experts, batch):
    g = torch.Generator().manual_seed(0)
    sets = [(torch.randint(0, num_experts, (batch,), generator=g).to(DEVICE),) for _ in range(INPUT_SETS)]
    if impl in BACKENDS:
        backend = require_backend(impl)
        fn = lambda idx: ops.group_by_expert(idx, num_experts, backend=backend, check_indices=False)  # noqa: E731
    else:
        fn = lambda idx: baselines.sort_bincount_cumsum(idx, num_experts)  # noqa: E731
    out = run_case(benchmark, stage="grouping", impl=impl, num_experts=num_experts, batch=batch, kind="",
                   call=rotating(sets, fn), work=Work(batch, routing_bytes(batch, num_experts), None))
    expected = reference_output("grouping", "", num_experts, batch,
                                lambda: reference.group_by_expert(sets[0][0], num_experts))
    for name, a, e in zip(expected._fields, out, expected):
        assert torch.equal(a.cpu().long(), e.cpu().long()), f"{impl} grouping differs from the reference in {name}"
