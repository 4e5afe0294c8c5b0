"""Planning and running the reproduction: presets, the options of ``smoe-fast reproduce``, the run
list, one training run (trained, resumed or skipped) and results.json."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...distributed import world_info

from ..data import DATA_SOURCES
from ..model import ROUTINGS
from ..train import COLLAPSE_PREVENTIONS
from .report import make_figures, write_report
from .summary import summarise

PRESETS: dict[str, dict[str, Any]] = {
    # Synthetic sketches, small: about 4 minutes on 2 CPU cores with the C++ backend. The paper's 20
    # epochs: soft-gated training first sits at the mean image for 2-3 epochs (every image's argmax on
    # one expert), so at 6 epochs E=5 was still at SSE 45.0 against 35.5 for one expert, at 12 epochs
    # 30.05 against 27.62, and only at 20 does the mixture overtake (23.56 against 25.27). The collapse
    # experiment (E x every COLLAPSE_PREVENTIONS mechanism) is outside the budget: --experiments collapse.
    "quick": dict(data="synthetic", num_train=8_000, num_test=2_000, fractions=(0.5, 1.0), experts=(1, 5, 10),
                  epochs=20, encoder="lite", decoder="lite", analysis_experts=10, tsne_points=1_000,
                  tsne_iter=500, experiments=("sweep", "routing", "analysis")),
    # PAPER.md's grid: 20 epochs, fractions 5-100 %, E in {1, 5, 10, 15, 20, 50}, the paper's model.
    "paper": dict(data="synthetic", num_train=50_000, num_test=5_000, fractions=(0.05, 0.1, 0.2, 0.4, 1.0),
                  experts=(1, 5, 10, 15, 20, 50), epochs=20, encoder="medium", decoder="lite", analysis_experts=10,
                  tsne_points=5_000, tsne_iter=1_000, experiments=("sweep", "routing", "collapse", "analysis")),
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
    d.add_argument("--categories", nargs="+", metavar="NAME", default=None,
                   help="class names, in label order (default: face cat snowflake pencil eye, the paper's)")
    d.add_argument("--download", action="store_true", help="fetch missing QuickDraw files into --root")
    d.add_argument("--num-train", type=int, default=None,
                   help="synthetic: training images at fraction 1.0; QuickDraw: cap on training images")
    d.add_argument("--num-test", type=int, default=None, help="synthetic: test images; QuickDraw: cap on test images")
    d.add_argument("--fractions", type=float, nargs="+", default=None, help="data set fractions p of the size sweep")
    d.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data set")
    m = parser.add_argument_group("runs")
    m.add_argument("--experts", type=int, nargs="+", default=None, help="configured expert counts E of the sweep")
    m.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the preset's)")
    m.add_argument("--batch-size", type=int, default=128, help="images per optimiser step (the paper's)")
    m.add_argument("--encoder", choices=("medium", "lite"), default=None, help="encoder (default: the preset's)")
    m.add_argument("--decoder", choices=("lite", "medium", "mlp"), default=None,
                   help="decoder expert kind (default: the preset's, lite)")
    m.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; tables average over them")
    m.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=None,
                   help="which experiments to run (default: the preset's; quick leaves out collapse)")
    m.add_argument("--analysis-experts", type=int, default=None,
                   help="E of the run analysed in depth (default 10, or the nearest in --experts)")
    m.add_argument("--tsne-points", type=int, default=None, help="test images in the t-SNE plot")
    parser.add_argument("--backend", choices=("auto", "reference", "triton", "cpp"), default="auto",
                        help="expert dispatch backend (auto: the fastest available)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (auto: cuda if available)")
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
    categories: tuple[str, ...] | None = None   # None: the data source's default (the paper's five)
    noise: str = "global"   # "keyed" under torchrun: each run is data-parallel (smoe_fast.vae.train)


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
    from ..train import resolve_device

    return Plan(preset=args.preset, data=data, root=args.root, download=args.download, num_train=num_train,
                num_test=num_test, fractions=fractions, experts=experts, epochs=pick("epochs"),
                batch_size=args.batch_size, encoder=pick("encoder"), decoder=pick("decoder"),
                seeds=tuple(dict.fromkeys(args.seeds)), experiments=tuple(pick("experiments")),
                analysis_experts=analysis_experts, tsne_points=pick("tsne_points"), tsne_iter=preset["tsne_iter"],
                backend=args.backend, device=str(resolve_device(args.device)), data_seed=args.data_seed,
                out=args.out or Path(f"runs/reproduce-{args.preset}"), progress=not args.no_progress,
                categories=tuple(args.categories) if getattr(args, "categories", None) else None)


# --------------------------------------------------------------------------- data
class DataCache:
    """(train, test) per fraction. Synthetic: one draw, per-class prefixes of the training set (as the
    paper takes the first p*70,000 sketches per class) and one fixed test set. QuickDraw: load_data(p)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._cache: dict[float, tuple] = {}

    def get(self, fraction: float):
        from ..data import load_data

        if fraction not in self._cache:
            plan = self.plan
            if plan.data == "synthetic":
                if 1.0 not in self._cache:
                    self._cache[1.0] = load_data("synthetic", num_train=plan.num_train, num_test=plan.num_test,
                                                 seed=plan.data_seed, categories=plan.categories)
                train, test = self._cache[1.0]
                self._cache[fraction] = (_per_class_prefix(train, fraction), test)
            else:
                self._cache[fraction] = load_data(plan.data, root=plan.root, fraction=fraction, download=plan.download,
                                                  num_train=plan.num_train, num_test=plan.num_test,
                                                  categories=plan.categories)
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
    prevention: str = "none"   # TrainConfig.collapse_prevention
    seed: int = 0

    @property
    def name(self) -> str:
        extra = "" if self.prevention == "none" else f"-{self.prevention}"
        return f"p{self.fraction:g}-E{self.num_experts}-{self.routing}{extra}-s{self.seed}"


