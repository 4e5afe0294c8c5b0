"""The "medium" decoder for training (soft and top-k gating), layer by layer over rows grouped by expert.

medium expert (shared/PAPER.md): fc L->1568, view 32x7x7, up x2, conv3x3 32->64, ELU, up x2, conv3x3
64->32, ELU, conv3x3 32->1, sigmoid. Too big to fuse per row block in on-chip memory, so each layer is
one launch of a generic grouped kernel (kernels/grouped_layers.py) over the R = B*K (token, slot) rows
sorted by expert.

Top-k forward: h0 = fc(z[token]) [R, 1568] (z gathered in the kernel), a1 [R, 64*14*14], a2
[R, 32*28*28], y [R, 784], all fp32 in sorted-row order and kept for backward (about 160 KB per
routed row). Torch then permutes y to (token, slot) order and sums the K gated slots; autograd does
d gates from there.

Soft gating (``experts_medium_soft``) would make that B*E rows (42 GB at B = 1,024, E = 256), so it
runs chunks of experts instead, ``SOFT_CHUNK_ROWS`` (token, expert) rows at a time, through the same
layers: the forward sums each chunk's gated images and drops its activations, the backward
recomputes each chunk's forward before its backward. Kept between the two: z, gates, weights.

Backward: for conv3, conv2, conv1 and fc in turn, dgrad (act' applied on load from the stored output)
and wgrad (per-tile partials + a per-expert segment sum); dz per row is permuted back and summed over
K by torch. No atomics anywhere: two backward runs give bitwise-equal gradients.

Precision: every layer, forward and backward, takes one GEMM mode, ``launch.dot_mode`` of z's dtype
(bf16/fp16 tensor cores when autocast has cast z, fp32 accumulation); activations are stored in fp32.
"""
from __future__ import annotations

import torch

from smoe_fast.contract import IMAGE_PIXELS as PIXELS, IMAGE_SHAPE

from .grouping import group_by_expert_tiles
from .launch import device_guard, dot_mode
from .grouped_layers import (ACT_ELU, ACT_NONE, ACT_SIGMOID, TILE_ROWS, Grouping, grouped_conv_dgrad,
                             grouped_conv_fwd, grouped_conv_wgrad)

