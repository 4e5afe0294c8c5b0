"""``smoe-fast reproduce``: the paper's experiments, resumable, with a report next to the published numbers.

Experiments (shared/PAPER.md), each a set of training runs on one data source:

| experiment | runs | what it answers |
|---|---|---|
| sweep | unsupervised, every data fraction x every E | test SSE vs ACTIVE experts per data set size (the main figure) |
| routing | at the largest fraction, E = number of classes: unsupervised, supervised (authors' CE gate), label | does unsupervised routing beat the supervised baseline? |
| collapse | at the largest fraction, every E > 1 with ``revive_dead_experts`` | how many experts survive, with and without reviving dead ones |
| analysis | the unsupervised run at the largest fraction with E = ``--analysis-experts`` | separability experts vs classes, sub-styles, per-expert tuning, t-SNE |

Layout of ``--out``::

    runs/<run>/checkpoint.pt, metrics.jsonl, config.json   written by smoe_fast.vae.train
    runs/<run>/result.json                                 written atomically when the run is finished
    results.json, report.md, figures/*.png                 rewritten after every run and at the end

A finished run (``result.json`` present) is skipped on restart; an interrupted run resumes from its
last epoch checkpoint. Re-running a finished command only redraws the report.

>>> parser = argparse.ArgumentParser(); add_arguments(parser)
>>> run(parser.parse_args(["--preset", "quick", "--out", "runs/quick"]))
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from .data import DATA_SOURCES

# --------------------------------------------------------------------------- published numbers (PAPER.md)
# Final test SSE per image by ACTIVE experts: fraction -> train size, 1 expert, 5 active, best (active, SSE).
PUBLISHED_SSE = {
    0.05: {"train_size": 17_500, "1": 23.97, "5": 22.53, "best": (3, 22.09)},
    0.10: {"train_size": 35_000, "1": 21.19, "5": 19.86, "best": (6, 19.28)},
    0.20: {"train_size": 70_000, "1": 19.24, "5": 18.04, "best": (8, 17.50)},
    0.40: {"train_size": 140_000, "1": 18.42, "5": 16.74, "best": (8, 16.55)},
    1.00: {"train_size": 350_000, "1": 17.72, "5": 15.96, "best": (7, 15.69)},
}
PUBLISHED_SUPERVISED_SSE = 16.56          # E = 5, 100 % data
PUBLISHED_ACTIVE = {5: 2.2, 10: 5.2, 15: 7.6, 20: 9.4, 50: 21.4}   # configured -> mean active, 100 % data
PUBLISHED_RANDOM_ROUTING = {"fraction": 0.20, "active": 5, "random": 20.08, "learned": 18.04}
PUBLISHED_SEPARABILITY = {               # (experts, classes) accuracy of the linear probe
    "paper": (0.934, 0.851),
    "authors' embeddings, E=10 run": (0.952, 0.863),
    "authors' embeddings, E=50 run": (0.885, 0.860),
}

PRESETS: dict[str, dict[str, Any]] = {
    # Synthetic sketches, small: a few minutes on 2 CPU cores with the reference backend.
    # 6 epochs of 8,000 images is about the least at which experts specialise (at 3 epochs of 4,000
    # every run collapsed to one expert and reconstructed the mean image).
    "quick": dict(data="synthetic", num_train=8_000, num_test=2_000, fractions=(0.5, 1.0), experts=(1, 5, 10),
                  epochs=6, encoder="lite", decoder="lite", analysis_experts=10, tsne_points=1_000,
                  tsne_iter=500),
    # PAPER.md's grid: 20 epochs, fractions 5-100 %, E in {1, 5, 10, 15, 20, 50}, the paper's model.
    "paper": dict(data="synthetic", num_train=50_000, num_test=5_000, fractions=(0.05, 0.1, 0.2, 0.4, 1.0),
                  experts=(1, 5, 10, 15, 20, 50), epochs=20, encoder="medium", decoder="lite", analysis_experts=10,
                  tsne_points=5_000, tsne_iter=1_000),
}
EXPERIMENTS = ("sweep", "routing", "collapse", "analysis")
RESULT_NAME = "result.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``smoe-fast reproduce``; a preset fills every option left unset."""
    parser.description = ("Run the paper's experiments (unsupervised vs supervised vs label routing, expert-count and "
                          "data-size sweeps grouped by active experts, separability, t-SNE, expert collapse) and write "
                          "results.json and report.md with figures. Resumable: finished runs are skipped.")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="quick",
                        help="quick: synthetic data, small, a few CPU minutes; paper: PAPER.md's grid (20 epochs)")
    d = parser.add_argument_group("data")
    d.add_argument("--data", choices=DATA_SOURCES, default=None,
                   help="data source (default: the preset's, synthetic); quickdraw needs --root")
    d.add_argument("--root", type=Path, default=None, help="directory holding the QuickDraw files")
    d.add_argument("--download", action="store_true", help="fetch missing QuickDraw files into --root")
    d.add_argument("--num-train", type=int, default=None,
                   help="synthetic: training images at fraction 1.0; QuickDraw: cap on training images")
    d.add_argument("--num-test", type=int, default=None, help="synthetic: test images; QuickDraw: cap on test images")
    d.add_argument("--fractions", type=float, nargs="+", default=None, help="data set fractions p of the size sweep")
    d.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data set")
    m = parser.add_argument_group("runs")
    m.add_argument("--experts", type=int, nargs="+", default=None, help="configured expert counts E of the sweep")
    m.add_argument("--epochs", type=int, default=None)
    m.add_argument("--batch-size", type=int, default=128)
    m.add_argument("--encoder", choices=("medium", "lite"), default=None)
    m.add_argument("--decoder", choices=("lite", "medium", "mlp"), default=None)
    m.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; tables average over them")
    m.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS),
                   help="which experiments to run")
    m.add_argument("--analysis-experts", type=int, default=None,
                   help="E of the run analysed in depth (default 10, or the nearest in --experts)")
    m.add_argument("--tsne-points", type=int, default=None, help="test images in the t-SNE plot")
    parser.add_argument("--backend", choices=("auto", "reference", "triton", "cpp"), default="auto",
                        help="expert dispatch backend (auto: the fastest available)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/reproduce-<preset>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclasses.dataclass
class Plan:
    """Resolved settings of one reproduce invocation (preset + overrides)."""

    preset: str
    data: str
    root: Path | None
    download: bool
    num_train: int | None
    num_test: int | None
    fractions: tuple[float, ...]
    experts: tuple[int, ...]
    epochs: int
    batch_size: int
    encoder: str
    decoder: str
    seeds: tuple[int, ...]
    experiments: tuple[str, ...]
    analysis_experts: int
    tsne_points: int
    tsne_iter: int
    backend: str
    device: str
    data_seed: int
    out: Path
    progress: bool


def make_plan(args: argparse.Namespace) -> Plan:
    """Preset values, overridden by every option given explicitly; validated."""
    preset = PRESETS[args.preset]

    def pick(name: str):
        value = getattr(args, name, None)
        return preset[name] if value is None else value

    experts = tuple(sorted(set(pick("experts"))))
    fractions = tuple(sorted(set(float(f) for f in pick("fractions"))))
    if not experts or min(experts) < 1:
        raise ValueError(f"--experts must be integers >= 1, got {list(experts)}")
    if not fractions or min(fractions) <= 0 or max(fractions) > 1:
        raise ValueError(f"--fractions must lie in (0, 1], got {list(fractions)}")
    data = pick("data")
    if data != "synthetic" and args.root is None:
        raise ValueError(f"--data {data} reads QuickDraw files: pass --root DIR (and --download to fetch them)")
    wanted = args.analysis_experts or preset["analysis_experts"]
    analysis_experts = min(experts, key=lambda e: (abs(e - wanted), -e))
    num_train = args.num_train if args.num_train is not None else (preset["num_train"] if data == "synthetic" else None)
    num_test = args.num_test if args.num_test is not None else (preset["num_test"] if data == "synthetic" else None)
    from .train import resolve_device

    return Plan(preset=args.preset, data=data, root=args.root, download=args.download, num_train=num_train,
                num_test=num_test, fractions=fractions, experts=experts, epochs=pick("epochs"),
                batch_size=args.batch_size, encoder=pick("encoder"), decoder=pick("decoder"),
                seeds=tuple(dict.fromkeys(args.seeds)), experiments=tuple(args.experiments),
                analysis_experts=analysis_experts, tsne_points=pick("tsne_points"), tsne_iter=preset["tsne_iter"],
                backend=args.backend, device=str(resolve_device(args.device)), data_seed=args.data_seed,
                out=args.out or Path(f"runs/reproduce-{args.preset}"), progress=not args.no_progress)


# --------------------------------------------------------------------------- data
class DataCache:
    """(train, test) per fraction. Synthetic: one draw, per-class prefixes of the training set (as the
    paper takes the first p*70,000 sketches per class) and one fixed test set. QuickDraw: load_data(p)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._cache: dict[float, tuple] = {}

    def get(self, fraction: float):
        from .data import load_data

        if fraction not in self._cache:
            plan = self.plan
            if plan.data == "synthetic":
                if 1.0 not in self._cache:
                    self._cache[1.0] = load_data("synthetic", num_train=plan.num_train, num_test=plan.num_test,
                                                 seed=plan.data_seed)
                train, test = self._cache[1.0]
                self._cache[fraction] = (_per_class_prefix(train, fraction), test)
            else:
                self._cache[fraction] = load_data(plan.data, root=plan.root, fraction=fraction, download=plan.download,
                                                  num_train=plan.num_train, num_test=plan.num_test)
        return self._cache[fraction]


def _per_class_prefix(dataset, fraction: float):
    """The first int(fraction * n_c) images of every class c, in their original order."""
    if fraction >= 1.0:
        return dataset
    labels = dataset.labels.numpy()
    keep = np.zeros(labels.size, dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        keep[rows[:int(fraction * rows.size)]] = True
    import torch

    rows = torch.from_numpy(np.flatnonzero(keep))
    return dataset._replace(images=dataset.images[rows], labels=dataset.labels[rows],
                            substyles=None if dataset.substyles is None else dataset.substyles[rows])


# --------------------------------------------------------------------------- runs
@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: where it belongs in the experiments and its configuration."""

    fraction: float
    num_experts: int
    routing: str = "unsupervised"
    revive: bool = False
    seed: int = 0

    @property
    def name(self) -> str:
        extra = "-revive" if self.revive else ""
        return f"p{self.fraction:g}-E{self.num_experts}-{self.routing}{extra}-s{self.seed}"


def plan_runs(plan: Plan, num_classes: int) -> list[RunSpec]:
    """Every run the chosen experiments need, without duplicates, cheapest (smallest data) first."""
    top = max(plan.fractions)
    specs: list[RunSpec] = []
    for seed in plan.seeds:
        if "sweep" in plan.experiments:
            specs += [RunSpec(f, e, seed=seed) for f in plan.fractions for e in plan.experts]
        if "routing" in plan.experiments:
            specs += [RunSpec(top, num_classes, routing, seed=seed) for routing in ("unsupervised", "supervised", "label")]
        if "collapse" in plan.experiments:
            specs += [RunSpec(top, e, revive=revive, seed=seed) for e in plan.experts if e > 1 for revive in (False, True)]
        if "analysis" in plan.experiments:
            specs.append(RunSpec(top, plan.analysis_experts, seed=seed))
    unique = list(dict.fromkeys(specs))
    return sorted(unique, key=lambda s: (s.fraction, s.seed, s.num_experts, s.routing, s.revive))


def train_config(plan: Plan, spec: RunSpec):
    from .train import TrainConfig

    return TrainConfig(num_experts=spec.num_experts, encoder=plan.encoder, decoder=plan.decoder, routing=spec.routing,
                       epochs=plan.epochs, batch_size=plan.batch_size, seed=spec.seed, backend=plan.backend,
                       device=plan.device, revive_dead_experts=spec.revive)


_RUNTIME_KEYS = ("backend", "device", "epochs")   # may change between restarts without invalidating a result


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _RUNTIME_KEYS}


