"""The launch layer: what every launcher in kernels/ needs from the device, written once.

| helper              | what it gives                                                                   |
|---------------------|---------------------------------------------------------------------------------|
| device_guard        | launch on the tensors' GPU (Triton's current device and stream), autocast off     |
| max_programs        | the persistent-grid cap: 2 programs per SM on a GPU, 2 in the interpreter         |
| device_arch         | 90 for sm_90, 80 for sm_80, ...; 0 for CPU tensors or the interpreter           |
| dot_precision       | ``tl.dot`` input precision, read from torch's own TF32 setting at call time       |
| dot_mode            | GEMM mode of a kernel: dot_precision, or bf16/fp16 tensor cores for half inputs   |
| autocast_input      | z in the autocast dtype when autocast is on (from smoe_fast.contract)             |
| mm (jit)            | one GEMM tile with fp32 accumulation in a dot_mode                                |
| log2_ceil           | binary-search steps over E experts (the ``LOG_E`` constexpr of every tile lookup) |
| tile_bound          | host-side bound on the tiles of any routing (a grid size with no host sync)       |
| tile_offsets        | [E+1] exclusive scan of cdiv(expert_counts, block_m), one launch, on the device   |
| tile_expert (jit)   | tile id -> expert: the one tile-to-expert lookup (binary search of tile_offsets)  |
| find_tile (jit)     | tile id -> (expert, first sorted row, rows in the tile)                          |

Nothing here synchronises with the host or copies from it: the cached values are per device and
computed from its properties once, and torch's precision flags are host state. Triton launches on
the current stream of the current device; ``device_guard`` makes that device the tensors' one, so
the stream is that device's current stream (the one torch is using), which is also what CUDA-graph
capture records.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from smoe_fast.contract import autocast_input  # noqa: F401  (the kernels' entry points import it from here)

__all__ = ["interpreting", "device_guard", "max_programs", "device_arch", "dot_precision", "dot_mode",
           "autocast_input", "mm",
           "log2_ceil", "tile_bound", "tile_offsets", "tile_expert", "find_tile"]

# programs per SM of a persistent grid: two resident CTAs hide each other's barriers and gathers
PROGRAMS_PER_SM = 2
# the interpreter runs programs one after another: a small cap makes tests exercise programs that
# loop over several items
INTERPRETER_PROGRAMS = 2


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors, one program at a time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def device_guard(tensor: torch.Tensor):
    """Context manager around an op's launches: ``tensor``'s GPU is the current device, and autocast is
    off. Each op casts its GEMM input once at entry (``autocast_input``); the torch ops a launcher runs
    between kernels (partial sums, the medium chunks' gated sums) stay in fp32 as written."""
    device = torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
    with device, torch.autocast(tensor.device.type, enabled=False):
        yield


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def max_programs(device: torch.device) -> int:
    """Programs of a persistent grid on ``device`` (bounds per-program scratch by the grid, not by B)."""
    if device.type != "cuda" or interpreting():
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * _sm_count(_index(device))


REGISTERS_PER_SM = 65536


def register_cap(num_warps: int) -> int:
    """The ``maxnreg`` for a kernel of ``num_warps`` warps: the most registers a thread can have with
    one CTA per SM (at most 255), i.e. the hardware limit, stated. ptxas sometimes gives a 16-warp
    kernel 64 registers (room for two CTAs) and spills; stating the limit changes its choice, for
    better or worse per kernel (``smoe-fast audit``, sm_90): the top-k lite forward went from 64
    registers and 84 B spilled to 123 and none, the lite backwards from up to 13.8 KB to at most 7.6
    KB, hard medium from 0 to 768 B spilled, hard lite (sm_86, IEEE) from 64 registers and 32 B
    spilled to 128 and none. So a launcher passes it only where the audit shows it helps."""
    return min(255, REGISTERS_PER_SM // (32 * num_warps))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_arch(device: torch.device) -> int:
    """10 * major + minor of a CUDA device's compute capability (90 for an H100); 0 for CPU tensors
    or under the interpreter. Tuning tables are keyed on it."""
    if device.type != "cuda" or interpreting():
        return 0
    major, minor = _capability(_index(device))
    return 10 * major + minor


def _torch_allows_tf32() -> bool:
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:                     # torch before the fp32_precision API
        return bool(matmul.allow_tf32)
    if precision == "none":                   # inherit the global setting
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def dot_precision(dtype: torch.dtype = torch.float32) -> str:
    """``tl.dot`` input precision for operands of ``dtype``: "tf32" when torch allows TF32 matmuls
    (``torch.backends.cuda.matmul.fp32_precision``, or ``allow_tf32`` on older torch), else "ieee".
    fp16/bf16 operands are exact in TF32, so they always get "tf32"."""
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32"
    return "tf32" if _torch_allows_tf32() else "ieee"


_HALF_DOTS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def dot_mode(dtype: torch.dtype, device: torch.device) -> str:
    """GEMM mode of kernels that cast their tiles themselves (``mm``): "bf16" or "fp16" for half inputs
    (GPU autocast) on a GPU, so ``tl.dot`` runs on the half-precision tensor cores with fp32
    accumulation; else :func:`dot_precision` ("ieee" or "tf32"). The interpreter cannot run
    half-precision dots: there, and for CPU tensors, half inputs are widened to fp32 (exact)."""
    if dtype in _HALF_DOTS and device.type == "cuda" and not interpreting():
        return _HALF_DOTS[dtype]
    return dot_precision(dtype)


@triton.jit
def mm(a, b, DOT: tl.constexpr):
    """a [M, K] @ b [K, N] -> fp32 [M, N] in mode DOT (:func:`dot_mode`): "bf16"/"fp16" cast both
    tiles to that dtype, "ieee"/"tf32" widen them to fp32 and use that input precision."""
    if DOT == "bf16":
        c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif DOT == "fp16":
        c = tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
    else:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT)
    return c


def log2_ceil(num_experts: int) -> int:
    """ceil(log2(E)), at least 1: the binary-search steps of :func:`find_tile` over E experts."""
    return max(1, (int(num_experts) - 1).bit_length())


def tile_bound(num_rows: int, num_experts: int, block_m: int) -> int:
    """Most tiles of ``block_m`` rows that any routing of ``num_rows`` rows over ``num_experts`` can
    need (each non-empty expert wastes at most one partial tile): a grid size known on the host."""
    return triton.cdiv(num_rows, block_m) + min(num_experts, num_rows)


@triton.jit
def _tile_offsets_kernel(p_counts, p_toff, E, block_m, BLOCK: tl.constexpr):
    """One program: p_toff[e] = sum_{e' < e} cdiv(counts[e'], block_m) for e in [0, E]."""
    o_e = tl.arange(0, BLOCK)
    carry = 0
    for e0 in range(0, E, BLOCK):
        m_e = e0 + o_e < E
        b_tiles = (tl.load(p_counts + e0 + o_e, mask=m_e, other=0) + block_m - 1) // block_m
        tl.store(p_toff + e0 + o_e, carry + tl.cumsum(b_tiles, axis=0) - b_tiles, mask=m_e)
        carry += tl.sum(b_tiles, axis=0)
    tl.store(p_toff + E + o_e, carry + o_e * 0, mask=o_e == 0)


TILE_SCAN_BLOCK = 1024


@torch.library.custom_op("smoe_fast::triton_tile_offsets", mutates_args=())
def _tile_offsets_op(expert_counts: torch.Tensor, block_m: int) -> torch.Tensor:
    num_experts = expert_counts.shape[0]
    out = torch.empty(num_experts + 1, dtype=torch.int32, device=expert_counts.device)
    with device_guard(expert_counts):
        _tile_offsets_kernel[(1,)](
            p_counts=expert_counts,
            p_toff=out,
            E=num_experts,
            block_m=block_m,
            BLOCK=TILE_SCAN_BLOCK,
        )
    return out


@_tile_offsets_op.register_fake
def _(expert_counts, block_m):
    return expert_counts.new_empty(expert_counts.shape[0] + 1, dtype=torch.int32)


def tile_offsets(expert_counts: torch.Tensor, block_m: int) -> torch.Tensor:
    """[E+1] int32 exclusive scan of cdiv(expert_counts, block_m): expert e owns tiles
    ``tile_offsets[e]:tile_offsets[e+1]`` (none when empty). One launch, no host synchronisation; a
    custom op, so ``torch.compile`` traces through it."""
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    return _tile_offsets_op(expert_counts, block_m)


@triton.jit
def tile_expert(p_toff, tile, E, LOG_E: tl.constexpr):
    """The expert owning tile id ``tile``: the largest e in [0, E) with tile_offsets[e] <= tile, by a
    binary search of LOG_E = ceil(log2 E) scalar loads. Empty experts share the next expert's offset,
    so they never own a tile."""
    lo = tile * 0
    hi = lo + E - 1
    for _ in tl.static_range(LOG_E):
        mid = (lo + hi + 1) // 2
        go_up = tl.load(p_toff + mid) <= tile
        lo = tl.where(go_up, mid, lo)
        hi = tl.where(go_up, hi, mid - 1)
    return lo


@triton.jit
def find_tile(p_toff, p_eoff, tile, E, LOG_E: tl.constexpr, BM: tl.constexpr):
    """(expert int64, first sorted row int64, rows in the tile int32) of tile id ``tile``; past the
    last tile (tile >= tile_offsets[E]) the row count is 0."""
    e = tile_expert(p_toff, tile, E, LOG_E)
    # row arithmetic in int32 (sorted rows < 2^31); pointers get the int64 start
    start = tl.load(p_eoff + e) + (tile - tl.load(p_toff + e)) * BM
    n_rows = tl.minimum(tl.load(p_eoff + e + 1) - start, BM)
    n_rows = tl.where(tile < tl.load(p_toff + E), n_rows, 0)
    return e.to(tl.int64), start.to(tl.int64), n_rows
