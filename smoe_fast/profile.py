"""``smoe-fast profile``: how the expert stage scales with the number of experts, per backend.

Sweeps E (and optionally B) at fixed tokens for each backend and stage, times the device (CUDA
events, or synchronise + perf_counter on CPU; warm-up first, median of repeats, inputs rotated), and
prints a table with the time per token, tokens/s, achieved GB/s for the bytes the stage must move,
GFLOP/s of the useful work, that rate as a fraction of the process's own sgemm ceiling (an n^3 fp32
``torch.mm`` timed in the same process at the same thread count, :func:`measure.measure_sgemm_gflops`)
and the speed-up over the reference backend. ``--threads 1,2`` sweeps CPU thread counts in one process
(thread scaling). ``--csv`` and ``--plot`` write the same numbers
as a CSV file and a log-log PNG of time per token against E with the memory-bandwidth floor
(bytes per token / copy bandwidth measured on the device; on known GPUs also the data-sheet figure).

Stages (all through :mod:`smoe_fast.ops`):

| stage | what is timed                                            | useful FLOPs           |
|-------|----------------------------------------------------------|------------------------|
| hard  | ``experts_hard`` forward, no grad (inference)            | B * F                  |
| soft  | ``experts_soft`` forward + backward (z, gates, weights)  | 3 * B * E * F          |
| topk  | ``experts_topk`` forward + backward, k = ``--top-k``     | 3 * B * k * F          |

F is one expert on one token; timing and the work model are :mod:`smoe_fast.measure`'s.

>>> smoe-fast profile --device cpu --csv profile.csv --plot profile.png
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from . import ops
from .backends import BackendUnavailableError, resolve_backend
from .experts import random_weights
from .measure import (STAGES, device_name, known_bandwidth, measure_copy_bandwidth, measure_sgemm_gflops,
                      random_routing, stage_bytes, stage_flops, time_device)

BACKENDS = ("reference", "triton", "cpp")
DEFAULT_EXPERTS = {"cpu": (1, 8, 64, 256), "cuda": (1, 8, 64, 256, 1024)}
# Tokens per stage: hard at the DESIGN.md target size; the training stages at sizes whose reference
# run stays within seconds (soft work grows with B*E).
DEFAULT_BATCH = {"cpu": {"hard": 1024, "soft": 1024, "topk": 1024},
                 "cuda": {"hard": 65536, "soft": 1024, "topk": 8192}}
# Soft gating runs every expert on every token: points with B*E above this are skipped, with the reason.
DEFAULT_MAX_SOFT_PAIRS = {"cpu": 1 << 16, "cuda": 1 << 18}
# Side of the square fp32 matmul that measures the compute ceiling (cpu: 17 GFLOP, ~0.14 s on 2 cores).
DEFAULT_SGEMM_SIZE = {"cpu": 2048, "cuda": 8192}


def build_stage(stage: str, backend: str, batch: int, num_experts: int, kind: str, device: torch.device,
                latent_dim: int = 32, hidden_dim: int = 256, top_k: int = 2, routing: str = "uniform",
                input_sets: int = 3, seed: int = 0) -> tuple[Callable[[], object], int]:
    """A zero-argument callable running one stage call (cycling through ``input_sets`` pre-generated
    inputs) and the number of distinct experts the routing touches (averaged over the sets)."""
    g = torch.Generator().manual_seed(seed)
    weights = random_weights(kind, num_experts, latent_dim, hidden_dim, device=device, seed=seed,
                             requires_grad=stage != "hard")
    params = list(weights.values())
    sets, touched = [], []
    for _ in range(input_sets):
        z = torch.randn(batch, latent_dim, generator=g).to(device)
        grad_out = torch.rand(batch, 1, 28, 28, generator=g).to(device)
        if stage == "hard":
            idx = random_routing(batch, num_experts, routing, g).to(device)
            sets.append((z, idx))
        elif stage == "soft":
            logits = torch.randn(batch, num_experts, generator=g)
            if routing == "skewed":
                logits = logits - torch.arange(num_experts) / 4.0
            idx = logits.argmax(-1)
            sets.append((z.requires_grad_(), logits.softmax(-1).to(device).requires_grad_(), grad_out))
        else:
            idx = random_routing(batch, num_experts, routing, g, top_k=top_k)
            gates = torch.rand(batch, top_k, generator=g) + 0.1
            gates = (gates / gates.sum(-1, keepdim=True)).to(device).requires_grad_()
            sets.append((z.requires_grad_(), idx.to(device), gates, grad_out))
        touched.append(num_experts if stage == "soft" else int(torch.unique(idx).numel()))
    counter = [0]

    def call():
        inputs = sets[counter[0] % len(sets)]
        counter[0] += 1
        if stage == "hard":
            z, idx = inputs
            with torch.no_grad():
                return ops.experts_hard(z, idx, weights, kind=kind, backend=backend, check_indices=False)
        if stage == "soft":
            z, gates, grad_out = inputs
            y = ops.experts_soft(z, gates, weights, kind=kind, backend=backend)
            return torch.autograd.grad(y, [z, gates, *params], grad_out)
        z, idx, gates, grad_out = inputs
        y = ops.experts_topk(z, idx, gates, weights, kind=kind, backend=backend, check_indices=False)
        return torch.autograd.grad(y, [z, gates, *params], grad_out)

    return call, round(statistics.mean(touched))


# ----------------------------------------------------------------------------- the sweep
@dataclass
class Row:
    device: str
    kind: str
    stage: str
    backend: str
    num_experts: int
    batch: int
    status: str                      # "ok" or "skipped: <reason>"
    threads: int | None = None       # torch CPU threads the point ran with
    seconds: float | None = None     # median per call
    ns_per_token: float | None = None
    tokens_per_s: float | None = None
    bytes_moved: int | None = None
    gb_per_s: float | None = None
    tflop_per_s: float | None = None
    gflop_per_s: float | None = None          # useful FLOPs / seconds / 1e9
    sgemm_gflop_per_s: float | None = None    # the ceiling: fp32 torch.mm measured in this process, same threads
    sgemm_fraction: float | None = None       # gflop_per_s / sgemm_gflop_per_s
    floor_ns_per_token: float | None = None   # bytes per token / measured copy bandwidth
    speedup_vs_reference: float | None = None


def _csv_list(text: str, cast=str) -> list:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``smoe-fast profile``."""
    parser.description = ("Time the expert stage against the number of experts for each backend; print a table and "
                          "optionally write a CSV and a log-log plot with the memory-bandwidth floor.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to profile (default: cuda if available, else cpu)")
    parser.add_argument("--backends", type=lambda s: _csv_list(s), default=None,
                        help="comma-separated backends from reference,triton,cpp (default: all; unavailable ones are "
                             "listed as skipped with the reason)")
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="hard",
                        help="hard: inference forward; soft/topk: training forward + backward; all: the three")
    parser.add_argument("--decoder", choices=("lite", "medium", "mlp"), default="lite", help="expert decoder kind")
    parser.add_argument("--experts", type=lambda s: _csv_list(s, int), default=None,
                        help="comma-separated numbers of experts (default cpu: 1,8,64,256; cuda: 1,8,64,256,1024)")
    parser.add_argument("--batch", type=lambda s: _csv_list(s, int), default=None,
                        help="comma-separated token counts B (default cpu: 1024; cuda: 65536 hard, 1024 soft, "
                             "8192 topk)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token for --stage topk")
    parser.add_argument("--routing", choices=("uniform", "skewed"), default="uniform",
                        help="uniform random experts, or skewed (expert e favoured by 2^(-e/4))")
    parser.add_argument("--latent-dim", type=int, default=32, help="latent size L")
    parser.add_argument("--hidden-dim", type=int, default=256, help="hidden size of the mlp decoder")
    parser.add_argument("--max-soft-pairs", type=int, default=None,
                        help="skip soft points with B*E above this (default cpu: 65536; cuda: 262144)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per point; the median is reported "
                        "(default cpu: 3; cuda: 10)")
    parser.add_argument("--threads", type=lambda s: _csv_list(s, int), default=None,
                        help="comma-separated CPU thread counts for torch and the C++ backend, each point timed at "
                             "each (e.g. 1,2: thread scaling in one process; default: torch's own choice)")
    parser.add_argument("--sgemm-size", type=int, default=None,
                        help="n of the n^3 fp32 torch.mm that measures the compute ceiling behind the %%sgemm column "
                             "(0: not measured; default cpu: 2048, cuda: 8192)")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 in matmuls and convolutions (default: IEEE fp32 on every backend, so the "
                             "comparison is like with like)")
    parser.add_argument("--copy-mb", type=int, default=256,
                        help="size of the copy that measures the bandwidth floor (0: no floor)")
    parser.add_argument("--csv", type=Path, default=None, help="write the rows to this CSV file")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write a log-log PNG of time per token against E")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--distributed", action="store_true",
                        help="under torchrun: expert parallelism (shard_experts), all-to-all bytes and time per step "
                             "next to the experts' time (smoe_fast.profile_distributed)")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_COLUMNS = (("stage", 5, "s"), ("backend", 9, "s"), ("E", 5, "d"), ("B", 6, "d"), ("thr", 3, "d"),
                 ("ms", 9, ".3f"), ("ns/token", 10, ".1f"), ("Mtok/s", 8, ".2f"), ("GB/s", 8, ".1f"),
                 ("%floor", 6, ".0f"), ("GFLOP/s", 9, ".1f"), ("%sgemm", 6, ".1f"), ("x ref", 7, ".2f"))


