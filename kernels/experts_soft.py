"""Soft-gated experts for training: x_hat = sum_e gates[:, e] * D_e(z), forward and backward in Triton.

Forward (``_experts_soft_fwd_kernel``): a persistent grid over blocks of BM=16 tokens (axis 1 tiles
the mlp's output pixels); each program runs its block through every expert in turn and accumulates
the gated outputs in registers, so no [B, E, 1, 28, 28] tensor and no per-expert activation is ever
stored. The lite convs go through a small per-program scratch (kernels/decoder_blocks.py): at most
``grid * 16 * 3528`` fp32, grid <= 2 programs per SM.

Backward (``_experts_soft_bwd_kernel``): items (expert e, run of token blocks), expert-major, on a
persistent grid; each item recomputes its expert's forward on its tokens and backpropagates. Memory:
  - d gates [B, E] written directly (each (token, expert) by exactly one item);
  - partial dz [E, B, L] fp32, summed over E by torch (deterministic);
  - partial weight grads [E, S, W] fp32 (W = one expert's parameter count, S = token runs per expert,
    S ~ 2 * SMs / E, so E*S*W <= max(E, 2 * SMs) * W), summed over S by torch (deterministic);
  - scratch ``grid * 16 * 7840`` fp32 for lite.
No atomics: two backward runs give bitwise-equal gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoe_fast.contract import IMAGE_PIXELS as PIXELS, IMAGE_SHAPE, alloc_output

from .decoder_blocks import (BLOCK_M, SCRATCH_BWD, SCRATCH_FWD,
                             _experts_bwd_body, _experts_fwd_body, kernel_weights, latent_pad, launch_dims,
                             partial_layout, unpack_partials, weight_args)
from .experts_medium import experts_medium_soft
from .tuning import training_config
from .launch import device_arch, device_guard, dot_precision, max_programs



@triton.jit
def _experts_soft_fwd_kernel(
    p_z, stride_zb, stride_zl, p_g, stride_gb, stride_ge, p_out,
    p_wa, p_wb, p_wc, p_wd, p_we, p_wf, p_scratch,
    B, L, H, E, n_items,
    IS_MLP: tl.constexpr, LP: tl.constexpr, HP: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    # items are token blocks; the expert loop inside sums every expert on chip
    _experts_fwd_body(
        p_z, stride_zb, stride_zl, p_g, stride_gb, stride_ge, p_out,
        p_wa, p_wb, p_wc, p_wd, p_we, p_wf, p_scratch, p_z, p_z, p_z,
        B, L, H, E, 1, n_items,
        True, IS_MLP, 1, LP, HP, BM, BR, BN, PREC,
    )


@triton.jit
def _experts_soft_bwd_kernel(
    p_do, stride_dob, stride_dop, p_z, stride_zb, stride_zl, p_g, stride_gb, stride_ge,
    p_dz, p_dg, p_part, W_TOTAL,
    p_wa, p_wb, p_wc, p_wd, p_we, p_wf, p_scratch,
    B, L, H, E, n_items, blocks_per_item,
    IS_MLP: tl.constexpr, LP: tl.constexpr, HP: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    # items are (expert, run of token blocks), expert-major
    _experts_bwd_body(
        p_do, stride_dob, stride_dop, p_z, stride_zb, stride_zl, p_g, stride_gb, stride_ge,
        p_dz, p_dg, p_part, W_TOTAL,
        p_wa, p_wb, p_wc, p_wd, p_we, p_wf, p_scratch, p_z, p_z, p_z,
        B, L, H, E, 1, n_items, blocks_per_item,
        True, IS_MLP, 1, LP, HP, BM, BR, BN, PREC,
    )


def experts_soft_fwd(z: torch.Tensor, gates: torch.Tensor, ws: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Launcher: z [B, L], gates [B, E], kernel weights -> x_hat [B, 784] (dtype of z and gates promoted)."""
    num_experts, latent, hidden = launch_dims(z, ws, kind)
    batch = z.shape[0]
    out = alloc_output((batch, PIXELS), like=z, dtype=torch.promote_types(z.dtype, gates.dtype))
    if batch == 0:
        return out
    is_mlp = kind == "mlp"
    n_items = triton.cdiv(batch, BLOCK_M)
    grid_m = min(n_items, max_programs(z.device))
    scratch = z.new_empty(0 if is_mlp else grid_m * BLOCK_M * SCRATCH_FWD, dtype=torch.float32)
    config = training_config(kind, "fwd", device_arch(z.device))
    block_n = config["BN"]
    _experts_soft_fwd_kernel[(grid_m, triton.cdiv(PIXELS, block_n))](
        z, z.stride(0), z.stride(1), gates, gates.stride(0), gates.stride(1), out,
        *weight_args(ws), scratch,
        batch, latent, hidden, num_experts, n_items,
        IS_MLP=is_mlp,
        LP=latent_pad(latent),
        HP=max(16, triton.next_power_of_2(hidden)),
        BM=BLOCK_M,
        BR=config["BR"],
        BN=block_n,
        PREC=dot_precision(z.dtype),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out


def experts_soft_bwd(grad_out: torch.Tensor, z: torch.Tensor, gates: torch.Tensor, ws: list[torch.Tensor],
                     kind: str) -> list[torch.Tensor]:
    """Launcher: dL/dx_hat [B, 784] -> [dz, dgates, d(each kernel weight)], deterministic."""
    num_experts, latent, hidden = launch_dims(z, ws, kind)
    batch = z.shape[0]
    sizes = partial_layout(kind, latent, hidden)
    if batch == 0:
        return [torch.zeros_like(z), torch.zeros_like(gates)] + [torch.zeros_like(w) for w in ws]
    is_mlp = kind == "mlp"
    config = training_config(kind, "bwd", device_arch(z.device))
    n_blocks = triton.cdiv(batch, BLOCK_M)
    cap = max_programs(z.device)
    # S token runs per expert: enough items to fill the grid, each run at least one block
    blocks_per_item = triton.cdiv(n_blocks, max(1, min(n_blocks, cap // num_experts)))
    runs = triton.cdiv(n_blocks, blocks_per_item)
    n_items = num_experts * runs
    grid_m = min(n_items, cap)
    partials = alloc_output((n_items, sum(sizes)), like=z, dtype=torch.float32)
    dz_partial = alloc_output((num_experts, batch, latent), like=z, dtype=torch.float32)
    dgates = alloc_output((batch, num_experts), like=gates)
    scratch = z.new_empty(0 if is_mlp else grid_m * BLOCK_M * SCRATCH_BWD, dtype=torch.float32)
    _experts_soft_bwd_kernel[(grid_m,)](
        grad_out, grad_out.stride(0), grad_out.stride(1), z, z.stride(0), z.stride(1),
        gates, gates.stride(0), gates.stride(1),
        dz_partial, dgates, partials, sum(sizes),
        *weight_args(ws), scratch,
        batch, latent, hidden, num_experts, n_items, blocks_per_item,
        IS_MLP=is_mlp,
        LP=latent_pad(latent),
        HP=max(16, triton.next_power_of_2(hidden)),
        BM=BLOCK_M,
        BR=config["BR"],
        BN=config["BN"],
        PREC=dot_precision(z.dtype),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    weight_grads = unpack_partials(partials.view(num_experts, runs, -1).sum(1), ws, kind, latent, hidden)
    return [dz_partial.sum(0).to(z.dtype), dgates] + weight_grads


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
    if kind == "medium":
        # too big to fuse per row block: layer by layer over grouped rows
        return experts_medium_soft(z, gates, weights)
    ws = kernel_weights(weights, kind)
    return _experts_soft_op(z, gates, ws, kind).view(z.shape[0], *IMAGE_SHAPE)
