"""Top-k experts for training: x_hat[b] = sum_k topk_gates[b, k] * D_{topk_idx[b, k]}(z[b]).

Each (token, slot) row runs through its one expert only. ``group_by_expert`` (kernels/grouping.py)
sorts the B*K rows by expert; expert e's rows are cut into cdiv(count_e, BM) tiles and
``tile_offsets`` (exclusive scan of tiles per expert, one launch on the device: no host sync)
numbers them. A tile finds its expert by binary search over tile_offsets. The grid is bounded by
cdiv(B*K, BM) + min(E, B*K) tiles, whatever the routing, and is persistent (<= 2 programs per SM), so
time depends on B*K, not on E; empty experts cost nothing. (Weight-gradient tensors are [E, ...]
and are written in full, zeros for unused experts: that much is O(E) by definition.)

Forward (``_experts_topk_fwd_kernel``): each tile writes its gated rows to their (token, slot)
place of y_slots [B*K, 784]; torch sums the K slots (deterministic). lite scratch: grid*16*3528 fp32.

Backward (``_experts_topk_bwd_kernel``): each tile recomputes its rows' forward and writes d gate
[B*K], dz per slot [B*K, L] (summed over K by torch) and one packed partial weight-gradient row per
tile [n_tiles_bound, W] fp32; ``_segment_sum_kernel`` then sums each expert's contiguous
tile rows in order (a deterministic segment sum, no atomics). Partial memory <= (cdiv(B*K, 16) +
min(E, B*K)) * W, i.e. at most about the size of the weight gradient plus one row per 16 slots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoe_fast.contract import IMAGE_PIXELS as PIXELS, IMAGE_SHAPE, alloc_output

from .decoder_blocks import (BLOCK_M, SCRATCH_BWD, SCRATCH_FWD,
                             _experts_bwd_body, _experts_fwd_body, kernel_weights, latent_pad, launch_dims,
                             partial_layout, _segment_sum_kernel, unpack_partials, weight_args)
from .experts_medium import experts_medium
from .grouping import group_by_expert
from .tuning import training_config
from .launch import device_arch, device_guard, dot_precision, log2_ceil, max_programs, tile_bound, tile_offsets

_REDUCE_BLOCK = 1024  # weight-gradient columns per segment-sum program


@triton.jit
def _experts_topk_fwd_kernel(
    p_z, stride_zb, stride_zl, p_g, stride_gb, stride_gk, p_out,
    p_wa, p_wb, p_wc, p_wd, p_we, p_wf, p_scratch, p_sorted, p_eoff, p_toff,
    B, L, H, E, K, n_items,
    IS_MLP: tl.constexpr, LOG_E: tl.constexpr, LP: tl.constexpr, HP: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    # items are expert tiles; each writes gated rows to their (token, slot) row of p_out
    _experts_fwd_body(
        p_z, stride_zb, stride_zl, p_g, stride_gb, stride_gk, p_out,
        p_wa, p_wb, p_wc, p_wd, p_we, p_wf, p_scratch, p_sorted, p_eoff, p_toff,
        B, L, H, E, K, n_items,
        False, IS_MLP, LOG_E, LP, HP, BM, BR, BN, PREC,
    )


@triton.jit
def _experts_topk_bwd_kernel(
    p_do, stride_dob, stride_dop, p_z, stride_zb, stride_zl, p_g, stride_gb, stride_gk,
    p_dz, p_dg, p_part, W_TOTAL,
    p_wa, p_wb, p_wc, p_wd, p_we, p_wf, p_scratch, p_sorted, p_eoff, p_toff,
    B, L, H, E, K, n_items,
    IS_MLP: tl.constexpr, LOG_E: tl.constexpr, LP: tl.constexpr, HP: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    # items are expert tiles; one partial weight-gradient row per tile
    _experts_bwd_body(
        p_do, stride_dob, stride_dop, p_z, stride_zb, stride_zl, p_g, stride_gb, stride_gk,
        p_dz, p_dg, p_part, W_TOTAL,
        p_wa, p_wb, p_wc, p_wd, p_we, p_wf, p_scratch, p_sorted, p_eoff, p_toff,
        B, L, H, E, K, n_items, 1,
        False, IS_MLP, LOG_E, LP, HP, BM, BR, BN, PREC,
    )


def experts_topk_fwd(z: torch.Tensor, topk_gates: torch.Tensor, sorted_token_idx: torch.Tensor,
                     expert_offsets: torch.Tensor, tile_offs: torch.Tensor, ws: list[torch.Tensor],
                     kind: str) -> torch.Tensor:
    """Launcher: rows grouped by expert -> x_hat [B, 784]."""
    num_experts, latent, hidden = launch_dims(z, ws, kind)
    batch, top_k = topk_gates.shape
    out_dtype = torch.promote_types(z.dtype, topk_gates.dtype)
    if batch == 0:
        return alloc_output((0, PIXELS), like=z, dtype=out_dtype)
    is_mlp = kind == "mlp"
    n_items = tile_bound(batch * top_k, num_experts, BLOCK_M)
    grid_m = min(n_items, max_programs(z.device))
    y_slots = alloc_output((batch * top_k, PIXELS), like=z, dtype=torch.float32)
    scratch = z.new_empty(0 if is_mlp else grid_m * BLOCK_M * SCRATCH_FWD, dtype=torch.float32)
    config = training_config(kind, "fwd", device_arch(z.device))
    block_n = config["BN"]
    _experts_topk_fwd_kernel[(grid_m, triton.cdiv(PIXELS, block_n))](
        z, z.stride(0), z.stride(1), topk_gates, topk_gates.stride(0), topk_gates.stride(1), y_slots,
        *weight_args(ws), scratch, sorted_token_idx, expert_offsets, tile_offs,
        batch, latent, hidden, num_experts, top_k, n_items,
        IS_MLP=is_mlp,
        LOG_E=log2_ceil(num_experts),
        LP=latent_pad(latent),
        HP=max(16, triton.next_power_of_2(hidden)),
        BM=BLOCK_M,
        BR=config["BR"],
        BN=block_n,
        PREC=dot_precision(z.dtype),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return y_slots.view(batch, top_k, PIXELS).sum(1).to(out_dtype)


def experts_topk_bwd(grad_out: torch.Tensor, z: torch.Tensor, topk_gates: torch.Tensor,
                     sorted_token_idx: torch.Tensor, expert_offsets: torch.Tensor, tile_offs: torch.Tensor,
                     ws: list[torch.Tensor], kind: str) -> list[torch.Tensor]:
    """Launcher: dL/dx_hat [B, 784] -> [dz, d topk_gates, d(each kernel weight)], deterministic."""
    num_experts, latent, hidden = launch_dims(z, ws, kind)
    batch, top_k = topk_gates.shape
    if batch == 0:
        return [torch.zeros_like(z), torch.zeros_like(topk_gates)] + [torch.zeros_like(w) for w in ws]
    sizes = partial_layout(kind, latent, hidden)
    is_mlp = kind == "mlp"
    config = training_config(kind, "bwd", device_arch(z.device))
    n_items = tile_bound(batch * top_k, num_experts, BLOCK_M)
    grid_m = min(n_items, max_programs(z.device))
    partials = alloc_output((n_items, sum(sizes)), like=z, dtype=torch.float32)
    dz_slots = alloc_output((batch * top_k, latent), like=z, dtype=torch.float32)
    dgates = alloc_output((batch, top_k), like=topk_gates)
    scratch = z.new_empty(0 if is_mlp else grid_m * BLOCK_M * SCRATCH_BWD, dtype=torch.float32)
    _experts_topk_bwd_kernel[(grid_m,)](
        grad_out, grad_out.stride(0), grad_out.stride(1), z, z.stride(0), z.stride(1),
        topk_gates, topk_gates.stride(0), topk_gates.stride(1),
        dz_slots, dgates, partials, sum(sizes),
        *weight_args(ws), scratch, sorted_token_idx, expert_offsets, tile_offs,
        batch, latent, hidden, num_experts, top_k, n_items,
        IS_MLP=is_mlp,
        LOG_E=log2_ceil(num_experts),
        LP=latent_pad(latent),
        HP=max(16, triton.next_power_of_2(hidden)),
        BM=BLOCK_M,
        BR=config["BR"],
        BN=config["BN"],
        PREC=dot_precision(z.dtype),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    flat = alloc_output((num_experts, sum(sizes)), like=z, dtype=torch.float32)
    _segment_sum_kernel[(num_experts, triton.cdiv(sum(sizes), _REDUCE_BLOCK))](
        partials, tile_offs, flat, sum(sizes),
        BLOCK=_REDUCE_BLOCK,
    )
    weight_grads = unpack_partials(flat, ws, kind, latent, hidden)
    return [dz_slots.view(batch, top_k, latent).sum(1).to(z.dtype), dgates] + weight_grads


@torch.library.custom_op("smoe_fast::triton_experts_topk", mutates_args=())
def _experts_topk_op(z: torch.Tensor, topk_gates: torch.Tensor, sorted_token_idx: torch.Tensor,
                     expert_offsets: torch.Tensor, tile_offs: torch.Tensor, ws: list[torch.Tensor],
                     kind: str) -> torch.Tensor:
    with device_guard(z):
        return experts_topk_fwd(z, topk_gates, sorted_token_idx, expert_offsets, tile_offs, ws, kind)


@_experts_topk_op.register_fake
def _(z, topk_gates, sorted_token_idx, expert_offsets, tile_offs, ws, kind):
    return z.new_empty((z.shape[0], PIXELS), dtype=torch.promote_types(z.dtype, topk_gates.dtype))


@torch.library.custom_op("smoe_fast::triton_experts_topk_bwd", mutates_args=())
def _experts_topk_bwd_op(grad_out: torch.Tensor, z: torch.Tensor, topk_gates: torch.Tensor,
                         sorted_token_idx: torch.Tensor, expert_offsets: torch.Tensor, tile_offs: torch.Tensor,
                         ws: list[torch.Tensor], kind: str) -> list[torch.Tensor]:
    with device_guard(z):
        return experts_topk_bwd(grad_out, z, topk_gates, sorted_token_idx, expert_offsets, tile_offs, ws, kind)


@_experts_topk_bwd_op.register_fake
def _(grad_out, z, topk_gates, sorted_token_idx, expert_offsets, tile_offs, ws, kind):
    return [torch.empty_like(z), torch.empty_like(topk_gates)] + [torch.empty_like(w) for w in ws]


def _setup_context(ctx, inputs, output):
    z, topk_gates, sorted_token_idx, expert_offsets, tile_offs, ws, kind = inputs
    ctx.save_for_backward(z, topk_gates, sorted_token_idx, expert_offsets, tile_offs, *ws)
    ctx.kind = kind


def _backward(ctx, grad_out):
    z, topk_gates, sorted_token_idx, expert_offsets, tile_offs, *ws = ctx.saved_tensors
    grads = _experts_topk_bwd_op(grad_out, z, topk_gates, sorted_token_idx, expert_offsets, tile_offs, ws, ctx.kind)
    return grads[0], grads[1], None, None, None, list(grads[2:]), None


torch.library.register_autograd("smoe_fast::triton_experts_topk", _backward, setup_context=_setup_context)


def experts_topk(z: torch.Tensor, topk_idx: torch.Tensor, topk_gates: torch.Tensor,
                 weights: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Top-k experts: ``x_hat[b] = sum_k topk_gates[b, k] * D_{topk_idx[b, k]}(z[b])``.

    z [B, L], topk_idx [B, K] int64, topk_gates [B, K], weights stacked per layer, kind "lite" or
    "mlp" (fused) or "medium" (layer by layer) -> x_hat [B, 1, 28, 28]; differentiable in z, topk_gates and weights. Inputs are assumed
    checked (smoe_fast.ops does that).

    >>> g, i = logits.softmax(-1).topk(2); y = experts_topk(z, i, g / g.sum(-1, keepdim=True), w, "lite")
    """
    if kind == "medium":
        # too big to fuse per row block: layer by layer over grouped rows
        return experts_medium(z, topk_idx, topk_gates, weights)
    ws = kernel_weights(weights, kind)
    routing = group_by_expert(topk_idx, ws[0].shape[0])
    y = _experts_topk_op(z, topk_gates, routing.sorted_token_idx, routing.expert_offsets,
                         tile_offsets(routing.expert_counts, BLOCK_M), ws, kind)
    return y.view(z.shape[0], *IMAGE_SHAPE)