def format_header() -> str:
    return "  ".join(f"{name:>{width}}" for name, width, _ in TABLE_COLUMNS)


def format_row(row: Row) -> str:
    if row.status != "ok":
        head = [f"{row.stage:>5}", f"{row.backend:>9}", f"{row.num_experts:>5d}", f"{row.batch:>6d}",
                f"{_fmt(row.threads, 'd'):>3}"]
        return "  ".join(head) + "  " + row.status
    pct = None if row.floor_ns_per_token is None else 100 * row.floor_ns_per_token / row.ns_per_token
    pct_sgemm = None if row.sgemm_fraction is None else 100 * row.sgemm_fraction
    values = (row.stage, row.backend, row.num_experts, row.batch, row.threads, row.seconds * 1e3, row.ns_per_token,
              row.tokens_per_s / 1e6, row.gb_per_s, pct, row.gflop_per_s, pct_sgemm, row.speedup_vs_reference)
    return "  ".join(f"{_fmt(v, spec):>{width}}" for v, (_, width, spec) in zip(values, TABLE_COLUMNS))


def _available_backends(names: list[str], device: torch.device) -> dict[str, str | None]:
    """{backend: None if it runs here, else the reason it does not}."""
    status = {}
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r} in --backends; expected some of {', '.join(BACKENDS)}")
        try:
            resolve_backend(name, device)
            status[name] = None
        except BackendUnavailableError as exc:
            status[name] = str(exc)
        if name == "triton" and device.type == "cpu" and status[name] is None:
            status[name] = "the Triton interpreter on CPU measures Python, not kernels; profile triton with --device cuda"
    return status


