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

Algorithm. The N = B*K flat assignments are cut into P contiguous chunks of ``tokens_per_program``
tokens, one program each, with P <= cdiv(N, E) so that the [P, E] count matrix is at most N + E
entries (memory O(N + E) for any E):

1. ``_group_by_expert_count_fwd_kernel``: program p zeroes its row ``block_counts[p, :]``, then walks
   its chunk in sub-tiles of BLOCK_T tokens. In a sub-tile, a token's rank among earlier tokens of
   the same expert comes from a BLOCK_T x BLOCK_T equality compare (BLOCK_J columns at a time); adding the running count
   ``block_counts[p, e]`` gives its stable rank within the chunk, stored in ``token_sorted_pos``
   (used as scratch). The last token of each expert in the sub-tile then advances the running count.
2. ``_group_by_expert_scatter_fwd_kernel``: program p reads the whole count matrix in
   [BLOCK_P, BLOCK_E] tiles and computes, per expert e, ``base[p, e] = offsets[e] + sum_{q<p}
   counts[q, e]`` (the expert-major exclusive scan of the matrix, as in a radix sort's digit scan).
   Program 0 also writes expert_counts, expert_offsets (and tile_offsets). Then every token goes to
   ``base[p, e] + rank``: sorted_token_idx[pos] = token, token_sorted_pos[token] = pos.

Every program repeats the scan of step 2 instead of waiting for one program to do it: that costs P
times the reads of the [P, E] matrix (L2 hits, and P*E <= N + E) but needs neither a third launch, a
zero-initialised semaphore, nor inter-program waiting. No host synchronisation anywhere: P depends
only on shapes.

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

import contextlib

import torch
import triton
import triton.language as tl

from smoe_fast.contract import Routing

from .tuning import bucket_tokens, grouping_config

__all__ = ["group_by_expert", "group_by_expert_tiles", "device_guard"]


@triton.jit
def _group_by_expert_count_fwd_kernel(
    expert_idx,          # [B, K] any strides, int32 or int64
    token_rank,          # [N] int32 out: stable rank within this program's chunk (-1: invalid index)
    block_counts,        # [P, E] int32 scratch out: tokens per expert in each chunk
    N, K, stride_b, stride_k, E, tokens_per_program,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    p_counts = block_counts + i_p * E
    o_e = tl.arange(0, BLOCK_E)
    for e0 in range(0, E, BLOCK_E):
        tl.store(p_counts + e0 + o_e, tl.zeros([BLOCK_E], dtype=tl.int32), mask=e0 + o_e < E)
    # the zeroed row is read by other threads of this program below
    tl.debug_barrier()

    o_t = tl.arange(0, BLOCK_T)
    o_j = tl.arange(0, BLOCK_J)
    for t0 in range(0, tokens_per_program, BLOCK_T):
        o_i = i_p * tokens_per_program + t0 + o_t
        m_i = o_i < N
        b_e = tl.load(expert_idx + (o_i // K) * stride_b + (o_i % K) * stride_k, mask=m_i, other=-1).to(tl.int64)
        m_valid = m_i & (b_e >= 0) & (b_e < E)
        b_e = tl.where(m_valid, b_e, -1)
        # rank among the sub-tile's earlier tokens of the same expert, BLOCK_J columns at a time: a
        # [BLOCK_T, BLOCK_T] compare at once spills registers (ptxas, sm_90: 11 KB at 256 x 256)
        b_before = tl.zeros([BLOCK_T], dtype=tl.int32)
        b_after = tl.zeros([BLOCK_T], dtype=tl.int32)
        for j0 in range(0, BLOCK_T, BLOCK_J):
            o_ij = i_p * tokens_per_program + t0 + j0 + o_j
            b_ej = tl.load(expert_idx + (o_ij // K) * stride_b + (o_ij % K) * stride_k, mask=o_ij < N, other=-1)
            # [BLOCK_T, BLOCK_J]: row i, column j; same expert, i valid (an invalid j never matches a valid i)
            b_same = (b_e[:, None] == b_ej.to(tl.int64)[None, :]) & m_valid[:, None]
            b_before += tl.sum((b_same & (j0 + o_j[None, :] < o_t[:, None])).to(tl.int32), axis=1)
            b_after += tl.sum((b_same & (j0 + o_j[None, :] > o_t[:, None])).to(tl.int32), axis=1)
        p_running = p_counts + tl.where(m_valid, b_e, 0)
        b_running = tl.load(p_running, mask=m_valid, other=0)
        tl.store(token_rank + o_i, tl.where(m_valid, b_running + b_before, -1), mask=m_i)
        # all reads of the running counts happen before the last token of each expert advances them
        tl.debug_barrier()
        tl.store(p_running, b_running + b_before + 1, mask=m_valid & (b_after == 0))
        tl.debug_barrier()


@triton.jit
def _group_by_expert_scatter_fwd_kernel(
    expert_idx,          # [B, K] any strides
    block_counts,        # [P, E] int32 from the count kernel
    block_base,          # [P, E] int32 scratch: first sorted row of (chunk p, expert e)
    expert_counts,       # [E] int32 out
    expert_offsets,      # [E+1] int32 out
    tile_offsets,        # [E+1] int32 out when HAS_TILES
    sorted_token_idx,    # [N] int32 out
    token_sorted_pos,    # [N] int32 in: rank within chunk; out: sorted position
    N, K, stride_b, stride_k, E, P, tokens_per_program, tile_block_m,
    HAS_TILES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    is_first = (i_p + tl.zeros([BLOCK_E], dtype=tl.int64)) == 0
    o_e = tl.arange(0, BLOCK_E)
    o_q = tl.arange(0, BLOCK_P)
    carry = 0
    tile_carry = 0
    for e0 in range(0, E, BLOCK_E):
        m_e = e0 + o_e < E
        b_total = tl.zeros([BLOCK_E], dtype=tl.int32)
        b_before = tl.zeros([BLOCK_E], dtype=tl.int32)
        for q0 in range(0, P, BLOCK_P):
            m_q = q0 + o_q < P
            # [BLOCK_P, BLOCK_E]
            b_c = tl.load(block_counts + (q0 + o_q[:, None]).to(tl.int64) * E + e0 + o_e[None, :],
                          mask=m_q[:, None] & m_e[None, :], other=0)
            b_total += tl.sum(b_c, axis=0)
            b_before += tl.sum(tl.where(q0 + o_q[:, None] < i_p, b_c, 0), axis=0)
        b_excl = carry + tl.cumsum(b_total, axis=0) - b_total
        tl.store(block_base + i_p * E + e0 + o_e, b_excl + b_before, mask=m_e)
        tl.store(expert_counts + e0 + o_e, b_total, mask=m_e & is_first)
        tl.store(expert_offsets + e0 + o_e, b_excl, mask=m_e & is_first)
        carry += tl.sum(b_total, axis=0)
        if HAS_TILES:
            b_tiles = (b_total + tile_block_m - 1) // tile_block_m
            tl.store(tile_offsets + e0 + o_e, tile_carry + tl.cumsum(b_tiles, axis=0) - b_tiles, mask=m_e & is_first)
            tile_carry += tl.sum(b_tiles, axis=0)
    tl.store(expert_offsets + E + o_e, carry + o_e * 0, mask=(o_e == 0) & is_first)
    if HAS_TILES:
        tl.store(tile_offsets + E + o_e, tile_carry + o_e * 0, mask=(o_e == 0) & is_first)
    # block_base written above by other threads of this program
    tl.debug_barrier()

    o_t = tl.arange(0, BLOCK_T)
    for t0 in range(0, tokens_per_program, BLOCK_T):
        o_i = i_p * tokens_per_program + t0 + o_t
        m_i = o_i < N
        b_e = tl.load(expert_idx + (o_i // K) * stride_b + (o_i % K) * stride_k, mask=m_i, other=-1).to(tl.int64)
        m_valid = m_i & (b_e >= 0) & (b_e < E)
        b_rank = tl.load(token_sorted_pos + o_i, mask=m_i, other=0)
        b_pos = tl.load(block_base + i_p * E + tl.where(m_valid, b_e, 0), mask=m_valid, other=0) + b_rank
        b_pos = tl.where(m_valid, b_pos, -1)
        tl.store(token_sorted_pos + o_i, b_pos, mask=m_i)
        tl.store(sorted_token_idx + b_pos.to(tl.int64), o_i.to(tl.int32), mask=m_valid)
        # rows past the valid total stay empty only with out-of-range indices: mark them -1
        tl.store(sorted_token_idx + o_i, tl.full([BLOCK_T], -1, dtype=tl.int32), mask=m_i & (o_i >= carry))


def device_guard(tensor: torch.Tensor):
    """Launch on ``tensor``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _program_split(num_rows: int, num_experts: int, block_t: int) -> tuple[int, int]:
    """(programs, tokens_per_program): P <= cdiv(N, E) keeps the [P, E] scratch within N + E entries."""
    max_programs = max(1, triton.cdiv(num_rows, num_experts))
    programs = max(1, min(triton.cdiv(num_rows, block_t), max_programs))
    tokens_per_program = max(1, triton.cdiv(triton.cdiv(num_rows, programs), block_t)) * block_t
    return max(1, triton.cdiv(num_rows, tokens_per_program)), tokens_per_program


def group_by_expert_fwd(expert_idx: torch.Tensor, num_experts: int, tile_block_m: int = 0):
    """Launch both kernels. Returns (counts, offsets, sorted_token_idx, token_sorted_pos, tile_offsets);
    tile_offsets is empty unless ``tile_block_m > 0``."""
    idx2d = expert_idx if expert_idx.dim() == 2 else expert_idx.unsqueeze(1)
    B, K = idx2d.shape
    N, E, device = B * K, num_experts, expert_idx.device
    config = grouping_config(bucket_tokens(N), E, device)
    programs, tokens_per_program = _program_split(N, E, config["BLOCK_T"])

    int32 = torch.int32
    expert_counts = torch.empty(E, dtype=int32, device=device)
    expert_offsets = torch.empty(E + 1, dtype=int32, device=device)
    tile_offsets = torch.empty(E + 1 if tile_block_m > 0 else 0, dtype=int32, device=device)
    sorted_token_idx = torch.empty(N, dtype=int32, device=device)
    token_sorted_pos = torch.empty(N, dtype=int32, device=device)
    scratch = torch.empty(2 * programs * E, dtype=int32, device=device)
    block_counts, block_base = scratch[:programs * E], scratch[programs * E:]

    with device_guard(expert_idx):
        _group_by_expert_count_fwd_kernel[(programs,)](
            expert_idx=idx2d,
            token_rank=token_sorted_pos,
            block_counts=block_counts,
            N=N,
            K=K,
            stride_b=idx2d.stride(0),
            stride_k=idx2d.stride(1),
            E=E,
            tokens_per_program=tokens_per_program,
            BLOCK_T=config["BLOCK_T"],
            BLOCK_J=config["BLOCK_J"],
            BLOCK_E=config["BLOCK_E"],
            num_warps=config["num_warps"],
        )
        _group_by_expert_scatter_fwd_kernel[(programs,)](
            expert_idx=idx2d,
            block_counts=block_counts,
            block_base=block_base,
            expert_counts=expert_counts,
            expert_offsets=expert_offsets,
            tile_offsets=tile_offsets,
            sorted_token_idx=sorted_token_idx,
            token_sorted_pos=token_sorted_pos,
            N=N,
            K=K,
            stride_b=idx2d.stride(0),
            stride_k=idx2d.stride(1),
            E=E,
            P=programs,
            tokens_per_program=tokens_per_program,
            tile_block_m=max(1, tile_block_m),
            HAS_TILES=tile_block_m > 0,
            BLOCK_T=config["BLOCK_T"],
            BLOCK_E=config["BLOCK_E"],
            BLOCK_P=config["BLOCK_P"],
            num_warps=config["num_warps"],
        )
    return expert_counts, expert_offsets, sorted_token_idx, token_sorted_pos, tile_offsets


@torch.library.custom_op("smoe_fast::triton_group_by_expert", mutates_args=())
def _group_by_expert_op(expert_idx: torch.Tensor, num_experts: int, tile_block_m: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return group_by_expert_fwd(expert_idx, num_experts, tile_block_m)


@_group_by_expert_op.register_fake
def _(expert_idx, num_experts, tile_block_m):
    n = expert_idx.numel()
    new = lambda size: expert_idx.new_empty(size, dtype=torch.int32)  # noqa: E731
    return new(num_experts), new(num_experts + 1), new(n), new(n), new(num_experts + 1 if tile_block_m > 0 else 0)


def group_by_expert(expert_idx: torch.Tensor, num_experts: int) -> Routing:
    """Group top-1 ([B]) or top-k ([B,K]) assignments by expert, stably; see the module docstring.

    expert_idx [B] or [B, K] int64/int32 (already range-checked by ``smoe_fast.ops``) ->
    ``Routing(expert_counts [E], expert_offsets [E+1], sorted_token_idx [B*K], token_sorted_pos [B*K])``,
    all int32. Two kernel launches, no host synchronisation.
    """
    counts, offsets, sorted_idx, sorted_pos, _ = _group_by_expert_op(expert_idx, num_experts, 0)
    return Routing(counts, offsets, sorted_idx, sorted_pos)


def group_by_expert_tiles(expert_idx: torch.Tensor, num_experts: int, block_m: int) -> tuple[Routing, torch.Tensor]:
    """:func:`group_by_expert` plus ``tile_offsets [E+1]`` int32, the exclusive scan of
    ``cdiv(expert_counts, block_m)``: a grid of tiles of ``block_m`` rows of one expert each, with no
    tile for an empty expert. A program with tile id t finds its expert by a binary search of
    tile_offsets; the number of tiles is at most ``cdiv(B*K, block_m) + min(E, B*K)``. Same launches."""
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    counts, offsets, sorted_idx, sorted_pos, tiles = _group_by_expert_op(expert_idx, num_experts, block_m)
    return Routing(counts, offsets, sorted_idx, sorted_pos), tiles
