"""The benchmark harness: grids, backend availability, device timing and the numbers recorded per case.

Every case goes through :func:`run_case`, which

- synchronises the device inside the timed call (device time, not launch time),
- warms up (the first call also measures peak memory on CUDA), calibrates the number of rounds to
  about ``SMOE_BENCH_TARGET_S`` seconds (at least 3), and cycles through pre-generated input sets so
  no round re-reads the previous round's inputs from cache,
- records in ``benchmark.extra_info``: tokens/s, ns/token, achieved GB/s for the bytes the stage must
  move, useful TFLOP/s and GFLOP/s, that rate as a fraction of the session's own fp32 sgemm ceiling
  (``sgemm_fraction``: a 2048^3 torch.mm on CPU, 8192^3 on CUDA, timed once per session and thread count by
  :func:`smoe_fast.measure.measure_sgemm_gflops`), peak memory (CUDA only; None on CPU rather than a guess) and the speed-up per
  token over the reference backend measured earlier in the same run.

Environment knobs: ``SMOE_BENCH_TARGET_S`` (seconds per case, default 0.1 on CUDA, 0.3 on CPU),
``SMOE_BENCH_BUDGET_S`` (cases starting later in the session skip; default 200 on CUDA, none on CPU),
``SMOE_BENCH_THREADS`` (torch CPU threads), ``SMOE_BENCH_TF32=1`` (allow TF32 in matmuls and convs;
default off, so every path computes IEEE fp32).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import pytest
import torch

from smoe_fast import BackendUnavailableError, resolve_backend
from smoe_fast.measure import measure_sgemm_gflops, synchronize, time_device

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
BACKENDS = ("reference", "triton", "cpp")

# Grids: the full sweep on a GPU, a small one on CPU (the whole suite runs in minutes on 2 cores).
EXPERTS = (1, 8, 64, 256, 1024) if ON_CUDA else (1, 8, 64)
HARD_BATCHES = (1024, 65536) if ON_CUDA else (256,)
TRAIN_BATCHES = (1024,) if ON_CUDA else (256,)
TOPK_BATCHES = (8192,) if ON_CUDA else (256,)
MODEL_BATCHES = (8192,) if ON_CUDA else (256,)
# The authors' per-sample loop is timed on the first N tokens of the smallest batch only (it is linear
# in B); its numbers are per token, like every ratio in the suite.
AUTHORS_LOOP_TOKENS = 1024 if ON_CUDA else 32
# Paths that run every expert on every token are skipped above this many (token, expert) pairs
# (inference; training keeps the activations for backward, hence the lower cap).
DENSE_MAX_PAIRS = (1 << 18) if ON_CUDA else (1 << 12)
DENSE_TRAIN_MAX_PAIRS = (1 << 16) if ON_CUDA else (1 << 11)
SOFT_MAX_PAIRS = (1 << 18) if ON_CUDA else (1 << 11)
TOP_K = 2
LATENT = 32
MLP_HIDDEN = 256
INPUT_SETS = 3

TARGET_SECONDS = float(os.environ.get("SMOE_BENCH_TARGET_S", "0.1" if ON_CUDA else "0.3"))
# Cases that start after this many seconds of the session skip (so a time-limited run such as
# shared/gpu/acceptance.sh, 240 s, still ends and writes its JSON). Unset: no limit.
BUDGET_SECONDS = float(os.environ["SMOE_BENCH_BUDGET_S"]) if os.environ.get("SMOE_BENCH_BUDGET_S") else (
    200.0 if ON_CUDA else None)
MIN_ROUNDS, MAX_ROUNDS = 3, 200
# Side of the square fp32 matmul behind sgemm_fraction (CPU: 17 GFLOP, about 0.14 s on 2 cores).
SGEMM_SIZE = 8192 if ON_CUDA else 2048

# {group: seconds per token of the reference backend}, filled as cases run (reference first).
REFERENCE_NS_PER_TOKEN: dict[str, float] = {}
# The reference backend's output on input set 0 for the latest group (its rows run right after it).
_REFERENCE_OUTPUT: dict[str, object] = {}
# One dict per measured case, printed as a table at the end of the session (conftest.py).
SUMMARY: list[dict] = []


def require_backend(name: str) -> str:
    """The backend name if it runs on DEVICE, else skip the case with the reason."""
    if name == "triton" and not ON_CUDA:
        pytest.skip("triton on CPU runs in the interpreter, whose timings measure Python, not kernels; "
                    "benchmark triton on a CUDA GPU")
    try:
        resolve_backend(name, DEVICE)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    return name


def authors_loop_tokens(batch: int, batches: Sequence[int]) -> int:
    """Tokens the authors' per-sample loop runs on; skips the case beyond the smallest batch of the grid."""
    if batch != min(batches):
        pytest.skip(f"the authors' per-sample loop is linear in B; it is timed once per E, in the B={min(batches)} group")
    return min(batch, AUTHORS_LOOP_TOKENS)


def skip_if_too_many_pairs(batch: int, num_experts: int, limit: int, what: str) -> None:
    if batch * num_experts > limit:
        pytest.skip(f"{what} runs every expert on every token: B*E = {batch}*{num_experts} = {batch * num_experts} "
                    f"(token, expert) pairs > {limit} on {DEVICE.type}")


