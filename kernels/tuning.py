"""Block sizes and warps for the Triton kernels, per (op or decoder kind, dtype, GPU arch), cached.

Every choice is keyed on the GPU arch (``launch.device_arch``: 80, 86, 89, 90; 0 for the interpreter)
and, where it depends on the batch, on a *bucketed* token count (next power of two, capped at
``MAX_BUCKET``), never on the raw B, so a new batch size neither recompiles nor re-tunes. Under
``TRITON_INTERPRET`` or on CPU tensors (arch 0) the interpreter's tiles are used: it pays per
operation, not per element, so they are wide.

Every config a launcher can pick for an arch is enumerated from these functions by
``smoe_fast/audit/cases.py``, which ``smoe-fast audit`` compiles: a config that does not fit an arch's per-block shared memory is never
chosen for it (``tests/test_audit.py`` enforces this from the audit's table).

The defaults were chosen from the audit's compile reports (registers, spills, shared memory), without
timing them: no GPU was available when they were written. ``SMOE_FAST_AUTOTUNE=1`` times the
candidates of :func:`experts_hard_candidates` on the first call per key on a GPU (outside CUDA-graph
capture) and caches the fastest.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

from .launch import device_arch, interpreting

MAX_BUCKET = 1 << 16
AUTOTUNE_ENV = "SMOE_FAST_AUTOTUNE"
# the archs every config must fit (tests/test_audit.py), and their per-block shared memory (opt-in)
SUPPORTED_ARCHS = (80, 86, 89, 90)
SHARED_LIMIT_BYTES = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}


def bucket_tokens(num_tokens: int) -> int:
    """Next power of two of ``num_tokens`` (at least 1), capped at ``MAX_BUCKET``: the tuning key."""
    return min(MAX_BUCKET, 1 << max(0, int(num_tokens) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def grouping_config(bucket: int, num_experts: int, arch: int) -> dict[str, int]:
    """Tiles of the two grouping kernels.

    BLOCK_T tokens per sub-tile: the within-sub-tile rank is a BLOCK_T x BLOCK_T compare, so its cost
    per token grows with BLOCK_T while the number of sequential sub-tiles per program (each with two
    barriers) shrinks. The compare runs BLOCK_J columns at a time: 256 x 16 with 8 warps compiles
    without spills, a 256 x 256 compare at once spills 11 KB (ptxas, sm_90). BLOCK_E experts per
    scatter program and per count-row step, BLOCK_P chunk rows per step of the scatter's pass.
    """
    if arch == 0:
        return {"BLOCK_T": 64, "BLOCK_J": 64, "BLOCK_E": min(triton.next_power_of_2(num_experts), 4096),
                "BLOCK_P": 16, "num_warps": 4}
    small = bucket <= 256
    return {"BLOCK_T": 64 if small else 256, "BLOCK_J": 16,
            "BLOCK_E": min(max(16, triton.next_power_of_2(num_experts)), 64 if small else 256),
            "BLOCK_P": 16 if small else 32, "num_warps": 4 if small else 8}


# Defaults per decoder kind. BM: tokens per tile (one expert); TS: tokens whose conv activations sit in
# scratch at once; BR: GEMM rows (pixel x token) per step; mlp: BN output pixels, BH hidden units per
# step. medium BR=16 with 4 warps uses 119-255 registers, BR=32 spills; mlp BM=64/BN=64/BH=32 with 8
# warps uses 101-128, BH=64 spills.
# lite (audit, sm_90, triton 3.9, 2026-12-02, token-innermost scratch): BM=16, TS=2, BR=64, 16 warps
# uses 105 registers in IEEE fp32 (no spill) and 128 with 32 B (TF32) / 48 B (bf16; fp32 maps then,
# see _HARD_LITE_HALF_SM90 for the half maps) spilled; it is
# one CTA per SM, but 16 resident warps, the level the audit's model takes as hiding latency.
# Since a1 stays in registers (2026-12-04) and the launcher states the register cap
# (launch.register_cap): 122-128 registers and nothing spilled on sm_90 in every mode, 0 / 8 / 0 B
# (IEEE / TF32 / bf16) on sm_86 (ptxas alone took 64 registers there and spilled 32 B in IEEE) and
# 0 / 64 / 64 B on sm_80.
# Two CTAs of 8 warps would need <= 128 registers at 8 warps, and 8 warps take more: TS=2, BR=64
# 197-241 registers (one CTA, predicted 1,036-1,060 us against 518-530 us), TS=4, BR=32 165-172
# (one CTA, 1,040-1,064 us); TS=2, BR=32 at 16 warps spills 196-276 B, TS=4, BR=64 16-64 B.
# Timings were not measured (no GPU when written): SMOE_FAST_AUTOTUNE=1 picks among the candidates.
_HARD_DEFAULTS = {
    "lite": {"BM": 16, "TS": 2, "BR": 64, "num_warps": 16},
    "medium": {"BM": 16, "TS": 1, "BR": 16, "num_warps": 4},
    "mlp": {"BM": 64, "BN": 64, "BH": 32, "num_warps": 8},
}
_HARD_CANDIDATES = {
    "lite": [{"BM": 16, "TS": 2, "BR": 64, "num_warps": 16}, {"BM": 32, "TS": 2, "BR": 64, "num_warps": 16},
             {"BM": 16, "TS": 2, "BR": 32, "num_warps": 8}],
    "medium": [{"BM": 16, "TS": 1, "BR": 16, "num_warps": 4}, {"BM": 16, "TS": 2, "BR": 16, "num_warps": 4}],
    "mlp": [{"BM": 64, "BN": 64, "BH": 32, "num_warps": 8}, {"BM": 32, "BN": 64, "BH": 32, "num_warps": 4}],
}
# The interpreter pays per operation, not per element: whole tiles at once.
_HARD_INTERPRETER = {
    "lite": {"BM": 16, "TS": 16, "BR": 256, "num_warps": 4},
    "medium": {"BM": 16, "TS": 4, "BR": 1024, "num_warps": 4},
    "mlp": {"BM": 16, "BN": 256, "BH": 64, "num_warps": 4},
}
# lite in a half GEMM mode on sm_90 (bf16 / fp16 maps, decoder_tiles.map_dtype), audit with triton 3.9,
# bf16: BR = 64 spills 80 B on sm_90 (128 registers, the cap of 16 warps), BR = 128 40 B, predicted
# the same 347.7 us (L2-bound either way). On sm_80 / sm_86 / sm_89 BR = 64 spills 64 B and BR = 128
# 72 / 8 / 8 B; those three keep BR = 64, since sm_86's compile stands for the other two
# (tests/test_audit.py) and one config must hold all three within the budget.
_HARD_LITE_HALF_SM90 = {"BR": 128}
# the mlp tile with few tokens per expert: smaller tiles waste fewer masked rows
_HARD_MLP_SMALL = {"BM": 32, "num_warps": 4}
# the mlp tile in IEEE fp32 (audit, triton 3.9): BN = 64, BH = 32 stops ptxas at 128 registers and spills
# 32 B (sm_90) / 16 B (sm_86); BN = 32, BH = 16 takes 80 / 80 / 128 registers on sm_90 / sm_86 / sm_80,
# spills nothing, and is predicted at the same 409 us (FMA-bound: h is read from the tile's scratch
# twice as often, which the FMA time hides). TF32 and bf16 spill nothing at 64 / 32 and are bound on
# memory, so they keep it. The small tile in TF32 spilled 8-16 B on sm_90 at BH = 32; BH = 16: 122
# registers, none spilled, the same predicted time.
_HARD_MLP_IEEE = {"BN": 32, "BH": 16}
# lite with fc folded into conv1 (kernels/lite_folded.py; TF32 / bf16 / fp16 with enough tokens per
# expert): no scratch, BM tokens per tile. Audit, sm_90, triton 3.9, 2026-12-04: bf16 BM = 128 at 16
# warps takes 100 registers, spills nothing, 53 KB of shared memory (BM = 64: 115 registers, predicted
# twice the latency-bound time). TF32's a1 tile is the second GEMM's register operand at 4 bytes an
# element: at 16 warps (the 128-register cap) BM = 64 spills 120 B and BM = 128 80 B, so TF32 runs 8
# warps at BM = 64: 156 registers, nothing spilled, one CTA per SM (predicted 2x the compute time for
# want of resident warps; two CTAs need maxnreg = 128, which spills 72-100 B; 8 warps at BM = 128 take
# 255 registers and spill 268 B; benchmarks/README.md lists the other shapes tried). Without wgmma
# (sm_80 / sm_86 / sm_89, mma.sync) every 16-warp tile spills (8-356 B) in every mode and BM = 64 at 8
# warps does not (153-190 registers), so there every mode runs that.
_HARD_LITE_FOLDED = {"FOLD": 1, "BM": 64, "num_warps": 8}
_HARD_LITE_FOLDED_HALF_SM90 = {"FOLD": 1, "BM": 128, "num_warps": 16}
_HARD_LITE_FOLDED_CANDIDATES = [{"FOLD": 1, "BM": 64, "num_warps": 8}]   # the one tile that spills on no arch
_HARD_LITE_FOLDED_INTERPRETER = {"FOLD": 1, "BM": 16, "num_warps": 4}
_tuned: dict[tuple, dict[str, int]] = {}
_forced: dict[str, dict[str, int]] = {}


def experts_hard_default(kind: str, arch: int, bucket: int, dot: str = "ieee", fold: bool = False) -> dict[str, int]:
    """The heuristic config for ``arch`` and GEMM mode ``dot`` (no timing); ``fold``: lite's folded kernel
    (kernels/lite_folded.py)."""
    if fold:
        if arch == 0:
            return dict(_HARD_LITE_FOLDED_INTERPRETER)
        return dict(_HARD_LITE_FOLDED_HALF_SM90 if dot in ("bf16", "fp16") and arch >= 90 else _HARD_LITE_FOLDED)
    if arch == 0:
        return dict(_HARD_INTERPRETER[kind])
    config = dict(_HARD_DEFAULTS[kind])
    if kind == "lite" and dot in ("bf16", "fp16") and arch >= 90:
        config.update(_HARD_LITE_HALF_SM90)
    if kind == "mlp" and bucket <= 256:
        config.update(_HARD_MLP_SMALL)
        if dot == "tf32":
            config["BH"] = 16
    elif kind == "mlp" and dot == "ieee":
        config.update(_HARD_MLP_IEEE)
    return config


def experts_hard_candidates(kind: str, fold: bool = False) -> list[dict[str, int]]:
    return [dict(c) for c in (_HARD_LITE_FOLDED_CANDIDATES if fold else _HARD_CANDIDATES[kind])]


def experts_hard_config(kind: str, dtype: torch.dtype, device: torch.device, num_tokens: int, run=None,
                        dot: str = "ieee", fold: bool = False) -> dict[str, int]:
    """Config for the hard-gated experts kernel of ``kind`` whose GEMMs run in mode ``dot``; ``fold``:
    lite's folded kernel (the launcher's choice, ``lite_folded.fold_pays``). A forced config (tests)
    wins over both, and picks the kernel by its ``FOLD`` key.

    ``run(config)`` launches the kernel once with a config; with ``SMOE_FAST_AUTOTUNE=1`` on a GPU it
    is timed for each candidate on the first call per (kind, dtype, GEMM mode, arch, bucket) key.
    """
    if kind in _forced:
        return dict(_forced[kind])
    bucket = bucket_tokens(num_tokens)
    arch = device_arch(device)
    key = (kind, dtype, dot, arch, bucket, fold)
    if key in _tuned:
        return _tuned[key]
    config = experts_hard_default(kind, arch, bucket, dot, fold)
    if (run is not None and device.type == "cuda" and not interpreting() and os.environ.get(AUTOTUNE_ENV) == "1"
            and not torch.cuda.is_current_stream_capturing()):
        import triton.testing

        timings = [(triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=20), i, c)
                   for i, c in enumerate(experts_hard_candidates(kind, fold))]
        config = min(timings)[2]
    _tuned[key] = config
    return config


@contextlib.contextmanager
def forced_experts_hard_config(kind: str, **config: int):
    """Use ``config`` for ``kind`` inside the block (tests exercise the GPU tile shapes with it)."""
    _forced[kind] = config
    try:
        yield
    finally:
        del _forced[kind]


# ----------------------------------------------------------------------------------------------------
# training kernels (soft / top-k fused lite and mlp; the medium decoder's grouped layers)
# ----------------------------------------------------------------------------------------------------

TRAIN_BLOCK_M = 16     # rows per block: the smallest tl.dot M
TRAIN_MLP_BLOCK_N = 32   # output pixels per mlp tile on a GPU (see training_mlp_config)


def training_mlp_config(arch: int, direction: str = "fwd", dot: str = "ieee") -> dict[str, int]:
    """Tiles of the fused mlp soft / top-k kernels (``direction`` "fwd" or "bwd", GEMM mode ``dot``) for
    ``arch``: BM rows per block, BN output pixels per tile, pipelining stages. Audit figures, spill
    bytes per thread:

    - BN: with 64 (3 stages, sm_90) the forwards spilled 16 B in bf16 and the backwards 2.2 / 4.1 KB
      (soft / top-k, IEEE) at 190-210 KB of shared memory; with BN = 32 the forwards spill nothing
      in IEEE, TF32 and bf16 and the backwards 1.5 / 3.3 KB, at 120-146 KB.
    - stages, archs with less shared memory than sm_90 (which take one config, so that the audit's
      sm_86 compile stands for sm_80 and sm_89): the forward's 146 KB with 3 stages is over sm_86's
      99 KB; with 1 it spills nothing on sm_86 and 8-32 B on sm_80 in IEEE (2 stages spilled 16-44 B
      on sm_86). The backward with 1 stage spilled 7.4-10.2 KB on sm_80 and sm_86, with 2 0.7-3.6 KB
      in IEEE and bf16 (sm_80 TF32 stays at 8.6 KB: ptxas keeps it at 128 registers). sm_90 keeps 3
      in both directions (2 spilled more in its IEEE backward).
    - the IEEE forward on those archs: with BN = 32 ptxas stops sm_80 at 128 registers and spills
      32 / 8 B (soft / top-k; a register cap of 168 or 255 moves the spill to sm_86); with BN = 16,
      122 / 106 registers on sm_80 / sm_86 and nothing spilled, the same predicted time, 35 KB of
      shared memory instead of 50. TF32 and bf16 keep BN = 32: at 16 they took 255 registers and
      spilled 12-332 B.
    - the IEEE and TF32 forwards on sm_90 at 1 stage too: 3 stages took 146 KB and 150-176 registers,
      one CTA of 8 warps per SM (predicted soft fwd 3,269 / 3,081 us, top-k 449 us); 1 stage takes
      50 KB and 108-114 registers, two CTAs per SM, nothing spilled (predicted 1,635 / 1,540 us, top-k
      224 us: the forward's own roofline in IEEE). bf16 keeps 3: it holds 176-198 registers (one CTA)
      at any depth.

    The interpreter keeps BN = 64: fewer numpy steps."""
    if arch == 0:
        return {"BM": TRAIN_BLOCK_M, "BN": 64, "num_warps": 8, "num_stages": 3}
    block_n = TRAIN_MLP_BLOCK_N
    if direction == "fwd" and dot in ("ieee", "tf32"):
        stages = 1
        if dot == "ieee" and SHARED_LIMIT_BYTES.get(arch, 0) < SHARED_LIMIT_BYTES[90]:
            block_n = 16
    elif SHARED_LIMIT_BYTES.get(arch, 0) >= SHARED_LIMIT_BYTES[90]:
        stages = 3
    else:
        stages = 1 if direction == "fwd" else 2
    return {"BM": TRAIN_BLOCK_M, "BN": block_n, "num_warps": 8, "num_stages": stages}


def training_lite_fwd_config(arch: int, dot: str = "ieee", gating: str = "soft") -> dict[str, int]:
    """Tiles of the lite soft / top-k (``gating``) forward kernels in GEMM mode ``dot``
    (``launch.dot_mode``): they run the hard kernel's per-tile decoder (kernels/decoder_tiles.py) on
    the same tiles, so they take its config at the largest bucket, at 16 or 8 warps. Audit, spill
    bytes per thread at 16 warps (at most 128 registers with one CTA per SM) -> at 8:

    - TF32 / bf16 (tensor-core dots): soft 116 / 172 B, top-k 48 / 56 B (sm_90) -> 0 on sm_80, sm_86
      and sm_90 (208-255 registers): 8 warps. Since conv1 feeds conv2's parts GEMM in registers
      (2026-12-04, ``decoder_tiles._upconv3x3_to_scratch``) sm_90 compiles them at 16 warps with
      114-128 registers and nothing spilled, predicted soft 3,232 -> 1,616 us (TF32) and 2,532 ->
      1,266 us (bf16), top-k 40 -> 20 us: sm_90 keeps 16. On sm_80 top-k at 16 spilled 64 B (sm_86
      none), so the archs under sm_90 keep 8.
    - IEEE: soft 0 on sm_90 but 16 / 56 B on sm_80 / sm_86 (ptxas took 128 / 64 registers) -> 0;
      top-k (with the launcher's register cap) 0 everywhere. 8 warps doubled the predicted time on
      sm_90 (soft 4,549 against 2,275 us: half the warps to hide the scratch gathers' latency), so
      IEEE keeps 16 where it spills nothing: top-k everywhere, soft on sm_90."""
    config = experts_hard_default("lite", arch, MAX_BUCKET)
    if arch == 0:
        return config
    if (dot != "ieee" and arch < 90) or (gating == "soft" and SHARED_LIMIT_BYTES.get(arch, 0) < SHARED_LIMIT_BYTES[90]):
        config["num_warps"] = 8
    return config


def training_lite_bwd_config(arch: int) -> dict[str, int]:
    """Tiles of the lite soft / top-k backward (kernels/decoder_tiles_bwd.py): the hard kernel's tiles (it
    recomputes the forward with the same device functions); TS must be a power of two dividing 4 * BR.
    It keeps 16 warps in every mode (8 spilled as much or more). Its [BR, 256] gathered conv1 tiles took 144 KB of shared memory in TF32 with BR = 64 (audit,
    sm_86), over the 99 KB of sm_86/sm_89: archs with less shared memory than sm_90 get BR = 32."""
    config = experts_hard_default("lite", arch, MAX_BUCKET)
    if arch != 0 and SHARED_LIMIT_BYTES.get(arch, 0) < SHARED_LIMIT_BYTES[90]:
        config["BR"] = 32
    return config


GROUPED_TILE_ROWS = 16   # sorted rows of one expert per grouped-layer tile


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(size)))


def grouped_layer_config(kernel: str, c_in: int, c_out: int, pixels_in: int, pixels_out: int, ks: int,
                         arch: int) -> dict[str, int]:
    """Tiles of a grouped conv/linear layer kernel (``kernel`` "fwd", "dgrad" or "wgrad") for ``arch``:
    BM x BN output tile, BK reduction step, software-pipelining stages.

    GPU archs get BM <= 64, BK = 16 and 8 warps. The gathered operand's [BM, BK] addresses and masks
    live in registers; with BM = 128, BK = 64 and 4 warps ptxas spilled 11-12 KB per thread in every
    forward conv and 18-30 KB in dgrad (audit, sm_90), with BM <= 64, BK = 16, 8 warps it spills
    nothing in 35 of the 36 (kernel, precision) rows (IEEE, TF32, bf16), at 38-186 registers and
    6-28 KB of shared memory, well inside every arch's limit; wgrad conv2 (BM = 32) spilled 8 B with 3
    stages and none with 2, so wgrad takes 2 (its reduction runs over rows, with no reuse to hide).
    The interpreter (arch 0) takes larger tiles: fewer, bigger numpy steps."""
    if arch == 0:
        bm, bk, warps = 128, 64, 4
    else:
        bm, bk, warps = 64, 16, 8
    if kernel == "fwd":
        config = {"BM": _block(GROUPED_TILE_ROWS * pixels_out, bm), "BN": _block(c_out, 64), "BK": bk}
    elif kernel == "dgrad":
        config = {"BM": _block(GROUPED_TILE_ROWS * pixels_in, bm), "BN": _block(c_in, 64), "BK": bk}
    elif kernel == "wgrad":
        config = {"BM": _block(c_out, 64), "BN": _block(c_in * ks * ks, 64), "BK": 2 * bk if arch == 0 else bk}
    else:
        raise ValueError(f"unknown grouped-layer kernel {kernel!r}")
    config.update(num_warps=warps, num_stages=2 if kernel == "wgrad" and arch != 0 else 3)
    return config


# ----------------------------------------------------------------------------------------------------
# spill budgets (bytes of spill stores + loads per thread, from ptxas), enforced by tests/test_audit.py
# ----------------------------------------------------------------------------------------------------

# Grouping must never spill. The others are the audit's figures (the most over sm_80, sm_86 and sm_90
# and every config of the covering set, triton 3.9, rounded up to 64 B): a ratchet that the
# hard-gated and training-kernel issues tighten towards zero; a change that spills more fails the
# test. sm_80's ptxas spills more than sm_86's for the same configs (hard medium 3,952 B against
# 100 B, medium wgrad conv1 23.8 KB against 12 B). Before the launch-layer and tile work: hard lite
# 132 B and hard medium 2,644 B on sm_80, grouped medium layers up to 73 KB (wgrad conv1 on sm_90),
# soft/top-k lite backward 9.5-22 KB. After the token-innermost scratch (2026-12-02): hard lite 0 B in
# IEEE fp32 everywhere, 32-64 B in TF32/bf16 on sm_80 and sm_90 (0 on sm_86); hard medium 2,856 B on
# sm_80, 96 B on sm_90. After the training-kernel redesign (2026-12-02: lite forwards on the hard
# kernel's tiles, the lite backward in the same layout, expert groups in soft items): soft / top-k lite
# forward 520-1,776 B -> 0 in IEEE fp32 on sm_90 (116 B TF32), lite backward 20.8-22.5 KB -> 4.3-9.1 KB.
# The mlp backward went up on sm_86 (7.2 KB -> 8.7 / 10.2 KB; sm_90 2.2 / 4.1 KB): pass 1 now loops the
# group's experts per row block, summing dz in registers and adding d fc1 into the partial rows.
# After the training tiles were set per precision (2026-12-02: bf16 rows audited too): every lite
# forward 0 B in IEEE, TF32 and bf16 on sm_80, sm_86 and sm_90; lite backwards at most 7.6 / 6.3 KB
# (soft / top-k; 13.8 KB in bf16 on sm_80 before the register cap); the grouped medium layers 0 B
# (at most 8 B: dgrad conv1, bf16, sm_86) from 11.6-30 KB; mlp forwards 0 B except 8-32 B in IEEE
# on sm_80; mlp backwards at most 8.6 / 8.1 KB (sm_80 TF32). After the mlp tiles were set per GEMM mode
# (training_mlp_config, experts_hard_default): every mlp forward, hard and training, 0 B on sm_80,
# sm_86 and sm_90 in every mode (hard mlp 32 B IEEE and 16 B TF32 before on sm_90). After lite's a1
# stayed in registers (2026-12-04): hard lite 0 B on sm_90 in every mode (32 / 40 B in TF32 / bf16
# before), at most 8 B on sm_86; sm_80 keeps 64 B in TF32 and bf16, hence the budget.
SPILL_BUDGET_BYTES = {
    "grouping": 0,
    "tile offsets": 0,
    "segment sum": 0,
    "hard lite": 64,
    "hard medium": 2_880,
    "hard mlp": 0,
    "soft fwd lite": 0,
    "soft fwd mlp": 0,
    "soft bwd lite": 7_680,
    "soft bwd mlp": 8_704,
    "topk fwd lite": 0,
    "topk fwd mlp": 0,
    "topk bwd lite": 6_272,
    "topk bwd mlp": 8_192,
    "medium fwd": 0,
    "medium dgrad conv1": 64,
    "medium dgrad": 0,
    "medium wgrad": 0,
}


def spill_budget(op: str) -> int:
    """The written spill budget of an audit op name ("hard lite", "soft bwd lite", ...)."""
    for prefix in sorted(SPILL_BUDGET_BYTES, key=len, reverse=True):
        if op.startswith(prefix):
            return SPILL_BUDGET_BYTES[prefix]
    raise KeyError(f"no spill budget for {op!r}; add one to kernels/tuning.py SPILL_BUDGET_BYTES")
