"""Hard-gated lite experts with fc folded into conv1: per a1 row, two tensor-core GEMMs and no scratch.

lite's fc has no activation, so z -> fc -> nearest x2 up-sampling -> conv1 (before its ELU) is one
linear map of z: conv1's pre-activation is ``A_e z + a_e`` with A_e [16 x 14 x 14, L], computed once
per weight version by :func:`folded_lite_weights` (in fp64, rounded once to the GEMM dtype). Its FLOPs
per token (2 x 3136 x L = 201K at L = 32) equal the phase-split conv1's, but it is a dense GEMM whose
input is the tile's z rows: h0 never exists, so nothing is gathered (the scratch kernel's 25 KB per
token in fp32).

Per tile (BM tokens of one expert), per half h of the image's columns and per a1 row r (14):

1. a1 = ELU(z [BM, L] @ A[e, h, r] [L, 128] + a[e, h, r]): the 16 channels of 8 a1 columns
   (columns 0-7 for h = 0, 6-13 for h = 1; n = column * 16 + channel), in registers.
2. conv2 (16 -> 1 channel on the up-sampled a1) as a banded GEMM: output row 2y + py of phase py
   takes a1 rows y + py - 1 + ty, ty in {0, 1}, so row r feeds four (py, ty) products
   a1 @ band[e, h, 2 py + ty] [128, 16 output columns] (14 used: columns 14 h to 14 h + 13), into
   the output row pairs r + 1, r and r - 1. Pair r - 1 is complete after row r: sigmoid, stored
   straight to its tokens' x_hat rows. Rows -1 and 14 are conv2's zero padding (no product).

FLOPs per token: 2 x 14 x 2 x L x 128 (229K at L = 32) + 2 x 14 x 4 x 2 x 128 x 16 (459K): 688K, 2.1x
the 326K useful (the band is 1/4 dense, and columns 6-7 are computed twice), all on tensor cores in
TF32 and bf16, where the scratch kernel binds on the L2. In IEEE fp32 the dots run on the FMA units
and the 2.1x costs more than the scratch saves, so the launcher folds only in a tensor-core mode
(:func:`fold_pays`).

Weights: A and a are 14 x 2 x (L + 1) x 128 elements and the bands 16K, 131K per expert at L = 32 (9x
the lite expert's 14K parameters), read once per tile (from the L2 after a tile of the same expert).
That pays for itself only with enough tokens per expert: :func:`fold_pays` asks for 64 (8.2 KB of
fold weights per token in fp32 from HBM, against about 52 KB of scratch traffic at the L2).

Grid, tiles and routing: as ``experts_hard`` (persistent programs over ``launch.tile_offsets`` tiles,
z rows gathered through sorted_token_idx, x_hat rows written to their original tokens).
"""
from __future__ import annotations

import collections
import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .activations import elu, sigmoid
from .launch import find_tile, log2_ceil, mm

__all__ = ["folded_lite_weights", "fold_pays", "experts_hard_lite_folded_fwd"]

A1_ROWS = 14                 # a1 is [16, 14, 14]
HALF_FIRST_COLUMN = (0, 6)   # first a1 column of each half's 8-column tile
TILE_COLUMNS = 8
CHANNELS = 16
BAND_N = 16                  # output columns per half (14) padded to a dot's N
FOLD_MIN_TOKENS_PER_EXPERT = 64
FOLD_MAX_BYTES = 256 * 2**20


def fold_pays(dot: str, num_tokens: int, num_experts: int, latent: int, elem_bytes: int) -> bool:
    """Whether the hard lite launcher runs this kernel: in a tensor-core GEMM mode (``dot`` "tf32",
    "bf16" or "fp16"), with at least FOLD_MIN_TOKENS_PER_EXPERT tokens per non-empty expert, and the
    fold weights (131K elements per expert at L = 32) within FOLD_MAX_BYTES."""
    if dot == "ieee":
        return False
    experts = min(num_experts, num_tokens)
    fold_bytes = num_experts * fold_elements(latent) * elem_bytes
    return num_tokens >= FOLD_MIN_TOKENS_PER_EXPERT * experts and fold_bytes <= FOLD_MAX_BYTES


