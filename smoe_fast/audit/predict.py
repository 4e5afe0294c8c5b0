"""A predicted time for one compiled kernel at its target shape, from what the compiler produced.

PREDICTED, never measured. The model, per launch:

- occupancy: resident CTAs per SM from registers, shared memory and warps (hardware.ctas_per_sm);
  the grid fills ``min(1, programs / SMs)`` of the GPU, and latency is hidden in proportion to the
  resident warps per SM up to WARPS_TO_HIDE_LATENCY (``latency_hiding``);
- compute: each stage's FLOPs at the rate of the unit the compiled code uses for it: a stage whose
  ``tl.dot`` lowered to mma/wgmma at the tensor-core rate of its precision (TF32 or bf16), one that
  stayed on FMA (IEEE fp32 dots, one-channel convolutions, elementwise work) at the FMA rate, integer
  work at the int32 rate;
- memory: each stream's bytes at its level's bandwidth (HBM; L2 for re-read weights; scratch at L2
  bandwidth while the grid's scratch fits the L2, else HBM). Gathered streams pay their scalar
  amplification in proportion to the share of their own tile accesses (the stream's ``sites``, else
  the whole kernel's) that did not vectorise;
- latency: the longest program's chain of dependent global round trips times GLOBAL_LATENCY_US;
- predicted time = max(compute / (grid fill x latency hiding), memory / (grid fill x latency hiding),
  latency), and ``bound`` names the term that binds. ``ideal_us`` is the roofline of the useful work (useful FLOPs at the
  precision's best unit, compulsory bytes at HBM bandwidth), printed beside it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .hardware import GLOBAL_LATENCY_US, GPUS, WARPS_TO_HIDE_LATENCY, ctas_per_sm
from .inspect import Dot, Site, stage_dots


@dataclass
class Prediction:
    predicted_us: float
    ideal_us: float
    bound: str
    terms: dict
    stage_units: dict


def _dots(record: dict) -> list[Dot]:
    return [Dot(tuple(Site(*s) for s in d["chain"]), d["m"], d["n"], d["k"], d["operand"], d["unit"])
            for d in record.get("dots", [])]


def stage_units(case, record: dict) -> dict[str, dict]:
    """{stage: {"unit": "wgmma"|"mma"|"fma"|"alu", "mma_instructions": n}} for the case's work model."""
    dots = _dots(record)
    named = frozenset(stage.dot for stage in case.work.stages if stage.dot is not None)
    out = {}
    for stage in case.work.stages:
        if stage.dot is None:
            out[stage.name] = {"unit": stage.unit, "mma_instructions": 0}
            continue
        found = stage_dots(dots, stage.dot, stage.occurrence, named - {stage.dot})
        units = {d.unit for d in found}
        unit = "wgmma" if "wgmma" in units else "mma" if "mma" in units else "fma"
        out[stage.name] = {"unit": unit, "mma_instructions": sum(d.mma_instructions() for d in found),
                           "dots": len(found)}
    return out


def vector_fraction(record: dict, sites: tuple[str, ...] | None = None) -> float:
    """Share of the compiled tile accesses that are vectorised; only those made inside one of the
    functions ``sites`` when given (a gathered stream's own loads)."""
    accesses = record.get("accesses", [])
    if sites is not None:
        accesses = [a for a in accesses if any(site[2] in sites for site in a["chain"])]
    if not accesses:
        return 1.0
    return sum(a["vector"] >= 2 for a in accesses) / len(accesses)


def predict(case, record: dict, arch: int, gpu_name: str) -> Prediction:
    gpu = GPUS[gpu_name]
    work = case.work
    ctas, limiter = ctas_per_sm(arch, case.num_warps, max(record.get("registers", 0), 1), record.get("shared_bytes", 0))
    units = stage_units(case, record)
    if ctas == 0:
        return Prediction(float("inf"), float("inf"), "does not fit", {"ctas_per_sm": 0, "limiter": limiter}, units)
    fill = min(1.0, work.programs / gpu.sms)
    resident_warps = min(ctas, max(1, -(-work.programs // gpu.sms))) * case.num_warps
    hiding = min(1.0, resident_warps / WARPS_TO_HIDE_LATENCY)
    tc_rate = gpu.bf16_tflops if case.precision == "bf16" else gpu.tf32_tflops

    compute = {"fma": 0.0, "tc": 0.0, "alu": 0.0}
    for stage in work.stages:
        unit = units[stage.name]["unit"]
        if unit in ("mma", "wgmma"):
            compute["tc"] += stage.flops / (tc_rate * 1e12)
        elif unit == "alu":
            compute["alu"] += stage.flops / (gpu.alu_tops * 1e12)
        else:
            compute["fma"] += stage.flops / (gpu.fma_tflops * 1e12)
    memory = {"hbm": 0.0, "l2": 0.0}
    for stream in work.streams:
        scalar_share = 1.0 - vector_fraction(record, stream.sites)
        amp = 1.0 + (stream.scalar_amp - 1.0) * scalar_share if stream.gather else 1.0
        level = stream.level
        if level == "scratch":
            level = "l2" if work.scratch_bytes <= gpu.l2_bytes else "hbm"
        rate = gpu.hbm_gbps if level == "hbm" else gpu.l2_gbps
        memory[level] += stream.bytes * amp / (rate * 1e9)
    latency = work.serial_steps * GLOBAL_LATENCY_US * 1e-6
    terms = {"compute-fma": compute["fma"], "compute-tc": compute["tc"], "compute-alu": compute["alu"],
             "memory-hbm": memory["hbm"], "memory-l2": memory["l2"], "latency": latency}
    compute_s = sum(compute.values())
    memory_s = max(memory.values())
    # throughput terms scale with the share of the GPU the grid keeps busy; a serial chain does not
    scale = 1.0 / (fill * hiding)
    binding = max((compute_s * scale, "compute"), (memory_s * scale, "memory"), (latency, "latency"))
    predicted = binding[0]
    if binding[1] == "compute":
        bound = max(("compute-fma", "compute-tc", "compute-alu"), key=terms.get)
    elif binding[1] == "memory":
        bound = max(("memory-hbm", "memory-l2"), key=terms.get)
    else:
        bound = "latency"
    if scale > 1.5 and bound != "latency":
        bound += f" (occupancy x{scale:.1f})"
    best_rate = tc_rate if case.precision in ("tf32", "bf16") else gpu.fma_tflops
    ideal = max(work.useful_flops / (best_rate * 1e12), work.compulsory_bytes / (gpu.hbm_gbps * 1e9))
    terms.update(ctas_per_sm=ctas, limiter=limiter, grid_fill=round(fill, 3), latency_hiding=round(hiding, 3))
    return Prediction(predicted * 1e6, ideal * 1e6, bound, terms, units)
