"""``smoe-fast audit``: GPU evidence without a GPU.

Compiles every kernel configuration a launcher in kernels/ can choose (cases.py) for each ``--arch``
with Triton's ahead-of-time path, reads ptxas's report, the PTX and the TTGIR (inspect.py), and
reports one row per (kernel, config, arch): warps, registers, spills (stores / loads), shared memory
against the arch's per-block limit, resident CTAs per SM, tensor-core instructions per GEMM-shaped
stage, the share of tile accesses that are vectorised, and a PREDICTED time at the DESIGN.md target
shape on a named GPU beside the ideal roofline (predict.py; every predicted figure is a model of the
compiled code, not a measurement: only a GPU measures). The CUDA sources get nvcc's resource rows.

>>> from smoe_fast import audit
>>> rows = audit.run_audit(archs=(90,), gpu="h100")
>>> [r for r in rows if r.kernel.startswith("_group_by_expert")][0].spill_bytes
0
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import asdict, dataclass, field

from .hardware import ARCHS, DEFAULT_ARCHS, GPUS, arch_number

__all__ = ["AuditRow", "MODEL_KERNEL", "STEP_KERNEL", "run_audit", "format_table", "write_csv", "add_arguments", "run", "can_compile", "CSV_COLUMNS"]


def can_compile() -> bool:
    """True when the installed triton has its ahead-of-time NVIDIA compiler (no GPU needed)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception:
        return False
    return True

CSV_COLUMNS = ["kernel", "op", "config", "arch", "num_warps", "registers", "spill_bytes", "spill_kind", "shared_bytes",
               "shared_limit_bytes", "fits", "ctas_per_sm", "occupancy_limiter", "mma_instructions", "tc_stages",
               "fma_stages", "vector_access_fraction", "predicted_us", "ideal_us", "bound", "gpu", "shape",
               "compile_s", "cached", "error"]


@dataclass
class AuditRow:
    kernel: str
    op: str
    config: str
    arch: str
    num_warps: int
    registers: int = -1
    spill_bytes: int = -1
    spill_kind: str = ""
    shared_bytes: int = -1
    shared_limit_bytes: int = 0
    fits: bool = False
    ctas_per_sm: int = 0
    occupancy_limiter: str = ""
    mma_instructions: int = 0
    tc_stages: str = ""
    fma_stages: str = ""
    vector_access_fraction: float = 0.0
    predicted_us: float = float("nan")
    ideal_us: float = float("nan")
    bound: str = ""
    gpu: str = ""
    shape: str = ""
    compile_s: float = 0.0
    cached: bool = False
    error: str = ""
    stages: dict = field(default_factory=dict, repr=False)
    accesses: list = field(default_factory=list, repr=False)


def _spill_kind(stores: int, loads: int) -> str:
    return {(False, False): "none", (True, False): "stores", (False, True): "loads"}.get(
        (stores > 0, loads > 0), "stores+loads")


def _row(case, record: dict, arch: int, gpu: str) -> AuditRow:
    from .predict import predict, vector_fraction

    name = case.kernel.split(":")[1]
    row = AuditRow(name, case.op, case.config, ARCHS[arch].name, case.num_warps,
                   shared_limit_bytes=ARCHS[arch].shared_per_block, gpu=gpu, shape=case.work.shape)
    if not record.get("ok"):
        row.error = record.get("error", "did not compile")
        return row
    stores, loads = max(0, record["spill_stores"]), max(0, record["spill_loads"])
    row.registers = record["registers"]
    row.spill_bytes = stores + loads
    row.spill_kind = _spill_kind(stores, loads)
    row.shared_bytes = record["shared_bytes"]
    row.fits = row.shared_bytes <= row.shared_limit_bytes
    row.mma_instructions = record["ptx"]["mma"] + record["ptx"]["wgmma"]
    row.vector_access_fraction = round(vector_fraction(record), 3)
    row.compile_s = record.get("seconds", 0.0)
    row.cached = record.get("cached", False)
    prediction = predict(case, record, arch, gpu)
    row.ctas_per_sm = prediction.terms["ctas_per_sm"]
    row.occupancy_limiter = prediction.terms["limiter"]
    row.predicted_us = round(prediction.predicted_us, 2)
    row.ideal_us = round(prediction.ideal_us, 2)
    row.bound = prediction.bound
    row.stages = prediction.stage_units
    tc = [f"{s}:{u['unit']}x{u['mma_instructions']}" for s, u in prediction.stage_units.items()
          if u["unit"] in ("mma", "wgmma")]
    row.tc_stages = " ".join(tc)
    row.fma_stages = " ".join(s for s, u in prediction.stage_units.items() if u["unit"] == "fma")
    row.accesses = record.get("accesses", [])
    return row


