"""What the audit needs to know about GPUs: per-arch resource limits and per-GPU peak rates.

Limits are NVIDIA's published per-arch figures (CUDA C Programming Guide, "Technical Specifications
per Compute Capability"). Rates are the data-sheet peaks of the SXM parts (dense, no sparsity); the
audit's predictions divide work by them, so they are ceilings, never measurements.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchLimits:
    name: str                      # "sm_90"
    shared_per_block: int          # bytes, opt-in maximum of dynamic shared memory per block
    shared_per_sm: int             # bytes
    registers_per_sm: int
    max_warps_per_sm: int
    max_ctas_per_sm: int
    register_granularity: int = 256   # registers are allocated per warp in units of this many
    max_registers_per_thread: int = 255


ARCHS = {
    80: ArchLimits("sm_80", 166_912, 167_936, 65_536, 64, 32),
    86: ArchLimits("sm_86", 101_376, 102_400, 65_536, 48, 16),
    89: ArchLimits("sm_89", 101_376, 102_400, 65_536, 48, 24),
    90: ArchLimits("sm_90", 232_448, 233_472, 65_536, 64, 32),
}
DEFAULT_ARCHS = (80, 90)


@dataclass(frozen=True)
class GPU:
    name: str
    arch: int
    sms: int
    clock_ghz: float               # boost clock the peaks assume
    fma_tflops: float              # fp32 on the FMA pipes (a fused multiply-add counts 2)
    tf32_tflops: float             # tensor cores, dense
    bf16_tflops: float             # tensor cores, dense (fp16 the same)
    hbm_gbps: float
    l2_gbps: float                 # sustained L2 bandwidth, roughly 2.5-3x HBM on these parts
    l2_bytes: int

    @property
    def alu_tops(self) -> float:
        """int32 operations per second (64 int32 lanes per SM per clock)."""
        return self.sms * 64 * self.clock_ghz / 1e3


GPUS = {
    "h100": GPU("H100 SXM", 90, 132, 1.83, 67.0, 495.0, 989.0, 3_350.0, 10_000.0, 50 * 2**20),
    "h200": GPU("H200 SXM", 90, 132, 1.83, 67.0, 495.0, 989.0, 4_800.0, 10_000.0, 50 * 2**20),
    "a100": GPU("A100 SXM", 80, 108, 1.41, 19.5, 156.0, 312.0, 2_039.0, 5_000.0, 40 * 2**20),
}
# a dependent round trip to global memory (load latency plus a barrier): what a kernel's serial
# steps cost at least, whatever the bandwidth
GLOBAL_LATENCY_US = 0.7
# resident warps per SM at which memory and FMA latency is assumed hidden (a quarter of 64)
WARPS_TO_HIDE_LATENCY = 16


def arch_number(text: str | int) -> int:
    """"sm_90", "sm90", "90" or 90 -> 90; raises with the supported list otherwise."""
    value = str(text).lower().removeprefix("sm_").removeprefix("sm").removesuffix("a")
    if not value.isdigit() or int(value) not in ARCHS:
        raise ValueError(f"unknown arch {text!r}; expected one of {', '.join(a.name for a in ARCHS.values())}")
    return int(value)


def ctas_per_sm(arch: int, num_warps: int, registers: int, shared_bytes: int) -> tuple[int, str]:
    """Resident CTAs per SM and the resource that limits them ("registers", "shared", "warps", "ctas")."""
    limits = ARCHS[arch]
    per_warp = -(-max(registers, 1) * 32 // limits.register_granularity) * limits.register_granularity
    by = {
        "registers": limits.registers_per_sm // (per_warp * num_warps),
        "shared": limits.shared_per_sm // shared_bytes if shared_bytes else limits.max_ctas_per_sm,
        "warps": limits.max_warps_per_sm // num_warps,
        "ctas": limits.max_ctas_per_sm,
    }
    if shared_bytes > limits.shared_per_block:
        return 0, "shared"
    limiter = min(by, key=by.get)
    return by[limiter], limiter
