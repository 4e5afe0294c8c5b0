"""Shared pieces of the training kernels (experts_soft.py, experts_topk.py): the mlp decoder's fused
forward and backward on blocks of rows, the row mapping and the host-side helpers both launchers use
(weight lists, partial-gradient layouts, the soft grid splits). The lite decoder's tiles live in
decoder_tiles.py (forward) and decoder_tiles_bwd.py (backward).

A "row block" is up to BM rows that go through one expert ``e``. Which token a row reads, which gate
scales it and where its results go is the caller's business (``IS_SOFT``: rows are tokens ``b`` and an
expert group's experts run in turn; top-k: rows are sorted (token, slot) pairs of one expert's tile).

lite weight gradients are computed for the merged (phase, tap) weights the kernels use: nearest x2
up-sampling then a 3x3 conv with padding 1 equals, for each output parity (py, px), a 2x2 conv on the
low-resolution map whose taps are sums of the 3x3 taps (output (2j+py, 2i+px) reads source rows
j+s+py-1 and columns i+r+px-1, s, r in {0, 1}); ``stored_weight_grads`` maps them back to the 3x3
weights (the merge is linear, so its adjoint is a fixed sum).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .activations import relu, relu_grad, sigmoid, sigmoid_grad
from .launch import mm, tile_expert
from .tuning import TRAIN_BLOCK_M

FC_OUT = 392      # 8 x 7 x 7
PIXELS = 784      # 1 x 28 x 28
BLOCK_M = TRAIN_BLOCK_M  # rows per block of the training kernels and of the top-k routing tiles

# _TAPS[p, s, t] = 1 if 3x3 tap t lands on source offset s for output parity p (see module docstring).
_TAPS = ((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1))


_taps_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _taps(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """_TAPS as a tensor, made once per (device, dtype): no host-to-device copy on the hot path."""
    key = (device, dtype)
    if key not in _taps_cache:
        _taps_cache[key] = torch.tensor(_TAPS, dtype=dtype).to(device)
    return _taps_cache[key]


def kernel_weights(weights: dict[str, torch.Tensor], kind: str) -> list[torch.Tensor]:
    """The stacked weights the fused ops take, in argument order (lite: fc, conv1, conv2 as stored;
    mlp: fc1, fc2), contiguous."""
    names = {"lite": ("fc.weight", "fc.bias", "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"),
             "mlp": ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    if kind not in names:
        raise NotImplementedError(
            f"the triton backend has no fused kernel for decoder kind {kind!r} (it has 'lite' and 'mlp'); "
            "use backend='reference' for this decoder")
    return [weights[name].contiguous() for name in names[kind]]


def partial_layout(kind: str, latent_dim: int, hidden_dim: int) -> list[int]:
    """Sizes of the weight gradients, in order, packed into one partial-gradient row (lite's convs as
    merged (phase, tap) weights: conv1 [4 phases, 32 = (ci, dy, dx), 16 co], conv2 [4, 64 = (ci, dy, dx)])."""
    if kind == "lite":
        return [FC_OUT * latent_dim, FC_OUT, 4 * 32 * 16, 16, 4 * 64, 1]
    return [hidden_dim * latent_dim, hidden_dim, PIXELS * hidden_dim, PIXELS]


def partials_to_grads(flat: torch.Tensor, ws: list[torch.Tensor], kind: str, latent_dim: int,
                      hidden_dim: int) -> list[torch.Tensor]:
    """[E, W] reduced partial rows -> the gradient of each stored weight in ``ws``, shaped and typed like
    it. lite's conv gradients come in the kernels' merged (phase, tap) layout and go back through the
    adjoint of the tap merge (see the module docstring)."""
    num_experts = flat.shape[0]
    parts = list(torch.split(flat, partial_layout(kind, latent_dim, hidden_dim), dim=1))
    if kind == "lite":
        taps = _taps(flat.device, flat.dtype)
        parts[2] = torch.einsum("epqisro,psy,qrx->eoiyx", parts[2].reshape(num_experts, 2, 2, 8, 2, 2, 16), taps, taps)
        parts[4] = torch.einsum("epqisr,psy,qrx->eiyx", parts[4].reshape(num_experts, 2, 2, 16, 2, 2), taps, taps)
    return [p.reshape(w.shape).to(w.dtype, copy=True) for p, w in zip(parts, ws)]


def latent_pad(latent_dim: int) -> int:
    return max(16, triton.next_power_of_2(latent_dim))


# ----------------------------------------------------------------------------------------------------
# mlp decoder: relu(z W1^T + b1) -> sigmoid(h W2^T + b2), output in pixel tiles of BN
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _mlp_hidden(b_z, p_w1, p_b1, L, H, LP: tl.constexpr, HP: tl.constexpr, PREC: tl.constexpr):
    """b_z [BM, LP] -> (pre-activation [BM, HP], W1^T [LP, HP]); padded columns are zero."""
    o_l = tl.arange(0, LP)
    o_h = tl.arange(0, HP)
    m_h = o_h < H
    b_w1t = tl.load(p_w1 + o_h[None, :] * L + o_l[:, None], mask=(o_l[:, None] < L) & m_h[None, :], other=0.).to(tl.float32)
    b_pre = mm(b_z, b_w1t, PREC) + tl.load(p_b1 + o_h, mask=m_h, other=0.).to(tl.float32)[None, :]
    return b_pre, b_w1t


@triton.jit
def _mlp_out_tile(b_h, p_w2, p_b2, n0, H, HP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Pixels n0:n0+BN of sigmoid(h W2^T + b2) -> (y [BM, BN], W2^T tile [HP, BN])."""
    o_h = tl.arange(0, HP)
    o_n = n0 + tl.arange(0, BN)
    m_n = o_n < 784
    b_w2t = tl.load(p_w2 + o_n[None, :] * H + o_h[:, None], mask=(o_h[:, None] < H) & m_n[None, :], other=0.).to(tl.float32)
    b_b2 = tl.load(p_b2 + o_n, mask=m_n, other=0.).to(tl.float32)
    return sigmoid(mm(b_h, b_w2t, PREC) + b_b2[None, :]), b_w2t


