"""Measuring the expert stage: device timing and the work model (FLOPs and bytes a stage must move).

Shared by ``smoe-fast profile`` (:mod:`smoe_fast.profile`) and the pytest-benchmark suites in
benchmarks/, so both time the same way and count the same work.

| name                        | what it gives                                                          |
|-----------------------------|------------------------------------------------------------------------|
| time_device                 | median seconds of a call: CUDA events on GPU, synchronise + perf_counter elsewhere |
| synchronize                 | wait for the device (a no-op on CPU)                                   |
| measure_copy_bandwidth      | achieved device-memory copy GB/s (the bandwidth floor)                 |
| measure_sgemm_gflops        | achieved fp32 torch.mm GFLOP/s in this process (the compute ceiling), cached per device and thread count |
| known_bandwidth, device_name | data-sheet GB/s of known GPUs; a printable device name                |
| decoder_flops_per_token     | useful FLOPs of one expert on one token (lite, medium, mlp)            |
| expert_bytes                | bytes of one expert's parameters                                       |
| stage_flops, stage_bytes    | useful FLOPs / least bytes moved of a stage (hard, soft, topk)         |
| random_routing              | uniform or skewed expert indices [B] or distinct [B, K]                |

Stages: ``hard`` is the inference forward, ``soft`` and ``topk`` a training forward + backward
(the backward counted as twice the forward).

>>> seconds = time_device(lambda: x @ y, torch.device("cuda"))
>>> stage_flops("hard", batch=65536, num_experts=64, kind="lite") / seconds / 1e12   # TFLOP/s
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from .contract import DECODER_KINDS, DEFAULT_MLP_HIDDEN, IMAGE_PIXELS, decoder_param_shapes

STAGES = ("hard", "soft", "topk")

# Data-sheet HBM bandwidth in GB/s, matched against torch.cuda.get_device_name().
KNOWN_BANDWIDTH_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-PCIE-40GB", 1555.0),
                        ("A100", 2039.0), ("L40S", 864.0), ("A10G", 600.0), ("L4", 300.0), ("T4", 320.0))


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    """Wait for every kernel queued on ``device`` (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_device(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` on the device. On a GPU: CUDA events around each call, recorded back
    to back with one synchronisation after the last (no host sync per call); elsewhere synchronise +
    perf_counter.

    >>> seconds = time_device(lambda: x @ y, torch.device("cuda"))
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    repeats = max(1, repeats)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        ends[-1].synchronize()
        return statistics.median(start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_copy_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 3) -> float:
    """Achieved device-memory copy bandwidth in GB/s (bytes read + bytes written per second)."""
    n = megabytes * (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = time_device(lambda: dst.copy_(src), device, warmup=1, repeats=repeats)
    del src, dst
    return 2 * n / seconds / 1e9


# {(device, threads, n, TF32 allowed): GFLOP/s}: one measurement per process, reused by every row.
_SGEMM_GFLOPS: dict[tuple[str, int, int, bool], float] = {}


def measure_sgemm_gflops(device: torch.device, n: int = 2048, repeats: int = 5,
                         timer: Callable[[Callable[[], object], torch.device], float] | None = None) -> float:
    """Achieved GFLOP/s of an n x n x n fp32 ``torch.mm`` on ``device`` at the current thread count: the
    compute ceiling that kernel rates are quoted against (a fraction of it, in the same process, is a
    ratio that survives a machine shared with other jobs). Measured once per (device, threads, n, TF32
    setting) and cached; ``timer(fn, device) -> seconds`` replaces :func:`time_device` (tests).

    >>> measure_sgemm_gflops(torch.device("cpu"))   # about 125 on 2 cores of this project's machines
    """
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    key = (str(device), torch.get_num_threads(), n, tf32)
    if timer is None and key in _SGEMM_GFLOPS:
        return _SGEMM_GFLOPS[key]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    out = torch.empty(n, n, device=device)
    if timer is None:
        seconds = time_device(lambda: torch.mm(a, b, out=out), device, warmup=1, repeats=repeats)
    else:
        seconds = timer(lambda: torch.mm(a, b, out=out), device)
    gflops = 2 * n ** 3 / seconds / 1e9
    if timer is None:
        _SGEMM_GFLOPS[key] = gflops
    return gflops


def known_bandwidth(device: torch.device) -> tuple[str, float] | None:
    """(device name, data-sheet GB/s) for GPUs in :data:`KNOWN_BANDWIDTH_GBPS`, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, gbps in KNOWN_BANDWIDTH_GBPS:
        if key.lower() in name.lower():
            return name, gbps
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads > 1 else ''})"


# ----------------------------------------------------------------------------- the work model
def decoder_flops_per_token(kind: str, latent_dim: int, hidden_dim: int = DEFAULT_MLP_HIDDEN) -> int:
    """Useful multiply-add FLOPs (2 per MAC) of one expert on one token. A 3x3 convolution after nearest
    x2 upsampling counts phase-split (each output phase is a 2x2 convolution of the low-res map: 4 taps,
    not 9), as DESIGN.md does: lite is 326 kFLOP (fc 25 k, conv1 201 k, conv2 100 k), 702 k counted
    naively on the upsampled maps; medium 16.6 MFLOP."""
    if kind == "mlp":
        return 2 * (latent_dim * hidden_dim + hidden_dim * IMAGE_PIXELS)
    if kind == "lite":
        return 2 * (latent_dim * 392 + 14 * 14 * 16 * 8 * 4 + 28 * 28 * 1 * 16 * 4)
    if kind == "medium":
        return 2 * (latent_dim * 1568 + 14 * 14 * 64 * 32 * 4 + 28 * 28 * 32 * 64 * 4 + 28 * 28 * 32 * 9)
    raise ValueError(f"unknown decoder kind {kind!r}; expected one of {DECODER_KINDS}")


def expert_bytes(kind: str, latent_dim: int, hidden_dim: int, element_size: int = 4) -> int:
    """Bytes of one expert's parameters."""
    return element_size * sum(math.prod(s) for s in decoder_param_shapes(kind, latent_dim, hidden_dim).values())


def stage_bytes(stage: str, batch: int, num_experts: int, experts_touched: int, kind: str, latent_dim: int = 32,
                hidden_dim: int = 256, top_k: int = 2, element_size: int = 4) -> int:
    """Bytes the stage must move at least: inputs z + routing + weights of the experts touched + output.

    Training stages (soft, topk) count every tensor twice: once forward, once as its gradient.
    """
    s = element_size
    z, out = batch * latent_dim * s, batch * IMAGE_PIXELS * s
    w = experts_touched * expert_bytes(kind, latent_dim, hidden_dim, s)
    if stage == "hard":
        return z + batch * 8 + w + out
    if stage == "soft":
        return 2 * (z + batch * num_experts * s + w + out)
    if stage == "topk":
        return 2 * (z + batch * top_k * s + w + out) + batch * top_k * 8
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def stage_flops(stage: str, batch: int, num_experts: int, kind: str, latent_dim: int = 32, hidden_dim: int = 256,
                top_k: int = 2) -> int:
    """Useful FLOPs of the stage (the backward pass counted as twice the forward)."""
    per_token = decoder_flops_per_token(kind, latent_dim, hidden_dim)
    if stage == "hard":
        return batch * per_token
    if stage == "soft":
        return 3 * batch * num_experts * per_token
    if stage == "topk":
        return 3 * batch * top_k * per_token
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def random_routing(batch: int, num_experts: int, routing: str, generator: torch.Generator, top_k: int = 1) -> torch.Tensor:
    """Expert indices [B] (top_k=1) or distinct [B, K]: 'uniform', or 'skewed' (expert e with weight 2^-e/4)."""
    if routing not in ("uniform", "skewed"):
        raise ValueError(f"unknown routing {routing!r}; expected 'uniform' or 'skewed'")
    weights = torch.exp2(-torch.arange(num_experts) / 4.0) if routing == "skewed" else torch.ones(num_experts)
    if top_k == 1:
        return torch.multinomial(weights, batch, replacement=True, generator=generator)
    # Distinct experts per token: the top k of random scores scaled by the expert weights.
    return (torch.rand(batch, num_experts, generator=generator) * weights).topk(top_k, dim=-1).indices
