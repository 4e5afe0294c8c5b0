"""The lite decoder's backward on a tile of rows, for the soft and top-k training kernels.

Each tile (up to BM rows of one expert ``e``, rows as in kernels/decoder_tiles.py: a token or a flat
(token, slot) id, z row ``row // row_div``) recomputes its forward with the forward's own device
functions (token-innermost, zero-bordered scratch maps, phase-split convolutions) and then runs the
backward in the same layout, TS tokens at a time:

| step | what                                            | as                                                       |
|------|-------------------------------------------------|----------------------------------------------------------|
| 1    | h0 = fc(z) -> H0 [8][9][9][BM]                   | the forward's ``_linear_rows_to_scratch``                |
| 2    | a1 = ELU(conv1(up(h0))) -> A1 [16][16][16][TS]   | the forward's ``_upconv3x3_to_scratch``, which also      |
| 3    | conv2's (phase, tap) parts -> PARTS              | runs conv2's channel GEMM on each a1 tile                |
| 4    | y; g2 = sigmoid'(gate * dL/dx_hat) -> G2P        | 4-tap sums; d gate = <dL/dx_hat, y>, d conv2.bias        |
|      | [4 phases][16][16][TS]                          |                                                          |
| 5    | da1 = conv2^T g2; dc1 = ELU'(da1) -> DC1P        | rows (pixel, token) x K = 16 (phase, tap) gathered from  |
|      | [4 phases][16][9][9][TS]; d conv2; d conv1.bias | G2P: ``tl.dot`` with the merged weights (dgrad) and,     |
|      |                                                 | transposed, with a1 at the rows (wgrad)                  |
| 6    | dh0 = conv1^T dc1 -> over h0 in H0; d conv1      | rows x K = 256 (phase, co, tap) gathered from DC1P: the  |
|      |                                                 | same two ``tl.dot`` (N = 8 channels, padded to 16)       |
| 7    | d fc, dz = dh0 W_fc (whole tile)                | ``tl.dot`` over the BM rows                              |

Each weight gradient reuses its data gradient's gathered tile (d W = gathered^T x input rows), so the
backward reads every activation map once per use, as the forward does.

Every gather reads consecutive addresses across a warp's rows (the token is innermost) with no
bounds mask (the zero borders are the padding: up-sampled convolutions read input (i + py + dy - 1);
their transposes read output (a - py - dy + 1), which stays inside a border of one on the
phase-split maps). Token slots past the tile's rows carry stale scratch: they are masked to zero
before any sum over rows, so they add nothing, not even a NaN.

Weight gradients use the merged (phase, tap) layout of ``decoder_blocks.partial_layout``; the
launcher maps them back to the 3x3 weights (``decoder_blocks.partials_to_grads``). d fc.weight is
added in place into the item's partial row per tile; the rest accumulate in registers per item.
Scratch per program: ``conv_bwd_scratch_size`` fp32, zero-filled once per call.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .activations import elu_grad, sigmoid, sigmoid_grad
from .decoder_tiles import (_gather_phase_rows, _linear_rows_to_scratch, _merged_phase_weights, _pixel_token_rows,
                            _upconv3x3_to_scratch)
from .launch import find_tile, mm

C0 = 8     # lite: fc -> 8 x 7 x 7 (conv1 -> 16 x 14 x 14, conv2 -> 1 x 28 x 28)


def conv_bwd_scratch_size(bm: int, ts: int) -> int:
    """fp32 scratch elements per program of the lite backward: H0 [8][9][9][BM] (h0, then dh0), then
    A1 and PARTS [16][16][16][TS], G2P [4][16][16][TS] and DC1P [4][16][9][9][TS]."""
    return C0 * 81 * bm + (2 * 16 * 256 + 4 * 256 + 4 * 16 * 81) * ts


@triton.jit
def _gather_tap_columns(p_src, o_row, o_col, m_r):
    """A tile [rows, K] of a transposed phase GEMM (steps 5 and 6): row r x column k reads
    ``p_src[o_row[r] + o_col[k]]``, the token innermost so a warp's rows are consecutive addresses;
    rows outside the map (``m_r`` false) read zero."""
    return tl.load(p_src + o_row[:, None] + o_col[None, :], mask=m_r[:, None], other=0.0)


@triton.jit
def _lite_tile_bwd(z, stride_zb, stride_zl, row_div, p_rows, n_rows, e,
                   p_do, stride_dob, stride_dop, p_gate, stride_g_row, gate_col,
                   p_dg, stride_dg_row, dg_col, p_dz, dz_accumulate, p_part, part_accumulate,
                   fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b, L,
                   p_h0, p_a1, p_parts, p_g2, p_dc1,
                   acc_fcb, acc_w1, acc_b1, acc_w2, acc_b2,
                   BM: tl.constexpr, TS: tl.constexpr, BR: tl.constexpr, LP: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):
    """Forward and backward of the n_rows rows ``p_rows[0:n_rows]`` through expert ``e`` (module
    docstring). Writes d gate at ``p_dg + row * stride_dg_row + dg_col`` and dz at ``p_dz + row * L``
    (added to what is there when ``dz_accumulate`` > 0), adds d fc.weight into ``p_part`` (stored when
    ``part_accumulate`` is 0) and returns the other weight-gradient accumulators, updated."""
    o_ts = tl.arange(0, TS)
    o_ci = tl.arange(0, 16)
    o_k16 = tl.arange(0, 16)
    o_k256 = tl.arange(0, 256)
    p_w1 = conv1_w + e * 16 * 8 * 9
    p_w2 = conv2_w + e * 16 * 9
    b_b2 = tl.load(conv2_b + e).to(tl.float32)
    # conv2's merged weights as the dgrad operand: [K = (py, px, dy, dx), N = ci]
    b_w2t = _merged_phase_weights(p_w2 + o_ci[None, :] * 9, o_k16[:, None] // 8, (o_k16[:, None] // 4) % 2,
                                  (o_k16[:, None] // 2) % 2, o_k16[:, None] % 2)
    # conv1's merged weights as the dgrad operand: [K = (py, px, co, dy, dx), N = ci (8 of 16)]
    kq_phase = o_k256 // 64
    kq_co = (o_k256 // 4) % 16
    m_ci8 = o_ci < 8
    b_w1t = _merged_phase_weights(p_w1 + kq_co[:, None] * (8 * 9) + (o_ci % 8)[None, :] * 9,
                                  kq_phase[:, None] // 2, kq_phase[:, None] % 2, (o_k256[:, None] // 2) % 2,
                                  o_k256[:, None] % 2)
    b_w1t = tl.where(m_ci8[None, :], b_w1t, 0.0)
    tl.debug_barrier()
    _linear_rows_to_scratch(z, stride_zb, stride_zl, p_rows, row_div, n_rows, fc_w, fc_b, e, L, 8 * 49, p_h0,
                            BM, LP, 64, False, True, INPUT_PRECISION)
    for g0 in range(0, n_rows, TS):
        n_group = tl.minimum(n_rows - g0, TS)
        tl.debug_barrier()
        _upconv3x3_to_scratch(p_h0 + g0, p_a1, p_parts, conv1_w, conv1_b, conv2_w, e, 8, 16, 7, 7, TS, BM, BR, True, 16,
                              INPUT_PRECISION)
        tl.debug_barrier()
        # 4. y from the four taps of each phase; g2 = d(conv2 pre-activation) -> G2P, d gate per token
        m_group = o_ts < n_group
        b_row_ts = tl.load(p_rows + g0 + o_ts, mask=m_group, other=0).to(tl.int64)
        b_dgate = tl.zeros([TS], dtype=tl.float32)
        for phase in tl.static_range(4):
            py = phase // 2
            px = phase % 2
            o_k = tl.arange(0, 4)
            for r0 in range(0, 14 * 14 * TS, 4 * BR):
                b_taps, m_r, o_t, o_i, o_j = _gather_phase_rows(p_parts, r0, py, px, phase * 4 + o_k, o_k // 2,
                                                                o_k % 2, 14, 14, TS, TS, 4 * BR)
                b_y = sigmoid(tl.sum(b_taps, axis=1) + b_b2)
                m_v = m_r & (o_t < n_group)
                b_row = tl.load(p_rows + g0 + o_t, mask=m_v, other=0).to(tl.int64)
                o_pix = (2 * o_i + py) * 28 + 2 * o_j + px
                b_do = tl.load(p_do + (b_row // row_div) * stride_dob + o_pix * stride_dop, mask=m_v, other=0.0).to(tl.float32)
                b_gate = tl.load(p_gate + b_row * stride_g_row + gate_col, mask=m_v, other=0.0).to(tl.float32)
                b_g2 = tl.where(m_v, sigmoid_grad(b_gate * b_do, b_y), 0.0)
                acc_b2 += tl.sum(b_g2, axis=0)
                b_dgate += tl.sum(tl.reshape(tl.where(m_v, b_do * b_y, 0.0), [4 * BR // TS, TS]), axis=0)
                tl.store(p_g2 + ((phase * 16 + o_i + 1) * 16 + o_j + 1) * TS + o_t, b_g2, mask=m_r)
        tl.store(p_dg + b_row_ts * stride_dg_row + dg_col, b_dgate, mask=m_group)
        tl.debug_barrier()
        # 5. da1 = conv2^T g2 over rows (a, b, token) of 14 x 14: input (a, b) is read by output
        # (a - py - dy + 1, b - px - dx + 1) of phase (py, px); d conv2 = the same gathered g2 tile^T
        # times a1 at (a, b); then ELU' from a1 -> DC1P by phase, and d conv1.bias
        k_py = o_k16 // 8
        k_px = (o_k16 // 4) % 2
        k_dy = (o_k16 // 2) % 2
        k_dx = o_k16 % 2
        o_col2 = (((k_py * 2 + k_px) * 16 + 2 - k_py - k_dy) * 16 + 2 - k_px - k_dx) * TS
        for r0 in range(0, 14 * 14 * TS, BR):
            m_r, o_t, o_a, o_b = _pixel_token_rows(r0, 14, 14, TS, BR)
            m_v = m_r & (o_t < n_group)
            b_g = _gather_tap_columns(p_g2, (o_a * 16 + o_b) * TS + o_t, o_col2, m_r)
            b_a1 = tl.load(p_a1 + (((o_a + 1) * 16 + o_b + 1) * TS + o_t)[:, None] + o_ci[None, :] * (256 * TS),
                           mask=m_v[:, None], other=0.0)
            acc_w2 += mm(tl.trans(b_g), b_a1, INPUT_PRECISION)
            b_dc1 = tl.where(m_v[:, None], elu_grad(mm(b_g, b_w2t, INPUT_PRECISION), b_a1), 0.0)
            acc_b1 += tl.sum(b_dc1, axis=0)
            o_dc1 = ((((o_a % 2) * 2 + o_b % 2) * 16 * 9 + o_a // 2 + 1) * 9 + o_b // 2 + 1) * TS + o_t
            tl.store(p_dc1 + o_dc1[:, None] + o_ci[None, :] * (81 * TS), b_dc1, mask=m_r[:, None])
        tl.debug_barrier()
        # 6. dh0 = conv1^T dc1 over rows (a, b, token) of 7 x 7, K = (phase, co, dy, dx) gathered from
        # DC1P's zero-bordered maps; d conv1 = that gathered tile^T times h0 at (a, b); dh0 then goes
        # over this group's h0 slots in H0 (no longer read)
        kq_py = kq_phase // 2
        kq_px = kq_phase % 2
        kq_dy = (o_k256 // 2) % 2
        kq_dx = o_k256 % 2
        o_col1 = (((kq_phase * 16 + kq_co) * 9 + 2 - kq_py - kq_dy) * 9 + 2 - kq_px - kq_dx) * TS
        for r0 in range(0, 7 * 7 * TS, BR):
            m_r, o_t, o_a, o_b = _pixel_token_rows(r0, 7, 7, TS, BR)
            m_v = m_r & (o_t < n_group)
            o_h0 = ((o_a + 1) * 9 + o_b + 1) * BM + g0 + o_t
            b_g = _gather_tap_columns(p_dc1, (o_a * 9 + o_b) * TS + o_t, o_col1, m_r)
            b_h0 = tl.load(p_h0 + o_h0[:, None] + o_ci[None, :] * (81 * BM), mask=m_v[:, None] & m_ci8[None, :],
                           other=0.0)
            acc_w1 += mm(tl.trans(b_g), b_h0, INPUT_PRECISION)
            tl.debug_barrier()
            tl.store(p_h0 + o_h0[:, None] + o_ci[None, :] * (81 * BM), mm(b_g, b_w1t, INPUT_PRECISION),
                     mask=m_v[:, None] & m_ci8[None, :])
    tl.debug_barrier()
    # 7. fc: d fc.weight [392, L] into the partial row, d fc.bias, dz = dh0 W_fc
    o_m = tl.arange(0, BM)
    o_n = tl.arange(0, 512)
    o_l = tl.arange(0, LP)
    m_m = o_m < n_rows
    m_n = o_n < 8 * 49
    m_l = o_l < L
    o_c = o_n // 49
    o_ij = o_n % 49
    b_dh0 = tl.load(p_h0 + (((o_c * 9 + o_ij // 7 + 1) * 9 + o_ij % 7 + 1) * BM)[None, :] + o_m[:, None],
                    mask=m_m[:, None] & m_n[None, :], other=0.0)
    b_rows = tl.load(p_rows + o_m, mask=m_m, other=0).to(tl.int64)
    b_z = tl.load(z + (b_rows // row_div)[:, None] * stride_zb + o_l[None, :] * stride_zl,
                  mask=m_m[:, None] & m_l[None, :], other=0.0).to(tl.float32)
    p_dw = p_part + o_n[:, None] * L + o_l[None, :]
    m_dw = m_n[:, None] & m_l[None, :]
    b_dw = mm(tl.trans(b_dh0), b_z, INPUT_PRECISION)
    b_dw += tl.load(p_dw, mask=m_dw & (o_n[:, None] * 0 + part_accumulate > 0), other=0.0)
    tl.store(p_dw, b_dw, mask=m_dw)
    acc_fcb += tl.sum(b_dh0, axis=0)
    b_wfc = tl.load(fc_w + e * (8 * 49) * L + o_n[:, None] * L + o_l[None, :], mask=m_dw, other=0.0).to(tl.float32)
    b_dz = mm(b_dh0, b_wfc, INPUT_PRECISION)
    p_dz_rows = p_dz + b_rows[:, None] * L + o_l[None, :]
    m_dz = m_m[:, None] & m_l[None, :]
    b_dz += tl.load(p_dz_rows, mask=m_dz & (o_m[:, None] * 0 + dz_accumulate > 0), other=0.0)
    tl.store(p_dz_rows, b_dz, mask=m_dz)
    return acc_fcb, acc_w1, acc_b1, acc_w2, acc_b2


@triton.jit
def _lite_experts_bwd_body(
    z, stride_zb, stride_zl, p_do, stride_dob, stride_dop, gates, stride_gb, stride_ge,
    p_dz, p_dg, p_part, W_TOTAL, scratch, scratch_per_program, p_rows_all, expert_offsets, tile_offsets,
    fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b,
    B, L, E, K, n_items, runs, blocks_per_run, experts_per_group,
    IS_SOFT: tl.constexpr, LOG_E: tl.constexpr, BM: tl.constexpr, TS: tl.constexpr, BR: tl.constexpr,
    LP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Persistent loop over items, as ``decoder_blocks._experts_bwd_body``. soft: item = (expert group,
    run of token blocks), rows = token ids, d gate [B, E], dz added per expert into the group's partial
    row p_dz[group], one partial weight row p_part[e * runs + run]; top-k: item = one expert tile of
    sorted (token, slot) rows, d gate and dz per slot, partial row p_part[item]."""
    i_p = tl.program_id(0)
    p_h0 = scratch + i_p.to(tl.int64) * scratch_per_program
    p_a1 = p_h0 + 8 * 81 * BM
    p_parts = p_a1 + 16 * 256 * TS
    p_g2 = p_parts + 16 * 256 * TS
    p_dc1 = p_g2 + 4 * 256 * TS
    n_blocks = tl.cdiv(B, BM)
    for item in range(i_p, n_items, tl.num_programs(0)):
        if IS_SOFT:
            run = item % runs
            e_lo = (item // runs) * experts_per_group
            e_hi = tl.minimum(e_lo + experts_per_group, E)
            blk_lo = run * blocks_per_run
            blk_hi = tl.minimum(blk_lo + blocks_per_run, n_blocks)
            p_dz_item = p_dz + tl.cast(item // runs, tl.int64) * B * L
        else:
            e_lo, row_start, n_tile = find_tile(tile_offsets, expert_offsets, item, E, LOG_E, BM)
            e_hi = e_lo + 1
            blk_lo = 0
            blk_hi = tl.where(n_tile > 0, 1, 0)
            p_dz_item = p_dz
        for e in range(e_lo, e_hi):
            e64 = tl.cast(e, tl.int64)
            if IS_SOFT:
                p_row = p_part + (e64 * runs + run) * W_TOTAL
            else:
                p_row = p_part + tl.cast(item, tl.int64) * W_TOTAL
            acc_fcb = tl.zeros((512,), dtype=tl.float32)
            acc_w1 = tl.zeros((256, 16), dtype=tl.float32)
            acc_b1 = tl.zeros((16,), dtype=tl.float32)
            acc_w2 = tl.zeros((16, 16), dtype=tl.float32)
            # a 0-d fp32 accumulator (conv2 has one output channel, so one bias)
            acc_b2 = tl.sum(tl.zeros((2,), dtype=tl.float32), axis=0)
            for blk in range(blk_lo, blk_hi):
                if IS_SOFT:
                    r0 = blk * BM
                    p_rows = p_rows_all + r0
                    n_rows = tl.minimum(B - r0, BM)
                    (acc_fcb, acc_w1, acc_b1, acc_w2, acc_b2) = _lite_tile_bwd(
                        z, stride_zb, stride_zl, 1, p_rows, n_rows, e64,
                        p_do, stride_dob, stride_dop, gates, stride_gb, e64 * stride_ge,
                        p_dg, E, e64, p_dz_item, e - e_lo, p_row, blk - blk_lo,
                        fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b, L,
                        p_h0, p_a1, p_parts, p_g2, p_dc1,
                        acc_fcb, acc_w1, acc_b1, acc_w2, acc_b2,
                        BM, TS, BR, LP, INPUT_PRECISION)
                else:
                    (acc_fcb, acc_w1, acc_b1, acc_w2, acc_b2) = _lite_tile_bwd(
                        z, stride_zb, stride_zl, K, p_rows_all + row_start, n_tile, e64,
                        p_do, stride_dob, stride_dop, gates, 1, 0,
                        p_dg, 1, 0, p_dz_item, 0, p_row, 0,
                        fc_w, fc_b, conv1_w, conv1_b, conv2_w, conv2_b, L,
                        p_h0, p_a1, p_parts, p_g2, p_dc1,
                        acc_fcb, acc_w1, acc_b1, acc_w2, acc_b2,
                        BM, TS, BR, LP, INPUT_PRECISION)
            _store_lite_partials(p_row, acc_fcb, acc_w1, acc_b1, acc_w2, acc_b2, L)


@triton.jit
def _store_lite_partials(p_part, acc_fcb, acc_w1, acc_b1, acc_w2, acc_b2, L):
    """The rest of a packed partial row [fc.w 392*L (in place already) | fc.b 392 | w1 merged
    [4 phases][32 = (ci, dy, dx)][16 co] | b1 16 | w2 merged [4 phases][64 = (ci, dy, dx)] | b2], from
    acc_w1 [256 = (phase, co, dy, dx), 16 ci] and acc_w2 [16 = (phase, dy, dx), 16 ci]."""
    o_n = tl.arange(0, 512)
    p_part += 392 * L
    tl.store(p_part + o_n, acc_fcb, mask=o_n < 392)
    p_part += 392
    o_k = tl.arange(0, 256)[:, None]
    o_ci = tl.arange(0, 16)[None, :]
    tl.store(p_part + (o_k // 64) * 512 + (o_ci * 4 + (o_k // 2) % 2 * 2 + o_k % 2) * 16 + (o_k // 4) % 16, acc_w1,
             mask=(o_k < 256) & (o_ci < 8))
    p_part += 2048
    tl.store(p_part + tl.arange(0, 16), acc_b1)
    p_part += 16
    o_n16 = tl.arange(0, 16)[:, None]
    tl.store(p_part + (o_n16 // 4) * 64 + o_ci * 4 + o_n16 % 4, acc_w2)
    tl.store(p_part + 256, acc_b2)