def plan_runs(plan: Plan, num_classes: int) -> list[RunSpec]:
    """Every run the chosen experiments need, without duplicates, cheapest (smallest data) first."""
    top = max(plan.fractions)
    specs: list[RunSpec] = []
    for seed in plan.seeds:
        if "sweep" in plan.experiments:
            specs += [RunSpec(f, e, seed=seed) for f in plan.fractions for e in plan.experts]
        if "routing" in plan.experiments:
            # learned (the paper), the authors' supervised gate, the label oracle, the random-routing control
            specs += [RunSpec(top, num_classes, routing, seed=seed) for routing in ROUTINGS]
        if "collapse" in plan.experiments:
            specs += [RunSpec(top, e, prevention=prevention, seed=seed) for e in plan.experts if e > 1
                      for prevention in COLLAPSE_PREVENTIONS]
        if "analysis" in plan.experiments:
            specs.append(RunSpec(top, plan.analysis_experts, seed=seed))
    unique = list(dict.fromkeys(specs))
    return sorted(unique, key=lambda s: (s.fraction, s.seed, s.num_experts, s.routing, s.prevention))


def train_config(plan: Plan, spec: RunSpec):
    from ..train import TrainConfig

    return TrainConfig(num_experts=spec.num_experts, encoder=plan.encoder, decoder=plan.decoder, routing=spec.routing,
                       epochs=plan.epochs, batch_size=plan.batch_size, seed=spec.seed, backend=plan.backend,
                       device=plan.device, collapse_prevention=spec.prevention, noise=plan.noise)


_RUNTIME_KEYS = ("backend", "device", "epochs")   # may change between restarts without invalidating a result


def _comparable(config: dict) -> dict:
    from ..train import TrainConfig

    return {k: v for k, v in dataclasses.asdict(TrainConfig.from_dict(config)).items() if k not in _RUNTIME_KEYS}