def thread_counts(args: argparse.Namespace, device: torch.device) -> list[int | None]:
    """The CPU thread counts to time each point at; [None] (leave torch's setting) on CUDA or when not given."""
    return list(args.threads) if args.threads and device.type == "cpu" else [None]


def set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def measure_ceilings(args: argparse.Namespace, device: torch.device) -> dict[int | None, float]:
    """{thread count: sgemm GFLOP/s} measured in this process (empty with --sgemm-size 0)."""
    n = DEFAULT_SGEMM_SIZE[device.type] if args.sgemm_size is None else args.sgemm_size
    ceilings = {}
    if n <= 0:
        return ceilings
    for threads in thread_counts(args, device):
        set_threads(threads)
        ceilings[threads] = measure_sgemm_gflops(device, n)
        print(f"sgemm ceiling: {n}^3 fp32 torch.mm at {ceilings[threads]:.1f} GFLOP/s on {device_name(device)} "
              f"(this process; %sgemm = GFLOP/s of the useful work / this)")
    return ceilings


def sweep(args: argparse.Namespace, device: torch.device, copy_gbps: float | None, progress: bool,
          ceilings: dict[int | None, float] | None = None) -> list[Row]:
    """Run every (stage, backend, E, B, threads) point; rows print as they finish. Thread counts are
    innermost, so a thread-scaling ratio compares runs taken seconds apart."""
    from tqdm.auto import tqdm

    stages = list(STAGES) if args.stage == "all" else [args.stage]
    experts = args.experts or list(DEFAULT_EXPERTS[device.type])
    max_soft = args.max_soft_pairs or DEFAULT_MAX_SOFT_PAIRS[device.type]
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    backends = _available_backends(args.backends or list(BACKENDS), device)
    ceilings = ceilings or {}
    points = [(stage, backend, E, B, threads) for stage in stages
              for B in (args.batch or [DEFAULT_BATCH[device.type][stage]])
              for E in experts for backend in backends for threads in thread_counts(args, device)]
    rows, reference_seconds = [], {}
    for backend, reason in backends.items():
        if reason is not None:
            print(f"skipped backend {backend}: {reason}")
    print(format_header())
    bar = tqdm(total=len(points), desc="profile", unit="point", file=sys.stderr, disable=not progress, leave=False)
    for stage, backend, E, B, threads in points:
        bar.set_postfix_str(f"{stage} {backend} E={E} B={B}" + ("" if threads is None else f" threads={threads}"))
        set_threads(threads)
        row = Row(device_name(device), args.decoder, stage, backend, E, B, "ok",
                  threads=torch.get_num_threads() if device.type == "cpu" else None)
        if backends[backend] is not None:
            row.status = f"skipped: {backends[backend]}"
        elif stage == "soft" and B * E > max_soft:
            row.status = (f"skipped: soft gating runs all E experts on all B tokens; "
                          f"B*E={B * E} > --max-soft-pairs {max_soft}")
        elif stage == "topk" and not 1 <= args.top_k <= E:
            row.status = f"skipped: top-k needs 1 <= k={args.top_k} <= E"
        else:
            _measure(row, args, device, repeats, copy_gbps, ceilings.get(threads))
            if backend == "reference" and row.seconds is not None:
                reference_seconds[(stage, E, B, threads)] = row.seconds
            if row.seconds is not None and (stage, E, B, threads) in reference_seconds:
                row.speedup_vs_reference = reference_seconds[(stage, E, B, threads)] / row.seconds
        rows.append(row)
        if backends[backend] is None:
            bar.write(format_row(row), file=sys.stdout)
        bar.update()
    bar.close()
    return rows