def fold_elements(latent: int) -> int:
    """Elements of one expert's fold weights: A and a, then the four bands of each half."""
    return (2 * A1_ROWS * (block_latent(latent) + 1) * TILE_COLUMNS * CHANNELS
            + 2 * 4 * TILE_COLUMNS * CHANNELS * BAND_N)


# FOLD[p][t][d]: kernel offset d of a 3x3 conv after x2 up-sampling lands, for output phase p, on
# low-resolution tap t (offset p - 1 + t): phase 0 takes d = 0 on t = 0 and d = 1, 2 on t = 1
_PHASE_TAPS = ((1., 0., 0.), (0., 1., 1.)), ((1., 1., 0.), (0., 0., 1.))


def _band_entries():
    """(half, a1 column in the tile, output column in the half, px, tx) of every band entry."""
    entries = []
    for h, first in enumerate(HALF_FIRST_COLUMN):
        for j in range(2 * 7):
            x, px = 7 * h + j // 2, j % 2
            for tx in range(2):
                column = x + px - 1 + tx
                if 0 <= column < A1_ROWS:    # else conv2's zero padding
                    entries.append((h, column - first, j, px, tx))
    return entries


def block_latent(latent: int) -> int:
    """The kernel's K for the folded GEMM (``BLOCK_L``): L padded to a power of two, at least 16."""
    return max(16, triton.next_power_of_2(latent))