def run_one(plan: Plan, spec: RunSpec, data: DataCache, focus: bool) -> dict[str, Any]:
    """Train (or resume, or skip) one run and return its result dict (also written to result.json)."""
    from ..analysis import expert_report
    from ...io import atomic_write_text
    from ..train import CHECKPOINT_NAME, evaluate, train

    run_dir = plan.out / "runs" / spec.name
    config = train_config(plan, spec)
    wanted = dataclasses.asdict(config)
    result_path = run_dir / RESULT_NAME
    rank, world = world_info()
    stored, error = None, None
    train_set, test_set = data.get(spec.fraction)
    if rank == 0 and result_path.exists():
        stored = json.loads(result_path.read_text())
        if stored.get("class_names", list(train_set.class_names)) != list(train_set.class_names):
            stored, error = None, ValueError(f"{str(run_dir)!r} holds a finished run on classes {stored['class_names']}, "
                                             f"not {list(train_set.class_names)}; use another --out directory")
        elif _comparable(stored["config"]) != _comparable(wanted) or stored["config"]["epochs"] != plan.epochs:
            stored, error = None, ValueError(f"{str(run_dir)!r} holds a finished run with a different configuration "
                                             f"({_config_difference(stored['config'], wanted)}); use another --out "
                                             "directory")
    if world > 1:   # rank 0 decides for all (the ranks need not share a file system)
        shared = [stored, error]
        torch.distributed.broadcast_object_list(shared, src=0)
        stored, error = shared
    if error is not None:
        raise error
    if stored is not None:
        return stored
    resume = (run_dir / CHECKPOINT_NAME).exists()   # train() reads it on rank 0 only
    started = time.perf_counter()
    result = train(config, train_set, test_set, out_dir=run_dir, resume=resume, progress=plan.progress)
    if rank != 0:
        return {}
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
    """Run every planned experiment, then write results.json, figures/ and report.md under --out.

    Under torchrun every run is data-parallel over the processes; rank 0 writes and prints.
    """
    from ...distributed import init_from_env

    device = init_from_env(args.device)
    if device is None:
        return _run(args, launched=False)
    args.device = str(device)
    try:
        return _run(args, launched=True)
    finally:
        torch.distributed.destroy_process_group()


def _run(args: argparse.Namespace, launched: bool) -> int:
    from tqdm.auto import tqdm

    plan = make_plan(args)
    rank = world_info()[0]
    if launched:
        plan = dataclasses.replace(plan, noise="keyed", progress=plan.progress and rank == 0)
    plan.out.mkdir(parents=True, exist_ok=True)
    data = DataCache(plan)
    num_classes = data.get(max(plan.fractions))[0].num_classes
    specs = plan_runs(plan, num_classes)
    focus = RunSpec(max(plan.fractions), plan.analysis_experts, seed=plan.seeds[0])
    from ...backends import resolve_backend

    backend = resolve_backend(plan.backend, plan.device).value
    if rank == 0:
        print(f"smoe-fast reproduce: preset {plan.preset}, {plan.data} data, {len(specs)} runs of {plan.epochs} epochs, "
              f"device {plan.device}, backend {plan.backend}{' -> ' + backend if plan.backend == 'auto' else ''}; "
              f"output {plan.out}" + (f"; {world_info()[1]} processes per run" if launched else ""))
    results: list[dict[str, Any]] = []
    bar = tqdm(specs, desc="reproduce", unit="run", disable=not plan.progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        record = run_one(plan, spec, data, focus=spec == focus)
        if rank == 0:
            results.append(record)
            write_results(plan, results)
    if rank != 0:
        return 0
    write_results(plan, results)
    figures = make_figures(plan, results, data, focus)
    report = write_report(plan, results, figures)
    print(f"wrote {plan.out / 'results.json'} and {report}")
    return 0


def write_results(plan: Plan, results: list[dict[str, Any]]) -> Path:
    from ...io import atomic_write_text

    meta = {"preset": plan.preset, "data": plan.data, "epochs": plan.epochs, "encoder": plan.encoder,
            "decoder": plan.decoder, "fractions": list(plan.fractions), "experts": list(plan.experts),
            "seeds": list(plan.seeds), "categories": results[0]["class_names"] if results else list(plan.categories or ()), "device": plan.device, "backend_requested": plan.backend,
            "python": platform.python_version(), "written": datetime.datetime.now().isoformat(timespec="seconds")}
    summary = summarise(plan, results)
    path = plan.out / "results.json"
    atomic_write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1, allow_nan=False)
                      + "\n", path)
    return path