def run_one(plan: Plan, spec: RunSpec, data: DataCache, focus: bool) -> dict[str, Any]:
    """Train (or resume, or skip) one run and return its result dict (also written to result.json)."""
    from .analysis import expert_report
    from ..io import atomic_write_text
    from .train import CHECKPOINT_NAME, evaluate, train

    run_dir = plan.out / "runs" / spec.name
    config = train_config(plan, spec)
    wanted = dataclasses.asdict(config)
    result_path = run_dir / RESULT_NAME
    if result_path.exists():
        stored = json.loads(result_path.read_text())
        if _comparable(stored["config"]) != _comparable(wanted) or stored["config"]["epochs"] != plan.epochs:
            raise ValueError(f"{str(run_dir)!r} holds a finished run with a different configuration "
                             f"({_config_difference(stored['config'], wanted)}); use another --out directory")
        return stored
    train_set, test_set = data.get(spec.fraction)
    resume = (run_dir / CHECKPOINT_NAME).exists()
    started = time.perf_counter()
    result = train(config, train_set, test_set, out_dir=run_dir, resume=resume, progress=plan.progress)
    evaluation = evaluate(result.model, test_set, batch_size=config.eval_batch_size, seed=config.seed)
    report = expert_report(evaluation, spec.num_experts, substyles=test_set.substyles, per_expert=focus)
    record = {
        "name": spec.name, "spec": dataclasses.asdict(spec), "config": wanted,
        "backend": result.model.resolved_backend(plan.device).value,
        "train_size": int(train_set.num_images), "test_size": int(test_set.num_images),
        "class_names": list(train_set.class_names),
        "train_seconds": round(sum(h["seconds"] for h in result.history), 2),
        "wall_seconds_this_session": round(time.perf_counter() - started, 2),
        "history": result.history, "revived_total": sum(len(h.get("revived", [])) for h in result.history),
        **report,
    }
    atomic_write_text(json.dumps(record, indent=1, allow_nan=False) + "\n", result_path)
    return record


