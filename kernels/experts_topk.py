"""Top-k experts for training: x_hat[b] = sum_k topk_gates[b, k] * D_{topk_idx[b, k]}(z[b]).

Each (token, slot) row runs through its one expert only. ``group_by_expert`` (kernels/grouping.py)
sorts the B*K rows by expert; expert e's rows are cut into cdiv(count_e, BM) tiles and
``tile_offsets`` (exclusive scan of tiles per expert, one launch on the device: no host sync)
numbers them. A tile finds its expert by binary search over tile_offsets. The grid is bounded by
cdiv(B*K, BM) + min(E, B*K) tiles, whatever the routing, and is persistent (<= 2 programs per SM), so
time depends on B*K, not on E; empty experts cost nothing. (Weight-gradient tensors are [E, ...]
and are written in full, zeros for unused experts: that much is O(E) by definition.)

Forward: each tile writes its gated rows to their (token, slot) place of y_slots [B*K, 784] fp32;
torch sums the K slots (deterministic). lite (``_experts_topk_lite_fwd_kernel``) runs the hard
kernel's per-tile decoder (kernels/decoder_tiles.py) in its gated mode, scratch ``programs *
conv_scratch_size``; mlp (``_experts_topk_mlp_fwd_kernel``) keeps both layers on chip.

Backward (``_experts_topk_bwd_kernel``): each tile recomputes its rows' forward and writes d gate
[B*K], dz per slot [B*K, L] (summed over K by torch) and one packed partial weight-gradient row per
tile [n_tiles_bound, W] fp32; ``_segment_sum_kernel`` then sums each expert's contiguous
tile rows in order (a deterministic segment sum, no atomics). Partial memory <= (cdiv(B*K, 16) +
min(E, B*K)) * W, i.e. at most about the size of the weight gradient plus one row per 16 slots.

Precision: every GEMM tile goes through ``launch.mm`` in the mode ``launch.dot_mode`` gives for z's
dtype: IEEE fp32 by default, TF32 when torch allows it, and under autocast (z cast once by
``launch.autocast_input``) bf16/fp16 tensor cores with fp32 accumulation. The weights stay fp32 and
are cast per tile, so weight gradients, partials and sums are fp32; dz comes back in z's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoe_fast.contract import IMAGE_PIXELS as PIXELS, IMAGE_SHAPE, alloc_output

from .decoder_blocks import (BLOCK_M, _mlp_experts_bwd_body, _mlp_experts_fwd_body, _segment_sum_kernel, kernel_weights,
                             latent_pad, launch_dims, partial_layout, partials_to_grads)
from .decoder_tiles import CONV_CHANNELS, _conv_decoder_tile, conv_scratch_size, map_dtype, scratch_maps
from .decoder_tiles_bwd import _lite_experts_bwd_body, conv_bwd_scratch_size
from .experts_medium import experts_medium
from .grouping import group_by_expert
from .launch import (autocast_input, device_arch, device_guard, dot_mode, find_tile, log2_ceil, max_programs,
                     register_cap, tile_bound, tile_offsets)
from .tuning import training_lite_bwd_config, training_lite_fwd_config, training_mlp_config

_REDUCE_BLOCK = 1024  # weight-gradient columns per segment-sum program


@triton.jit
def _experts_topk_lite_fwd_kernel(
    z,                   # [B, L] any strides
    out,                 # [B*K, 784] fp32, (token, slot) order
    scratch,             # [programs, scratch_per_program] fp32, zero-filled (the maps' borders)
    sorted_token_idx,    # [B*K] int32: flat (token, slot) ids sorted by expert
    expert_offsets,      # [E+1] int32
    tile_offsets,        # [E+1] int32
    gates,               # [B*K] contiguous
    fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b,
    E, K, L, stride_zb, stride_zl, max_tiles, scratch_per_program,
    LOG_E: tl.constexpr,
    MAPS: tl.constexpr,
    C0: tl.constexpr,
    C1: tl.constexpr,
    BM: tl.constexpr,
    TS: tl.constexpr,
    BR: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BN_FC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Persistent over expert tiles: out[f] = gates[f] * D_e(z[f // K]) for the tile's slots f."""
    i_p = tl.program_id(0)
    p_h0, p_h1, p_h2 = scratch_maps(scratch, scratch_per_program, C0, C1, False, BM, TS, MAPS)
    for tile in range(i_p, max_tiles, tl.num_programs(0)):
        e, row_start, n_rows = find_tile(tile_offsets, expert_offsets, tile, E, LOG_E, BM)
        if n_rows > 0:
            _conv_decoder_tile(z, stride_zb, stride_zl, K, sorted_token_idx + row_start, n_rows, e,
                               out, gates, 1, 0, 0,
                               fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b, conv2_w, conv2_b, L, p_h0, p_h1, p_h2,
                               C0, C1, 1, False, BM, TS, BR, BLOCK_L, BN_FC, True, INPUT_PRECISION)


