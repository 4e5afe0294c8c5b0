"""Block sizes and warps for the Triton kernels, per (op or decoder kind, dtype, GPU), cached.

Every choice is keyed on a *bucketed* token count (next power of two, capped at ``MAX_BUCKET``),
never on the raw B, so a new batch size neither recompiles nor re-tunes. Under ``TRITON_INTERPRET``
or on CPU tensors the defaults are used as they are (there is nothing to time).

The defaults were chosen without timing them (no GPU was available when they were written):
tensor-core tiles of 16 rows at least (``tl.dot`` needs M, N, K >= 16), per-program scratch small
enough to stay in L1/L2, and no register spills in ptxas's report for sm_90a (see below).
``SMOE_FAST_AUTOTUNE=1`` times the candidates of :func:`experts_hard_candidates` on the first call
per key on a GPU (outside CUDA-graph capture) and caches the fastest.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

MAX_BUCKET = 1 << 16
AUTOTUNE_ENV = "SMOE_FAST_AUTOTUNE"


def bucket_tokens(num_tokens: int) -> int:
    """Next power of two of ``num_tokens`` (at least 1), capped at ``MAX_BUCKET``: the tuning key."""
    return min(MAX_BUCKET, 1 << max(0, int(num_tokens) - 1).bit_length())


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, (0, 0) for CPU or the interpreter."""
    if device.type != "cuda" or interpreting():
        return (0, 0)
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def num_programs_resident(device: torch.device) -> int:
    """Programs a persistent grid launches: 2 per SM on a GPU, 4 under the interpreter (small scratch)."""
    if device.type != "cuda" or interpreting():
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def grouping_config(bucket: int, num_experts: int, device: torch.device) -> dict[str, int]:
    """Tiles of the two grouping kernels.

    BLOCK_T tokens per sub-tile: the within-sub-tile rank is a BLOCK_T x BLOCK_T compare, so its cost
    per token grows with BLOCK_T while the number of sequential sub-tiles per program (each with two
    barriers) shrinks. The compare runs BLOCK_J columns at a time: ptxas (sm_90a) reports 108
    registers and no spills for 256 x 16 with 8 warps, 11 KB of spills for a 256 x 256 compare at
    once. BLOCK_E x BLOCK_P is the tile of the per-program count matrix read while scanning.
    """
    if device.type != "cuda" or interpreting():
        # the interpreter pays per operation, not per element: few, wide steps
        return {"BLOCK_T": 64, "BLOCK_J": 64, "BLOCK_E": min(triton_next_power_of_2(num_experts), 4096),
                "BLOCK_P": 16, "num_warps": 4}
    small = bucket <= 256
    block_t = 64 if small else 256
    block_e = min(triton_next_power_of_2(num_experts), 64 if small else 256)
    return {"BLOCK_T": block_t, "BLOCK_J": 16, "BLOCK_E": block_e, "BLOCK_P": 16 if small else 32,
            "num_warps": 4 if small else 8}


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Defaults per decoder kind. BM: tokens per tile (one expert); TS: tokens whose conv activations sit in
# scratch at once; BR: GEMM rows (token x pixel) per step; mlp: BN output pixels, BH hidden units per
# step. Chosen so that ptxas (sm_90a, triton 3.9) reports no register spills for fp32 (IEEE and TF32)
# and fp16: lite BR=64 with 16 warps uses 95-128 registers, BR=128 spills ~128 B; medium BR=16 with
# 4 warps uses 158-255, BR=32 spills; mlp BM=64/BN=64/BH=32 with 8 warps uses 148-213, BH=64 spills.
# tests/test_triton_compile.py re-checks these configs on every run (sm_90 and sm_80; on sm_80 medium
# spills ~2.6 KB: A100 is not tuned).
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
_tuned: dict[tuple, dict[str, int]] = {}
_forced: dict[str, dict[str, int]] = {}


def experts_hard_default(kind: str, dtype: torch.dtype, device: torch.device, bucket: int) -> dict[str, int]:
    """The heuristic config (no timing)."""
    if device.type != "cuda" or interpreting():
        return dict(_HARD_INTERPRETER[kind])
    config = dict(_HARD_DEFAULTS[kind])
    if kind == "mlp" and bucket <= 256:
        # few tokens per expert: smaller tiles waste fewer masked rows
        config.update(BM=32, num_warps=4)
    return config


def experts_hard_candidates(kind: str) -> list[dict[str, int]]:
    return [dict(c) for c in _HARD_CANDIDATES[kind]]


def experts_hard_config(kind: str, dtype: torch.dtype, device: torch.device, num_tokens: int, run=None) -> dict[str, int]:
    """Config for the hard-gated experts kernel of ``kind``.

    ``run(config)`` launches the kernel once with a config; with ``SMOE_FAST_AUTOTUNE=1`` on a GPU it
    is timed for each candidate on the first call per (kind, dtype, capability, bucket) key.
    """
    if kind in _forced:
        return dict(_forced[kind])
    bucket = bucket_tokens(num_tokens)
    key = (kind, dtype, device_capability(device), bucket)
    if key in _tuned:
        return _tuned[key]
    config = experts_hard_default(kind, dtype, device, bucket)
    if (run is not None and device.type == "cuda" and not interpreting() and os.environ.get(AUTOTUNE_ENV) == "1"
            and not torch.cuda.is_current_stream_capturing()):
        import triton.testing

        timings = [(triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=20), i, c)
                   for i, c in enumerate(experts_hard_candidates(kind))]
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
