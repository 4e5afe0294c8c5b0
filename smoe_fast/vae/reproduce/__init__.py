"""``smoe-fast reproduce``: the paper's experiments, resumable, with a report next to the published numbers.

Experiments (shared/PAPER.md), each a set of training runs on one data source:

| experiment | runs | what it answers |
|---|---|---|
| sweep | unsupervised, every data fraction x every E | test SSE vs ACTIVE experts per data set size (the main figure) |
| routing | at the largest fraction, E = number of classes: unsupervised, supervised (authors' CE gate), label, random | does unsupervised routing beat the supervised baseline and the random-routing control? |
| collapse | at the largest fraction, every E > 1 with every ``collapse_prevention`` (none, revive, gate-bias) | how many experts survive, with and without each remedy, at what SSE |
| analysis | the unsupervised run at the largest fraction with E = ``--analysis-experts`` | separability experts vs classes, sub-styles, per-expert tuning, t-SNE |

Layout of ``--out``::

    runs/<run>/checkpoint.pt, metrics.jsonl, config.json   written by smoe_fast.vae.train
    runs/<run>/result.json                                 written atomically when the run is finished
    results.json, report.md, figures/*.png                 rewritten after every run and at the end

A finished run (``result.json`` present) is skipped on restart; an interrupted run resumes from its
last epoch checkpoint. Re-running a finished command only redraws the report.

Modules: :mod:`.runs` plans and runs the training runs and writes results.json, :mod:`.summary`
holds the published numbers and aggregates ours into the report's tables, :mod:`.report` draws the
figures and writes report.md.

>>> parser = argparse.ArgumentParser(); add_arguments(parser)
>>> run(parser.parse_args(["--preset", "quick", "--out", "runs/quick"]))
"""
from __future__ import annotations

from .report import make_figures, write_report
from .runs import (EXPERIMENTS, PRESETS, RESULT_NAME, DataCache, Plan, RunSpec, add_arguments, make_plan, plan_runs,
                   run, run_one, train_config, write_results)
from .summary import (PUBLISHED_ACTIVE, PUBLISHED_RANDOM_ROUTING, PUBLISHED_SEPARABILITY, PUBLISHED_SSE,
                      PUBLISHED_SUPERVISED_SSE, qualitative_findings, summarise)

__all__ = ["add_arguments", "run", "make_plan", "Plan", "RunSpec", "DataCache", "plan_runs", "train_config", "run_one",
           "write_results", "summarise", "qualitative_findings", "make_figures", "write_report", "PRESETS",
           "EXPERIMENTS", "RESULT_NAME", "PUBLISHED_SSE", "PUBLISHED_SUPERVISED_SSE", "PUBLISHED_ACTIVE",
           "PUBLISHED_RANDOM_ROUTING", "PUBLISHED_SEPARABILITY"]