def _config_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in ("backend", "device"))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "none"


def run(args: argparse.Namespace) -> int:
    """Run every planned experiment, then write results.json, figures/ and report.md under --out."""
    from tqdm.auto import tqdm

    plan = make_plan(args)
    plan.out.mkdir(parents=True, exist_ok=True)
    data = DataCache(plan)
    num_classes = data.get(max(plan.fractions))[0].num_classes
    specs = plan_runs(plan, num_classes)
    focus = RunSpec(max(plan.fractions), plan.analysis_experts, seed=plan.seeds[0])
    from ..backends import resolve_backend

    backend = resolve_backend(plan.backend, plan.device).value
    print(f"smoe-fast reproduce: preset {plan.preset}, {plan.data} data, {len(specs)} runs of {plan.epochs} epochs, "
          f"device {plan.device}, backend {plan.backend}{' -> ' + backend if plan.backend == 'auto' else ''}; "
          f"output {plan.out}")
    results: list[dict[str, Any]] = []
    bar = tqdm(specs, desc="reproduce", unit="run", disable=not plan.progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        results.append(run_one(plan, spec, data, focus=spec == focus))
        write_results(plan, results)
    write_results(plan, results)
    figures = make_figures(plan, results, data, focus)
    report = write_report(plan, results, figures)
    print(f"wrote {plan.out / 'results.json'} and {report}")
    return 0


def write_results(plan: Plan, results: list[dict[str, Any]]) -> Path:
    from ..io import atomic_write_text

    meta = {"preset": plan.preset, "data": plan.data, "epochs": plan.epochs, "encoder": plan.encoder,
            "decoder": plan.decoder, "fractions": list(plan.fractions), "experts": list(plan.experts),
            "seeds": list(plan.seeds), "device": plan.device, "backend_requested": plan.backend,
            "python": platform.python_version(), "written": datetime.datetime.now().isoformat(timespec="seconds")}
    summary = summarise(plan, results)
    path = plan.out / "results.json"
    atomic_write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1, allow_nan=False)
                      + "\n", path)
    return path