def _measure(row: Row, args, device: torch.device, repeats: int, copy_gbps: float | None,
             sgemm_gflops: float | None = None) -> None:
    stage, E, B = row.stage, row.num_experts, row.batch
    try:
        call, touched = build_stage(stage, row.backend, B, E, args.decoder, device, args.latent_dim, args.hidden_dim,
                                    args.top_k, args.routing)
        seconds = time_device(call, device, warmup=args.warmup, repeats=repeats)
    except torch.cuda.OutOfMemoryError as exc:
        row.status = f"skipped: out of device memory ({str(exc).splitlines()[0]})"
        torch.cuda.empty_cache()
        return
    moved = stage_bytes(stage, B, E, touched, args.decoder, args.latent_dim, args.hidden_dim, args.top_k)
    row.seconds, row.bytes_moved = seconds, moved
    row.ns_per_token = seconds / B * 1e9
    row.tokens_per_s = B / seconds
    row.gb_per_s = moved / seconds / 1e9
    flops = stage_flops(stage, B, E, args.decoder, args.latent_dim, args.hidden_dim, args.top_k)
    row.gflop_per_s = flops / seconds / 1e9
    row.tflop_per_s = row.gflop_per_s / 1e3
    if sgemm_gflops:
        row.sgemm_gflop_per_s = sgemm_gflops
        row.sgemm_fraction = row.gflop_per_s / sgemm_gflops
    if copy_gbps:
        row.floor_ns_per_token = moved / B / copy_gbps


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    tmp.replace(path)


