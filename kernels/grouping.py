"""Group (token, slot) assignments by expert: a stable counting sort in two launches.

The dispatch contract (DESIGN.md), the same names in every backend:

| tensor           | shape, dtype       | meaning                                                              |
|------------------|--------------------|----------------------------------------------------------------------|
| expert_idx       | [B] or [B,K] int64 | chosen expert per token (per slot for top-k); int32 accepted          |
| expert_counts    | [E] int32          | tokens routed to each expert                                         |
| expert_offsets   | [E+1] int32        | exclusive scan of counts; expert e owns sorted rows offsets[e]:offsets[e+1] |
| sorted_token_idx | [B*K] int32        | sorted row -> flat (token, slot) index b*K + k; ascending within an expert |
| token_sorted_pos | [B*K] int32        | the inverse permutation                                              |
| tile_offsets     | [E+1] int32        | (internal, optional) exclusive scan of cdiv(counts, BM): expert e owns tiles tile_offsets[e]:tile_offsets[e+1] |

Algorithm. The N = B*K flat assignments are cut into P contiguous chunks of T = ``tokens_per_program``
tokens, with P <= cdiv(N, E) so that the [P, E] count matrices hold at most N + E entries (memory
O(N + E) for any E). Two launches, no host synchronisation, total work O(N + P*E):

1. ``_group_by_expert_count_fwd_kernel``, one program per chunk p: a counting sort of the chunk.
   Walking the chunk in sub-tiles of BLOCK_T tokens, a token's rank among the earlier tokens of its
   expert in the sub-tile comes from a BLOCK_T x BLOCK_T equality compare (BLOCK_J columns at a
   time); adding the running count ``chunk_counts[p, e]`` gives its stable rank within the chunk
   (kept in ``token_sorted_pos``, used as scratch). Then ``chunk_offsets[p, :]``, the exclusive scan
   of the chunk's counts over experts, and a second walk writes the chunk's tokens in expert order
   to ``local_sorted[p*T + chunk_offsets[p, e] + rank]``. Reads: about 4T + 2E per program.
2. ``_group_by_expert_scatter_fwd_kernel``, a grid of (expert blocks of BLOCK_E) x (R ranges of
   chunks): program (j, c) owns experts e0..e1 of block j and chunks of range c. One pass over the
   P rows of the count matrices gives, for its experts, the totals (-> expert_counts and
   expert_offsets; the offset of e0 is sum_p chunk_offsets[p, e0], the tokens of all earlier experts,
   so no program needs another's result) and the tokens in chunks before its range. Then, chunk by
   chunk, the block's tokens are one contiguous run of ``local_sorted`` (the chunk is sorted by
   expert), copied to sorted row ``expert_offsets[e] + (tokens of e in earlier chunks) + rank``.
   Reads: P*BLOCK_E + P per program plus its tokens, so R*P*E + 4N in all, with R chosen so that
   R*P*E <= 8 * max(N, P*E).

No program waits for another and nothing needs zeroing beforehand. ``tile_offsets`` (cdiv of the
counts per expert, scanned) is a third launch made only for the callers that want tiles
(:func:`group_by_expert_tiles`, kernels/launch.py ``tile_offsets``).

Bad indices. ``smoe_fast.ops`` range-checks expert_idx before launch (``check_indices=True``, one
device-to-host read); turn it off only for indices you produced, such as an argmax. The kernels never
touch memory out of bounds whatever the indices: an out-of-range assignment is left out of the counts,
gets ``token_sorted_pos = -1``, and the sorted rows it leaves empty at the end hold -1.

>>> from smoe_fast.kernels.grouping import group_by_expert
>>> r = group_by_expert(torch.tensor([2, 0, 2, 1], device="cuda"), 3)
>>> r.sorted_token_idx.tolist()
[1, 3, 0, 2]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from smoe_fast.contract import Routing

from .launch import device_arch, device_guard, max_programs, tile_offsets
from .tuning import bucket_tokens, grouping_config

__all__ = ["group_by_expert", "group_by_expert_tiles", "plan_grouping", "GroupingPlan", "MAX_ASSIGNMENTS"]

# int32 routing tensors: every sorted row and flat (token, slot) index must fit
MAX_ASSIGNMENTS = 2**31 - 1
# chunk ranges of the scatter grid: more programs, shorter chains, each repeating the P-row pass of
# its expert block; at most max(MIN_..., REPEAT_BUDGET * N / (P * E)) of them keeps those repeats
# within REPEAT_BUDGET * max(N, P * E) reads
MIN_CHUNK_RANGES = 8
REPEAT_BUDGET = 8


@triton.jit
def _load_experts(expert_idx, o_i, m_i, K, stride_b, stride_k, E):
    """Experts of flat assignments o_i (int64, -1 where masked or out of range) and the valid mask."""
    b_e = tl.load(expert_idx + (o_i // K) * stride_b + (o_i % K) * stride_k, mask=m_i, other=-1).to(tl.int64)
    m_valid = m_i & (b_e >= 0) & (b_e < E)
    return tl.where(m_valid, b_e, -1), m_valid


@triton.jit
def _group_by_expert_count_fwd_kernel(
    expert_idx,          # [B, K] any strides, int32 or int64
    token_rank,          # [N] int32 out: stable rank within the chunk's expert (-1: invalid index)
    chunk_counts,        # [P, E] int32 out: tokens per expert in each chunk
    chunk_offsets,       # [P, E] int32 out: exclusive scan of chunk_counts[p, :]
    local_sorted,        # [N] int32 out: each chunk's tokens in expert order, at p*T + ...
    N, K, stride_b, stride_k, E, tokens_per_program,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Grid (P,): program p sorts chunk p = flat assignments [p*T, (p+1)*T) by expert, stably."""
    i_p = tl.program_id(0).to(tl.int64)
    i_first = i_p * tokens_per_program
    p_counts = chunk_counts + i_p * E
    p_offsets = chunk_offsets + i_p * E
    o_e = tl.arange(0, BLOCK_E)
    for e0 in range(0, E, BLOCK_E):
        tl.store(p_counts + e0 + o_e, tl.zeros([BLOCK_E], dtype=tl.int32), mask=e0 + o_e < E)
    # the zeroed row is read by other threads of this program below
    tl.debug_barrier()

    o_t = tl.arange(0, BLOCK_T)
    o_j = tl.arange(0, BLOCK_J)
    for t0 in range(0, tokens_per_program, BLOCK_T):
        o_i = i_first + t0 + o_t
        m_i = o_i < N
        b_e, m_valid = _load_experts(expert_idx, o_i, m_i, K, stride_b, stride_k, E)
        # rank among the sub-tile's earlier tokens of the same expert, BLOCK_J columns at a time: a
        # [BLOCK_T, BLOCK_T] compare at once spills registers (ptxas, sm_90: 11 KB at 256 x 256)
        b_before = tl.zeros([BLOCK_T], dtype=tl.int32)
        b_after = tl.zeros([BLOCK_T], dtype=tl.int32)
        for j0 in range(0, BLOCK_T, BLOCK_J):
            o_ij = i_first + t0 + j0 + o_j
            b_ej, _ = _load_experts(expert_idx, o_ij, o_ij < N, K, stride_b, stride_k, E)
            # [BLOCK_T, BLOCK_J]: row i, column j; same expert, i valid (an invalid j never matches a valid i)
            b_same = (b_e[:, None] == b_ej[None, :]) & m_valid[:, None]
            b_before += tl.sum((b_same & (j0 + o_j[None, :] < o_t[:, None])).to(tl.int32), axis=1)
            b_after += tl.sum((b_same & (j0 + o_j[None, :] > o_t[:, None])).to(tl.int32), axis=1)
        p_running = p_counts + tl.where(m_valid, b_e, 0)
        b_running = tl.load(p_running, mask=m_valid, other=0)
        tl.store(token_rank + o_i, tl.where(m_valid, b_running + b_before, -1), mask=m_i)
        # all reads of the running counts happen before the last token of each expert advances them
        tl.debug_barrier()
        tl.store(p_running, b_running + b_before + 1, mask=m_valid & (b_after == 0))
        tl.debug_barrier()

    carry = 0
    for e0 in range(0, E, BLOCK_E):
        m_e = e0 + o_e < E
        b_c = tl.load(p_counts + e0 + o_e, mask=m_e, other=0)
        tl.store(p_offsets + e0 + o_e, carry + tl.cumsum(b_c, axis=0) - b_c, mask=m_e)
        carry += tl.sum(b_c, axis=0)
    # chunk_offsets written above by other threads of this program
    tl.debug_barrier()

    for t0 in range(0, tokens_per_program, BLOCK_T):
        o_i = i_first + t0 + o_t
        m_i = o_i < N
        b_e, m_valid = _load_experts(expert_idx, o_i, m_i, K, stride_b, stride_k, E)
        b_rank = tl.load(token_rank + o_i, mask=m_valid, other=0)
        b_local = tl.load(p_offsets + tl.where(m_valid, b_e, 0), mask=m_valid, other=0) + b_rank
        tl.store(local_sorted + i_first + b_local, o_i.to(tl.int32), mask=m_valid)


