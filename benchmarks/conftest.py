"""Benchmark session set-up: precision and threads, reference-first ordering, the summary table.

Run with ``pytest benchmarks/`` (see README.md). Nothing here sets TRITON_INTERPRET: Triton cases
run on CUDA only and skip on CPU with the reason.
"""
from __future__ import annotations

import gc
import os
import time

import pytest
import torch

import harness

IMPL_ORDER = ("reference", "triton", "cpp")
# Cases behind the DESIGN.md targets first, so a time-limited run measures them before anything else.
TEST_ORDER = ("test_group_by_expert", "test_experts_hard", "test_experts_soft_train", "test_experts_topk_train",
              "test_model_eval_forward", "test_model_train_step", "test_experts_hard_mlp", "test_experts_hard_skewed")
_SESSION_START = time.monotonic()


def pytest_configure(config):
    # IEEE fp32 everywhere unless asked: every path computes the same numbers, so speed-ups compare like with like.
    tf32 = os.environ.get("SMOE_BENCH_TF32", "0") == "1"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    if os.environ.get("SMOE_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["SMOE_BENCH_THREADS"]))


def pytest_collection_modifyitems(session, config, items):
    """Run the target cases first (TEST_ORDER) and, within each table (same test function and parameters
    but the implementation), the reference backend first, so every row's speed-up is known when recorded."""
    first_seen, keyed = {}, []
    for index, item in enumerate(items):
        params = dict(getattr(getattr(item, "callspec", None), "params", {}))
        impl = params.pop("impl", None)
        others = tuple(sorted((k, repr(v)) for k, v in params.items()))
        group = (str(item.path), getattr(item, "originalname", item.name), others)
        first_seen.setdefault(group, index)
        name = getattr(item, "originalname", item.name)
        priority = TEST_ORDER.index(name) if name in TEST_ORDER else len(TEST_ORDER)
        rank = IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)
        keyed.append(((priority, first_seen[group], rank, index), item))
    items[:] = [item for _, item in sorted(keyed, key=lambda pair: pair[0])]


def pytest_runtest_setup(item):
    elapsed = time.monotonic() - _SESSION_START
    if harness.BUDGET_SECONDS is not None and elapsed > harness.BUDGET_SECONDS:
        pytest.skip(f"benchmark time budget spent ({elapsed:.0f} s > SMOE_BENCH_BUDGET_S={harness.BUDGET_SECONDS:.0f})")


@pytest.fixture(autouse=True)
def _release_memory():
    """Free one case's tensors before the next, so peak-memory numbers and big cases do not add up."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fmt(value, spec):
    width = int(spec.split(".")[0])
    return "-".rjust(width) if value is None else format(value, spec)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not harness.SUMMARY:
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"smoe_fast benchmarks on {harness.DEVICE} (device time, median per call)")
    width = max(len(row["group"]) for row in harness.SUMMARY)
    header = (f"{'group':<{width}} {'implementation':<28} {'tokens':>6} {'ms':>9} {'ns/token':>10} {'Mtok/s':>8} "
              f"{'GB/s':>8} {'GFLOP/s':>9} {'%sgemm':>6} {'peak MB':>8} {'x ref':>7}")
    write(header)
    last_group = None
    for row in harness.SUMMARY:
        if last_group is not None and row["group"] != last_group:
            write("")
        last_group = row["group"]
        peak = None if row["peak_memory_bytes"] is None else row["peak_memory_bytes"] / 2 ** 20
        pct_sgemm = None if row["sgemm_fraction"] is None else 100 * row["sgemm_fraction"]
        write(f"{row['group']:<{width}} {row['impl']:<28} {row['tokens']:>6d} {row['median_s'] * 1e3:>9.3f} "
              f"{row['ns_per_token']:>10.1f} {row['tokens_per_s'] / 1e6:>8.3f} {_fmt(row['gb_per_s'], '8.2f')} "
              f"{_fmt(row['gflop_per_s'], '9.1f')} {_fmt(pct_sgemm, '6.1f')} {_fmt(peak, '8.1f')} "
              f"{_fmt(row['speedup_vs_reference'], '7.2f')}")
    write("x ref: time per token of the reference backend in the same run / this row's (higher is faster).")
    ceilings = sorted({row["sgemm_gflop_per_s"] for row in harness.SUMMARY if row["sgemm_gflop_per_s"] is not None})
    if ceilings:
        write(f"%sgemm: the row's useful GFLOP/s / a {harness.SGEMM_SIZE}^3 fp32 torch.mm timed in this session at "
              f"the same thread count ({', '.join(f'{g:.1f}' for g in ceilings)} GFLOP/s).")
