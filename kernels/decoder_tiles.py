"""One expert's decoder on a tile of rows, the forward device code the hard, soft and top-k kernels share.

A tile is up to BM rows that go through one expert ``e``. Row ``m`` is the id ``rows[m]``: a token
(hard and soft gating) or a flat (token, slot) id ``b * K + k`` (top-k); it reads ``z[rows[m] //
row_div]`` and its image goes to ``out[rows[m]]``. What the image is (``_store_image_rows``):

| mode          | out[row] =                        | used by                                       |
|---------------|-----------------------------------|-----------------------------------------------|
| plain         | D_e(z)                            | hard gating                                   |
| GATED         | gate[row, e] * D_e(z)             | top-k (one expert per (token, slot) row)      |
| GATED, accum. | out[row] + gate[row, e] * D_e(z)  | soft (an expert group summed in place)        |

with ``gate[row, e]`` at ``p_gate + row * stride_g_row + e * stride_g_expert`` (the caller passes
``gate_col = e * stride_g_expert``).

Decoder (conv kinds, ``_conv_decoder_tile``):
1. fc: [BM, L] x [L, C0*49] with ``tl.dot`` -> scratch h0 [C0, 9, 9, BM].
2. per group of TS tokens: nearest x2 up-sampling followed by a 3x3 convolution (padding 1) is the
   same as four 2x2 convolutions on the low-resolution map, one per output parity ("phase"), with
   the 3x3 taps that land on one low-resolution pixel summed. Each phase is a GEMM with
   K = C_in * 4 (32 for lite's conv1, exactly one tensor-core K step) instead of C_in * 9 on the
   up-sampled map: 2.25x fewer multiply-adds and no up-sampled tensor. Rows are (pixel, token),
   gathered from scratch; conv1 (+ELU) -> scratch h1 [C1, 16, 16, TS] (medium), whose conv2 (+ELU)
   is the second such pass.
3. the last convolution has one output channel, too narrow for ``tl.dot``. One GEMM over its input
   channels gives every input pixel's contribution to each of its taps ("parts"): lite's
   (up-sampled, 16 channels) [pixels, 16] x [16, 16 (phase, tap)], medium's (28x28, 32 channels)
   [pixels, 32] x [32, 9 taps, padded to 16]; then each output pixel sums its 4 or 9 parts (each
   input read once, not 16 or 9 times). That GEMM is per pixel, so it runs on each tile of the layer
   before while it is still in registers (``_upconv3x3_to_scratch``): only the parts go to scratch,
   never lite's a1 or medium's a2. Then sigmoid and the output mode.

Scratch. Triton cannot gather from registers, so the stages exchange activations through a small
per-program buffer in global memory, sized by the grid and not by B (it stays in L1/L2). The
maps are token-innermost with a zero border, [C][H+2][W+2][tokens]: a GEMM row is (pixel, token) with
the token fastest, so a warp's rows read consecutive addresses and vectorise (TS tokens per vector),
and no tap needs a bounds mask (the border is the padding; the buffer is zero-filled once per call
and only interiors are written). Per program: ``conv_scratch_size``.

Precision (``INPUT_PRECISION``, ``launch.dot_mode``): every GEMM tile goes through ``launch.mm`` (IEEE
or TF32 fp32, or bf16/fp16 tensor cores with fp32 accumulation). The maps are in the GEMM operands'
dtype (``map_dtype``: fp32, or bf16/fp16 in a half mode, which halves their traffic and rounds
nothing the GEMM would not); lite's conv2 parts and the one-channel last conv's tap sum stay fp32
(the sum on the FMA units).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .activations import elu, relu, sigmoid
from .launch import mm

CONV_CHANNELS = {"lite": (8, 16, 1), "medium": (32, 64, 32)}


# bytes of one map element (scratch_maps' MAPS)
MAP_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def map_dtype(dot: str) -> str:
    """The maps' dtype for GEMM mode ``dot`` (``launch.dot_mode``): a half mode keeps its maps in that
    dtype, since ``mm`` rounds every GEMM operand read from them to it anyway (half the scratch
    traffic, nothing rounded that was not); IEEE and TF32 keep fp32."""
    return dot if dot in ("bf16", "fp16") else "fp32"


def conv_scratch_size(kind: str, bm: int, ts: int, maps: str = "fp32") -> int:
    """fp32 scratch elements per program of the conv kinds: the zero-bordered maps h0 [C0][9][9][BM] and
    medium's h1 [C1][16][16][TS], in ``maps`` (``map_dtype``), then the last conv's parts in fp32:
    lite [16][16][16][TS], medium [9][30][30][TS] (the map before it stays in registers)."""
    c0, c1, _ = CONV_CHANNELS[kind]
    map_elements = c0 * 81 * bm + (c1 * 256 * ts if kind == "medium" else 0)
    parts = 16 * 256 * ts if kind == "lite" else 9 * 900 * ts
    return -(-map_elements * MAP_BYTES[maps] // 4) + parts


@triton.jit
def _store_image_rows(p_pix, p_rows, o_t, m_o, b_y, p_gate, stride_g_row, gate_col, accumulate,
                      NPIX: tl.constexpr, GATED: tl.constexpr):
    """Pixels ``p_pix`` (output pointer + pixel offsets) of the images of token slots ``o_t`` (rows
    ``p_rows[o_t]``, NPIX pixels apart): sigmoid(b_y), times the row's gate if GATED, plus what the
    output holds if ``accumulate`` > 0 (a runtime count: the first expert of a soft group stores, the
    others add). The caller adds the pixel offsets to the pointer
    first: ``out + b_row * NPIX + o_pix`` took hard lite (sm_90, ptxas) from 105 registers and no
    spill to 64 and 64 B spilled."""
    b_row = tl.load(p_rows + o_t, mask=m_o, other=0).to(tl.int64)
    p_out = p_pix + b_row * NPIX
    b_img = sigmoid(b_y)
    if GATED:
        b_img *= tl.load(p_gate + b_row * stride_g_row + gate_col, mask=m_o, other=0.0).to(tl.float32)
        b_img += tl.load(p_out, mask=m_o & (o_t * 0 + accumulate > 0), other=0.0)
    tl.store(p_out, b_img, mask=m_o)


@triton.jit
def _linear_rows_to_scratch(z, stride_zb, stride_zl, p_rows, row_div, n_rows, w, b, e, L, N, p_dst,
                            BM: tl.constexpr, BLOCK_L: tl.constexpr, BN: tl.constexpr,
                            APPLY_RELU: tl.constexpr, TO_MAPS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """act(z[rows[m] // row_div] @ w[e]^T + b[e]) for the BM rows of a tile; w [E, N, L]. TO_MAPS: column
    n = (c, i, j) of 7x7 maps goes to the zero-bordered maps [C][9][9][BM] (token innermost, see
    ``_gather_phase_rows``); else to rows [BM, N]."""
    o_m = tl.arange(0, BM)
    o_l = tl.arange(0, BLOCK_L)
    o_n = tl.arange(0, BN)
    m_m = o_m < n_rows
    b_tok = (tl.load(p_rows + o_m, mask=m_m, other=0) // row_div).to(tl.int64)
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
def _one_channel_weights(w, e, CIN: tl.constexpr, PARTS: tl.constexpr):
    """[CIN, 16] weights of a one-channel 3x3 convolution as the GEMM operand of its parts
    (``_one_channel_parts``). PARTS == 16, an up-sampled convolution (lite's conv2): column n = (py,
    px, dy, dx) holds the merged W'[py, px, ci, dy, dx] (``_merged_phase_weights``). PARTS == 9, a
    plain one (medium's conv3): column n = ky * 3 + kx holds W[ci, ky, kx], columns 9..15 zero."""
    o_c = tl.arange(0, CIN)
    o_n = tl.arange(0, 16)
    if PARTS == 16:
        b_w = _merged_phase_weights(w + e * CIN * 9 + o_c[:, None] * 9, o_n[None, :] // 8, (o_n[None, :] // 4) % 2,
                                    (o_n[None, :] // 2) % 2, o_n[None, :] % 2)
    else:
        b_w = tl.load(w + e * CIN * 9 + o_c[:, None] * 9 + o_n[None, :], mask=o_n[None, :] < 9, other=0.0)
    return b_w.to(tl.float32)


@triton.jit
def _one_channel_parts(b_x, b_w, INPUT_PRECISION: tl.constexpr):
    """[rows, CIN] pixels x [CIN, 16] (``_one_channel_weights``) -> each pixel's contribution to each
    (phase, tap) or tap of a one-channel convolution, summed per output pixel by ``_sum_taps_to_image``."""
    return mm(b_x, b_w, INPUT_PRECISION)


@triton.jit
def _upconv3x3_to_scratch(p_src, p_dst, p_part, w, b, w_next, e,
                          CIN: tl.constexpr, COUT: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                          TS: tl.constexpr, SRC_T: tl.constexpr, BR: tl.constexpr, STORE_MAP: tl.constexpr,
                          PARTS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """act = ELU(conv3x3(up2(src)) + b) for TS tokens, four phase GEMMs: src [CIN][H+2][W+2][SRC_T] ->
    act [COUT][2H+2][2W+2][TS] (both zero-bordered, token innermost; the borders are never written).

    STORE_MAP: act goes to p_dst. PARTS (0, 9 or 16): act feeds a one-channel convolution (COUT
    input channels), and each [BR, COUT] tile of act goes, still in registers, through that
    convolution's channel GEMM (``_one_channel_parts``): the conv's parts [PARTS][2H+2][2W+2][TS]
    fp32 -> p_part, zero-bordered like act, for ``_sum_taps_to_image``. The GEMM is per pixel, so the
    forward never stores act: lite's conv1 -> conv2 and medium's conv2 -> conv3 save writing and
    re-reading it (lite's scratch traffic per token 77 -> 52 KB in fp32); the lite backward, which
    needs a1, stores both."""
    o_k = tl.arange(0, CIN * 4)
    ci = o_k // 4
    dy = (o_k // 2) % 2
    dx = o_k % 2
    o_n = tl.arange(0, COUT)
    o_p = tl.arange(0, 16)
    b_bias = tl.load(b + e * COUT + o_n).to(tl.float32)
    if PARTS > 0:
        b_w_next = _one_channel_weights(w_next, e, COUT, PARTS)
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
            if STORE_MAP:
                tl.store(p_dst + o_out[:, None] + o_n[None, :] * ((2 * H + 2) * (2 * W + 2) * TS), b_h,
                         mask=m_r[:, None])
            if PARTS > 0:
                tl.store(p_part + o_out[:, None] + o_p[None, :] * ((2 * H + 2) * (2 * W + 2) * TS),
                         _one_channel_parts(b_h, b_w_next, INPUT_PRECISION), mask=m_r[:, None] & (o_p[None, :] < PARTS))


@triton.jit
def _sum_taps_to_image(p_part, out, p_rows, p_gate, stride_g_row, gate_col, accumulate, b, e, n_tokens,
                       H: tl.constexpr, W: tl.constexpr, TS: tl.constexpr, BR: tl.constexpr, UP: tl.constexpr,
                       GATED: tl.constexpr):
    """out[row] = sigmoid(conv3x3(x) + b) with one output channel, for the first n_tokens of TS tokens
    (output modes: ``_store_image_rows``), from the conv's parts over x's H x W pixels
    (``_upconv3x3_to_scratch``, zero-bordered [parts][H+2][W+2][TS], so a tap off the map adds 0, as
    the padding does).

    UP (lite's conv2, x = up2(src), a 2H x 2W image): part[(py, px, dy, dx)][a][b] = sum_ci W'[py, px,
    ci, dy, dx] src[ci][a][b] and output (2i+py, 2j+px) adds part[(py, px, dy, dx)][i+py+dy-1][j+px+dx-1]
    over its four taps: CIN*H*W + 4*4*H*W values per token instead of gathering CIN*4 phase taps per
    output, CIN*4*4*H*W (lite: 6,272 against 50,176). Else (medium's conv3, an H x W image):
    part[ky * 3 + kx][a][b] = sum_ci W[ci, ky, kx] x[ci][a][b] and output (i, j) adds
    part[ky * 3 + kx][i+ky-1][j+kx-1] over its nine taps: 18 values per pixel instead of CIN*9 (medium:
    288)."""
    b_bias = tl.load(b + e).to(tl.float32)
    if UP:
        o_k = tl.arange(0, 4)
        dy = o_k // 2
        dx = o_k % 2
        for phase in tl.static_range(4):
            py = phase // 2
            px = phase % 2
            # the four taps of this phase are the columns n = phase * 4 + (dy, dx) of part; 4 * BR rows per
            # step so that a [rows, 4] tile still gives each thread a vector of rows
            for r0 in range(0, H * W * TS, 4 * BR):
                b_taps, m_r, o_t, o_i, o_j = _gather_phase_rows(p_part, r0, py, px, phase * 4 + o_k, dy, dx, H, W,
                                                                TS, TS, 4 * BR)
                b_y = tl.sum(b_taps, axis=1) + b_bias
                m_o = m_r & (o_t < n_tokens)
                _store_image_rows(out + (2 * o_i + py) * (2 * W) + 2 * o_j + px, p_rows, o_t, m_o, b_y, p_gate,
                                  stride_g_row, gate_col, accumulate, 4 * H * W, GATED)
    else:
        # [16] taps, 9 of them real: part n at padded pixel (i + ky, j + kx)
        o_n = tl.arange(0, 16)
        o_tap = ((o_n * (H + 2) + o_n // 3) * (W + 2) + o_n % 3) * TS
        for r0 in range(0, H * W * TS, BR):
            m_r, o_t, o_i, o_j = _pixel_token_rows(r0, H, W, TS, BR)
            o_pix = (o_i * (W + 2) + o_j) * TS + o_t
            b_taps = tl.load(p_part + o_pix[:, None] + o_tap[None, :], mask=m_r[:, None] & (o_n[None, :] < 9),
                             other=0.0)
            b_y = tl.sum(b_taps, axis=1) + b_bias
            m_o = m_r & (o_t < n_tokens)
            _store_image_rows(out + o_i * W + o_j, p_rows, o_t, m_o, b_y, p_gate, stride_g_row, gate_col, accumulate,
                              H * W, GATED)


@triton.jit
def scratch_maps(scratch, scratch_per_program, C0: tl.constexpr, C1: tl.constexpr, HAS_CONV3: tl.constexpr,
                 BM: tl.constexpr, TS: tl.constexpr, MAPS: tl.constexpr):
    """This program's part of the fp32 ``scratch`` (conv_scratch_size floats) as (h0, h1, parts): the
    maps h0 [C0, 9, 9, BM] and medium's h1 [C1, 16, 16, TS] as pointers to ``MAPS`` (``map_dtype``),
    then the last conv's parts in fp32 (lite [16, 16, 16, TS], medium [9, 30, 30, TS]). The map
    before the last conv never goes to scratch (``_upconv3x3_to_scratch``); lite's h1 is the parts."""
    p_base = scratch + tl.program_id(0).to(tl.int64) * scratch_per_program
    if MAPS == "bf16":
        p_h0 = p_base.to(tl.pointer_type(tl.bfloat16))
    elif MAPS == "fp16":
        p_h0 = p_base.to(tl.pointer_type(tl.float16))
    else:
        p_h0 = p_base
    maps = C0 * 81 * BM + (C1 * 256 * TS if HAS_CONV3 else 0)
    if MAPS == "fp32":
        p_parts = p_base + maps
    else:
        # half maps: C0 * 81 * BM + C1 * 256 * TS elements is even (C0 = 8 or 32), so the parts start on a float
        p_parts = p_base + maps // 2
    p_h1 = p_h0 + C0 * 81 * BM if HAS_CONV3 else p_parts
    return p_h0, p_h1, p_parts


@triton.jit
def _conv_decoder_tile(z, stride_zb, stride_zl, row_div, p_rows, n_rows, e,
                       out, p_gate, stride_g_row, gate_col, accumulate,
                       fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b, conv3_w, conv3_b, L, p_h0, p_h1, p_h2,
                       C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, HAS_CONV3: tl.constexpr,
                       BM: tl.constexpr, TS: tl.constexpr, BR: tl.constexpr, BLOCK_L: tl.constexpr,
                       BN_FC: tl.constexpr, GATED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The n_rows (<= BM) rows ``p_rows[0:n_rows]`` through expert ``e`` (a conv kind), images stored in
    the output mode of the module docstring. ``p_h0, p_h1, p_h2``: this program's scratch maps
    (``scratch_maps``)."""
    # the previous tile's readers of the scratch are done
    tl.debug_barrier()
    _linear_rows_to_scratch(z, stride_zb, stride_zl, p_rows, row_div, n_rows, fc_w, fc_b, e, L, C0 * 49, p_h0,
                            BM, BLOCK_L, BN_FC, False, True, INPUT_PRECISION)
    for g0 in range(0, n_rows, TS):
        # token slots past n_rows (or past BM when TS does not divide it) compute on stale scratch and
        # are never stored
        n_group = tl.minimum(n_rows - g0, TS)
        tl.debug_barrier()
        if HAS_CONV3:
            _upconv3x3_to_scratch(p_h0 + g0, p_h1, p_h1, conv1_w, conv1_b, conv1_w, e, C0, C1, 7, 7, TS, BM, BR, True,
                                  0, INPUT_PRECISION)
            tl.debug_barrier()
            _upconv3x3_to_scratch(p_h1, p_h2, p_h2, conv2_w, conv2_b, conv3_w, e, C1, C2, 14, 14, TS, TS, BR, False,
                                  9, INPUT_PRECISION)
            tl.debug_barrier()
            _sum_taps_to_image(p_h2, out, p_rows + g0, p_gate, stride_g_row, gate_col, accumulate, conv3_b, e,
                               n_group, 28, 28, TS, BR, False, GATED)
        else:
            _upconv3x3_to_scratch(p_h0 + g0, p_h1, p_h1, conv1_w, conv1_b, conv2_w, e, C0, C1, 7, 7, TS, BM, BR, False,
                                  16, INPUT_PRECISION)
            tl.debug_barrier()
            _sum_taps_to_image(p_h1, out, p_rows + g0, p_gate, stride_g_row, gate_col, accumulate, conv2_b, e,
                               n_group, 14, 14, TS, BR, True, GATED)
