"""What each kernel does at its DESIGN.md target shape: the work model the audit's prediction uses.

A :class:`Work` lists a launch's stages (FLOPs, and which ``tl.dot`` of the compiled kernel does them,
so the prediction uses the unit the compiled code really uses) and its memory streams (bytes, the
level they come from, whether the algorithm reads them contiguously or gathers them), plus the grid
and the longest chain of dependent global round trips one program makes. The FLOPs follow the
kernels' code, padding included (a [BM, 1024] tile for 784 pixels computes 1024).

Target shapes (DESIGN.md "Performance targets"):

| op                 | shape                                  |
|--------------------|----------------------------------------|
| grouping           | B*K = 65,536 assignments, E = 1,024    |
| hard-gated experts | B = 65,536, E = 64                     |
| soft-gated         | B = 1,024, E = 256 (forward, backward) |
| top-k              | B = 1,024, K = 2, E = 1,024            |
| medium grouped     | B*K = 2,048 rows (top-2), E = 64       |
"""
from __future__ import annotations

from dataclasses import dataclass

GROUPING_N, GROUPING_E = 65_536, 1_024
HARD_B, HARD_E = 65_536, 64
SOFT_B, SOFT_E = 1_024, 256
TOPK_B, TOPK_K, TOPK_E = 1_024, 2, 1_024
MEDIUM_ROWS, MEDIUM_E = 2_048, 64
LATENT = 32
PIXELS = 784


@dataclass(frozen=True)
class Stage:
    """FLOPs of one part of a kernel. ``dot``: the helper function whose ``tl.dot`` does it (matched
    against the compiled dots' call chains; None: elementwise FMA work, no GEMM shape). ``unit``
    "fma" or "alu" (int32) for non-GEMM stages."""
    name: str
    flops: float
    dot: str | None = None
    occurrence: int = 0
    unit: str = "fma"


@dataclass(frozen=True)
class Stream:
    """Bytes moved. ``level``: "hbm" (compulsory traffic), "scratch" (per-program buffers: L1/L2 when
    the grid's scratch fits the L2, else HBM), "l2" (re-read data such as weights). ``gather``: the
    algorithm reads it by computed addresses; unless the compiled loads are vectorised it pays
    ``scalar_amp`` (32-byte sectors for 4-byte elements spread over several lines). ``sites``: the
    functions whose compiled accesses are the gathers (None: every access of the kernel counts)."""
    name: str
    bytes: float
    level: str
    gather: bool = False
    scalar_amp: float = 4.0
    sites: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Work:
    shape: str
    programs: int
    stages: tuple[Stage, ...] = ()
    streams: tuple[Stream, ...] = ()
    serial_steps: float = 0.0        # dependent global round trips of the longest program
    scratch_bytes: float = 0.0       # the grid's scratch footprint
    useful_flops: float = 0.0        # the ideal roofline's FLOPs (no padding, phase-split convs)
    compulsory_bytes: float = 0.0    # the ideal roofline's bytes


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------
# lite / medium decoder arithmetic per token (phase-split convolutions: 4 taps per input channel)
# ----------------------------------------------------------------------------------------------------

def nonempty_experts(experts: int, rows: int) -> float:
    """Expected experts holding at least one of ``rows`` uniformly routed rows: the experts whose weights
    an ideal kernel must read (all of them for soft gating, where every row visits every expert)."""
    return experts * (1.0 - (1.0 - 1.0 / experts) ** rows)


def lite_flops() -> dict[str, float]:
    return {"fc": 2 * LATENT * 392, "conv1": 2 * 16 * 196 * 8 * 4, "conv2": 2 * 784 * 16 * 4}


def medium_flops() -> dict[str, float]:
    return {"fc": 2 * LATENT * 1568, "conv1": 2 * 64 * 196 * 32 * 4, "conv2": 2 * 32 * 784 * 64 * 4,
            "conv3": 2 * 784 * 32 * 9}


LITE_PARAMS = 392 * LATENT + 392 + 16 * 8 * 9 + 16 + 16 * 9 + 1
MEDIUM_PARAMS = 1568 * LATENT + 1568 + 64 * 32 * 9 + 64 + 32 * 64 * 9 + 32 + 32 * 9 + 1


# ----------------------------------------------------------------------------------------------------
# the rest of an eval forward (encoder + gate), as torch runs it: layer by layer (cuDNN / cuBLAS)
# ----------------------------------------------------------------------------------------------------

# (name, C_in, C_out, output side) of each 3x3 conv; the fc_mu / fc_logvar heads read C_out x 7 x 7
ENCODER_CONVS = {"medium": (("conv1", 1, 32, 28), ("conv2", 32, 64, 14), ("conv3", 64, 128, 7)),
                 "lite": (("conv1", 1, 16, 14), ("conv2", 16, 8, 7))}


def encoder_flops(kind: str, num_experts: int = HARD_E) -> dict[str, float]:
    """Per token: each encoder conv, the two heads (mu, logvar) and the gate MLP (L->64->32->E)."""
    flops = {name: 2 * side * side * cout * cin * 9 for name, cin, cout, side in ENCODER_CONVS[kind]}
    _, _, cout, side = ENCODER_CONVS[kind][-1]
    flops["fc_mu + fc_logvar"] = 2 * 2 * cout * side * side * LATENT
    flops["gate"] = 2 * (LATENT * 64 + 64 * 32 + 32 * num_experts)
    return flops


def encoder_bytes(kind: str, elem: int) -> float:
    """Per token, the least a layer-by-layer encoder moves through HBM: the image read once, each
    conv's output written once and read once by the next layer, mu / logvar / logits written."""
    activations = sum(cout * side * side for _, _, cout, side in ENCODER_CONVS[kind])
    return PIXELS * elem + 2 * activations * elem + (2 * LATENT + HARD_E) * elem