# ----------------------------------------------------------------------------------------------------
# row mapping shared by the soft and top-k kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _block_rows(
    IS_SOFT: tl.constexpr, blk, e, B, K, p_sorted, p_eoff, p_toff, stride_gb, stride_gk, BM: tl.constexpr,
):
    """Rows of one block: (token [BM] int64, slot [BM] int64, gate offset [BM] int64, valid mask, count).

    soft: block ``blk`` of tokens; slot = token; the gate offset lacks the expert column (the caller
    adds e * stride_gk). top-k: tile ``blk`` of expert e's sorted rows; slot = flat (token, k) index f;
    gate (f // K, f % K). Valid rows are always a prefix of the block.
    """
    o_i = tl.arange(0, BM)
    if IS_SOFT:
        r0 = tl.cast(blk, tl.int64) * BM
        n_valid = tl.minimum(B - r0, BM)
        o_tok = r0 + o_i
        m_row = o_i < n_valid
        o_slot = o_tok
        o_gate = o_tok * stride_gb
    else:
        r0 = tl.load(p_eoff + e).to(tl.int64) + (blk - tl.load(p_toff + e)).to(tl.int64) * BM
        n_valid = tl.minimum(tl.load(p_eoff + e + 1).to(tl.int64) - r0, BM)
        m_row = o_i < n_valid
        o_slot = tl.load(p_sorted + r0 + o_i, mask=m_row, other=0).to(tl.int64)
        o_tok = o_slot // K
        o_gate = o_tok * stride_gb + (o_slot % K) * stride_gk
    return o_tok, o_slot, o_gate, m_row, n_valid