def write_plot(rows: list[Row], path: Path, device: torch.device, copy_gbps: float | None, args) -> str | None:
    """Log-log time per token against E; returns a note when no data-sheet floor could be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    series = sorted({(r.stage, r.batch, r.backend) for r in ok}, key=lambda s: (s[0], s[1], BACKENDS.index(s[2])))
    multi = len({(s[0], s[1]) for s in series}) > 1
    markers = {"reference": "o", "triton": "s", "cpp": "^"}
    for stage, batch, backend in series:
        pts = sorted((r.num_experts, r.ns_per_token) for r in ok if (r.stage, r.batch, r.backend) == (stage, batch, backend))
        label = f"{backend} ({stage}, B={batch})" if multi else backend
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(backend, "o"), label=label)
    note = None
    spec = known_bandwidth(device)
    for stage, batch in sorted({(s[0], s[1]) for s in series}):
        pts = sorted({(r.num_experts, r.bytes_moved / r.batch) for r in ok if (r.stage, r.batch) == (stage, batch)})
        suffix = f" ({stage}, B={batch})" if multi else ""
        if copy_gbps:
            ax.plot([p[0] for p in pts], [p[1] / copy_gbps for p in pts], "k--", linewidth=1,
                    label=f"bandwidth floor, measured copy {copy_gbps:.0f} GB/s{suffix}")
        if spec:
            ax.plot([p[0] for p in pts], [p[1] / spec[1] for p in pts], "k:", linewidth=1,
                    label=f"bandwidth floor, data sheet {spec[1]:.0f} GB/s{suffix}")
    if device.type == "cuda" and spec is None:
        note = f"no data-sheet bandwidth known for {device_name(device)}; only the measured floor is drawn"
    ax.set_xscale("log", base=2)
    experts = sorted({r.num_experts for r in ok})
    if experts:
        ax.set_xticks(experts, [str(e) for e in experts])
    ax.set_yscale("log")
    ax.set_xlabel("number of experts E")
    ax.set_ylabel("time per token (ns, device time, median)")
    stages = ", ".join(sorted({r.stage for r in ok})) or args.stage
    batches = ", ".join(str(b) for b in sorted({r.batch for r in ok}))
    ax.set_title(f"smoe_fast expert stage ({stages}; {args.decoder} decoder; B={batches}; {args.routing} routing)\n"
                 f"on {device_name(device)}, torch {torch.__version__}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ok:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no backend could run", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return note


def run(args: argparse.Namespace) -> int:
    """Run ``smoe-fast profile``; returns the exit status (0 when at least one point was measured)."""
    if getattr(args, "distributed", False):
        from .profile_distributed import run as run_distributed

        return run_distributed(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was requested but torch sees no CUDA GPU; use --device cpu", file=sys.stderr)
        return 2
    for name in ("experts", "batch", "threads"):
        values = getattr(args, name)
        if values is not None and (not values or min(values) < 1):
            print(f"error: --{name} needs positive integers, got {values}", file=sys.stderr)
            return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    set_threads(thread_counts(args, device)[0])
    print(f"device: {device_name(device)}; decoder {args.decoder}; routing {args.routing}; "
          f"{'TF32' if args.tf32 else 'IEEE fp32'}; torch {torch.__version__}")
    copy_gbps = measure_copy_bandwidth(device, args.copy_mb) if args.copy_mb > 0 else None
    spec = known_bandwidth(device)
    print("bandwidth: " + (f"measured copy {copy_gbps:.1f} GB/s" if copy_gbps else "not measured (--copy-mb 0)")
          + (f"; data sheet {spec[1]:.0f} GB/s ({spec[0]})" if spec else ""))
    ceilings = measure_ceilings(args, device)
    try:
        rows = sweep(args, device, copy_gbps, progress=not args.no_progress, ceilings=ceilings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        note = write_plot(rows, args.plot, device, copy_gbps, args)
        print(f"wrote {args.plot}" + (f" ({note})" if note else ""))
    measured = sum(r.status == "ok" for r in rows)
    if measured == 0:
        print("error: no point could be measured (every backend was skipped; see the reasons above)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smoe-fast profile")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