# --------------------------------------------------------------------------- aggregation
def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(plan: Plan, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Tables of the report, as data: size sweep grouped by active experts, routing, collapse, separability."""
    plain = [r for r in results if r["spec"]["routing"] == "unsupervised" and not r["spec"]["revive"]]
    sweep = []
    for fraction in plan.fractions:
        mine = [r for r in plain if r["spec"]["fraction"] == fraction]
        if not mine:
            continue
        by_active: dict[int, list[float]] = {}
        for r in mine:
            by_active.setdefault(r["active_experts_subsample"], []).append(r["sse_per_image"])
        grouped = sorted((a, float(np.mean(v)), len(v)) for a, v in by_active.items())
        best = min(grouped, key=lambda g: g[1])
        five = min(grouped, key=lambda g: (abs(g[0] - 5), g[0]))
        sweep.append({
            "fraction": fraction, "train_size": mine[0]["train_size"], "test_size": mine[0]["test_size"],
            "one_expert": _mean(r["sse_per_image"] for r in mine if r["spec"]["num_experts"] == 1),
            "five_active": {"active": five[0], "sse": five[1]}, "best": {"active": best[0], "sse": best[1]},
            "by_active": [{"active": a, "sse": s, "runs": n} for a, s, n in grouped],
            "by_configured": [{"num_experts": e,
                               "active": _mean(r["active_experts"] for r in mine if r["spec"]["num_experts"] == e),
                               "active_subsample": _mean(r["active_experts_subsample"] for r in mine
                                                         if r["spec"]["num_experts"] == e),
                               "sse": _mean(r["sse_per_image"] for r in mine if r["spec"]["num_experts"] == e)}
                              for e in sorted({r["spec"]["num_experts"] for r in mine})],
        })
    top = max(plan.fractions)
    at_top = [r for r in results if r["spec"]["fraction"] == top]

    def mean_of(key, **match):
        rows = [r for r in at_top if all(r["spec"][k] == v for k, v in match.items())]
        return (_mean(r[key] for r in rows), len(rows)) if rows else (None, 0)

    routing = {}
    num_classes = len(results[0]["class_names"]) if results else 0
    for mode in ("unsupervised", "supervised", "label"):
        sse, n = mean_of("sse_per_image", routing=mode, num_experts=num_classes, revive=False)
        if n:
            routing[mode] = {"num_experts": num_classes, "sse": sse, "runs": n,
                             "active": mean_of("active_experts", routing=mode, num_experts=num_classes, revive=False)[0],
                             "separability_experts": mean_of("separability_experts", routing=mode,
                                                             num_experts=num_classes, revive=False)[0]}
    collapse = []
    for e in sorted({r["spec"]["num_experts"] for r in at_top if r["spec"]["routing"] == "unsupervised"}):
        for revive in (False, True):
            sse, n = mean_of("sse_per_image", routing="unsupervised", num_experts=e, revive=revive)
            if n:
                collapse.append({"num_experts": e, "revive": revive, "sse": sse, "runs": n,
                                 "active_experts": mean_of("active_experts", routing="unsupervised", num_experts=e,
                                                           revive=revive)[0],
                                 "active_subsample": mean_of("active_experts_subsample", routing="unsupervised",
                                                             num_experts=e, revive=revive)[0]})
    separability = []
    for e in sorted({r["spec"]["num_experts"] for r in at_top}):
        rows = [r for r in at_top if r["spec"]["num_experts"] == e and r["spec"]["routing"] == "unsupervised"
                and not r["spec"]["revive"] and e > 1]
        if rows:
            separability.append({"num_experts": e, "runs": len(rows),
                                 **{k: _mean(r.get(k) for r in rows) for k in
                                    ("separability_experts", "separability_labels", "chance_experts", "chance_labels",
                                     "ami", "nmi", "purity", "ami_substyles", "nmi_substyles", "purity_substyles")}})
    return {"sweep": sweep, "routing": routing, "collapse": collapse, "separability": separability}


def qualitative_findings(summary: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(the paper's claim, what this run measured, whether it held) for each claim the run can test."""
    findings = []
    top = summary["sweep"][-1] if summary["sweep"] else None
    if top and top["one_expert"] is not None and any(g["active"] > 1 for g in top["by_active"]):
        multi = min((g for g in top["by_active"] if g["active"] > 1), key=lambda g: g["sse"])
        findings.append(("more active experts lower the test SSE",
                         f"1 expert {top['one_expert']:.2f} vs best with {multi['active']} active {multi['sse']:.2f}",
                         multi["sse"] < top["one_expert"]))
    routing = summary["routing"]
    if "unsupervised" in routing and "supervised" in routing:
        u, sup = routing["unsupervised"]["sse"], routing["supervised"]["sse"]
        findings.append(("unsupervised routing reconstructs better than the supervised gate",
                         f"unsupervised {u:.2f} vs supervised {sup:.2f}", u < sup))
    plain = [c for c in summary["collapse"] if not c["revive"] and c["num_experts"] > 1]
    if plain:
        share = float(np.mean([c["active_subsample"] / c["num_experts"] for c in plain]))
        findings.append(("about half the configured experts collapse (stay inactive)",
                         f"{share:.0%} of configured experts active", 0.3 <= share <= 0.7))
    for row in summary["separability"]:
        if row["separability_experts"] is not None and row["separability_labels"] is not None:
            findings.append((f"experts are more linearly separable than classes (E={row['num_experts']})",
                             f"{row['separability_experts']:.1%} vs {row['separability_labels']:.1%}",
                             row["separability_experts"] > row["separability_labels"]))
    return findings


# --------------------------------------------------------------------------- figures
def make_figures(plan: Plan, results: list[dict[str, Any]], data: DataCache, focus: RunSpec) -> dict[str, Path]:
    """Draw every figure the results support; returns {figure key: path}. The focus run is reloaded
    from its checkpoint for the latent-space figures."""
    from . import analysis, figures
    from .train import evaluate, load_checkpoint

    out = plan.out / "figures"
    summary = summarise(plan, results)
    drawn: dict[str, Path] = {}
    points = [{"train_size": s["train_size"], "active_experts": g["active"], "sse": g["sse"]}
              for s in summary["sweep"] for g in s["by_active"]]
    if points:
        reference = {v["train_size"]: v for v in PUBLISHED_SSE.values()}
        drawn["sse_vs_active"] = figures.plot_sse_vs_active(points, out / "sse_vs_active.png", reference=reference,
                                                            overlay=plan.data != "synthetic")
    if summary["collapse"]:
        drawn["collapse"] = figures.plot_collapse(
            [{"num_experts": c["num_experts"], "revive": c["revive"], "active_experts": c["active_experts"],
              "sse": c["sse"]} for c in summary["collapse"]], out / "collapse.png",
            reference=PUBLISHED_ACTIVE)
    by_name = {r["name"]: r for r in results}
    focus_result = by_name.get(focus.name)
    if focus_result is None:
        return drawn
    usage = {"unsupervised": focus_result["usage"]}
    revived = by_name.get(dataclasses.replace(focus, revive=True).name)
    if revived is not None:
        usage["unsupervised + revive_dead_experts"] = revived["usage"]
    drawn["usage"] = figures.plot_expert_usage(usage, out / "usage.png",
                                               title=f"Expert usage, E={focus.num_experts} (test images won)")
    _, test = data.get(focus.fraction)
    model, _ = load_checkpoint(plan.out / "runs" / focus.name, backend=plan.backend, device=plan.device)
    ev = evaluate(model, test, seed=focus.seed)
    names = list(test.class_names)
    drawn["contingency"] = figures.plot_contingency(focus_result["contingency"], out / "contingency.png",
                                                    class_names=names,
                                                    title=f"Class x expert, E={focus.num_experts} (test images)")
    drawn["tsne"] = figures.plot_tsne(ev.z, ev.labels, ev.expert_idx, out / "tsne.png", class_names=names,
                                      max_points=plan.tsne_points, max_iter=plan.tsne_iter,
                                      title=f"t-SNE of sampled z, E={focus.num_experts} ({plan.data} test images)")
    top = analysis.most_exciting_inputs(ev.gates, ev.expert_idx, k=10)
    drawn["most_exciting"] = figures.plot_most_exciting(test.images, top, out / "most_exciting.png")
    drawn["reconstructions"] = figures.plot_expert_reconstructions(model, test.images, ev.expert_idx,
                                                                   out / "reconstructions.png", labels=test.labels)
    return drawn


# --------------------------------------------------------------------------- report
def _f(value, digits: int = 2, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * value:.1f}%" if pct else f"{value:.{digits}f}"


def write_report(plan: Plan, results: list[dict[str, Any]], figures: dict[str, Path]) -> Path:
    """report.md: our numbers next to PAPER.md's, with the figures linked relatively."""
    from ..io import atomic_write_text

    s = summarise(plan, results)
    synthetic = plan.data == "synthetic"
    backends = sorted({r["backend"] for r in results})
    seconds = sum(r["train_seconds"] for r in results)
    lines = [f"# SMoE-VAE reproduction report ({plan.preset} preset)", ""]
    lines += [f"Data: **{plan.data}**, {len(results)} training runs of {plan.epochs} epochs "
              f"(encoder {plan.encoder}, decoder {plan.decoder}, batch {plan.batch_size}, seeds "
              f"{', '.join(map(str, plan.seeds))}), device {plan.device}, backend {', '.join(backends) or plan.backend}; "
              f"{seconds / 60:.1f} min of training in total. Test SSE is the paper's metric: per-image sum of squared "
              "errors over 784 pixels, hard routing, sampled z, after the last epoch.", ""]
    if synthetic:
        lines += ["> **Not comparable in absolute value.** These numbers come from the built-in synthetic sketches, "
                  "not QuickDraw: image statistics, data set sizes and epochs differ from the paper, so only the "
                  "*qualitative* findings (more active experts help, supervised routing is not better, about half "
                  "the experts collapse, experts are more separable than classes) can be compared. Run "
                  "`smoe-fast reproduce --preset paper --data quickdraw --root DIR` for comparable numbers.", ""]
    elif plan.preset != "paper" or plan.epochs != 20:
        lines += [f"> Settings differ from the paper (epochs {plan.epochs}, preset {plan.preset}): expect higher SSE "
                  "than published.", ""]
    lines += ["Active experts: an expert is *active* if it wins the hard argmax for at least 10 test images. The "
              "authors counted over about 6,700 shuffled test images; we report that count (*authors'*, on a "
              "6,700-image shuffled subsample, or all test images when there are fewer) and the count over the "
              "whole test set (*all*). Results are grouped by the authors' count.", ""]

    findings = qualitative_findings(s)
    if findings:
        lines += ["## The paper's qualitative findings in this run", "",
                  "| finding (paper) | this run | held? |", "|---|---|---|"]
        lines += [f"| {claim} | {evidence} | {'yes' if held else '**no**'} |" for claim, evidence, held in findings]
        lines += [""]
    lines += ["## Test SSE vs active experts (the paper's main result)", ""]
    if "sse_vs_active" in figures:
        lines += [f"![test SSE vs active experts]({_rel(plan, figures['sse_vs_active'])})", ""]
    lines += ["| p | train images (ours / paper) | 1 expert (ours / paper) | ~5 active (ours / paper) | "
              "best: SSE (active) ours | best: SSE (active) paper |", "|---|---|---|---|---|---|"]
    for row in s["sweep"]:
        ref = PUBLISHED_SSE.get(round(row["fraction"], 2))
        five = row["five_active"]
        lines.append(
            f"| {row['fraction']:g} | {row['train_size']:,} / {ref['train_size']:,} | {_f(row['one_expert'])} / "
            f"{ref['1']} | {_f(five['sse'])} ({five['active']} active) / {ref['5']} | "
            f"{_f(row['best']['sse'])} ({row['best']['active']}) | {ref['best'][1]} ({ref['best'][0]}) |"
            if ref else
            f"| {row['fraction']:g} | {row['train_size']:,} / – | {_f(row['one_expert'])} / – | "
            f"{_f(five['sse'])} ({five['active']} active) / – | {_f(row['best']['sse'])} ({row['best']['active']}) | – |")
    lines += ["", "All sweep runs (configured E → active experts, authors' count / all test images):", "",
              "| p | E | active (authors') | active (all) | test SSE |", "|---|---|---|---|---|"]
    for row in s["sweep"]:
        for c in row["by_configured"]:
            lines.append(f"| {row['fraction']:g} | {c['num_experts']} | {_f(c['active_subsample'], 1)} | "
                         f"{_f(c['active'], 1)} | {_f(c['sse'])} |")
    lines += ["", f"Published random-routing control ({PUBLISHED_RANDOM_ROUTING['fraction']:.0%} data, 5 active "
              f"experts): {PUBLISHED_RANDOM_ROUTING['random']} vs {PUBLISHED_RANDOM_ROUTING['learned']} learned "
              "(not rerun here: smoe_fast has no random-routing mode).", ""]

    if s["routing"]:
        lines += ["## Unsupervised vs supervised vs label routing", "",
                  f"At the largest data fraction with E = {next(iter(s['routing'].values()))['num_experts']} "
                  "(the number of classes; the paper's supervised baseline used E = 5 = classes). *supervised* is "
                  "the authors' baseline (gate trained by cross-entropy on the label, hard routing by the gate); "
                  "*label* routes every image to the expert of its class (an oracle, ours).", "",
                  "| routing | test SSE (ours) | active | separability of experts | published |", "|---|---|---|---|---|"]
        published = {"unsupervised": f"{PUBLISHED_SSE[1.0]['5']} (5 active), best {PUBLISHED_SSE[1.0]['best'][1]}",
                     "supervised": f"{PUBLISHED_SUPERVISED_SSE}", "label": "–"}
        for mode, r in s["routing"].items():
            lines.append(f"| {mode} | {_f(r['sse'])} | {_f(r['active'], 1)} | {_f(r['separability_experts'], pct=True)} "
                         f"| {published[mode]} |")
        lines.append("")

    if s["collapse"]:
        lines += ["## Expert collapse", "",
                  "Configured experts that stay active after training, as published (no remedy) and with "
                  "`revive_dead_experts` (an expert winning fewer than 10 training images in an epoch is "
                  "re-initialised from the busiest expert).", ""]
        if "collapse" in figures:
            lines += [f"![expert collapse]({_rel(plan, figures['collapse'])})", ""]
        lines += ["| E | active, as published (authors' / all) | active with revive (authors' / all) | "
                  "SSE as published | SSE with revive | paper: active (100 % data) |", "|---|---|---|---|---|---|"]
        for e in sorted({c["num_experts"] for c in s["collapse"]}):
            plain = next((c for c in s["collapse"] if c["num_experts"] == e and not c["revive"]), None)
            revive = next((c for c in s["collapse"] if c["num_experts"] == e and c["revive"]), None)
            cell = (lambda c: f"{_f(c['active_subsample'], 1)} / {_f(c['active_experts'], 1)}" if c else "–")
            lines.append(f"| {e} | {cell(plain)} | {cell(revive)} | {_f(plain and plain['sse'])} | "
                         f"{_f(revive and revive['sse'])} | {PUBLISHED_ACTIVE.get(e, '–')} |")
        lines.append("")

    if s["separability"]:
        lines += ["## Linear separability: experts vs classes", "",
                  "Logistic regression (max_iter 1000, random_state 42) on up to 10,000 test samples' sampled z, "
                  "stratified 80/20 split: accuracy predicting the expert argmax vs the class label. *chance* is the "
                  "majority share. AMI/NMI/purity compare the expert partition with the classes"
                  + (" and with the synthetic sub-styles (finer, ground-truth modes within classes)." if synthetic
                     else "."), "",
                  "| E | experts | classes | chance (experts / classes) | AMI / NMI / purity vs classes |"
                  + (" AMI / NMI / purity vs sub-styles |" if synthetic else ""),
                  "|---|---|---|---|---|" + ("---|" if synthetic else "")]
        for r in s["separability"]:
            line = (f"| {r['num_experts']} | {_f(r['separability_experts'], pct=True)} | "
                    f"{_f(r['separability_labels'], pct=True)} | {_f(r['chance_experts'], pct=True)} / "
                    f"{_f(r['chance_labels'], pct=True)} | {_f(r['ami'])} / {_f(r['nmi'])} / {_f(r['purity'])} |")
            if synthetic:
                line += f" {_f(r['ami_substyles'])} / {_f(r['nmi_substyles'])} / {_f(r['purity_substyles'])} |"
            lines.append(line)
        lines += ["", "Published: " + "; ".join(f"{k}: {a:.1%} experts vs {b:.1%} classes"
                                                for k, (a, b) in PUBLISHED_SEPARABILITY.items()) + ".", ""]

    focus = next((r for r in results if r["spec"]["fraction"] == max(plan.fractions)
                  and r["spec"]["num_experts"] == plan.analysis_experts and r["spec"]["routing"] == "unsupervised"
                  and not r["spec"]["revive"] and r.get("per_expert")), None)
    if focus is not None:
        names = focus["class_names"]
        lines += [f"## What each expert encodes (E = {plan.analysis_experts}, {focus['train_size']:,} train images)", "",
                  f"Network sparsity (active / configured): {_f(focus['network_sparsity'])}. Per expert: test images "
                  "won, dominant class and its share (*purity*: 1 = monosemantic by class), linear separability of "
                  "the classes among the images it wins (– when it holds one class or too few images), and balanced "
                  "accuracy of a one-vs-rest probe for \"routed to this expert\" (0.5 = chance).", "",
                  "| expert | wins | dominant class | purity | class separability within | one-vs-rest |",
                  "|---|---|---|---|---|---|"]
        for row in focus["per_expert"]:
            top = row["top_class"]
            cls = names[top] if top is not None and top < len(names) else "–"
            lines.append(f"| {row['expert']} | {row['wins']} | {cls} | {_f(row['purity'])} | "
                         f"{_f(row['class_separability'], pct=True)} | {_f(row['expert_vs_rest'], pct=True)} |")
        lines.append("")
        for key, caption in (("tsne", "t-SNE of z coloured by class (left) and by expert (right)"),
                             ("contingency", "class x expert table"), ("usage", "expert usage"),
                             ("most_exciting", "most exciting inputs per expert (highest gate probability first)"),
                             ("reconstructions", "reconstructions per expert")):
            if key in figures:
                lines += [f"### {caption[0].upper() + caption[1:]}", "", f"![{caption}]({_rel(plan, figures[key])})", ""]

    lines += ["## Files", "", "- `results.json`: every run's configuration, per-epoch history and measurements, "
              "and the summary tables above.", "- `runs/<run>/`: checkpoint, metrics.jsonl and result.json per run.",
              "- `figures/`: the PNG figures.", ""]
    path = plan.out / "report.md"
    atomic_write_text("\n".join(lines), path)
    return path


def _rel(plan: Plan, path: Path) -> str:
    return Path(path).resolve().relative_to(plan.out.resolve()).as_posix()