@triton.jit
def _experts_topk_mlp_fwd_kernel(
    p_z, stride_zb, stride_zl, p_g, stride_gb, stride_gk, p_out,
    p_w1, p_b1, p_w2, p_b2, p_sorted, p_eoff, p_toff,
    B, L, H, E, K, n_items,
    LOG_E: tl.constexpr, LP: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr,
):
    # items are expert tiles; each writes gated rows to their (token, slot) row of p_out
    _mlp_experts_fwd_body(
        p_z, stride_zb, stride_zl, p_g, stride_gb, stride_gk, p_out,
        p_w1, p_b1, p_w2, p_b2, p_sorted, p_eoff, p_toff,
        B, L, H, E, K, n_items, 1, 1,
        False, LOG_E, LP, HP, BM, BN, PREC,
    )


@triton.jit
def _experts_topk_lite_bwd_kernel(
    z, stride_zb, stride_zl, p_do, stride_dob, stride_dop, gates,
    p_dz, p_dg, p_part, W_TOTAL, scratch, scratch_per_program, sorted_token_idx, expert_offsets, tile_offsets,
    fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b,
    B, L, E, K, n_items,
    LOG_E: tl.constexpr, BM: tl.constexpr, TS: tl.constexpr, BR: tl.constexpr, LP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # items are expert tiles (kernels/decoder_tiles_bwd.py); one partial weight-gradient row per tile
    _lite_experts_bwd_body(
        z, stride_zb, stride_zl, p_do, stride_dob, stride_dop, gates, 1, 0,
        p_dz, p_dg, p_part, W_TOTAL, scratch, scratch_per_program, sorted_token_idx, expert_offsets, tile_offsets,
        fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b,
        B, L, E, K, n_items, 1, 1, 1,
        False, LOG_E, BM, TS, BR, LP, INPUT_PRECISION,
    )


@triton.jit
def _experts_topk_mlp_bwd_kernel(
    p_do, stride_dob, stride_dop, p_z, stride_zb, stride_zl, p_g, stride_gb, stride_gk,
    p_dz, p_dg, p_part, W_TOTAL,
    p_w1, p_b1, p_w2, p_b2, p_sorted, p_eoff, p_toff,
    B, L, H, E, K, n_items,
    LOG_E: tl.constexpr, LP: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr,
):
    # items are expert tiles; one partial weight-gradient row per tile
    _mlp_experts_bwd_body(
        p_do, stride_dob, stride_dop, p_z, stride_zb, stride_zl, p_g, stride_gb, stride_gk,
        p_dz, p_dg, p_part, W_TOTAL,
        p_w1, p_b1, p_w2, p_b2, p_sorted, p_eoff, p_toff,
        B, L, H, E, K, n_items, 1, 1, 1,
        False, LOG_E, LP, HP, BM, BN, PREC,
    )


def experts_topk_fwd(z: torch.Tensor, topk_gates: torch.Tensor, sorted_token_idx: torch.Tensor,
                     expert_offsets: torch.Tensor, tile_offs: torch.Tensor, ws: list[torch.Tensor],
                     kind: str) -> torch.Tensor:
    """Launcher: rows grouped by expert (tiles of BLOCK_M) -> x_hat [B, 784]."""
    num_experts, latent, hidden = launch_dims(z, ws, kind)
    batch, top_k = topk_gates.shape
    out_dtype = torch.promote_types(z.dtype, topk_gates.dtype)
    if batch == 0:
        return alloc_output((0, PIXELS), like=z, dtype=out_dtype)
    device = z.device
    arch = device_arch(device)
    dot = dot_mode(z.dtype, device)
    n_items = tile_bound(batch * top_k, num_experts, BLOCK_M)
    programs = min(n_items, max_programs(device))
    y_slots = alloc_output((batch * top_k, PIXELS), like=z, dtype=torch.float32)
    if kind == "lite":
        config = training_lite_fwd_config(arch, dot, "topk")
        if config["BM"] != BLOCK_M:
            raise RuntimeError(f"the top-k lite forward tile has {config['BM']} rows, the routing's tiles {BLOCK_M}")
        per_program = conv_scratch_size("lite", BLOCK_M, config["TS"], map_dtype(dot))
        c0, c1, _ = CONV_CHANNELS["lite"]
        _experts_topk_lite_fwd_kernel[(programs,)](
            z=z,
            out=y_slots,
            # zero-filled once per call: the maps' borders (the conv padding) are never written
            scratch=torch.zeros(programs * per_program, dtype=torch.float32, device=device),
            sorted_token_idx=sorted_token_idx,
            expert_offsets=expert_offsets,
            tile_offsets=tile_offs,
            gates=topk_gates.contiguous(),
            fc_w=ws[0],
            fc_b=ws[1],
            conv1_w=ws[2],
            conv1_b=ws[3],
            conv2_w=ws[4],
            conv2_b=ws[5],
            E=num_experts,
            K=top_k,
            L=latent,
            stride_zb=z.stride(0),
            stride_zl=z.stride(1),
            max_tiles=n_items,
            scratch_per_program=per_program,
            LOG_E=log2_ceil(num_experts),
            MAPS=map_dtype(dot),
            C0=c0,
            C1=c1,
            BM=BLOCK_M,
            TS=config["TS"],
            BR=config["BR"],
            BLOCK_L=latent_pad(latent),
            BN_FC=64,
            INPUT_PRECISION=dot,
            num_warps=config["num_warps"],
            # the whole register file for one CTA: without the cap ptxas took 64 registers and spilled
            # 84 B in IEEE with 16 warps (audit, sm_90), with it 123 and none
            maxnreg=register_cap(config["num_warps"]),
        )
    else:
        config = training_mlp_config(arch, "fwd", dot)
        _experts_topk_mlp_fwd_kernel[(programs, triton.cdiv(PIXELS, config["BN"]))](
            z, z.stride(0), z.stride(1), topk_gates, topk_gates.stride(0), topk_gates.stride(1), y_slots,
            *ws, sorted_token_idx, expert_offsets, tile_offs,
            batch, latent, hidden, num_experts, top_k, n_items,
            LOG_E=log2_ceil(num_experts),
            LP=latent_pad(latent),
            HP=max(16, triton.next_power_of_2(hidden)),
            BM=BLOCK_M,
            BN=config["BN"],
            PREC=dot,
            num_warps=config["num_warps"],
            num_stages=config["num_stages"],
        )
    return y_slots.view(batch, top_k, PIXELS).sum(1).to(out_dtype)


def experts_topk_bwd(grad_out: torch.Tensor, z: torch.Tensor, topk_gates: torch.Tensor,
                     sorted_token_idx: torch.Tensor, expert_offsets: torch.Tensor, tile_offs: torch.Tensor,
                     ws: list[torch.Tensor], kind: str) -> list[torch.Tensor]:
    """Launcher: dL/dx_hat [B, 784] -> [dz, d topk_gates, d(each stacked weight)], deterministic."""
    num_experts, latent, hidden = launch_dims(z, ws, kind)
    batch, top_k = topk_gates.shape
    if batch == 0:
        return [torch.zeros_like(z), torch.zeros_like(topk_gates)] + [torch.zeros_like(w) for w in ws]
    device = z.device
    arch = device_arch(device)
    weights_per_expert = sum(partial_layout(kind, latent, hidden))
    n_items = tile_bound(batch * top_k, num_experts, BLOCK_M)
    programs = min(n_items, max_programs(device))
    partials = alloc_output((n_items, weights_per_expert), like=z, dtype=torch.float32)
    dz_slots = alloc_output((batch * top_k, latent), like=z, dtype=torch.float32)
    dgates = alloc_output((batch, top_k), like=topk_gates)
    if kind == "lite":
        config = training_lite_bwd_config(arch)
        if config["BM"] != BLOCK_M:
            raise RuntimeError(f"the top-k lite backward tile has {config['BM']} rows, the routing's tiles {BLOCK_M}")
        per_program = conv_bwd_scratch_size(BLOCK_M, config["TS"])
        _experts_topk_lite_bwd_kernel[(programs,)](
            z, z.stride(0), z.stride(1), grad_out, grad_out.stride(0), grad_out.stride(1), topk_gates.contiguous(),
            dz_slots, dgates, partials, weights_per_expert,
            # zero-filled once per call: the maps' borders (the conv padding) are never written
            torch.zeros(programs * per_program, dtype=torch.float32, device=device), per_program,
            sorted_token_idx, expert_offsets, tile_offs,
            *ws,
            batch, latent, num_experts, top_k, n_items,
            LOG_E=log2_ceil(num_experts),
            BM=BLOCK_M,
            TS=config["TS"],
            BR=config["BR"],
            LP=latent_pad(latent),
            INPUT_PRECISION=dot_mode(z.dtype, device),
            num_warps=config["num_warps"],
            # 128 registers stated: without the cap ptxas took as few as 40 and spilled up to 13.8 KB
            # (bf16, sm_80); with it 4.0-7.6 KB on sm_80, sm_86 and sm_90 in every mode (audit)
            maxnreg=register_cap(config["num_warps"]),
        )
    else:
        config = training_mlp_config(arch, "bwd")
        _experts_topk_mlp_bwd_kernel[(programs,)](
            grad_out, grad_out.stride(0), grad_out.stride(1), z, z.stride(0), z.stride(1),
            topk_gates, topk_gates.stride(0), topk_gates.stride(1),
            dz_slots, dgates, partials, weights_per_expert,
            *ws, sorted_token_idx, expert_offsets, tile_offs,
            batch, latent, hidden, num_experts, top_k, n_items,
            LOG_E=log2_ceil(num_experts),
            LP=latent_pad(latent),
            HP=max(16, triton.next_power_of_2(hidden)),
            BM=BLOCK_M,
            BN=config["BN"],
            PREC=dot_mode(z.dtype, device),
            num_warps=config["num_warps"],
            num_stages=config["num_stages"],
        )
    flat = alloc_output((num_experts, weights_per_expert), like=z, dtype=torch.float32)
    _segment_sum_kernel[(num_experts, triton.cdiv(weights_per_expert, _REDUCE_BLOCK))](
        partials, tile_offs, flat, weights_per_expert,
        BLOCK=_REDUCE_BLOCK,
    )
    return ([dz_slots.view(batch, top_k, latent).sum(1).to(z.dtype), dgates]
            + partials_to_grads(flat, ws, kind, latent, hidden))


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
    z = autocast_input(z)
    if kind == "medium":
        # too big to fuse per row block: layer by layer over grouped rows
        return experts_medium(z, topk_idx, topk_gates, weights)
    ws = kernel_weights(weights, kind)
    routing = group_by_expert(topk_idx, ws[0].shape[0])
    y = _experts_topk_op(z, topk_gates, routing.sorted_token_idx, routing.expert_offsets,
                         tile_offsets(routing.expert_counts, BLOCK_M), ws, kind)
    return y.view(z.shape[0], *IMAGE_SHAPE)