def rotating(input_sets: Sequence[tuple], fn: Callable) -> Callable[[], object]:
    """A zero-argument call of ``fn(*inputs)`` that cycles through the pre-generated input sets."""
    counter = [0]

    def call():
        inputs = input_sets[counter[0] % len(input_sets)]
        counter[0] += 1
        return fn(*inputs)

    return call


@dataclass
class Work:
    """What one call must do: tokens processed, bytes it must move, useful FLOPs (None: not counted)."""

    tokens: int
    bytes_moved: int | None
    flops: int | None


def run_case(benchmark, *, stage: str, impl: str, num_experts: int, batch: int, call: Callable[[], object],
             work: Work, kind: str = "lite") -> object:
    """Time ``call`` (device time), record the metrics; returns the output of one call (for checks)."""
    group = group_name(stage, kind, num_experts, batch)
    benchmark.group = group
    benchmark.extra_info.update(stage=stage, impl=impl, kind=kind, num_experts=num_experts, batch=batch,
                                tokens=work.tokens, device=str(DEVICE), torch=torch.__version__,
                                tf32=torch.backends.cuda.matmul.allow_tf32, threads=torch.get_num_threads())

    def timed():
        out = call()
        synchronize(DEVICE)
        return out

    if not benchmark.enabled:  # --benchmark-disable: run the body once, record nothing
        out = benchmark.pedantic(timed, rounds=1, iterations=1)
        _keep_reference(group, impl, out)
        return out
    peak = None
    try:
        if ON_CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        out = timed()  # warm-up: compiles, autotunes, fills caches
        if ON_CUDA:
            peak = torch.cuda.max_memory_allocated() - before
        start = time.perf_counter()
        timed()
        once = time.perf_counter() - start
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_SECONDS / max(once, 1e-9)))))
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        # on a GPU the figures come from device time: CUDA events, one synchronisation in all
        device_s = time_device(call, DEVICE, warmup=1, repeats=rounds) if ON_CUDA else None
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"{impl} ran out of device memory at E={num_experts}, B={batch}: {str(exc).splitlines()[0]}")
    _record(benchmark, group, impl, work, peak, device_s)
    _keep_reference(group, impl, out)
    return out


def group_name(stage: str, kind: str, num_experts: int, batch: int) -> str:
    """One table of the output: every implementation of one stage at one (E, B)."""
    return f"{stage} {kind + ' ' if kind else ''}E={num_experts} B={batch}"


def _keep_reference(group: str, impl: str, out: object) -> None:
    if impl == "reference":
        _REFERENCE_OUTPUT.clear()
        _REFERENCE_OUTPUT[group] = out


def reference_output(stage: str, kind: str, num_experts: int, batch: int, compute: Callable[[], object]) -> object:
    """The reference backend's output on input set 0 of this group: kept from its own case when it ran
    just before (it always runs first in its group), else computed."""
    group = group_name(stage, kind, num_experts, batch)
    return _REFERENCE_OUTPUT[group] if group in _REFERENCE_OUTPUT else compute()


def _record(benchmark, group: str, impl: str, work: Work, peak: int | None, device_s: float | None = None) -> None:
    """Metrics from the device time where there is one (GPU), else from pytest-benchmark's median."""
    wall = benchmark.stats.stats.median
    median = wall if device_s is None else device_s
    ns_per_token = median / work.tokens * 1e9
    if impl == "reference":
        REFERENCE_NS_PER_TOKEN[group] = ns_per_token
    reference = REFERENCE_NS_PER_TOKEN.get(group)
    gflop_per_s = None if work.flops is None else work.flops / median / 1e9
    sgemm = measure_sgemm_gflops(DEVICE, SGEMM_SIZE) if gflop_per_s is not None else None
    info = dict(
        median_s=median,
        timing="cuda-events" if device_s is not None else "wall-clock",
        wall_median_s=wall,
        ns_per_token=ns_per_token,
        tokens_per_s=work.tokens / median,
        gb_per_s=None if work.bytes_moved is None else work.bytes_moved / median / 1e9,
        tflop_per_s=None if work.flops is None else work.flops / median / 1e12,
        gflop_per_s=gflop_per_s,
        sgemm_gflop_per_s=sgemm,
        sgemm_fraction=None if sgemm is None else gflop_per_s / sgemm,
        peak_memory_bytes=peak,
        speedup_vs_reference=None if reference is None else reference / ns_per_token,
    )
    benchmark.extra_info.update(info)
    SUMMARY.append(dict(group=group, impl=impl, tokens=work.tokens, **info))


def check_close(actual, expected, what: str, rtol_rms: float = 1e-3) -> None:
    """A benchmark compares equal work: its output must match the reference (relative RMS; 1e-3 covers
    TF32 when SMOE_BENCH_TF32=1 and reduction-order differences at large E)."""
    actual = actual if isinstance(actual, (tuple, list)) else (actual,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what} output {i}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        a, e = a.detach().double(), e.detach().double()
        err = ((a - e).norm() / e.norm().clamp_min(1e-12)).item()
        assert err <= rtol_rms, f"{what} output {i}: relative RMS error {err:.2e} > {rtol_rms:.0e} against the reference"