@triton.jit
def _group_by_expert_scatter_fwd_kernel(
    expert_idx,          # [B, K] any strides
    chunk_counts,        # [P, E] int32 from the count kernel
    chunk_offsets,       # [P, E] int32 from the count kernel
    local_sorted,        # [N] int32 from the count kernel
    block_base,          # [programs, BLOCK_E] int32 scratch: first sorted row of (chunk, expert)
    expert_counts,       # [E] int32 out
    expert_offsets,      # [E+1] int32 out
    sorted_token_idx,    # [N] int32 out
    token_sorted_pos,    # [N] int32 in: rank within the chunk's expert; out: sorted position
    N, K, stride_b, stride_k, E, P, tokens_per_program, chunks_per_range,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Grid (cdiv(E, BLOCK_E), R): program (j, c) places the tokens of experts [j*BLOCK_E, ...) that
    lie in chunks [c*chunks_per_range, ...)."""
    i_j = tl.program_id(0)
    i_c = tl.program_id(1)
    e0 = i_j * BLOCK_E
    o_e = tl.arange(0, BLOCK_E)
    m_e = e0 + o_e < E
    c_lo = i_c * chunks_per_range
    c_hi = tl.minimum(c_lo + chunks_per_range, P)
    o_q = tl.arange(0, BLOCK_P)

    # one pass over the P chunk rows: totals, tokens before this range, tokens of all earlier experts
    b_total = tl.zeros([BLOCK_E], dtype=tl.int32)
    b_before = tl.zeros([BLOCK_E], dtype=tl.int32)
    b_below = tl.zeros([BLOCK_P], dtype=tl.int32)
    for q0 in range(0, P, BLOCK_P):
        m_q = q0 + o_q < P
        o_row = (q0 + o_q).to(tl.int64) * E
        # [BLOCK_P, BLOCK_E]
        b_c = tl.load(chunk_counts + o_row[:, None] + e0 + o_e[None, :], mask=m_q[:, None] & m_e[None, :], other=0)
        b_total += tl.sum(b_c, axis=0)
        b_before += tl.sum(tl.where((q0 + o_q < c_lo)[:, None], b_c, 0), axis=0)
        b_below += tl.load(chunk_offsets + o_row + e0, mask=m_q, other=0)
    b_offsets = tl.sum(b_below, axis=0) + tl.cumsum(b_total, axis=0) - b_total
    num_valid = tl.sum(b_below, axis=0) + tl.sum(b_total, axis=0)   # meaningful in the last block only
    is_last_block = e0 + BLOCK_E >= E
    if i_c == 0:
        tl.store(expert_counts + e0 + o_e, b_total, mask=m_e)
        tl.store(expert_offsets + e0 + o_e, b_offsets, mask=m_e)
        if is_last_block:
            tl.store(expert_offsets + E + o_e, num_valid + o_e * 0, mask=o_e == 0)

    p_base = block_base + tl.cast(i_j * tl.num_programs(1) + i_c, tl.int64) * BLOCK_E
    b_base = b_offsets + b_before
    o_t = tl.arange(0, BLOCK_T)
    for p in range(c_lo, c_hi):
        p64 = tl.cast(p, tl.int64)
        # the previous chunk's gathers of block_base are done
        tl.debug_barrier()
        tl.store(p_base + o_e, b_base)
        tl.debug_barrier()
        # the block's tokens in chunk p: local_sorted[p*T + lo : p*T + hi], sorted by expert
        b_c = tl.load(chunk_counts + p64 * E + e0 + o_e, mask=m_e, other=0)
        lo = tl.load(chunk_offsets + p64 * E + e0)
        hi = lo + tl.sum(b_c, axis=0)
        p_local = local_sorted + p64 * tokens_per_program
        for s0 in range(lo, hi, BLOCK_T):
            m_s = s0 + o_t < hi
            b_tok = tl.load(p_local + s0 + o_t, mask=m_s, other=0).to(tl.int64)
            b_e, _ = _load_experts(expert_idx, b_tok, m_s, K, stride_b, stride_k, E)
            b_rank = tl.load(token_sorted_pos + b_tok, mask=m_s, other=0)
            b_pos = tl.load(p_base + (b_e - e0), mask=m_s, other=0) + b_rank
            tl.store(sorted_token_idx + b_pos.to(tl.int64), b_tok.to(tl.int32), mask=m_s)
            tl.store(token_sorted_pos + b_tok, b_pos, mask=m_s)
        b_base += b_c

    if is_last_block:
        # rows past the valid total stay empty only with out-of-range indices: mark them -1
        step = tl.num_programs(1) * BLOCK_T
        for r0 in range(num_valid + i_c * BLOCK_T, N, step):
            o_r = r0 + o_t
            tl.store(sorted_token_idx + o_r, tl.full([BLOCK_T], -1, dtype=tl.int32), mask=o_r < N)


@dataclass(frozen=True)
class GroupingPlan:
    """Launch parameters of the two grouping kernels for N assignments and E experts.

    ``elements_read()`` counts what the kernels' loops read (index, count-matrix and scratch elements),
    per the kernel code above: the test of the O(N + P*E) work bound reads it from here."""
    num_assignments: int
    num_experts: int
    programs: int            # P: chunks, one count program each
    tokens_per_program: int  # T
    expert_blocks: int       # J = cdiv(E, BLOCK_E): scatter grid axis 0
    chunk_ranges: int        # R: scatter grid axis 1
    chunks_per_range: int
    config: tuple            # (BLOCK_T, BLOCK_J, BLOCK_E, BLOCK_P, num_warps)

    def elements_read(self) -> dict[str, int]:
        """Elements each kernel's loads read in all (masked-off lanes are not reads)."""
        n, e, p = self.num_assignments, self.num_experts, self.programs
        # count: the rank walk reads each index as a row and as a column, plus its running count;
        # the second walk reads the index and the rank again; the row scan reads E counts
        count = 5 * n + p * e
        # scatter: each of the J * R programs passes over all P rows of its expert slice (plus one
        # offset per row); each chunk is then visited once per expert block (its counts and one
        # offset) and each token is read once (local row, index, rank, base)
        scatter = self.chunk_ranges * p * (e + self.expert_blocks) + p * (e + self.expert_blocks) + 4 * n
        return {"count": count, "scatter": scatter}


def plan_grouping(num_assignments: int, num_experts: int, config: dict[str, int], target_programs: int) -> GroupingPlan:
    """The launch parameters :func:`group_by_expert_fwd` uses for ``num_assignments`` = B*K, with the
    tiles of ``tuning.grouping_config`` and ``target_programs`` (the device's persistent-grid size)."""
    if num_assignments > MAX_ASSIGNMENTS:
        raise ValueError(f"group_by_expert: B*K = {num_assignments} assignments do not fit the int32 routing "
                         f"tensors (expected at most 2^31 - 1 = {MAX_ASSIGNMENTS}); split the batch")
    n, e = num_assignments, num_experts
    cfg = config
    block_t = cfg["BLOCK_T"]
    # P <= cdiv(N, E) keeps each [P, E] matrix within N + E entries
    programs = max(1, min(triton.cdiv(n, block_t), triton.cdiv(n, e)))
    tokens_per_program = max(1, triton.cdiv(triton.cdiv(n, programs), block_t)) * block_t
    programs = max(1, triton.cdiv(n, tokens_per_program))
    expert_blocks = triton.cdiv(e, cfg["BLOCK_E"])
    # enough scatter programs to fill the device, each range at least one chunk
    wanted = triton.cdiv(target_programs, expert_blocks)
    most = max(MIN_CHUNK_RANGES, REPEAT_BUDGET * n // max(1, programs * e))
    chunks_per_range = triton.cdiv(programs, max(1, min(programs, wanted, most)))
    chunk_ranges = triton.cdiv(programs, chunks_per_range)
    config = (block_t, cfg["BLOCK_J"], cfg["BLOCK_E"], cfg["BLOCK_P"], cfg["num_warps"])
    return GroupingPlan(n, e, programs, tokens_per_program, expert_blocks, chunk_ranges, chunks_per_range, config)


def group_by_expert_fwd(expert_idx: torch.Tensor, num_experts: int):
    """Launch both kernels. Returns (counts, offsets, sorted_token_idx, token_sorted_pos)."""
    idx2d = expert_idx if expert_idx.dim() == 2 else expert_idx.unsqueeze(1)
    B, K = idx2d.shape
    N, E, device = B * K, num_experts, expert_idx.device
    config = grouping_config(bucket_tokens(N), E, device_arch(device))
    plan = plan_grouping(N, E, config, max_programs(device))
    block_t, block_j, block_e, block_p, num_warps = plan.config
    P = plan.programs

    int32 = torch.int32
    expert_counts = torch.empty(E, dtype=int32, device=device)
    expert_offsets = torch.empty(E + 1, dtype=int32, device=device)
    sorted_token_idx = torch.empty(N, dtype=int32, device=device)
    token_sorted_pos = torch.empty(N, dtype=int32, device=device)
    scratch = torch.empty(2 * P * E + N + plan.expert_blocks * plan.chunk_ranges * block_e, dtype=int32, device=device)
    chunk_counts, chunk_offsets = scratch[:P * E], scratch[P * E:2 * P * E]
    local_sorted, block_base = scratch[2 * P * E:2 * P * E + N], scratch[2 * P * E + N:]

    with device_guard(expert_idx):
        _group_by_expert_count_fwd_kernel[(P,)](
            expert_idx=idx2d,
            token_rank=token_sorted_pos,
            chunk_counts=chunk_counts,
            chunk_offsets=chunk_offsets,
            local_sorted=local_sorted,
            N=N,
            K=K,
            stride_b=idx2d.stride(0),
            stride_k=idx2d.stride(1),
            E=E,
            tokens_per_program=plan.tokens_per_program,
            BLOCK_T=block_t,
            BLOCK_J=block_j,
            BLOCK_E=block_e,
            num_warps=num_warps,
        )
        _group_by_expert_scatter_fwd_kernel[(plan.expert_blocks, plan.chunk_ranges)](
            expert_idx=idx2d,
            chunk_counts=chunk_counts,
            chunk_offsets=chunk_offsets,
            local_sorted=local_sorted,
            block_base=block_base,
            expert_counts=expert_counts,
            expert_offsets=expert_offsets,
            sorted_token_idx=sorted_token_idx,
            token_sorted_pos=token_sorted_pos,
            N=N,
            K=K,
            stride_b=idx2d.stride(0),
            stride_k=idx2d.stride(1),
            E=E,
            P=P,
            tokens_per_program=plan.tokens_per_program,
            chunks_per_range=plan.chunks_per_range,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            BLOCK_P=block_p,
            num_warps=num_warps,
        )
    return expert_counts, expert_offsets, sorted_token_idx, token_sorted_pos


@torch.library.custom_op("smoe_fast::triton_group_by_expert", mutates_args=())
def _group_by_expert_op(expert_idx: torch.Tensor, num_experts: int, tile_block_m: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    counts, offsets, sorted_idx, sorted_pos = group_by_expert_fwd(expert_idx, num_experts)
    tiles = tile_offsets(counts, tile_block_m) if tile_block_m > 0 else counts.new_empty(0)
    return counts, offsets, sorted_idx, sorted_pos, tiles


@_group_by_expert_op.register_fake
def _(expert_idx, num_experts, tile_block_m):
    n = expert_idx.numel()
    new = lambda size: expert_idx.new_empty(size, dtype=torch.int32)  # noqa: E731
    return new(num_experts), new(num_experts + 1), new(n), new(n), new(num_experts + 1 if tile_block_m > 0 else 0)


def group_by_expert(expert_idx: torch.Tensor, num_experts: int) -> Routing:
    """Group top-1 ([B]) or top-k ([B,K]) assignments by expert, stably; see the module docstring.

    expert_idx [B] or [B, K] int64/int32 (already range-checked by ``smoe_fast.ops``) ->
    ``Routing(expert_counts [E], expert_offsets [E+1], sorted_token_idx [B*K], token_sorted_pos [B*K])``,
    all int32. Two kernel launches, no host synchronisation; B*K must be below 2^31.
    """
    counts, offsets, sorted_idx, sorted_pos, _ = _group_by_expert_op(expert_idx, num_experts, 0)
    return Routing(counts, offsets, sorted_idx, sorted_pos)


def group_by_expert_tiles(expert_idx: torch.Tensor, num_experts: int, block_m: int) -> tuple[Routing, torch.Tensor]:
    """:func:`group_by_expert` plus ``tile_offsets [E+1]`` int32, the exclusive scan of
    ``cdiv(expert_counts, block_m)``: a grid of tiles of ``block_m`` rows of one expert each, with no
    tile for an empty expert (a third launch). A program with tile id t finds its expert with
    ``launch.find_tile``; the number of tiles is at most ``launch.tile_bound(B*K, E, block_m)``."""
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    counts, offsets, sorted_idx, sorted_pos, tiles = _group_by_expert_op(expert_idx, num_experts, block_m)
    return Routing(counts, offsets, sorted_idx, sorted_pos), tiles
