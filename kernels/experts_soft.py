"""Soft-gated experts for training: x_hat = sum_e gates[:, e] * D_e(z), forward and backward in Triton.

Nothing of size B x E is stored except the gates and their gradient: no [B, E, 1, 28, 28] output, no
per-expert activation, no per-expert partial dz. Memory beyond inputs, outputs and weight gradients
is bounded by the grid (``decoder_blocks.soft_forward_split`` / ``soft_backward_split``), and the
backward recomputes each expert's forward rather than keeping it.

Forward. Items are (block of BM tokens, group of experts); ``soft_forward_split`` makes enough
groups that the items fill the persistent grid (B = 1,024 is 64 blocks of 16, fewer than the 264
programs of an H100) and no more. Each item runs its block through its group's experts in turn and
sums the gated images in place in out[group], fp32 [groups, B, 784]; torch sums the groups
(deterministic; one group writes the output directly).
  - lite (``_experts_soft_lite_fwd_kernel``): the hard kernel's per-tile decoder
    (kernels/decoder_tiles.py: phase-split convolutions on token-innermost scratch) in its
    gated-accumulate mode; scratch ``programs * conv_scratch_size`` fp32.
  - mlp (``_experts_soft_mlp_fwd_kernel``): both layers on chip, axis 1 tiles the output pixels.

Backward (``_experts_soft_bwd_kernel``). Items are (group of experts, run of token blocks). Each item,
expert by expert, recomputes the expert's forward on its tokens and backpropagates:
  - d gates [B, E] written directly (each (token, expert) by exactly one item);
  - partial dz [groups, B, L] fp32: an item adds its experts' dz in order into its group's row
    (one writer per element), torch sums the groups;
  - partial weight grads [E, runs, W] fp32 (W = one expert's parameter count), summed over runs by
    torch;
  - scratch ``programs * 16 * 7840`` fp32 for lite.
``soft_backward_split`` picks (groups, runs) that fill the grid with the least of this memory.
No atomics: two backward runs give bitwise-equal gradients.

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

from .decoder_blocks import (_mlp_experts_bwd_body, _mlp_experts_fwd_body, kernel_weights, latent_pad, launch_dims,
                             partial_layout, partials_to_grads, soft_backward_split, soft_forward_split)
from .decoder_tiles import CONV_CHANNELS, _conv_decoder_tile, conv_scratch_size, map_dtype, scratch_maps
from .decoder_tiles_bwd import _lite_experts_bwd_body, conv_bwd_scratch_size
from .experts_medium import experts_medium_soft
from .launch import autocast_input, device_arch, device_guard, dot_mode, max_programs, register_cap
from .tuning import training_lite_bwd_config, training_lite_fwd_config, training_mlp_config


@triton.jit
def _experts_soft_lite_fwd_kernel(
    z,                   # [B, L] any strides
    out,                 # [groups, B, 784] fp32
    scratch,             # [programs, scratch_per_program] fp32, zero-filled (the maps' borders)
    token_ids,           # [B] int32: 0 .. B-1 (the rows of a token block)
    gates,               # [B, E] any strides
    fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b,
    B, E, L, stride_zb, stride_zl, stride_gb, stride_ge, n_blocks, n_items, experts_per_group,
    scratch_per_program,
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
    """Persistent over items (token block, expert group): out[group, tokens] = sum over the group's
    experts of gate * D_e(z), the first expert storing and the others adding in place."""
    i_p = tl.program_id(0)
    p_h0, p_h1, p_h2 = scratch_maps(scratch, scratch_per_program, C0, C1, False, BM, TS, MAPS)
    for item in range(i_p, n_items, tl.num_programs(0)):
        r0 = (item % n_blocks) * BM
        n_rows = tl.minimum(B - r0, BM)
        e_lo = (item // n_blocks) * experts_per_group
        e_hi = tl.minimum(e_lo + experts_per_group, E)
        p_out = out + tl.cast(item // n_blocks, tl.int64) * B * 784
        for e in range(e_lo, e_hi):
            e64 = tl.cast(e, tl.int64)
            _conv_decoder_tile(z, stride_zb, stride_zl, 1, token_ids + r0, n_rows, e64,
                               p_out, gates, stride_gb, e64 * stride_ge, e - e_lo,
                               fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b, conv2_w, conv2_b, L, p_h0, p_h1, p_h2,
                               C0, C1, 1, False, BM, TS, BR, BLOCK_L, BN_FC, True, INPUT_PRECISION)


@triton.jit
def _experts_soft_mlp_fwd_kernel(
    p_z, stride_zb, stride_zl, p_g, stride_gb, stride_ge, p_out,
    p_w1, p_b1, p_w2, p_b2,
    B, L, H, E, n_items, n_blocks, experts_per_group,
    LP: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    # items are (token block, expert group); the group's experts are summed on chip
    _mlp_experts_fwd_body(
        p_z, stride_zb, stride_zl, p_g, stride_gb, stride_ge, p_out,
        p_w1, p_b1, p_w2, p_b2, p_z, p_z, p_z,
        B, L, H, E, 1, n_items, n_blocks, experts_per_group,
        True, 1, LP, HP, BM, BN, PREC,
    )


@triton.jit
def _experts_soft_lite_bwd_kernel(
    z, stride_zb, stride_zl, p_do, stride_dob, stride_dop, gates, stride_gb, stride_ge,
    p_dz, p_dg, p_part, W_TOTAL, scratch, scratch_per_program, token_ids,
    fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b,
    B, L, E, n_items, runs, blocks_per_run, experts_per_group,
    BM: tl.constexpr, TS: tl.constexpr, BR: tl.constexpr, LP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # items are (expert group, run of token blocks), group-major (kernels/decoder_tiles_bwd.py)
    _lite_experts_bwd_body(
        z, stride_zb, stride_zl, p_do, stride_dob, stride_dop, gates, stride_gb, stride_ge,
        p_dz, p_dg, p_part, W_TOTAL, scratch, scratch_per_program, token_ids, token_ids, token_ids,
        fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b,
        B, L, E, 1, n_items, runs, blocks_per_run, experts_per_group,
        True, 1, BM, TS, BR, LP, INPUT_PRECISION,
    )


@triton.jit
def _experts_soft_mlp_bwd_kernel(
    p_do, stride_dob, stride_dop, p_z, stride_zb, stride_zl, p_g, stride_gb, stride_ge,
    p_dz, p_dg, p_part, W_TOTAL,
    p_w1, p_b1, p_w2, p_b2,
    B, L, H, E, n_items, runs, blocks_per_run, experts_per_group,
    LP: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    # items are (expert group, run of token blocks), group-major
    _mlp_experts_bwd_body(
        p_do, stride_dob, stride_dop, p_z, stride_zb, stride_zl, p_g, stride_gb, stride_ge,
        p_dz, p_dg, p_part, W_TOTAL,
        p_w1, p_b1, p_w2, p_b2, p_z, p_z, p_z,
        B, L, H, E, 1, n_items, runs, blocks_per_run, experts_per_group,
        True, 1, LP, HP, BM, BN, PREC,
    )


def experts_soft_fwd(z: torch.Tensor, gates: torch.Tensor, ws: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Launcher: z [B, L], gates [B, E], the stacked weights -> x_hat [B, 784] (dtype of z and gates promoted)."""
    num_experts, latent, hidden = launch_dims(z, ws, kind)
    batch = z.shape[0]
    out_dtype = torch.promote_types(z.dtype, gates.dtype)
    if batch == 0:
        return alloc_output((0, PIXELS), like=z, dtype=out_dtype)
    device = z.device
    arch = device_arch(device)
    cap = max_programs(device)
    dot = dot_mode(z.dtype, device)
    config = training_lite_fwd_config(arch, dot) if kind == "lite" else training_mlp_config(arch, "fwd", dot)
    n_blocks, groups, per_group = soft_forward_split(batch, num_experts, cap, config["BM"])
    n_items = n_blocks * groups
    programs = min(n_items, cap)
    acc = alloc_output((groups, batch, PIXELS), like=z, dtype=torch.float32)
    if kind == "lite":
        per_program = conv_scratch_size("lite", config["BM"], config["TS"], map_dtype(dot))
        c0, c1, _ = CONV_CHANNELS["lite"]
        _experts_soft_lite_fwd_kernel[(programs,)](
            z=z,
            out=acc,
            # zero-filled once per call: the maps' borders (the conv padding) are never written
            scratch=torch.zeros(programs * per_program, dtype=torch.float32, device=device),
            token_ids=torch.arange(batch, dtype=torch.int32, device=device),
            gates=gates,
            fc_w=ws[0],
            fc_b=ws[1],
            conv1_w=ws[2],
            conv1_b=ws[3],
            conv2_w=ws[4],
            conv2_b=ws[5],
            B=batch,
            E=num_experts,
            L=latent,
            stride_zb=z.stride(0),
            stride_zl=z.stride(1),
            stride_gb=gates.stride(0),
            stride_ge=gates.stride(1),
            n_blocks=n_blocks,
            n_items=n_items,
            experts_per_group=per_group,
            scratch_per_program=per_program,
            MAPS=map_dtype(dot),
            C0=c0,
            C1=c1,
            BM=config["BM"],
            TS=config["TS"],
            BR=config["BR"],
            BLOCK_L=latent_pad(latent),
            BN_FC=64,
            INPUT_PRECISION=dot,
            num_warps=config["num_warps"],
        )
    else:
        _experts_soft_mlp_fwd_kernel[(programs, triton.cdiv(PIXELS, config["BN"]))](
            z, z.stride(0), z.stride(1), gates, gates.stride(0), gates.stride(1), acc,
            *ws,
            batch, latent, hidden, num_experts, n_items, n_blocks, per_group,
            LP=latent_pad(latent),
            HP=max(16, triton.next_power_of_2(hidden)),
            BM=config["BM"],
            BN=config["BN"],
            PREC=dot,
            num_warps=config["num_warps"],
            num_stages=config["num_stages"],
        )
    out = acc[0] if groups == 1 else acc.sum(0)
    return out.to(out_dtype)