# ----------------------------------------------------------------------------------------------------
# kernel bodies: the named kernels in experts_soft.py / experts_topk.py call these with IS_SOFT fixed
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _mlp_experts_fwd_body(
    p_z, stride_zb, stride_zl, p_g, stride_gb, stride_gk, p_out,
    p_w1, p_b1, p_w2, p_b2, p_sorted, p_eoff, p_toff,
    B, L, H, E, K, n_items, n_blocks, experts_per_group,
    IS_SOFT: tl.constexpr, LOG_E: tl.constexpr, LP: tl.constexpr, HP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    """mlp experts, a persistent loop over items. soft: item = (token block, expert group), the group's
    experts summed on chip and stored to out[group] ([groups, B, 784]); top-k: item = expert tile,
    gated rows written to their (token, k) slot. Axis 1 tiles the output pixels by BN."""
    i_p = tl.program_id(0)
    n_prog = tl.num_programs(0)
    i_n = tl.program_id(1)
    o_l = tl.arange(0, LP)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < 784
    for item in range(i_p, n_items, n_prog):
        if IS_SOFT:
            blk = item % n_blocks
            e_lo = (item // n_blocks) * experts_per_group
            e_hi = tl.minimum(e_lo + experts_per_group, E)
            p_dst = p_out + tl.cast(item // n_blocks, tl.int64) * B * 784
        else:
            blk = item
            e_lo = tile_expert(p_toff, item, E, LOG_E)
            e_hi = tl.where(item < tl.load(p_toff + E), e_lo + 1, e_lo)
            p_dst = p_out
        o_tok, o_slot, o_gate, m_row, n_valid = _block_rows(
            IS_SOFT, blk, e_lo, B, K, p_sorted, p_eoff, p_toff, stride_gb, stride_gk, BM)
        if not IS_SOFT:
            # an item past the last real tile (top-k grid bound) owns no rows
            n_valid = tl.where(e_hi > e_lo, n_valid, 0)
            m_row = tl.arange(0, BM) < n_valid
        b_z = tl.load(p_z + o_tok[:, None] * stride_zb + o_l[None, :] * stride_zl,
                      mask=m_row[:, None] & (o_l[None, :] < L), other=0.).to(tl.float32)
        b_acc = tl.zeros((BM, BN), dtype=tl.float32)
        for e in range(e_lo, e_hi):
            e64 = tl.cast(e, tl.int64)
            b_pre, b_w1t = _mlp_hidden(b_z, p_w1 + e64 * H * L, p_b1 + e64 * H, L, H, LP, HP, PREC)
            y, b_w2t = _mlp_out_tile(relu(b_pre), p_w2 + e64 * 784 * H, p_b2 + e64 * 784, i_n * BN, H, HP, BN, PREC)
            if IS_SOFT:
                b_gate = tl.load(p_g + o_gate + e64 * stride_gk, mask=m_row, other=0.).to(tl.float32)
            else:
                b_gate = tl.load(p_g + o_gate, mask=m_row, other=0.).to(tl.float32)
            b_acc += b_gate[:, None] * y
        if IS_SOFT:
            o_row = o_tok
        else:
            o_row = o_slot
        tl.store(p_dst + o_row[:, None] * 784 + o_n[None, :], b_acc, mask=m_row[:, None] & m_n[None, :])


@triton.jit
def _mlp_experts_bwd_body(
    p_do, stride_dob, stride_dop, p_z, stride_zb, stride_zl, p_g, stride_gb, stride_gk,
    p_dz, p_dg, p_part, W_TOTAL,
    p_wa, p_wb, p_wc, p_wd, p_sorted, p_eoff, p_toff,
    B, L, H, E, K, n_items, runs, blocks_per_run, experts_per_group,
    IS_SOFT: tl.constexpr, LOG_E: tl.constexpr, LP: tl.constexpr, HP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    """mlp experts' backward, a persistent loop over items. soft: item = (expert group, run of token
    blocks), group-major; top-k: item = one expert tile (a group of one expert, a run of one block).

    Pass 1, row blocks outer and the group's experts inner: d gate per (row, expert), dz summed over
    the group's experts in registers and stored once (soft: the group's partial dz row p_dz[group];
    top-k: per (token, slot)), d fc1 added into each expert's partial row. Pass 2, per expert, pixel
    tiles outer: d fc2 accumulates in registers over the run's blocks (h and y recomputed). One
    packed partial weight-gradient row per (expert, run) (soft: p_part[e * runs + run]; top-k:
    p_part[item]). No atomics: the launcher reduces the partials in a fixed order."""
    i_p = tl.program_id(0)
    n_prog = tl.num_programs(0)
    o_l = tl.arange(0, LP)
    m_l = o_l < L
    o_h = tl.arange(0, HP)
    m_h = o_h < H
    m_hl = m_h[:, None] & m_l[None, :]
    n_blocks = tl.cdiv(B, BM)
    for item in range(i_p, n_items, n_prog):
        if IS_SOFT:
            run = item % runs
            e_lo = (item // runs) * experts_per_group
            e_hi = tl.minimum(e_lo + experts_per_group, E)
            blk_lo = run * blocks_per_run
            blk_hi = tl.minimum(blk_lo + blocks_per_run, n_blocks)
            p_dz_item = p_dz + tl.cast(item // runs, tl.int64) * B * L
            row_base = p_part + run * W_TOTAL
            row_stride = runs * W_TOTAL
        else:
            e_lo = tile_expert(p_toff, item, E, LOG_E)
            e_hi = e_lo + 1
            blk_lo = item
            blk_hi = tl.where(item < tl.load(p_toff + E), item + 1, item)
            p_dz_item = p_dz
            # the tile's one expert writes row p_part[item]
            row_base = p_part + tl.cast(item, tl.int64) * W_TOTAL - tl.cast(e_lo, tl.int64) * W_TOTAL
            row_stride = W_TOTAL
        # pass 1 (row blocks outer): d gate, dz over the group's experts, d fc1 into the partial rows
        for blk in range(blk_lo, blk_hi):
            o_tok, o_slot, o_gate, m_row, n_valid = _block_rows(
                IS_SOFT, blk, e_lo, B, K, p_sorted, p_eoff, p_toff, stride_gb, stride_gk, BM)
            b_z = tl.load(p_z + o_tok[:, None] * stride_zb + o_l[None, :] * stride_zl,
                          mask=m_row[:, None] & m_l[None, :], other=0.).to(tl.float32)
            b_dz = tl.zeros((BM, LP), dtype=tl.float32)
            for e in range(e_lo, e_hi):
                e64 = tl.cast(e, tl.int64)
                p_row = row_base + e64 * row_stride
                if IS_SOFT:
                    b_gate = tl.load(p_g + o_gate + e64 * stride_gk, mask=m_row, other=0.).to(tl.float32)
                else:
                    b_gate = tl.load(p_g + o_gate, mask=m_row, other=0.).to(tl.float32)
                b_pre, b_w1t = _mlp_hidden(b_z, p_wa + e64 * H * L, p_wb + e64 * H, L, H, LP, HP, PREC)
                b_h = relu(b_pre)
                b_dh = tl.zeros((BM, HP), dtype=tl.float32)
                b_dgate = tl.zeros((BM,), dtype=tl.float32)
                for n0 in range(0, 784, BN):
                    o_n = n0 + tl.arange(0, BN)
                    m_rn = m_row[:, None] & (o_n[None, :] < 784)
                    y, b_w2t = _mlp_out_tile(b_h, p_wc + e64 * 784 * H, p_wd + e64 * 784, n0, H, HP, BN, PREC)
                    b_do = tl.load(p_do + o_tok[:, None] * stride_dob + o_n[None, :] * stride_dop, mask=m_rn, other=0.).to(tl.float32)
                    b_dgate += tl.sum(b_do * y, axis=1)
                    b_g2 = tl.where(m_rn, sigmoid_grad(b_gate[:, None] * b_do, y), 0.)
                    b_dh += mm(b_g2, tl.trans(b_w2t), PREC)
                # torch's relu backward: zero gradient where the output is exactly 0, NaN passes
                b_dh = relu_grad(b_dh, b_h)
                b_dz += mm(b_dh, tl.trans(b_w1t), PREC)
                if IS_SOFT:
                    tl.store(p_dg + o_tok * E + e64, b_dgate, mask=m_row)
                else:
                    tl.store(p_dg + o_slot, b_dgate, mask=m_row)
                # d fc1 [H, L] and d fc1.bias [H]: stored by the run's first block, added by the others
                first = o_h * 0 + (blk - blk_lo) > 0
                p_w1g = p_row + o_h[:, None] * L + o_l[None, :]
                b_w1g = mm(tl.trans(b_dh), b_z, PREC)
                b_w1g += tl.load(p_w1g, mask=m_hl & first[:, None], other=0.)
                tl.store(p_w1g, b_w1g, mask=m_hl)
                b_b1g = tl.sum(b_dh, axis=0) + tl.load(p_row + H * L + o_h, mask=m_h & first, other=0.)
                tl.store(p_row + H * L + o_h, b_b1g, mask=m_h)
            o_dz_row = o_tok if IS_SOFT else o_slot
            tl.store(p_dz_item + o_dz_row[:, None] * L + o_l[None, :], b_dz, mask=m_row[:, None] & m_l[None, :])
        # pass 2 (per expert, pixel tiles outer): d fc2 accumulates in registers; h and y are recomputed
        for e in range(e_lo, e_hi):
            e64 = tl.cast(e, tl.int64)
            p_row = row_base + e64 * row_stride
            for n0 in range(0, 784, BN):
                o_n = n0 + tl.arange(0, BN)
                acc_w2 = tl.zeros((BN, HP), dtype=tl.float32)
                acc_b2 = tl.zeros((BN,), dtype=tl.float32)
                for blk in range(blk_lo, blk_hi):
                    o_tok, o_slot, o_gate, m_row, n_valid = _block_rows(
                        IS_SOFT, blk, e, B, K, p_sorted, p_eoff, p_toff, stride_gb, stride_gk, BM)
                    if IS_SOFT:
                        o_gate += e64 * stride_gk
                    m_rn = m_row[:, None] & (o_n[None, :] < 784)
                    b_z = tl.load(p_z + o_tok[:, None] * stride_zb + o_l[None, :] * stride_zl,
                                  mask=m_row[:, None] & m_l[None, :], other=0.).to(tl.float32)
                    b_gate = tl.load(p_g + o_gate, mask=m_row, other=0.).to(tl.float32)
                    b_pre, b_w1t = _mlp_hidden(b_z, p_wa + e64 * H * L, p_wb + e64 * H, L, H, LP, HP, PREC)
                    b_h = relu(b_pre)
                    y, b_w2t = _mlp_out_tile(b_h, p_wc + e64 * 784 * H, p_wd + e64 * 784, n0, H, HP, BN, PREC)
                    b_do = tl.load(p_do + o_tok[:, None] * stride_dob + o_n[None, :] * stride_dop, mask=m_rn, other=0.).to(tl.float32)
                    b_g2 = tl.where(m_rn, sigmoid_grad(b_gate[:, None] * b_do, y), 0.)
                    acc_w2 += mm(tl.trans(b_g2), b_h, PREC)
                    acc_b2 += tl.sum(b_g2, axis=0)
                m_n = o_n < 784
                tl.store(p_row + H * L + H + o_n[:, None] * H + o_h[None, :], acc_w2, mask=m_n[:, None] & (o_h[None, :] < H))
                tl.store(p_row + H * L + H + 784 * H + o_n, acc_b2, mask=m_n)


@triton.jit
def _segment_sum_kernel(p_part, p_toff, p_out, W_TOTAL, BLOCK: tl.constexpr):
    """Deterministic per-expert reduction of per-tile partials (shared by top-k and the medium layers):
    out[e, cols] = sum of partial rows tile_offsets[e] .. tile_offsets[e+1], in order (zero if none)."""
    i_e = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    o_c = i_c * BLOCK + tl.arange(0, BLOCK)
    m_c = o_c < W_TOTAL
    b_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(tl.load(p_toff + i_e), tl.load(p_toff + i_e + 1)):
        b_acc += tl.load(p_part + tl.cast(t, tl.int64) * W_TOTAL + o_c, mask=m_c, other=0.)
    tl.store(p_out + i_e * W_TOTAL + o_c, b_acc, mask=m_c)


def soft_forward_split(batch: int, num_experts: int, programs: int, block_m: int) -> tuple[int, int, int]:
    """(token blocks, expert groups, experts per group) of a soft forward: as many expert groups as it
    takes for the (block, group) items to fill ``programs`` (B = 1,024 is 64 blocks of 16 against an
    H100's 264 programs: 4 groups), and no more, so the fp32 [groups, B, 784] partial outputs hold at
    most ``programs * block_m`` rows whatever E."""
    n_blocks = triton.cdiv(batch, block_m)
    per_group = triton.cdiv(num_experts, max(1, min(num_experts, programs // n_blocks)))
    return n_blocks, triton.cdiv(num_experts, per_group), per_group


@functools.lru_cache(maxsize=1024)
def soft_backward_split(batch: int, num_experts: int, programs: int, block_m: int, weights_per_expert: int,
                        latent_dim: int) -> tuple[int, int, int, int]:
    """(expert groups, experts per group, token runs, blocks per run) of a soft backward.

    Items are groups x runs. Their extra memory is the partial weight gradients, E * runs * W, plus the
    partial dz, groups * B * L (fp32): more runs cost weight-gradient rows, more groups cost dz rows.
    Among the splits whose items fill at least 7/8 of the grid (or of the E * blocks items there are),
    the one with the least of that memory; ties go to fewer items."""
    n_blocks = triton.cdiv(batch, block_m)
    target = min(programs, num_experts * n_blocks)
    best = None
    for runs in range(1, min(n_blocks, programs) + 1):
        blocks_per_run = triton.cdiv(n_blocks, runs)
        runs = triton.cdiv(n_blocks, blocks_per_run)
        per_group = triton.cdiv(num_experts, min(num_experts, triton.cdiv(target, runs)))
        groups = triton.cdiv(num_experts, per_group)
        if 8 * groups * runs < 7 * target:
            continue
        memory = num_experts * runs * weights_per_expert + groups * batch * latent_dim
        key = (memory, groups * runs)
        if best is None or key < best[0]:
            best = (key, (groups, per_group, runs, blocks_per_run))
    if best is None:  # every expert its own group, every block its own run
        return num_experts, 1, n_blocks, 1
    return best[1]


def launch_dims(z: torch.Tensor, ws: list[torch.Tensor], kind: str) -> tuple[int, int, int]:
    """(E, L, H) for a launch: H is the mlp hidden size (1 for lite)."""
    hidden = ws[0].shape[1] if kind == "mlp" else 1
    return ws[0].shape[0], z.shape[1], hidden


