"""Generic grouped layers over rows sorted by expert: one conv/linear layer of every expert in one launch.

Rows are (token, slot) assignments sorted by expert (kernels/grouping.py). Expert e owns sorted rows
``expert_offsets[e]:expert_offsets[e+1]``, cut into tiles of TILE_ROWS rows; ``tile_offsets`` [E+1]
(exclusive scan of cdiv(count_e, TILE_ROWS), made on the device by ``group_by_expert_tiles``) numbers
them, and a program finds its tile's expert by binary search (``launch.find_tile``). Grids are bounded by
``tile_bound(R, E) = cdiv(R, TILE_ROWS) + min(E, R)`` tiles whatever the routing; programs past the
last real tile return at once, so empty experts cost nothing and there is no host synchronisation.

One layer, per expert e (weights stacked with a leading E):

    y[r] = act(conv_KSxKS(up_UP(x[r]), W_e, pad=KS//2) + b_e)      x [C_IN, H, W], y [C_OUT, UP*H, UP*W]

KS=1, H=W=1, UP=1 is a linear layer (W_e [C_OUT, C_IN]); ``HAS_IDX`` reads input row
``idx[r] // IDX_DIV`` instead of row r (the first layer reads z[token] straight from z). ACT: 0 none,
1 ELU (alpha 1), 2 sigmoid, the helpers of kernels/activations.py. Convolutions are implicit GEMMs that
gather their inputs by address:

| kernel                        | M                        | N     | reduction              |
|-------------------------------|--------------------------|-------|------------------------|
| _grouped_conv_fwd_kernel      | tile rows x out pixels   | C_OUT | C_IN*KS*KS             |
| _grouped_conv_dgrad_kernel    | tile rows x in pixels    | C_IN  | C_OUT*KS*KS*UP*UP      |
| _grouped_conv_wgrad_kernel    | C_OUT                    | C_IN*KS*KS | tile rows x out pixels |

dgrad folds the nearest-neighbour upsampling's adjoint (a sum over the UP*UP copies) into its
reduction. Backward kernels take the layer's stored output y and apply act' on load (ELU: y > 0 ? 1 :
y + 1; sigmoid: y (1 - y)), so the pre-activation gradient is never stored. wgrad writes one partial
[C_OUT, C_IN*KS*KS] (and bias [C_OUT]) per tile; ``_segment_sum_kernel`` adds each expert's
tiles in order: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoe_fast.contract import alloc_output

from .activations import ACT_ELU, ACT_NONE, ACT_SIGMOID, activate, activate_grad
from .decoder_blocks import _segment_sum_kernel
from .launch import device_arch, dot_precision, find_tile, log2_ceil, mm, tile_bound
from .tuning import GROUPED_TILE_ROWS, grouped_layer_config

TILE_ROWS = GROUPED_TILE_ROWS   # sorted rows of one expert per tile
_SUM_BLOCK = 1024     # partial columns per segment-sum program


@triton.jit
def _act_grad(b_dy, p_y, o_y, m_y, ACT: tl.constexpr):
    """d(pre-activation) from d(output) and the stored output y (read only when ACT has a derivative)."""
    if ACT != 0:
        b_dy = activate_grad(b_dy, tl.load(p_y + o_y, mask=m_y, other=0.), ACT)
    return b_dy


@triton.jit
def _input_rows(p_idx, o_r, m_r, IDX_DIV, HAS_IDX: tl.constexpr):
    """Input row of each sorted row: idx[r] // IDX_DIV (gathered first layer) or r itself."""
    if HAS_IDX:
        return tl.load(p_idx + o_r, mask=m_r, other=0).to(tl.int64) // IDX_DIV
    return o_r