def _nvcc_rows(archs, cache_dir: str) -> list[AuditRow]:
    from .compile import nvcc_resources

    csrc = os.path.join(os.path.dirname(os.path.dirname(__file__)), "csrc")
    if not os.path.isdir(csrc):
        import smoe_fast.csrc as package  # the installed location

        csrc = os.path.dirname(package.__file__)
    rows = []
    for r in nvcc_resources(archs, csrc, cache_dir):
        arch = r["arch"]
        stores, loads = max(0, r.get("spill_stores", 0)), max(0, r.get("spill_loads", 0))
        rows.append(AuditRow(r["kernel"], f"cuda {r['source']}", "nvcc -O3", ARCHS[arch].name, 0,
                             registers=r.get("registers", -1), spill_bytes=stores + loads,
                             spill_kind=_spill_kind(stores, loads), shared_bytes=r.get("shared_bytes", 0),
                             shared_limit_bytes=ARCHS[arch].shared_per_block,
                             fits=r.get("shared_bytes", 0) <= ARCHS[arch].shared_per_block,
                             mma_instructions=r.get("mma_instructions", 0),
                             bound="(not modelled)", error=r.get("error", "")))
    return rows


MODEL_KERNEL = "SMoEVAE.eval"
# the precision labels of the hard-gated rows -> (tensor-core rate or None for the FMA units, bytes per element)
_MODEL_PRECISIONS = {"fp32/ieee": (None, 4), "fp32/tf32": ("tf32", 4), "bf16": ("bf16", 2), "fp16": ("bf16", 2)}


def _model_rows(rows: list[AuditRow], gpu_name: str, encoder: str = "medium") -> list[AuditRow]:
    """One whole-model row per (arch, hard-gated decoder kind, precision): an eval forward of
    SMoEVAE(encoder="medium") at B = 65,536, E = 64 is the encoder and gate (as torch runs them, layer
    by layer: their FLOPs at the precision's peak or their activations at HBM bandwidth, whichever
    binds; a roofline, so an optimistic figure), plus grouping and the experts kernel as predicted
    above from the compiled code. ``bound`` says which share of the predicted time the experts take."""
    from . import work as W

    gpu = GPUS[gpu_name]
    enc_flops = sum(W.encoder_flops(encoder).values()) * W.HARD_B
    grouping_shape = f"N={W.HARD_B} E={W.HARD_E}"
    out = []
    for arch in dict.fromkeys(r.arch for r in rows):
        grouping = {}
        for r in rows:
            if r.arch == arch and r.shape == grouping_shape and r.op.startswith("grouping") and not r.error:
                grouping.setdefault(r.op, r.predicted_us)
        chosen = {}
        for r in rows:
            label = r.config.rsplit(",", 1)[-1]
            if r.arch != arch or not r.op.startswith("hard ") or r.error or label not in _MODEL_PRECISIONS:
                continue
            # the first row of an op is its default config at the target bucket, unless a folded lite
            # row follows: at the target shape the launcher folds (kernels/lite_folded.fold_pays)
            if (r.op, label) not in chosen or r.config.startswith("FOLD=1"):
                chosen[r.op, label] = r
        for (_, label), r in chosen.items():
            unit, elem = _MODEL_PRECISIONS[label]
            rate = {None: gpu.fma_tflops, "tf32": gpu.tf32_tflops, "bf16": gpu.bf16_tflops}[unit]
            compute_us = 1e6 * enc_flops / (rate * 1e12)
            memory_us = 1e6 * W.HARD_B * W.encoder_bytes(encoder, elem) / (gpu.hbm_gbps * 1e9)
            enc_us = max(compute_us, memory_us)
            experts_us = r.predicted_us + sum(grouping.values())
            total = enc_us + experts_us
            out.append(AuditRow(MODEL_KERNEL, f"model eval {r.op[5:]}", f"encoder {encoder},{label}", arch, 0,
                                fits=r.fits, ctas_per_sm=r.ctas_per_sm, cached=r.cached, predicted_us=round(total, 2),
                                ideal_us=round(enc_us + r.ideal_us, 2), gpu=gpu_name, shape=r.shape,
                                bound=f"experts {100 * experts_us / total:.0f}% (encoder+gate {enc_us:.0f} us: "
                                      f"{'HBM' if memory_us > compute_us else (unit or 'fma') + ' peak'} roofline)"))
    return out


STEP_KERNEL = "training step"


def _step_rows(rows: list[AuditRow]) -> list[AuditRow]:
    """One row per (arch, soft / top-k, fused kind, precision): the training step's experts, forward +
    backward, as the sum of the two compiled kernels' predictions (DESIGN.md: the soft step at
    B = 1,024, E = 256 within 2x of its roofline, i.e. at least half of it)."""
    out = []
    for arch in dict.fromkeys(r.arch for r in rows):
        first = {}
        for r in rows:
            if r.arch == arch and not r.error and r.op.split(" ")[0] in ("soft", "topk") and len(r.op.split(" ")) == 3:
                first.setdefault((r.op, r.config.rsplit(",", 1)[-1]), r)
        for (op, label), fwd in first.items():
            gating, direction, kind = op.split(" ")
            bwd = first.get((f"{gating} bwd {kind}", label))
            if direction != "fwd" or bwd is None:
                continue
            predicted, ideal = fwd.predicted_us + bwd.predicted_us, fwd.ideal_us + bwd.ideal_us
            out.append(AuditRow(STEP_KERNEL, f"{gating} step {kind}", f"fwd+bwd,{label}", arch, 0,
                                fits=fwd.fits and bwd.fits, predicted_us=round(predicted, 2), ideal_us=round(ideal, 2),
                                gpu=fwd.gpu, shape=fwd.shape, cached=fwd.cached and bwd.cached,
                                bound=f"{predicted / ideal:.1f}x the roofline (fwd {fwd.predicted_us:.0f} us, "
                                      f"bwd {bwd.predicted_us:.0f} us)"))
    return out