def experts_soft_bwd(grad_out: torch.Tensor, z: torch.Tensor, gates: torch.Tensor, ws: list[torch.Tensor],
                     kind: str) -> list[torch.Tensor]:
    """Launcher: dL/dx_hat [B, 784] -> [dz, dgates, d(each stacked weight)], deterministic."""
    num_experts, latent, hidden = launch_dims(z, ws, kind)
    batch = z.shape[0]
    if batch == 0:
        return [torch.zeros_like(z), torch.zeros_like(gates)] + [torch.zeros_like(w) for w in ws]
    device = z.device
    arch = device_arch(device)
    weights_per_expert = sum(partial_layout(kind, latent, hidden))
    config = training_lite_bwd_config(arch) if kind == "lite" else training_mlp_config(arch, "bwd")
    cap = max_programs(device)
    groups, per_group, runs, blocks_per_run = soft_backward_split(batch, num_experts, cap, config["BM"],
                                                                  weights_per_expert, latent)
    n_items = groups * runs
    programs = min(n_items, cap)
    partials = alloc_output((num_experts * runs, weights_per_expert), like=z, dtype=torch.float32)
    dz_partial = alloc_output((groups, batch, latent), like=z, dtype=torch.float32)
    dgates = alloc_output((batch, num_experts), like=gates)
    if kind == "lite":
        per_program = conv_bwd_scratch_size(config["BM"], config["TS"])
        _experts_soft_lite_bwd_kernel[(programs,)](
            z, z.stride(0), z.stride(1), grad_out, grad_out.stride(0), grad_out.stride(1),
            gates, gates.stride(0), gates.stride(1),
            dz_partial, dgates, partials, weights_per_expert,
            # zero-filled once per call: the maps' borders (the conv padding) are never written
            torch.zeros(programs * per_program, dtype=torch.float32, device=device), per_program,
            torch.arange(batch, dtype=torch.int32, device=device),
            *ws,
            batch, latent, num_experts, n_items, runs, blocks_per_run, per_group,
            BM=config["BM"],
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
        _experts_soft_mlp_bwd_kernel[(programs,)](
            grad_out, grad_out.stride(0), grad_out.stride(1), z, z.stride(0), z.stride(1),
            gates, gates.stride(0), gates.stride(1),
            dz_partial, dgates, partials, weights_per_expert,
            *ws,
            batch, latent, hidden, num_experts, n_items, runs, blocks_per_run, per_group,
            LP=latent_pad(latent),
            HP=max(16, triton.next_power_of_2(hidden)),
            BM=config["BM"],
            BN=config["BN"],
            PREC=dot_mode(z.dtype, device),
            num_warps=config["num_warps"],
            num_stages=config["num_stages"],
        )
    per_run = partials.view(num_experts, runs, -1)
    dz = dz_partial[0] if groups == 1 else dz_partial.sum(0)
    return [dz.to(z.dtype), dgates] + partials_to_grads(per_run[:, 0] if runs == 1 else per_run.sum(1), ws, kind,
                                                        latent, hidden)


@torch.library.custom_op("smoe_fast::triton_experts_soft", mutates_args=())
def _experts_soft_op(z: torch.Tensor, gates: torch.Tensor, ws: list[torch.Tensor], kind: str) -> torch.Tensor:
    with device_guard(z):
        return experts_soft_fwd(z, gates, ws, kind)


@_experts_soft_op.register_fake
def _(z, gates, ws, kind):
    return z.new_empty((z.shape[0], PIXELS), dtype=torch.promote_types(z.dtype, gates.dtype))


@torch.library.custom_op("smoe_fast::triton_experts_soft_bwd", mutates_args=())
def _experts_soft_bwd_op(grad_out: torch.Tensor, z: torch.Tensor, gates: torch.Tensor, ws: list[torch.Tensor],
                         kind: str) -> list[torch.Tensor]:
    with device_guard(z):
        return experts_soft_bwd(grad_out, z, gates, ws, kind)


@_experts_soft_bwd_op.register_fake
def _(grad_out, z, gates, ws, kind):
    return [torch.empty_like(z), torch.empty_like(gates)] + [torch.empty_like(w) for w in ws]


def _setup_context(ctx, inputs, output):
    z, gates, ws, kind = inputs
    ctx.save_for_backward(z, gates, *ws)
    ctx.kind = kind


def _backward(ctx, grad_out):
    z, gates, *ws = ctx.saved_tensors
    grads = _experts_soft_bwd_op(grad_out, z, gates, ws, ctx.kind)
    return grads[0], grads[1], list(grads[2:]), None


torch.library.register_autograd("smoe_fast::triton_experts_soft", _backward, setup_context=_setup_context)


def experts_soft(z: torch.Tensor, gates: torch.Tensor, weights: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Soft-gated experts: ``x_hat = sum_e gates[:, e] * D_e(z)``, differentiable in z, gates and weights.

    z [B, L], gates [B, E], weights stacked per layer (``{"fc.weight": [E, 392, L], ...}``), kind "lite"
    or "mlp" (fused) or "medium" (layer by layer, kernels/experts_medium.py) -> x_hat [B, 1, 28, 28].
    Inputs are assumed checked (smoe_fast.ops does that).

    >>> y = experts_soft(z, logits.softmax(-1), model.experts.weights(), kind="lite")
    """
    z = autocast_input(z)
    if kind == "medium":
        # too big to fuse per row block: layer by layer over grouped rows
        return experts_medium_soft(z, gates, weights)
    ws = kernel_weights(weights, kind)
    return _experts_soft_op(z, gates, ws, kind).view(z.shape[0], *IMAGE_SHAPE)
