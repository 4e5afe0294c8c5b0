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

Decoder, per tile (conv kinds):
1. fc: [BM, L] x [L, C0*49] with ``tl.dot`` -> scratch h0 [C0, 9, 9, BM].
2. per group of TS tokens: nearest x2 up-sampling followed by a 3x3 convolution (padding 1) is the
   same as four 2x2 convolutions on the low-resolution map, one per output parity ("phase"), with
   the 3x3 taps that land on one low-resolution pixel summed. Each phase is a GEMM with
   K = C_in * 4 (32 for lite's conv1, exactly one tensor-core K step) instead of C_in * 9 on the
   up-sampled map: 2.25x fewer multiply-adds and no up-sampled tensor. Rows are (pixel, token),
   gathered from scratch; conv1 (+ELU) -> scratch h1 [C1, 16, 16, TS]; medium's conv2 (+ELU) ->
   scratch h2 [32, 30, 30, TS].
3. the last convolution has one output channel. lite's (up-sampled, 16 channels): one GEMM over the
   channels gives every input pixel's contribution to each (phase, tap) pair, [pixels, 16] x [16, 16]
   on ``tl.dot`` -> scratch, then each output pixel sums its four taps (each input read once, not 16
   times). medium's (28x28, 32 channels, no up-sampling): a row-wise weighted sum over its 9 x 32
   taps. Then sigmoid, stored at ``x_hat[token]``.
mlp: relu(z W1^T + b1) -> scratch h [BM, hidden] -> sigmoid(h W2^T + b2) -> x_hat[token].

Scratch. Triton cannot gather from registers, so the stages exchange activations through a small
per-program buffer in global memory, fp32, sized by the grid and not by B (it stays in L1/L2). The
conv kinds keep their maps token-innermost with a zero border, [C][H+2][W+2][tokens]: a GEMM row is
(pixel, token) with the token fastest, so a warp's rows read consecutive addresses and vectorise
(TS tokens per vector), and no tap needs a bounds mask (the border is the padding; the buffer is
zero-filled once per call and only interiors are written). Per program: C0*81*BM + C1*256*TS floats,
then lite 16*256*TS (BM=16, TS=2: 26.8K floats, 107 KB) or medium C2*900*TS (BM=16, TS=1: 86.7K floats,
347 KB); mlp BM*hidden floats. With 2 programs per SM on an H100 that is 28 MB (lite, inside the
50 MB L2) and 87 MB (medium).

Launches: two for grouping (kernels/grouping.py), one for the tile scan and one decoder kernel,
whatever E and the routing. Indices are range-checked by ``smoe_fast.ops`` before the launch
(``check_indices=True``); with the check off, a token with an out-of-range expert gets no tile and its
x_hat row is left unwritten, but nothing outside the tensors is read or written.

Precision (``launch.dot_mode``, the ``INPUT_PRECISION`` constexpr, read at every call). fp32 inputs:
``tl.dot`` in IEEE fp32 unless torch allows TF32 matmuls (``fp32_precision`` or ``allow_tf32``), then
TF32. bf16/fp16 inputs (GPU autocast): every GEMM tile (z, the fc/fc1/fc2 weights, the gathered
activations, the phase-merged conv weights) is cast to the input dtype and ``tl.dot`` runs on the
half-precision tensor cores with fp32 accumulation; the scratch stays fp32 and x_hat is in the input
dtype. The one-channel last conv stays an fp32 weighted sum on the FMA units. The interpreter cannot
run half-precision dots, so there half inputs are widened to fp32 instead. Block sizes and warps come
from kernels/tuning.py.

>>> from smoe_fast.kernels.experts_hard import experts_hard
>>> x_hat = experts_hard(z, logits.argmax(-1), model.experts.weights(), kind="lite")   # [B, 1, 28, 28]
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoe_fast.contract import IMAGE_PIXELS, IMAGE_SHAPE, alloc_output

from .activations import elu, relu, sigmoid
from .grouping import group_by_expert_fwd
from .launch import device_guard, dot_mode, find_tile, log2_ceil, max_programs, mm, tile_bound, tile_offsets
from .tuning import experts_hard_config

__all__ = ["experts_hard", "experts_hard_fwd"]


@triton.jit
def _linear_rows_to_scratch(z, stride_zb, stride_zl, p_tok, n_rows, w, b, e, L, N, p_dst,
                            BM: tl.constexpr, BLOCK_L: tl.constexpr, BN: tl.constexpr,
                            APPLY_RELU: tl.constexpr, TO_MAPS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """act(z[tok[m]] @ w[e]^T + b[e]) for the BM rows of a tile; w [E, N, L]. TO_MAPS: column
    n = (c, i, j) of 7x7 maps goes to the zero-bordered maps [C][9][9][BM] (token innermost, see
    ``_gather_phase_rows``); else to rows [BM, N]."""
    o_m = tl.arange(0, BM)
    o_l = tl.arange(0, BLOCK_L)
    o_n = tl.arange(0, BN)
    m_m = o_m < n_rows
    b_tok = tl.load(p_tok + o_m, mask=m_m, other=0).to(tl.int64)
    # [BM, BLOCK_L]
    b_z = tl.load(z + b_tok[:, None] * stride_zb + o_l[None, :] * stride_zl, mask=m_m[:, None] & (o_l[None, :] < L),
                  other=0.0)
    for n0 in range(0, N, BN):
        m_n = n0 + o_n < N
        # [BLOCK_L, BN]
        b_w = tl.load(w + e * N * L + (n0 + o_n[None, :]) * L + o_l[:, None], mask=m_n[None, :] & (o_l[:, None] < L),
                      other=0.0)
        b_h = mm(b_z, b_w, INPUT_PRECISION) + tl.load(b + e * N + n0 + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        if APPLY_RELU:
            b_h = relu(b_h)
        if TO_MAPS:
            o_c = (n0 + o_n) // 49
            o_ij = (n0 + o_n) % 49
            p_h = p_dst + (((o_c * 9 + o_ij // 7 + 1) * 9 + o_ij % 7 + 1) * BM)[None, :] + o_m[:, None]
        else:
            p_h = p_dst + o_m[:, None] * N + n0 + o_n[None, :]
        tl.store(p_h, b_h, mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _merged_phase_weights(p_w, py, px, dy, dx):
    """Sum of the 3x3 taps that land on low-res offset (dy, dx) for output parity (py, px).

    Up-sampled row 2i+py+ky-1 reads low-res row i+py+dy-1: dy=0 takes ky=0 (py=0) or ky=0,1 (py=1),
    dy=1 takes ky=1,2 (py=0) or ky=2 (py=1); so the first tap is dy*(1+py), a second one when dy != py.
    ``p_w`` points at tap (0, 0) of each element; 4 loads instead of 9."""
    o_ky = dy * (1 + py)
    o_kx = dx * (1 + px)
    m_y2 = dy != py
    m_x2 = dx != px
    p_tap = p_w + o_ky * 3 + o_kx
    b_w = tl.load(p_tap).to(tl.float32)
    b_w += tl.load(p_tap + 3, mask=m_y2, other=0.0).to(tl.float32)
    b_w += tl.load(p_tap + 1, mask=m_x2, other=0.0).to(tl.float32)
    b_w += tl.load(p_tap + 4, mask=m_y2 & m_x2, other=0.0).to(tl.float32)
    return b_w


@triton.jit
def _pixel_token_rows(r0, H: tl.constexpr, W: tl.constexpr, TS: tl.constexpr, BR: tl.constexpr):
    """Rows r0 .. r0 + BR of the (pixel (i, j) of an H x W map, token t of TS) row order, t fastest:
    (row mask, t, i, j)."""
    o_r = r0 + tl.arange(0, BR)
    return o_r < H * W * TS, o_r % TS, (o_r // TS) // W, (o_r // TS) % W


@triton.jit
def _gather_phase_rows(p_src, r0, py, px, ci, dy, dx, H: tl.constexpr, W: tl.constexpr, TS: tl.constexpr,
                       SRC_T: tl.constexpr, BR: tl.constexpr):
    """A tile [BR, CIN*4] of a phase GEMM. Maps live zero-bordered with the token innermost,
    src [CIN][H+2][W+2][SRC_T] (low-res pixel (y, x) of token t at [ci][y+1][x+1][t]), so no tap needs a
    bounds mask, and rows are (i, j, t) with t fastest: row x column (ci, dy, dx) reads
    src[ci][i+py+dy][j+px+dx][t], and a warp's rows are consecutive addresses (TS tokens, then the
    next pixel). Returns (tile, row mask, t, i, j)."""
    m_r, o_t, o_i, o_j = _pixel_token_rows(r0, H, W, TS, BR)
    o_row = ((o_i + py) * (W + 2) + o_j + px) * SRC_T + o_t
    o_col = ((ci * (H + 2) + dy) * (W + 2) + dx) * SRC_T
    return tl.load(p_src + o_row[:, None] + o_col[None, :], mask=m_r[:, None], other=0.0), m_r, o_t, o_i, o_j


@triton.jit
def _upconv3x3_to_scratch(p_src, p_dst, w, b, e,
                          CIN: tl.constexpr, COUT: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                          TS: tl.constexpr, SRC_T: tl.constexpr, BR: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dst = ELU(conv3x3(up2(src)) + b) for TS tokens, four phase GEMMs: src [CIN][H+2][W+2][SRC_T]
    -> dst [COUT][2H+2][2W+2][TS] (both zero-bordered, token innermost; the borders are never written)."""
    o_k = tl.arange(0, CIN * 4)
    ci = o_k // 4
    dy = (o_k // 2) % 2
    dx = o_k % 2
    o_n = tl.arange(0, COUT)
    b_bias = tl.load(b + e * COUT + o_n).to(tl.float32)
    for phase in tl.static_range(4):
        py = phase // 2
        px = phase % 2
        # [CIN*4, COUT]
        b_w = _merged_phase_weights(w + e * COUT * CIN * 9 + o_n[None, :] * (CIN * 9) + ci[:, None] * 9,
                                    py, px, dy[:, None], dx[:, None])
        for r0 in range(0, H * W * TS, BR):
            b_a, m_r, o_t, o_i, o_j = _gather_phase_rows(p_src, r0, py, px, ci, dy, dx, H, W, TS, SRC_T, BR)
            b_h = elu(mm(b_a, b_w, INPUT_PRECISION) + b_bias[None, :])
            o_out = ((2 * o_i + py + 1) * (2 * W + 2) + 2 * o_j + px + 1) * TS + o_t
            tl.store(p_dst + o_out[:, None] + o_n[None, :] * ((2 * H + 2) * (2 * W + 2) * TS), b_h, mask=m_r[:, None])


@triton.jit
def _conv3x3_to_image(p_src, out, p_tok, w, b, e, n_tokens,
                      CIN: tl.constexpr, H: tl.constexpr, W: tl.constexpr, TS: tl.constexpr, BR: tl.constexpr):
    """x_hat[tok] = sigmoid(conv3x3(src) + b) with one output channel (medium's conv3), for the first
    n_tokens of TS tokens.

    src [CIN][H+2][W+2][TS] (zero-bordered, token innermost); the image is H x W. One output channel
    is too narrow for tl.dot: each row (pixel, token) is a weighted sum of its 9 taps of CIN channels,
    read at consecutive addresses across a warp's rows."""
    b_bias = tl.load(b + e).to(tl.float32)
    p_w = w + e * CIN * 9
    o_c = tl.arange(0, CIN)
    for r0 in range(0, H * W * TS, BR):
        m_r, o_t, o_i, o_j = _pixel_token_rows(r0, H, W, TS, BR)
        # [BR, CIN] at tap (0, 0), padded (i, j); tap (ky, kx) is a fixed offset from it
        p_a = p_src + (((o_i * (W + 2) + o_j) * TS + o_t)[:, None] + o_c[None, :] * ((H + 2) * (W + 2) * TS))
        b_y = tl.zeros([BR], dtype=tl.float32)
        for ky in tl.static_range(3):
            for kx in tl.static_range(3):
                b_a = tl.load(p_a + (ky * (W + 2) + kx) * TS, mask=m_r[:, None], other=0.0)
                b_w = tl.load(p_w + o_c * 9 + ky * 3 + kx).to(tl.float32)
                b_y += tl.sum(b_a * b_w[None, :], axis=1)
        b_y += b_bias
        m_o = m_r & (o_t < n_tokens)
        b_tok = tl.load(p_tok + o_t, mask=m_o, other=0).to(tl.int64)
        tl.store(out + b_tok * (H * W) + o_i * W + o_j, sigmoid(b_y), mask=m_o)


@triton.jit
def _upconv3x3_one_channel_to_image(p_src, p_part, out, p_tok, w, b, e, n_tokens,
                                    CIN: tl.constexpr, H: tl.constexpr, W: tl.constexpr, TS: tl.constexpr,
                                    BR: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """x_hat[tok] = sigmoid(conv3x3(up2(src)) + b) with one output channel, for the first n_tokens of
    TS tokens; src [CIN][H+2][W+2][TS] zero-bordered, the image is 2H x 2W.

    Gathering the CIN*4 phase taps of every output pixel would read each input 16 times. Instead one
    GEMM over the channels gives, for every input pixel (a, b), its contribution to each of the 16
    (phase, tap) pairs: part[(py, px, dy, dx)][a][b] = sum_ci W'[py, px, ci, dy, dx] src[ci][a][b]
    (rows (pixel, token), K = CIN, N = 16); then output (2i+py, 2j+px) adds its four taps,
    part[(py, px, dy, dx)][i+py+dy-1][j+px+dx-1]. part [16][H+2][W+2][TS] is zero-bordered like src,
    so a tap off the map adds 0, as the padding does. Per token that reads CIN*H*W + 4*4*H*W
    scratch values instead of CIN*4*4*H*W (lite: 6,272 against 50,176)."""
    o_c = tl.arange(0, CIN)
    o_n = tl.arange(0, 16)
    # [CIN, 16]: column n = (py, px, dy, dx)
    b_w = _merged_phase_weights(w + e * CIN * 9 + o_c[:, None] * 9, o_n[None, :] // 8, (o_n[None, :] // 4) % 2,
                                (o_n[None, :] // 2) % 2, o_n[None, :] % 2)
    for r0 in range(0, H * W * TS, BR):
        m_r, o_t, o_a, o_b = _pixel_token_rows(r0, H, W, TS, BR)
        o_pix = ((o_a + 1) * (W + 2) + o_b + 1) * TS + o_t
        b_x = tl.load(p_src + o_pix[:, None] + o_c[None, :] * ((H + 2) * (W + 2) * TS), mask=m_r[:, None], other=0.0)
        b_part = mm(b_x, b_w, INPUT_PRECISION)
        tl.store(p_part + o_pix[:, None] + o_n[None, :] * ((H + 2) * (W + 2) * TS), b_part, mask=m_r[:, None])
    tl.debug_barrier()
    b_bias = tl.load(b + e).to(tl.float32)
    o_k = tl.arange(0, 4)
    dy = o_k // 2
    dx = o_k % 2
    for phase in tl.static_range(4):
        py = phase // 2
        px = phase % 2
        # the four taps of this phase are the columns n = phase * 4 + (dy, dx) of part; 4 * BR rows per
        # step so that a [rows, 4] tile still gives each thread a vector of rows
        for r0 in range(0, H * W * TS, 4 * BR):
            b_taps, m_r, o_t, o_i, o_j = _gather_phase_rows(p_part, r0, py, px, phase * 4 + o_k, dy, dx, H, W, TS, TS,
                                                            4 * BR)
            b_y = tl.sum(b_taps, axis=1) + b_bias
            m_o = m_r & (o_t < n_tokens)
            b_tok = tl.load(p_tok + o_t, mask=m_o, other=0).to(tl.int64)
            tl.store(out + b_tok * (4 * H * W) + (2 * o_i + py) * (2 * W) + 2 * o_j + px, sigmoid(b_y), mask=m_o)


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
    p_h0 = scratch + i_p.to(tl.int64) * scratch_per_program   # [C0, 9, 9, BM]
    p_h1 = p_h0 + C0 * 81 * BM                                # [C1, 16, 16, TS]
    p_h2 = p_h1 + C1 * 256 * TS                               # medium: [C2, 30, 30, TS]; lite: [16, 16, 16, TS]
    for tile in range(i_p, max_tiles, tl.num_programs(0)):
        e, row_start, n_rows = find_tile(tile_offsets, expert_offsets, tile, E, LOG_E, BM)
        if n_rows > 0:
            p_tok = sorted_token_idx + row_start
            # the previous tile's readers of the scratch are done
            tl.debug_barrier()
            _linear_rows_to_scratch(z, stride_zb, stride_zl, p_tok, n_rows, fc_w, fc_b, e, L, C0 * 49, p_h0,
                                    BM, BLOCK_L, BN_FC, False, True, INPUT_PRECISION)
            for g0 in range(0, n_rows, TS):
                # token slots past n_rows (or past BM when TS does not divide it) compute on stale
                # scratch and are never stored
                n_group = tl.minimum(n_rows - g0, TS)
                tl.debug_barrier()
                _upconv3x3_to_scratch(p_h0 + g0, p_h1, conv1_w, conv1_b, e, C0, C1, 7, 7, TS, BM, BR, INPUT_PRECISION)
                tl.debug_barrier()
                if HAS_CONV3:
                    _upconv3x3_to_scratch(p_h1, p_h2, conv2_w, conv2_b, e, C1, C2, 14, 14, TS, TS, BR, INPUT_PRECISION)
                    tl.debug_barrier()
                    _conv3x3_to_image(p_h2, out, p_tok + g0, conv3_w, conv3_b, e, n_group, C2, 28, 28, TS, BR)
                else:
                    _upconv3x3_one_channel_to_image(p_h1, p_h2, out, p_tok + g0, conv2_w, conv2_b, e, n_group,
                                                    C1, 14, 14, TS, BR, INPUT_PRECISION)


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
            _linear_rows_to_scratch(z, stride_zb, stride_zl, p_tok, n_rows, fc1_w, fc1_b, e, L, HIDDEN, p_h,
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


_CONV_CHANNELS = {"lite": (8, 16, 1), "medium": (32, 64, 32)}


def conv_scratch_size(kind: str, bm: int, ts: int) -> int:
    """fp32 scratch elements per program of the conv kinds: the zero-bordered maps h0 [C0][9][9][BM],
    h1 [C1][16][16][TS], then medium's h2 [C2][30][30][TS] or lite's conv2 parts [16][16][16][TS]."""
    c0, c1, c2 = _CONV_CHANNELS[kind]
    return c0 * 81 * bm + c1 * 256 * ts + (c2 * 900 * ts if kind == "medium" else 16 * 256 * ts)


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
        c0, c1, c2 = _CONV_CHANNELS[kind]
        ts = config["TS"]
        per_program = conv_scratch_size(kind, bm, ts)
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
        )

    with device_guard(z):
        run(experts_hard_config(kind, z.dtype, device, B, run=run))
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
    if torch.is_autocast_enabled(z.device.type):
        dtype = torch.get_autocast_dtype(z.device.type)
        z, layers = z.to(dtype), [w.to(dtype) for w in layers]
    return _OPS[kind](z, expert_idx, *layers)
