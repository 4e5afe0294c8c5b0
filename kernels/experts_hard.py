"""Hard-gated (top-1) experts for inference: one fused kernel per call, after the two grouping launches.

``experts_hard(z, expert_idx, weights, kind)``: x_hat[b] = D_{expert_idx[b]}(z[b]), z [B, L] ->
x_hat [B, 1, 28, 28], for the decoder kinds "lite", "medium" and "mlp" (shapes in DESIGN.md).

Grid. ``launch.tile_offsets`` scans cdiv(expert_counts, BM) on the device: tile t holds up to BM
sorted rows of one expert, and an empty expert owns no tile. There are at most
``max_tiles = cdiv(B, BM) + min(E, B)`` tiles. The grid is persistent: ``min(max_tiles, 2 * SMs)``
programs stride over tile ids; ``launch.find_tile`` finds a tile's expert by a binary search of
tile_offsets (ceil(log2 E) scalar loads) and gives tiles past ``tile_offsets[E]`` no rows (read on
the device: no host sync). No per-expert launch,
no padded or permuted copy of z or x_hat: z rows are gathered through sorted_token_idx and each
output row is written straight to its original token.

Decoder, per tile: the conv kinds run ``decoder_tiles._conv_decoder_tile`` (fc, then the up-sampled
3x3 convolutions as phase-split GEMMs over token-innermost, zero-bordered scratch maps; the module
docstring there has the arithmetic) in its plain output mode, x_hat[token] = D_e(z[token]).
mlp: relu(z W1^T + b1) -> scratch h [BM, hidden] -> sigmoid(h W2^T + b2) -> x_hat[token].

Scratch, per program (sized by the grid, not by B): ``decoder_tiles.conv_scratch_size``, lite
BM=16, TS=2: 18.6K floats (73 KB; 52 KB with half maps: h0 and conv2's parts, a1 stays in registers),
medium BM=16, TS=1: 66.0K floats (258 KB; 145 KB with half maps: h0, a1 and conv3's parts); mlp
BM*hidden floats. With 2 programs per SM on an H100 that is 19 MB (lite, inside the 50 MB L2) and 66 MB
(medium; 37 MB, inside the L2, with half maps).

Launches: two for grouping (kernels/grouping.py), one for the tile scan and one decoder kernel,
whatever E and the routing. Indices are range-checked by ``smoe_fast.ops`` before the launch
(``check_indices=True``); with the check off, a token with an out-of-range expert gets no tile and its
x_hat row is left unwritten, but nothing outside the tensors is read or written.

Precision (``launch.dot_mode``, the ``INPUT_PRECISION`` constexpr, read at every call). fp32 inputs:
``tl.dot`` in IEEE fp32 unless torch allows TF32 matmuls (``fp32_precision`` or ``allow_tf32``), then
TF32. bf16/fp16 inputs (GPU autocast): every GEMM tile (z, the fc/fc1/fc2 weights, the gathered
activations, the phase-merged conv weights) is cast to the input dtype and ``tl.dot`` runs on the
half-precision tensor cores with fp32 accumulation; the conv kinds' maps are in that dtype
(``decoder_tiles.map_dtype``) and x_hat is in the input dtype. The one-channel last conv stays an
fp32 weighted sum on the FMA units. The interpreter cannot run half-precision dots, so there half
inputs are widened to fp32 instead. Block sizes and warps come from kernels/tuning.py.

>>> from smoe_fast.kernels.experts_hard import experts_hard
>>> x_hat = experts_hard(z, logits.argmax(-1), model.experts.weights(), kind="lite")   # [B, 1, 28, 28]
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoe_fast.contract import IMAGE_PIXELS, IMAGE_SHAPE, alloc_output

from .activations import sigmoid
from .decoder_tiles import (CONV_CHANNELS, _conv_decoder_tile, _linear_rows_to_scratch, conv_scratch_size, map_dtype,
                            scratch_maps)
from .grouping import group_by_expert_fwd
from .launch import (autocast_input, device_guard, dot_mode, find_tile, log2_ceil, max_programs, mm, register_cap,
                     tile_bound, tile_offsets)
from .lite_folded import experts_hard_lite_folded_fwd, fold_pays
from .tuning import experts_hard_config

__all__ = ["experts_hard", "experts_hard_fwd"]


@triton.jit
def _experts_hard_conv_fwd_kernel(
    z,                   # [B, L] any strides
    out,                 # [B, 784] contiguous, original token order
    scratch,             # [programs, scratch_per_program] fp32, zero-filled (the maps' borders)
    sorted_token_idx,    # [B] int32
    expert_offsets,      # [E+1] int32
    tile_offsets,        # [E+1] int32
    fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b, conv3_w, conv3_b,
    E, L, stride_zb, stride_zl, max_tiles, scratch_per_program,
    LOG_E: tl.constexpr,
    MAPS: tl.constexpr,
    C0: tl.constexpr,
    C1: tl.constexpr,
    C2: tl.constexpr,
    HAS_CONV3: tl.constexpr,
    BM: tl.constexpr,
    TS: tl.constexpr,
    BR: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BN_FC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    i_p = tl.program_id(0)
    p_h0, p_h1, p_h2 = scratch_maps(scratch, scratch_per_program, C0, C1, HAS_CONV3, BM, TS, MAPS)
    for tile in range(i_p, max_tiles, tl.num_programs(0)):
        e, row_start, n_rows = find_tile(tile_offsets, expert_offsets, tile, E, LOG_E, BM)
        if n_rows > 0:
            _conv_decoder_tile(z, stride_zb, stride_zl, 1, sorted_token_idx + row_start, n_rows, e,
                               out, out, 0, 0, 0,
                               fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b, conv3_w, conv3_b, L, p_h0, p_h1, p_h2,
                               C0, C1, C2, HAS_CONV3, BM, TS, BR, BLOCK_L, BN_FC, False, INPUT_PRECISION)


@triton.jit
def _experts_hard_mlp_fwd_kernel(
    z,                   # [B, L] any strides
    out,                 # [B, PIXELS] contiguous, original token order
    scratch,             # [programs, BM * hidden] fp32
    sorted_token_idx,    # [B] int32
    expert_offsets,      # [E+1] int32
    tile_offsets,        # [E+1] int32
    fc1_w, fc1_b, fc2_w, fc2_b,
    E, L, HIDDEN, stride_zb, stride_zl, max_tiles,
    LOG_E: tl.constexpr,
    PIXELS: tl.constexpr,
    BM: tl.constexpr,
    BH: tl.constexpr,
    BN: tl.constexpr,
    BLOCK_L: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    i_p = tl.program_id(0)
    p_h = scratch + i_p.to(tl.int64) * (BM * HIDDEN)   # [BM, HIDDEN]
    o_m = tl.arange(0, BM)
    o_h = tl.arange(0, BH)
    o_n = tl.arange(0, BN)
    for tile in range(i_p, max_tiles, tl.num_programs(0)):
        e, row_start, n_rows = find_tile(tile_offsets, expert_offsets, tile, E, LOG_E, BM)
        if n_rows > 0:
            p_tok = sorted_token_idx + row_start
            tl.debug_barrier()
            _linear_rows_to_scratch(z, stride_zb, stride_zl, p_tok, 1, n_rows, fc1_w, fc1_b, e, L, HIDDEN, p_h,
                                    BM, BLOCK_L, BH, True, False, INPUT_PRECISION)
            tl.debug_barrier()
            m_m = o_m < n_rows
            b_tok = tl.load(p_tok + o_m, mask=m_m, other=0).to(tl.int64)
            for n0 in range(0, PIXELS, BN):
                m_n = n0 + o_n < PIXELS
                b_y = tl.zeros([BM, BN], dtype=tl.float32)
                for h0 in range(0, HIDDEN, BH):
                    m_h = h0 + o_h < HIDDEN
                    b_a = tl.load(p_h + o_m[:, None] * HIDDEN + h0 + o_h[None, :], mask=m_m[:, None] & m_h[None, :],
                                  other=0.0)
                    # [BH, BN] of fc2.weight [E, PIXELS, HIDDEN]
                    b_w = tl.load(fc2_w + e * PIXELS * HIDDEN + (n0 + o_n[None, :]) * HIDDEN + h0 + o_h[:, None],
                                  mask=m_n[None, :] & m_h[:, None], other=0.0)
                    b_y += mm(b_a, b_w, INPUT_PRECISION)
                b_y += tl.load(fc2_b + e * PIXELS + n0 + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
                tl.store(out + b_tok[:, None] * PIXELS + n0 + o_n[None, :], sigmoid(b_y), mask=m_m[:, None] & m_n[None, :])


def experts_hard_fwd(z: torch.Tensor, expert_idx: torch.Tensor, kind: str, layers: list[torch.Tensor]) -> torch.Tensor:
    """Launch grouping and the fused kernel. ``layers``: the weights of ``kind`` in contract order
    (fc.weight, fc.bias, conv1.weight, ... or fc1.weight, fc1.bias, fc2.weight, fc2.bias)."""
    B, L = z.shape
    E = layers[0].shape[0]
    out = alloc_output((B, *IMAGE_SHAPE), z)
    if B == 0:
        return out
    layers = [w.contiguous() for w in layers]
    device = z.device
    programs_cap = max_programs(device)
    precision = dot_mode(z.dtype, device)
    block_l = max(16, triton.next_power_of_2(L))

    def run(config):
        bm = config["BM"]
        expert_counts, expert_offsets, sorted_token_idx, _ = group_by_expert_fwd(expert_idx, E)
        tiles = tile_offsets(expert_counts, bm)
        max_tiles = tile_bound(B, E, bm)
        programs = min(max_tiles, programs_cap)
        if kind == "mlp":
            hidden = layers[0].shape[1]
            scratch = torch.empty(programs * bm * hidden, dtype=torch.float32, device=device)
            _experts_hard_mlp_fwd_kernel[(programs,)](
                z=z,
                out=out,
                scratch=scratch,
                sorted_token_idx=sorted_token_idx,
                expert_offsets=expert_offsets,
                tile_offsets=tiles,
                fc1_w=layers[0],
                fc1_b=layers[1],
                fc2_w=layers[2],
                fc2_b=layers[3],
                E=E,
                L=L,
                HIDDEN=hidden,
                stride_zb=z.stride(0),
                stride_zl=z.stride(1),
                max_tiles=max_tiles,
                LOG_E=log2_ceil(E),
                PIXELS=IMAGE_PIXELS,
                BM=bm,
                BH=config["BH"],
                BN=config["BN"],
                BLOCK_L=block_l,
                INPUT_PRECISION=precision,
                num_warps=config["num_warps"],
            )
            return
        if config.get("FOLD"):
            experts_hard_lite_folded_fwd(z, out, layers, (sorted_token_idx, expert_offsets, tiles, max_tiles, programs),
                                         config, precision)
            return
        c0, c1, c2 = CONV_CHANNELS[kind]
        ts = config["TS"]
        maps = map_dtype(precision)
        per_program = conv_scratch_size(kind, bm, ts, maps)
        # zero-filled once per call: the maps' borders (the conv padding) are never written
        scratch = torch.zeros(programs * per_program, dtype=torch.float32, device=device)
        # lite has no conv3: the kernel never reads it (HAS_CONV3=False); pass conv2 in its place
        conv3 = layers[6:8] if kind == "medium" else layers[4:6]
        _experts_hard_conv_fwd_kernel[(programs,)](
            z=z,
            out=out,
            scratch=scratch,
            sorted_token_idx=sorted_token_idx,
            expert_offsets=expert_offsets,
            tile_offsets=tiles,
            fc_w=layers[0],
            fc_b=layers[1],
            conv1_w=layers[2],
            conv1_b=layers[3],
            conv2_w=layers[4],
            conv2_b=layers[5],
            conv3_w=conv3[0],
            conv3_b=conv3[1],
            E=E,
            L=L,
            stride_zb=z.stride(0),
            stride_zl=z.stride(1),
            max_tiles=max_tiles,
            scratch_per_program=per_program,
            LOG_E=log2_ceil(E),
            MAPS=maps,
            C0=c0,
            C1=c1,
            C2=c2,
            HAS_CONV3=kind == "medium",
            BM=bm,
            TS=ts,
            BR=config["BR"],
            BLOCK_L=block_l,
            BN_FC=64,
            INPUT_PRECISION=precision,
            num_warps=config["num_warps"],
            maxnreg=register_cap(config["num_warps"]) if kind == "lite" else None,
        )

    fold = kind == "lite" and fold_pays(precision, B, E, L, z.element_size())
    if not fold and z.dtype != layers[0].dtype and z.dtype in (torch.float16, torch.bfloat16):
        # half inputs (inference only): the weights go half too (half the weight bytes read per tile);
        # the folded kernel folds the weights as given into z's dtype
        layers = [w.to(z.dtype) for w in layers]
    with device_guard(z):
        run(experts_hard_config(kind, z.dtype, device, B, run=run, dot=precision, fold=fold))
    return out


def _fake_image(z: torch.Tensor) -> torch.Tensor:
    return z.new_empty((z.shape[0], *IMAGE_SHAPE))


@torch.library.custom_op("smoe_fast::triton_experts_hard_lite", mutates_args=())
def _experts_hard_lite_op(z: torch.Tensor, expert_idx: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor,
                          conv1_weight: torch.Tensor, conv1_bias: torch.Tensor, conv2_weight: torch.Tensor,
                          conv2_bias: torch.Tensor) -> torch.Tensor:
    return experts_hard_fwd(z, expert_idx, "lite", [fc_weight, fc_bias, conv1_weight, conv1_bias, conv2_weight, conv2_bias])


@_experts_hard_lite_op.register_fake
def _(z, expert_idx, fc_weight, fc_bias, conv1_weight, conv1_bias, conv2_weight, conv2_bias):
    return _fake_image(z)


@torch.library.custom_op("smoe_fast::triton_experts_hard_medium", mutates_args=())
def _experts_hard_medium_op(z: torch.Tensor, expert_idx: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor,
                            conv1_weight: torch.Tensor, conv1_bias: torch.Tensor, conv2_weight: torch.Tensor,
                            conv2_bias: torch.Tensor, conv3_weight: torch.Tensor, conv3_bias: torch.Tensor) -> torch.Tensor:
    return experts_hard_fwd(z, expert_idx, "medium", [fc_weight, fc_bias, conv1_weight, conv1_bias, conv2_weight,
                                                      conv2_bias, conv3_weight, conv3_bias])


@_experts_hard_medium_op.register_fake
def _(z, expert_idx, fc_weight, fc_bias, conv1_weight, conv1_bias, conv2_weight, conv2_bias, conv3_weight, conv3_bias):
    return _fake_image(z)


@torch.library.custom_op("smoe_fast::triton_experts_hard_mlp", mutates_args=())
def _experts_hard_mlp_op(z: torch.Tensor, expert_idx: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
                         fc2_weight: torch.Tensor, fc2_bias: torch.Tensor) -> torch.Tensor:
    return experts_hard_fwd(z, expert_idx, "mlp", [fc1_weight, fc1_bias, fc2_weight, fc2_bias])


@_experts_hard_mlp_op.register_fake
def _(z, expert_idx, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    return _fake_image(z)


_LAYER_NAMES = {
    "lite": ("fc", "conv1", "conv2"),
    "medium": ("fc", "conv1", "conv2", "conv3"),
    "mlp": ("fc1", "fc2"),
}
_OPS = {"lite": _experts_hard_lite_op, "medium": _experts_hard_medium_op, "mlp": _experts_hard_mlp_op}


def experts_hard(z: torch.Tensor, expert_idx: torch.Tensor, weights: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Hard-gated experts: x_hat[b] = D_{expert_idx[b]}(z[b]); inference only (no autograd).

    z [B, L] float (any strides), expert_idx [B] int64/int32 (already checked by ``smoe_fast.ops``),
    weights stacked per layer ({"fc.weight": [E, 392, L], ...}) -> x_hat [B, 1, 28, 28] in z's dtype,
    or in the autocast dtype when autocast is on for z's device.
    """
    if kind not in _OPS:
        raise ValueError(f"unknown decoder kind {kind!r}; expected one of {tuple(_OPS)}")
    layers = [weights[f"{layer}.{part}"] for layer in _LAYER_NAMES[kind] for part in ("weight", "bias")]
    return _OPS[kind](autocast_input(z), expert_idx, *layers)