def run_audit(archs=DEFAULT_ARCHS, gpu: str = "h100", full: bool = False, cache_dir: str | None = None,
              cuda_sources: bool = True) -> list[AuditRow]:
    """Compile (or read from the cache) every case for each arch; one :class:`AuditRow` per case."""
    from .cases import all_cases
    from .compile import compile_all, default_cache_dir

    archs = tuple(arch_number(a) for a in archs)
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; expected one of {', '.join(GPUS)}")
    cache_dir = cache_dir or default_cache_dir()
    records = compile_all(archs, full, cache_dir)
    rows = []
    for arch in archs:
        cases = all_cases(arch, full)
        if len(records[arch]) != len(cases):
            raise RuntimeError(f"sm_{arch}: the compile worker returned {len(records[arch])} records for "
                               f"{len(cases)} cases")
        rows += [_row(case, record, arch, gpu) for case, record in zip(cases, records[arch])]
    rows += _model_rows(rows, gpu) + _step_rows(rows)
    if cuda_sources:
        rows += _nvcc_rows(archs, cache_dir)
    return rows


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "~"


def format_table(rows: list[AuditRow]) -> str:
    """The human table: predicted figures are labelled as predictions."""
    head = (f"{'kernel / op':<30} {'config':<44} {'arch':<6} {'w':>2} {'regs':>4} {'spill':>6} "
            f"{'smem KB':>8} {'fits':>4} {'cta/SM':>6} {'mma':>5} {'vec':>4} {'pred us':>9} {'ideal us':>9}  bound")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.error:
            lines.append(f"{_short(r.op, 30):<30} {_short(r.config, 44):<44} {r.arch:<6} ERROR: {_short(r.error, 80)}")
            continue
        if r.kernel in (MODEL_KERNEL, STEP_KERNEL):  # no compiled kernel of its own: only the predicted times
            lines.append(f"{_short(r.op, 30):<30} {_short(r.config, 44):<44} {r.arch:<6} {'':>52} "
                         f"{r.predicted_us:>9.1f} {r.ideal_us:>9.1f}  {r.bound}")
            continue
        smem = f"{r.shared_bytes / 1024:.1f}/{r.shared_limit_bytes // 1024}"
        pred = "-" if r.predicted_us != r.predicted_us else f"{r.predicted_us:.1f}"
        ideal = "-" if r.ideal_us != r.ideal_us else f"{r.ideal_us:.1f}"
        lines.append(f"{_short(r.op, 30):<30} {_short(r.config, 44):<44} {r.arch:<6} {r.num_warps:>2} {r.registers:>4} "
                     f"{r.spill_bytes:>6} {smem:>8} {'yes' if r.fits else 'NO':>4} {r.ctas_per_sm:>6} "
                     f"{r.mma_instructions:>5} {r.vector_access_fraction:>4.2f} {pred:>9} {ideal:>9}  {r.bound}")
    lines.append("pred us / ideal us: PREDICTED at the DESIGN.md target shape (see `shape` in the CSV) from the "
                 "compiled code; not measured. vec: share of tile loads/stores vectorised (TTGIR layouts).")
    return "\n".join(lines)


def write_csv(rows: list[AuditRow], path: str) -> None:
    """Write the rows atomically (a temporary file renamed over ``path``)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``smoe-fast audit`` options (smoe_fast/cli.py's command protocol)."""
    parser.description = __doc__.split("\n\n")[1].replace("\n", " ")
    parser.add_argument("--arch", nargs="+", default=[f"sm_{a}" for a in DEFAULT_ARCHS],
                        help=f"archs to compile for, from {', '.join(a.name for a in ARCHS.values())}")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="the GPU of the predicted times")
    parser.add_argument("--full", action="store_true",
                        help="every config: also the autotune candidates, fp16 and int32 indices (slower); "
                             "without it, the covering set CI checks")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="compile cache (unset: $SMOE_FAST_CACHE_DIR/audit or ~/.cache/smoe_fast/audit)")
    parser.add_argument("--no-cuda-sources", action="store_true", help="skip the nvcc rows of csrc/*.cu")


def run(args: argparse.Namespace) -> int:
    """Run the audit for the parsed options; print the table, write the CSV; the exit status."""
    try:
        rows = run_audit(args.arch, args.gpu, args.full, args.cache_dir, not args.no_cuda_sources)
    except (ValueError, RuntimeError) as exc:
        print(f"smoe-fast audit: {exc}", file=sys.stderr)
        return 2
    from .memory import format_memory, memory_rows

    print(format_table(rows))
    print()
    print(format_memory(memory_rows()))
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {len(rows)} rows to {args.csv}")
    return 0