@triton.jit
def _grouped_conv_fwd_kernel(
    p_x, stride_xr, stride_xc, p_idx, IDX_DIV, p_w, p_b, p_y, p_eoff, p_toff,
    E, C_IN, C_OUT, H_IN, W_IN,
    HAS_IDX: tl.constexpr, KS: tl.constexpr, UP: tl.constexpr, ACT: tl.constexpr, LOG_E: tl.constexpr,
    TILE_ROWS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    i_n = tl.program_id(2).to(tl.int64)
    if i_t >= tl.load(p_toff + E):
        return
    e, r0, n_rows = find_tile(p_toff, p_eoff, i_t, E, LOG_E, TILE_ROWS)
    H_OUT = H_IN * UP
    W_OUT = W_IN * UP
    P_OUT = H_OUT * W_OUT
    if i_m * BM >= n_rows * P_OUT:
        return
    # [BM] flattened (row, output pixel) of this tile
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < n_rows * P_OUT
    o_r = r0 + o_m // P_OUT
    o_p = o_m % P_OUT
    o_oy = o_p // W_OUT
    o_ox = o_p % W_OUT
    o_xr = _input_rows(p_idx, o_r, m_m, IDX_DIV, HAS_IDX)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < C_OUT
    K_TOTAL = C_IN * KS * KS
    p_we = p_w + e * C_OUT * K_TOTAL
    b_acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K_TOTAL, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K_TOTAL
        o_ci = o_k // (KS * KS)
        o_ky = (o_k % (KS * KS)) // KS
        o_kx = o_k % KS
        # [BM, BK] position on the upsampled input grid; padding reads zeros
        o_iy = o_oy[:, None] + o_ky[None, :] - KS // 2
        o_ix = o_ox[:, None] + o_kx[None, :] - KS // 2
        m_x = (m_m[:, None] & m_k[None, :] & (o_iy >= 0) & (o_iy < H_OUT) & (o_ix >= 0) & (o_ix < W_OUT))
        o_sy = tl.where(o_iy > 0, o_iy, 0) // UP
        o_sx = tl.where(o_ix > 0, o_ix, 0) // UP
        b_x = tl.load(p_x + o_xr[:, None] * stride_xr + o_ci[None, :] * stride_xc + o_sy * W_IN + o_sx,
                      mask=m_x, other=0.).to(tl.float32)
        b_w = tl.load(p_we + o_n[None, :] * K_TOTAL + o_k[:, None], mask=m_k[:, None] & m_n[None, :],
                      other=0.).to(tl.float32)
        b_acc += mm(b_x, b_w, PREC)
    b_acc += tl.load(p_b + e * C_OUT + o_n, mask=m_n, other=0.).to(tl.float32)[None, :]
    b_acc = activate(b_acc, ACT)
    tl.store(p_y + o_r[:, None] * (C_OUT * P_OUT) + o_n[None, :] * P_OUT + o_p[:, None], b_acc,
             mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _grouped_conv_dgrad_kernel(
    p_dy, p_y, p_w, p_dx, p_eoff, p_toff,
    E, C_IN, C_OUT, H_IN, W_IN,
    KS: tl.constexpr, UP: tl.constexpr, ACT: tl.constexpr, LOG_E: tl.constexpr,
    TILE_ROWS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    i_n = tl.program_id(2).to(tl.int64)
    if i_t >= tl.load(p_toff + E):
        return
    e, r0, n_rows = find_tile(p_toff, p_eoff, i_t, E, LOG_E, TILE_ROWS)
    H_OUT = H_IN * UP
    W_OUT = W_IN * UP
    P_OUT = H_OUT * W_OUT
    P_IN = H_IN * W_IN
    if i_m * BM >= n_rows * P_IN:
        return
    # [BM] flattened (row, input pixel) of this tile
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < n_rows * P_IN
    o_r = r0 + o_m // P_IN
    o_p = o_m % P_IN
    o_sy = o_p // W_IN
    o_sx = o_p % W_IN
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < C_IN
    TAPS = KS * KS
    SUBS = UP * UP
    K_TOTAL = C_OUT * TAPS * SUBS
    p_we = p_w + e * C_OUT * C_IN * TAPS
    b_acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K_TOTAL, BK):
        # reduction index = (output channel, tap, upsampled copy)
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K_TOTAL
        o_co = o_k // (TAPS * SUBS)
        o_tap = (o_k % (TAPS * SUBS)) // SUBS
        o_sub = o_k % SUBS
        o_oy = o_sy[:, None] * UP + (o_sub // UP)[None, :] - (o_tap // KS)[None, :] + KS // 2
        o_ox = o_sx[:, None] * UP + (o_sub % UP)[None, :] - (o_tap % KS)[None, :] + KS // 2
        m_g = (m_m[:, None] & m_k[None, :] & (o_oy >= 0) & (o_oy < H_OUT) & (o_ox >= 0) & (o_ox < W_OUT))
        o_g = o_r[:, None] * (C_OUT * P_OUT) + o_co[None, :] * P_OUT + o_oy * W_OUT + o_ox
        b_g = tl.load(p_dy + o_g, mask=m_g, other=0.).to(tl.float32)
        b_g = _act_grad(b_g, p_y, o_g, m_g, ACT)
        b_w = tl.load(p_we + o_co[:, None] * (C_IN * TAPS) + o_n[None, :] * TAPS + o_tap[:, None],
                      mask=m_k[:, None] & m_n[None, :], other=0.).to(tl.float32)
        b_acc += mm(b_g, b_w, PREC)
    tl.store(p_dx + o_r[:, None] * (C_IN * P_IN) + o_n[None, :] * P_IN + o_p[:, None], b_acc,
             mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _grouped_conv_wgrad_kernel(
    p_dy, p_y, p_x, stride_xr, stride_xc, p_idx, IDX_DIV, p_wpart, p_bpart, p_eoff, p_toff,
    E, C_IN, C_OUT, H_IN, W_IN,
    HAS_IDX: tl.constexpr, KS: tl.constexpr, UP: tl.constexpr, ACT: tl.constexpr, LOG_E: tl.constexpr,
    TILE_ROWS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    # partial dW of one tile: [C_OUT, C_IN*KS*KS] = sum over (row, out pixel) of g^T x_col
    i_t = tl.program_id(0).to(tl.int64)
    i_co = tl.program_id(1).to(tl.int64)
    i_k = tl.program_id(2).to(tl.int64)
    if i_t >= tl.load(p_toff + E):
        return
    e, r0, n_rows = find_tile(p_toff, p_eoff, i_t, E, LOG_E, TILE_ROWS)
    H_OUT = H_IN * UP
    W_OUT = W_IN * UP
    P_OUT = H_OUT * W_OUT
    K_TOTAL = C_IN * KS * KS
    o_co = i_co * BM + tl.arange(0, BM)
    m_co = o_co < C_OUT
    o_k = i_k * BN + tl.arange(0, BN)
    m_k = o_k < K_TOTAL
    o_ci = o_k // (KS * KS)
    o_ky = (o_k % (KS * KS)) // KS
    o_kx = o_k % KS
    b_acc = tl.zeros((BM, BN), dtype=tl.float32)
    b_bias = tl.zeros((BM,), dtype=tl.float32)
    for m0 in range(0, n_rows * P_OUT, BK):
        o_m = m0 + tl.arange(0, BK)
        m_m = o_m < n_rows * P_OUT
        o_r = r0 + o_m // P_OUT
        o_p = o_m % P_OUT
        # [BM, BK] g^T
        o_g = o_r[None, :] * (C_OUT * P_OUT) + o_co[:, None] * P_OUT + o_p[None, :]
        m_g = m_co[:, None] & m_m[None, :]
        b_g = tl.load(p_dy + o_g, mask=m_g, other=0.).to(tl.float32)
        b_g = _act_grad(b_g, p_y, o_g, m_g, ACT)
        # [BK, BN] input columns
        o_xr = _input_rows(p_idx, o_r, m_m, IDX_DIV, HAS_IDX)
        o_iy = (o_p // W_OUT)[:, None] + o_ky[None, :] - KS // 2
        o_ix = (o_p % W_OUT)[:, None] + o_kx[None, :] - KS // 2
        m_x = (m_m[:, None] & m_k[None, :] & (o_iy >= 0) & (o_iy < H_OUT) & (o_ix >= 0) & (o_ix < W_OUT))
        o_sy = tl.where(o_iy > 0, o_iy, 0) // UP
        o_sx = tl.where(o_ix > 0, o_ix, 0) // UP
        b_x = tl.load(p_x + o_xr[:, None] * stride_xr + o_ci[None, :] * stride_xc + o_sy * W_IN + o_sx,
                      mask=m_x, other=0.).to(tl.float32)
        b_acc += mm(b_g, b_x, PREC)
        b_bias += tl.sum(b_g, 1)
    tl.store(p_wpart + i_t * (C_OUT * K_TOTAL) + o_co[:, None] * K_TOTAL + o_k[None, :], b_acc,
             mask=m_co[:, None] & m_k[None, :])
    if i_k == 0:
        tl.store(p_bpart + i_t * C_OUT + o_co, b_bias, mask=m_co)


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------

class Grouping:
    """Sorted rows of a grouped layer: R rows, expert_offsets and tile_offsets [E+1] int32 on device."""

    def __init__(self, num_rows: int, expert_offsets: torch.Tensor, tile_offsets: torch.Tensor):
        self.num_rows = num_rows
        self.num_experts = expert_offsets.shape[0] - 1
        self.expert_offsets = expert_offsets
        self.tile_offsets = tile_offsets

    @property
    def tile_bound(self) -> int:
        """Upper bound on the tiles of any routing of num_rows rows over num_experts, known on the host."""
        return tile_bound(self.num_rows, self.num_experts, TILE_ROWS)

    @property
    def log_e(self) -> int:
        return log2_ceil(self.num_experts)


def _input_args(x: torch.Tensor, num_in: int, row_index: torch.Tensor | None, index_div: int) -> tuple:
    """x is [rows, C*H*W] with contiguous C, H, W, or [rows, C] (H = W = 1) with any strides."""
    x3 = x.view(x.shape[0], num_in, -1)
    idx = row_index if row_index is not None else x
    return x, x3.stride(0), x3.stride(1), idx, index_div


def grouped_conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grouping: Grouping, act: int,
                     up: int, in_hw: tuple[int, int], row_index: torch.Tensor | None = None,
                     index_div: int = 1, dot: str | None = None) -> torch.Tensor:
    """y [R, C_OUT, up*H, up*W] fp32 = act(conv(up(x[r]), W_e) + b_e), weight [E, C_OUT, C_IN, KS, KS] or
    [E, C_OUT, C_IN] (KS = 1, a linear layer). With ``row_index``, row r reads x[row_index[r] // index_div].
    ``dot``: the GEMM mode (``launch.dot_mode``; default ``dot_precision`` of the weights), the same for
    every layer of a decoder and its backward."""
    num_out, num_in = weight.shape[1], weight.shape[2]
    ks = weight.shape[3] if weight.dim() == 5 else 1
    height, width = in_hw
    pixels_out = height * width * up * up
    y = alloc_output((grouping.num_rows, num_out * pixels_out), like=x, dtype=torch.float32)
    if grouping.num_rows == 0:
        return y
    config = grouped_layer_config("fwd", num_in, num_out, height * width, pixels_out, ks, device_arch(x.device))
    block_m, block_n = config["BM"], config["BN"]
    grid = (grouping.tile_bound, triton.cdiv(TILE_ROWS * pixels_out, block_m), triton.cdiv(num_out, block_n))
    _grouped_conv_fwd_kernel[grid](
        *_input_args(x, num_in, row_index, index_div), weight, bias, y, grouping.expert_offsets, grouping.tile_offsets,
        grouping.num_experts, num_in, num_out, height, width,
        HAS_IDX=row_index is not None,
        KS=ks,
        UP=up,
        ACT=act,
        LOG_E=grouping.log_e,
        TILE_ROWS=TILE_ROWS,
        BM=block_m,
        BN=block_n,
        BK=config["BK"],
        PREC=dot or dot_precision(weight.dtype),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return y


def grouped_conv_dgrad(grad_y: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, grouping: Grouping,
                       act: int, up: int, in_hw: tuple[int, int], dot: str | None = None) -> torch.Tensor:
    """dx [R, C_IN * H * W] fp32 from dL/dy [R, C_OUT * up*H * up*W] (contiguous) and the stored output y
    (for act'; unused when act is ACT_NONE)."""
    num_out, num_in = weight.shape[1], weight.shape[2]
    ks = weight.shape[3] if weight.dim() == 5 else 1
    height, width = in_hw
    pixels_in = height * width
    dx = alloc_output((grouping.num_rows, num_in * pixels_in), like=grad_y, dtype=torch.float32)
    if grouping.num_rows == 0:
        return dx
    config = grouped_layer_config("dgrad", num_in, num_out, pixels_in, pixels_in * up * up, ks, device_arch(grad_y.device))
    block_m, block_n = config["BM"], config["BN"]
    grid = (grouping.tile_bound, triton.cdiv(TILE_ROWS * pixels_in, block_m), triton.cdiv(num_in, block_n))
    _grouped_conv_dgrad_kernel[grid](
        grad_y, grad_y if y is None else y, weight, dx, grouping.expert_offsets, grouping.tile_offsets,
        grouping.num_experts, num_in, num_out, height, width,
        KS=ks,
        UP=up,
        ACT=act,
        LOG_E=grouping.log_e,
        TILE_ROWS=TILE_ROWS,
        BM=block_m,
        BN=block_n,
        BK=config["BK"],
        PREC=dot or dot_precision(weight.dtype),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return dx


def grouped_segment_sum(partials: torch.Tensor, grouping: Grouping) -> torch.Tensor:
    """[tiles, W] fp32 per-tile partials -> [E, W] fp32 per-expert sums, in tile order (deterministic)."""
    width = partials.shape[1]
    out = alloc_output((grouping.num_experts, width), like=partials, dtype=torch.float32)
    _segment_sum_kernel[(grouping.num_experts, triton.cdiv(width, _SUM_BLOCK))](
        partials, grouping.tile_offsets, out, width,
        BLOCK=_SUM_BLOCK,
    )
    return out


def grouped_conv_wgrad(grad_y: torch.Tensor, y: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                       grouping: Grouping, act: int, up: int, in_hw: tuple[int, int],
                       row_index: torch.Tensor | None = None, index_div: int = 1,
                       dot: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW shaped and typed like weight, db [E, C_OUT] fp32): per-tile partials, then a segment sum per
    expert. x and row_index as in :func:`grouped_conv_fwd`."""
    num_out, num_in = weight.shape[1], weight.shape[2]
    ks = weight.shape[3] if weight.dim() == 5 else 1
    height, width = in_hw
    k_total = num_in * ks * ks
    if grouping.num_rows == 0:
        return torch.zeros_like(weight), weight.new_zeros((weight.shape[0], num_out), dtype=torch.float32)
    w_partial = alloc_output((grouping.tile_bound, num_out * k_total), like=x, dtype=torch.float32)
    b_partial = alloc_output((grouping.tile_bound, num_out), like=x, dtype=torch.float32)
    config = grouped_layer_config("wgrad", num_in, num_out, height * width, height * width * up * up, ks,
                                  device_arch(x.device))
    block_m, block_n = config["BM"], config["BN"]
    grid = (grouping.tile_bound, triton.cdiv(num_out, block_m), triton.cdiv(k_total, block_n))
    _grouped_conv_wgrad_kernel[grid](
        grad_y, grad_y if y is None else y, *_input_args(x, num_in, row_index, index_div), w_partial, b_partial,
        grouping.expert_offsets, grouping.tile_offsets,
        grouping.num_experts, num_in, num_out, height, width,
        HAS_IDX=row_index is not None,
        KS=ks,
        UP=up,
        ACT=act,
        LOG_E=grouping.log_e,
        TILE_ROWS=TILE_ROWS,
        BM=block_m,
        BN=block_n,
        BK=config["BK"],
        PREC=dot or dot_precision(weight.dtype),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    grad_w = grouped_segment_sum(w_partial, grouping).view(weight.shape).to(weight.dtype)
    return grad_w, grouped_segment_sum(b_partial, grouping)
