"""The reproduction's outputs for people: the figures and report.md, our numbers next to PAPER.md's."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..train import COLLAPSE_PREVENTIONS
from .summary import (PUBLISHED_ACTIVE, PUBLISHED_RANDOM_ROUTING, PUBLISHED_SEPARABILITY, PUBLISHED_SSE,
                      PUBLISHED_SUPERVISED_SSE, run_prevention, qualitative_findings, summarise)

if TYPE_CHECKING:
    from .runs import DataCache, Plan, RunSpec


# --------------------------------------------------------------------------- figures
def make_figures(plan: Plan, results: list[dict[str, Any]], data: DataCache, focus: RunSpec) -> dict[str, Path]:
    """Draw every figure the results support; returns {figure key: path}. The focus run is reloaded
    from its checkpoint for the latent-space figures."""
    from .. import analysis, figures
    from ..train import evaluate, load_checkpoint

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
            [{"num_experts": c["num_experts"], "prevention": c["prevention"], "active_experts": c["active_experts"],
              "sse": c["sse"]} for c in summary["collapse"]], out / "collapse.png",
            reference=PUBLISHED_ACTIVE)
    by_name = {r["name"]: r for r in results}
    focus_result = by_name.get(focus.name)
    if focus_result is None:
        return drawn
    usage = {"unsupervised": focus_result["usage"]}
    for prevention in COLLAPSE_PREVENTIONS[1:]:
        remedied = by_name.get(dataclasses.replace(focus, prevention=prevention).name)
        if remedied is not None:
            usage[f"unsupervised + {prevention}"] = remedied["usage"]
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
    from ...io import atomic_write_text

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
                  "*qualitative* findings (more active experts help, supervised routing is not better, random routing "
                  "is worse, about half the experts collapse, experts are more separable than classes) can be "
                  "compared. Run "
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
    lines.append("")

    if s["routing"]:
        lines += ["## Unsupervised vs supervised vs label routing", "",
                  f"At the largest data fraction with E = {next(iter(s['routing'].values()))['num_experts']} "
                  "(the number of classes; the paper's supervised baseline used E = 5 = classes). *supervised* is "
                  "the authors' baseline (gate trained by cross-entropy on the label, hard routing by the gate); "
                  "*label* routes every image to the expert of its class (an oracle, ours); *random* sends every "
                  "image to a uniformly random expert, afresh at every pass (the paper's control).", "",
                  "| routing | test SSE (ours) | active | separability of experts | published |", "|---|---|---|---|---|"]
        published = {"unsupervised": f"{PUBLISHED_SSE[1.0]['5']} (5 active), best {PUBLISHED_SSE[1.0]['best'][1]}",
                     "supervised": f"{PUBLISHED_SUPERVISED_SSE}", "label": "–",
                     "random": f"{PUBLISHED_RANDOM_ROUTING['random']} vs {PUBLISHED_RANDOM_ROUTING['learned']} learned "
                               f"({PUBLISHED_RANDOM_ROUTING['fraction']:.0%} data, 5 active)"}
        for mode, r in s["routing"].items():
            lines.append(f"| {mode} | {_f(r['sse'])} | {_f(r['active'], 1)} | {_f(r['separability_experts'], pct=True)} "
                         f"| {published[mode]} |")
        lines.append("")

    if s["collapse"]:
        lines += ["## Expert collapse", "",
                  "Configured experts that stay active after training, as published (*none*) and with each "
                  "`--collapse-prevention` mechanism: *revive* re-initialises an expert that won fewer than 10 "
                  "training images in an epoch by splitting the busiest expert (decoder copied, gate rows moved "
                  "apart); *gate-bias* raises, after every step, the gate's output bias of each expert that won "
                  "less than half its fair share of the batch (loss-free balancing on the routing bias). "
                  f"Means over {len(plan.seeds)} seed(s).", ""]
        if "collapse" in figures:
            lines += [f"![expert collapse]({_rel(plan, figures['collapse'])})", ""]
        mechanisms = [m for m in COLLAPSE_PREVENTIONS if any(c["prevention"] == m for c in s["collapse"])]
        lines += ["| E | " + " | ".join(f"active, {m} (authors' / all)" for m in mechanisms) + " | "
                  + " | ".join(f"SSE, {m}" for m in mechanisms) + " | paper: active (100 % data) |",
                  "|---|" + "---|" * (2 * len(mechanisms) + 1)]
        for e in sorted({c["num_experts"] for c in s["collapse"]}):
            row = {c["prevention"]: c for c in s["collapse"] if c["num_experts"] == e}
            cell = (lambda c: f"{_f(c['active_subsample'], 1)} / {_f(c['active_experts'], 1)}" if c else "–")
            lines.append(f"| {e} | " + " | ".join(cell(row.get(m)) for m in mechanisms) + " | "
                         + " | ".join(_f(row[m]["sse"] if m in row else None) for m in mechanisms)
                         + f" | {PUBLISHED_ACTIVE.get(e, '–')} |")
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
                  and run_prevention(r) == "none" and r.get("per_expert")), None)
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
                             ("reconstructions", "reconstructions per expert, with its average input and average reconstruction")):
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