MEDIUM_WEIGHTS = ("fc.weight", "fc.bias", "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                  "conv3.weight", "conv3.bias")
_FC_OUT = 32 * 7 * 7
_A1_SIZE = 64 * 14 * 14
_A2_SIZE = 32 * 28 * 28


def experts_medium_fwd(z: torch.Tensor, sorted_token_idx: torch.Tensor, expert_offsets: torch.Tensor,
                       tile_offs: torch.Tensor, ws: list[torch.Tensor], top_k: int) -> list[torch.Tensor]:
    """Launcher: [y [R, 784], h0 [R, 1568], a1 [R, 12544], a2 [R, 25088]] fp32 in sorted-row order."""
    grouping = Grouping(sorted_token_idx.shape[0], expert_offsets, tile_offs)
    w_fc, b_fc, w1, b1, w2, b2, w3, b3 = ws
    dot = dot_mode(z.dtype, z.device)
    h0 = grouped_conv_fwd(z, w_fc, b_fc, grouping, ACT_NONE, 1, (1, 1), row_index=sorted_token_idx,
                          index_div=top_k, dot=dot)
    a1 = grouped_conv_fwd(h0, w1, b1, grouping, ACT_ELU, 2, (7, 7), dot=dot)
    a2 = grouped_conv_fwd(a1, w2, b2, grouping, ACT_ELU, 2, (14, 14), dot=dot)
    y = grouped_conv_fwd(a2, w3, b3, grouping, ACT_SIGMOID, 1, (28, 28), dot=dot)
    return [y, h0, a1, a2]


def experts_medium_bwd(grad_y: torch.Tensor, z: torch.Tensor, sorted_token_idx: torch.Tensor,
                       token_sorted_pos: torch.Tensor, expert_offsets: torch.Tensor, tile_offs: torch.Tensor,
                       ws: list[torch.Tensor], y: torch.Tensor, h0: torch.Tensor, a1: torch.Tensor,
                       a2: torch.Tensor, top_k: int) -> list[torch.Tensor]:
    """Launcher: dL/dy [R, 784] -> [dz [B, L], d(each weight) in MEDIUM_WEIGHTS order], deterministic."""
    grouping = Grouping(sorted_token_idx.shape[0], expert_offsets, tile_offs)
    w_fc, b_fc, w1, b1, w2, b2, w3, b3 = ws
    grad_y = grad_y.contiguous()
    dot = dot_mode(z.dtype, z.device)   # the forward's mode
    da2 = grouped_conv_dgrad(grad_y, y, w3, grouping, ACT_SIGMOID, 1, (28, 28), dot=dot)
    dw3, db3 = grouped_conv_wgrad(grad_y, y, a2, w3, grouping, ACT_SIGMOID, 1, (28, 28), dot=dot)
    da1 = grouped_conv_dgrad(da2, a2, w2, grouping, ACT_ELU, 2, (14, 14), dot=dot)
    dw2, db2 = grouped_conv_wgrad(da2, a2, a1, w2, grouping, ACT_ELU, 2, (14, 14), dot=dot)
    dh0 = grouped_conv_dgrad(da1, a1, w1, grouping, ACT_ELU, 2, (7, 7), dot=dot)
    dw1, db1 = grouped_conv_wgrad(da1, a1, h0, w1, grouping, ACT_ELU, 2, (7, 7), dot=dot)
    dz_rows = grouped_conv_dgrad(dh0, None, w_fc, grouping, ACT_NONE, 1, (1, 1), dot=dot)
    dw_fc, db_fc = grouped_conv_wgrad(dh0, None, z, w_fc, grouping, ACT_NONE, 1, (1, 1),
                                      row_index=sorted_token_idx, index_div=top_k, dot=dot)
    # sorted rows -> (token, slot) order, then the K slots of a token summed in a fixed order
    dz = dz_rows[token_sorted_pos.long()].view(z.shape[0], top_k, z.shape[1]).sum(1).to(z.dtype)
    biases = [db_fc.to(b_fc.dtype), db1.to(b1.dtype), db2.to(b2.dtype), db3.to(b3.dtype)]
    return [dz, dw_fc, biases[0], dw1, biases[1], dw2, biases[2], dw3, biases[3]]


@torch.library.custom_op("smoe_fast::triton_experts_medium", mutates_args=())
def _experts_medium_op(z: torch.Tensor, sorted_token_idx: torch.Tensor, token_sorted_pos: torch.Tensor,
                       expert_offsets: torch.Tensor, tile_offs: torch.Tensor, ws: list[torch.Tensor],
                       top_k: int) -> list[torch.Tensor]:
    with device_guard(z):
        return experts_medium_fwd(z, sorted_token_idx, expert_offsets, tile_offs, ws, top_k)


@_experts_medium_op.register_fake
def _(z, sorted_token_idx, token_sorted_pos, expert_offsets, tile_offs, ws, top_k):
    rows = sorted_token_idx.shape[0]
    return [z.new_empty((rows, size), dtype=torch.float32) for size in (PIXELS, _FC_OUT, _A1_SIZE, _A2_SIZE)]


@torch.library.custom_op("smoe_fast::triton_experts_medium_bwd", mutates_args=())
def _experts_medium_bwd_op(grad_y: torch.Tensor, z: torch.Tensor, sorted_token_idx: torch.Tensor,
                           token_sorted_pos: torch.Tensor, expert_offsets: torch.Tensor, tile_offs: torch.Tensor,
                           ws: list[torch.Tensor], y: torch.Tensor, h0: torch.Tensor, a1: torch.Tensor,
                           a2: torch.Tensor, top_k: int) -> list[torch.Tensor]:
    with device_guard(z):
        return experts_medium_bwd(grad_y, z, sorted_token_idx, token_sorted_pos, expert_offsets, tile_offs, ws,
                                  y, h0, a1, a2, top_k)


@_experts_medium_bwd_op.register_fake
def _(grad_y, z, sorted_token_idx, token_sorted_pos, expert_offsets, tile_offs, ws, y, h0, a1, a2, top_k):
    return [torch.empty_like(z)] + [torch.empty_like(w) for w in ws]


def _setup_context(ctx, inputs, output):
    z, sorted_token_idx, token_sorted_pos, expert_offsets, tile_offs, ws, top_k = inputs
    y, h0, a1, a2 = output
    ctx.mark_non_differentiable(h0, a1, a2)
    ctx.save_for_backward(z, sorted_token_idx, token_sorted_pos, expert_offsets, tile_offs, y, h0, a1, a2, *ws)
    ctx.top_k = top_k


def _backward(ctx, grads):
    z, sorted_token_idx, token_sorted_pos, expert_offsets, tile_offs, y, h0, a1, a2, *ws = ctx.saved_tensors
    grad_y = grads[0] if grads[0] is not None else torch.zeros_like(y)
    out = _experts_medium_bwd_op(grad_y, z, sorted_token_idx, token_sorted_pos, expert_offsets, tile_offs, ws,
                                 y, h0, a1, a2, ctx.top_k)
    return out[0], None, None, None, None, list(out[1:]), None


torch.library.register_autograd("smoe_fast::triton_experts_medium", _backward, setup_context=_setup_context)


def experts_medium(z: torch.Tensor, topk_idx: torch.Tensor, topk_gates: torch.Tensor,
                   weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """medium-decoder experts: ``x_hat[b] = sum_k topk_gates[b, k] * D_{topk_idx[b, k]}(z[b])``.

    z [B, L], topk_idx [B, K] int64 (any strides), topk_gates [B, K], weights stacked per layer
    (MEDIUM_WEIGHTS) -> x_hat [B, 1, 28, 28]; differentiable in z, topk_gates and every weight. Soft
    gating has its own chunked op (``experts_medium_soft``).

    >>> g, i = logits.softmax(-1).topk(2); y = experts_medium(z, i, g / g.sum(-1, keepdim=True), w)
    """

    batch, top_k = topk_idx.shape
    ws = [weights[name].contiguous() for name in MEDIUM_WEIGHTS]
    routing, tile_offs = group_by_expert_tiles(topk_idx, ws[0].shape[0], TILE_ROWS)
    y_rows = _experts_medium_op(z, routing.sorted_token_idx, routing.token_sorted_pos, routing.expert_offsets,
                                tile_offs, ws, top_k)[0]
    y_slots = y_rows[routing.token_sorted_pos.long()].view(batch, top_k, PIXELS)
    out = (y_slots * topk_gates.unsqueeze(-1)).sum(1)
    return out.to(torch.promote_types(z.dtype, topk_gates.dtype)).view(batch, *IMAGE_SHAPE)


# rows (token, expert) of one soft chunk: 256 tiles of 16 rows (about two per SM of an H100), about
# 160 KB of fp32 activations each (h0, a1, a2, y): 650 MB at most, whatever E
SOFT_CHUNK_ROWS = 4096


def _soft_chunks(batch: int, num_experts: int, device: torch.device):
    """Expert chunks [e0, e1) of at most max(1, SOFT_CHUNK_ROWS // B) experts, each with the routing of
    its B x (e1 - e0) rows: (token, expert) pairs sorted by expert, made on the device (no host sync).
    Chunks of the same width share one routing."""
    per_chunk = max(1, min(num_experts, SOFT_CHUNK_ROWS // max(1, batch)))
    routings = {}
    for e0 in range(0, num_experts, per_chunk):
        width = min(per_chunk, num_experts - e0)
        if width not in routings:
            idx = torch.arange(width, device=device).expand(batch, width)
            routing, tiles = group_by_expert_tiles(idx, width, TILE_ROWS)
            routings[width] = (routing.sorted_token_idx, routing.token_sorted_pos, routing.expert_offsets, tiles)
        yield e0, e0 + width, routings[width]


def experts_medium_soft_fwd(z: torch.Tensor, gates: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """Launcher: x_hat [B, 784] = sum_e gates[:, e] D_e(z), chunk by chunk of experts; each chunk's
    activations are dropped as soon as its images are summed (nothing of size B x E is kept)."""
    batch = z.shape[0]
    out = torch.zeros(batch, PIXELS, dtype=torch.float32, device=z.device)
    for e0, e1, (sorted_idx, _, offsets, tiles) in _soft_chunks(batch, ws[0].shape[0], z.device):
        y = experts_medium_fwd(z, sorted_idx, offsets, tiles, [w[e0:e1] for w in ws], e1 - e0)[0]
        # sorted rows are expert-major: row j * B + b is token b through expert e0 + j
        out += torch.einsum("bj,jbp->bp", gates[:, e0:e1].float(), y.view(e1 - e0, batch, PIXELS))
    return out.to(torch.promote_types(z.dtype, gates.dtype))


def experts_medium_soft_bwd(grad_out: torch.Tensor, z: torch.Tensor, gates: torch.Tensor,
                            ws: list[torch.Tensor]) -> list[torch.Tensor]:
    """Launcher: dL/dx_hat [B, 784] -> [dz, d gates, d(each weight)], chunk by chunk of experts with the
    chunk's forward recomputed; dz summed over chunks in order (deterministic)."""
    batch = z.shape[0]
    grad_out = grad_out.float()
    dz = torch.zeros(batch, z.shape[1], dtype=torch.float32, device=z.device)
    dgates = torch.empty(gates.shape, dtype=gates.dtype, device=z.device)
    weight_grads = [torch.empty_like(w) for w in ws]
    for e0, e1, (sorted_idx, sorted_pos, offsets, tiles) in _soft_chunks(batch, ws[0].shape[0], z.device):
        chunk_ws = [w[e0:e1] for w in ws]
        y, h0, a1, a2 = experts_medium_fwd(z, sorted_idx, offsets, tiles, chunk_ws, e1 - e0)
        y = y.view(e1 - e0, batch, PIXELS)
        dgates[:, e0:e1] = torch.einsum("bp,jbp->bj", grad_out, y).to(gates.dtype)
        grad_y = (gates[:, e0:e1].float().t()[:, :, None] * grad_out).reshape(-1, PIXELS)
        grads = experts_medium_bwd(grad_y, z, sorted_idx, sorted_pos, offsets, tiles, chunk_ws,
                                   y.view(-1, PIXELS), h0, a1, a2, e1 - e0)
        dz += grads[0].float()
        for full, part in zip(weight_grads, grads[1:]):
            full[e0:e1] = part
    return [dz.to(z.dtype), dgates] + weight_grads


@torch.library.custom_op("smoe_fast::triton_experts_medium_soft", mutates_args=())
def _experts_medium_soft_op(z: torch.Tensor, gates: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    with device_guard(z):
        return experts_medium_soft_fwd(z, gates, ws)


@_experts_medium_soft_op.register_fake
def _(z, gates, ws):
    return z.new_empty((z.shape[0], PIXELS), dtype=torch.promote_types(z.dtype, gates.dtype))


@torch.library.custom_op("smoe_fast::triton_experts_medium_soft_bwd", mutates_args=())
def _experts_medium_soft_bwd_op(grad_out: torch.Tensor, z: torch.Tensor, gates: torch.Tensor,
                                ws: list[torch.Tensor]) -> list[torch.Tensor]:
    with device_guard(z):
        return experts_medium_soft_bwd(grad_out, z, gates, ws)


@_experts_medium_soft_bwd_op.register_fake
def _(grad_out, z, gates, ws):
    return [torch.empty_like(z), torch.empty_like(gates)] + [torch.empty_like(w) for w in ws]


def _soft_setup_context(ctx, inputs, output):
    z, gates, ws = inputs
    ctx.save_for_backward(z, gates, *ws)


def _soft_backward(ctx, grad_out):
    z, gates, *ws = ctx.saved_tensors
    grads = _experts_medium_soft_bwd_op(grad_out, z, gates, ws)
    return grads[0], grads[1], list(grads[2:])


torch.library.register_autograd("smoe_fast::triton_experts_medium_soft", _soft_backward,
                                setup_context=_soft_setup_context)


def experts_medium_soft(z: torch.Tensor, gates: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Soft gating with the medium decoder: ``x_hat = sum_e gates[:, e] * D_e(z)``; z [B, L], gates [B, E]
    -> x_hat [B, 1, 28, 28], differentiable in z, gates and every weight.

    Chunks of experts go through the grouped layers in turn (``SOFT_CHUNK_ROWS`` (token, expert) rows
    at a time); the backward recomputes each chunk's forward, so what is kept between forward and
    backward is z, the gates and the weights, and the extra memory is one chunk's activations.

    >>> y = experts_medium_soft(z, logits.softmax(-1), model.experts.weights())
    """
    ws = [weights[name].contiguous() for name in MEDIUM_WEIGHTS]
    return _experts_medium_soft_op(z, gates, ws).view(z.shape[0], *IMAGE_SHAPE)