def _fold(layers: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fc_w, fc_b, conv1_w, conv1_b, conv2_w = (w.detach().to(torch.float64) for w in layers[:5])
    E, _, L = fc_w.shape
    # zero latent units up to BLOCK_L: the kernel reads whole [BLOCK_L, 128] tiles, unmasked
    fc_w = F.pad(fc_w, (0, block_latent(L) - L))
    L = fc_w.shape[2]

    def up(x):
        return x.repeat_interleave(2, -2).repeat_interleave(2, -1)

    # conv1 of each latent unit's fc column (no bias), and of the fc bias (with conv1's): [*, E, 16, 14, 14]
    w1 = conv1_w.reshape(E * CHANNELS, 8, 3, 3)
    a = F.conv2d(up(fc_w.permute(2, 0, 1).reshape(L, E * 8, 7, 7)), w1, padding=1, groups=E)
    b = F.conv2d(up(fc_b.reshape(1, E * 8, 7, 7)), w1, conv1_b.reshape(-1), padding=1, groups=E)
    columns = torch.tensor([first + x for first in HALF_FIRST_COLUMN for x in range(TILE_COLUMNS)],
                           device=fc_w.device)

    def tiles(t):   # [n, E, 16, 14, 14] -> [E, 2, 14, n, 8 * 16]: (half, row, ., column, channel)
        t = t.view(t.shape[0], E, CHANNELS, A1_ROWS, A1_ROWS)[..., columns]
        t = t.view(t.shape[0], E, CHANNELS, A1_ROWS, 2, TILE_COLUMNS).permute(1, 4, 3, 0, 5, 2)
        return t.reshape(E, 2, A1_ROWS, t.shape[3], TILE_COLUMNS * CHANNELS)

    phase_taps = torch.tensor(_PHASE_TAPS, dtype=torch.float64, device=fc_w.device)
    # conv2 folded per phase: [E, py, ty, px, tx, c]
    w2 = torch.einsum("ptd,qse,kcde->kptqsc", phase_taps, phase_taps, conv2_w[:, 0])
    band = fc_w.new_zeros(E, 2, 2, 2, TILE_COLUMNS, CHANNELS, BAND_N)   # [E, h, py, ty, column, c, j]
    for h, column, j, px, tx in _band_entries():
        band[:, h, :, :, column, :, j] += w2[:, :, :, px, tx]
    band = band.view(E, 2, 4, TILE_COLUMNS * CHANNELS, BAND_N)
    return (tiles(a).to(dtype).contiguous(), tiles(b)[:, :, :, 0].to(dtype).contiguous(),
            band.to(dtype).contiguous())


_Cached = collections.namedtuple("_Cached", "refs versions folded")
_cache: collections.OrderedDict = collections.OrderedDict()
_CACHE_ENTRIES = 2


def folded_lite_weights(layers: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(A [E, 2, 14, BLOCK_L, 128], a [E, 2, 14, 128], band [E, 2, 4, 128, 16]) in ``dtype`` from the lite
    weights (fc.weight, fc.bias, conv1.weight, conv1.bias, conv2.weight, ...; module docstring).

    Cached for the last two weight sets, keyed on the tensors themselves (weak references) and their
    version counters, so inference with fixed weights folds once and an optimizer step or an in-place
    load refolds. Inference-mode tensors have no version counter: they fold every call."""
    tensors = tuple(layers[:5])
    key = (tuple(id(t) for t in tensors), dtype)
    try:
        versions = tuple(t._version for t in tensors)
    except RuntimeError:
        return _fold(layers, dtype)
    hit = _cache.get(key)
    if hit is not None and hit.versions == versions and all(r() is t for r, t in zip(hit.refs, tensors)):
        _cache.move_to_end(key)
        return hit.folded
    with torch.no_grad():
        folded = _fold(layers, dtype)
    _cache[key] = _Cached(tuple(weakref.ref(t) for t in tensors), versions, folded)
    _cache.move_to_end(key)
    while len(_cache) > _CACHE_ENTRIES:
        _cache.popitem(last=False)
    return folded


@triton.jit
def _folded_a1_row(b_z, p_w, p_b, o_l, o_n, INPUT_PRECISION: tl.constexpr):
    """ELU(z [BM, BLOCK_L] @ A [BLOCK_L, 128] + a [128]): one a1 row's 8 columns x 16 channels, fp32
    [BM, 128]; A's rows past L are zero (the fold pads them)."""
    b_w = tl.load(p_w + o_l[:, None] * 128 + o_n[None, :])
    b_a = mm(b_z, b_w, INPUT_PRECISION)
    return elu(b_a + tl.load(p_b + o_n).to(tl.float32)[None, :])


@triton.jit
def _banded(b_a1, b_band, INPUT_PRECISION: tl.constexpr):
    """One (py, ty) product of an a1 row [BM, 128] with its band tile [128, 16]: [BM, 16]."""
    return mm(b_a1, b_band, INPUT_PRECISION)


@triton.jit
def _store_row_pair(p_out, y, h, b_phase0, b_phase1, b_bias, m_m, o_j, m_j):
    """x_hat rows 2y and 2y + 1, columns 14 h .. 14 h + 13, of the tile's tokens (``p_out`` [BM, 1])."""
    m = m_m[:, None] & m_j[None, :] & (y >= 0)
    p = p_out + (2 * y) * 28 + 14 * h + o_j[None, :]
    tl.store(p, sigmoid(b_phase0 + b_bias), mask=m)
    tl.store(p + 28, sigmoid(b_phase1 + b_bias), mask=m)


@triton.jit
def _experts_hard_lite_folded_fwd_kernel(
    z,                   # [B, L] any strides
    out,                 # [B, 784] contiguous, original token order
    sorted_token_idx,    # [B] int32
    expert_offsets,      # [E+1] int32
    tile_offsets,        # [E+1] int32
    fold_w,              # [E, 2, 14, BLOCK_L, 128]: A per (half, a1 row), zero past L
    fold_b,              # [E, 2, 14, 128]
    band,                # [E, 2, 4, 128, 16]: conv2 per (half, 2 py + ty)
    conv2_b,             # [E, 1]
    E, L, stride_zb, stride_zl, max_tiles,
    LOG_E: tl.constexpr,
    BM: tl.constexpr,
    BLOCK_L: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Grid: persistent programs striding over the tiles of ``launch.tile_offsets`` (BM rows of one
    expert each); each runs the module docstring's two GEMMs per (half, a1 row) of its tiles, the
    half's four band tiles loaded once and held across its rows (loaded in the row loop instead, the
    pipeliner keeps three stages of them: 160 KB of shared memory in TF32, audit sm_90)."""
    i_p = tl.program_id(0)
    o_m = tl.arange(0, BM)
    o_l = tl.arange(0, BLOCK_L)
    o_n = tl.arange(0, 128)
    o_j = tl.arange(0, 16)
    m_l = o_l < L
    m_j = o_j < 14
    o_band = o_n[:, None] * 16 + o_j[None, :]
    for tile in range(i_p, max_tiles, tl.num_programs(0)):
        e, row_start, n_rows = find_tile(tile_offsets, expert_offsets, tile, E, LOG_E, BM)
        if n_rows > 0:
            m_m = o_m < n_rows
            b_tok = tl.load(sorted_token_idx + row_start + o_m, mask=m_m, other=0).to(tl.int64)
            b_z = tl.load(z + b_tok[:, None] * stride_zb + o_l[None, :] * stride_zl,
                          mask=m_m[:, None] & m_l[None, :], other=0.)
            b_bias = tl.load(conv2_b + e).to(tl.float32)
            p_out = out + b_tok[:, None] * 784
            for h in tl.static_range(2):
                p_band = band + (e * 2 + h) * (4 * 2048) + o_band   # (py, ty) tile at + (2 py + ty) * 2048
                b_band00 = tl.load(p_band)
                b_band01 = tl.load(p_band + 2048)
                b_band10 = tl.load(p_band + 2 * 2048)
                b_band11 = tl.load(p_band + 3 * 2048)
                # output row pairs r - 1 (prev) and r (cur) of the row loop, [BM, 16] per phase; a1 row r
                # feeds pair r + 1 with (py, ty) = (0, 0), pair r with (0, 1) and (1, 0), pair r - 1 with
                # (1, 1); rows -1 and 14 are conv2's zero padding
                b_prev0 = tl.zeros([BM, 16], dtype=tl.float32)
                b_prev1 = tl.zeros([BM, 16], dtype=tl.float32)
                b_cur0 = tl.zeros([BM, 16], dtype=tl.float32)
                for r in range(14):
                    i_row = (e * 2 + h) * 14 + r
                    b_a1 = _folded_a1_row(b_z, fold_w + i_row * (BLOCK_L * 128), fold_b + i_row * 128, o_l, o_n,
                                          INPUT_PRECISION)
                    b_prev1 += _banded(b_a1, b_band11, INPUT_PRECISION)
                    _store_row_pair(p_out, r - 1, h, b_prev0, b_prev1, b_bias, m_m, o_j, m_j)
                    b_prev0 = b_cur0 + _banded(b_a1, b_band01, INPUT_PRECISION)
                    b_prev1 = _banded(b_a1, b_band10, INPUT_PRECISION)
                    b_cur0 = _banded(b_a1, b_band00, INPUT_PRECISION)
                _store_row_pair(p_out, 13, h, b_prev0, b_prev1, b_bias, m_m, o_j, m_j)


def experts_hard_lite_folded_fwd(z, out, layers, routing, config, precision):
    """Launch the kernel on grouped tokens. ``routing``: (sorted_token_idx, expert_offsets, tile_offsets,
    max_tiles, programs); ``layers``: the lite weights in contract order; fold weights in z's dtype."""
    sorted_token_idx, expert_offsets, tiles, max_tiles, programs = routing
    E, _, L = layers[0].shape
    fold_w, fold_b, band = folded_lite_weights(layers, z.dtype)
    _experts_hard_lite_folded_fwd_kernel[(programs,)](
        z=z,
        out=out,
        sorted_token_idx=sorted_token_idx,
        expert_offsets=expert_offsets,
        tile_offsets=tiles,
        fold_w=fold_w,
        fold_b=fold_b,
        band=band,
        conv2_b=layers[5],
        E=E,
        L=L,
        stride_zb=z.stride(0),
        stride_zl=z.stride(1),
        max_tiles=max_tiles,
        LOG_E=log2_ceil(E),
        BM=config["BM"],
        BLOCK_L=block_latent(L),
        INPUT_PRECISION=precision,
        num_warps=config["num_warps"],
    )
