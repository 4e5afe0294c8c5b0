"""The reproduction's numbers: the published ones (PAPER.md) and the tables our runs aggregate to,
with the paper's qualitative findings checked against them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..model import ROUTINGS
from ..train import COLLAPSE_PREVENTIONS

if TYPE_CHECKING:
    from .runs import Plan


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


# --------------------------------------------------------------------------- aggregation
def run_prevention(result: dict[str, Any]) -> str:
    """A run's collapse prevention; results written before it existed had a ``revive`` flag."""
    spec = result["spec"]
    return spec.get("prevention") or ("revive" if spec.get("revive") else "none")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(plan: Plan, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Tables of the report, as data: size sweep grouped by active experts, routing, collapse, separability."""
    plain = [r for r in results if r["spec"]["routing"] == "unsupervised" and run_prevention(r) == "none"]
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

    def mean_of(key, prevention="none", **match):
        rows = [r for r in at_top if run_prevention(r) == prevention and all(r["spec"][k] == v for k, v in match.items())]
        return (_mean(r[key] for r in rows), len(rows)) if rows else (None, 0)

    routing = {}
    num_classes = len(results[0]["class_names"]) if results else 0
    for mode in ROUTINGS:
        sse, n = mean_of("sse_per_image", routing=mode, num_experts=num_classes)
        if n:
            routing[mode] = {"num_experts": num_classes, "sse": sse, "runs": n,
                             "active": mean_of("active_experts", routing=mode, num_experts=num_classes)[0],
                             "separability_experts": mean_of("separability_experts", routing=mode,
                                                             num_experts=num_classes)[0]}
    collapse = []
    for e in sorted({r["spec"]["num_experts"] for r in at_top if r["spec"]["routing"] == "unsupervised"}):
        for prevention in COLLAPSE_PREVENTIONS:
            sse, n = mean_of("sse_per_image", prevention, routing="unsupervised", num_experts=e)
            if n:
                collapse.append({"num_experts": e, "prevention": prevention, "sse": sse, "runs": n,
                                 "active_experts": mean_of("active_experts", prevention, routing="unsupervised",
                                                           num_experts=e)[0],
                                 "active_subsample": mean_of("active_experts_subsample", prevention,
                                                             routing="unsupervised", num_experts=e)[0]})
    separability = []
    for e in sorted({r["spec"]["num_experts"] for r in at_top}):
        rows = [r for r in at_top if r["spec"]["num_experts"] == e and r["spec"]["routing"] == "unsupervised"
                and run_prevention(r) == "none" and e > 1]
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
    if "unsupervised" in routing and "random" in routing:
        u, rnd = routing["unsupervised"]["sse"], routing["random"]["sse"]
        findings.append(("random routing (the control) reconstructs worse than learned routing",
                         f"random {rnd:.2f} vs learned {u:.2f} (E={routing['random']['num_experts']})", rnd > u))
    plain = [c for c in summary["collapse"] if c["prevention"] == "none" and c["num_experts"] > 1]
    if not plain:   # no collapse experiment: the sweep's runs show collapse too
        plain = [{"num_experts": c["num_experts"], "active_subsample": c["active_subsample"]}
                 for c in (top["by_configured"] if top else []) if c["num_experts"] > 1]
    if plain:
        share = float(np.mean([c["active_subsample"] / c["num_experts"] for c in plain]))
        findings.append(("about half the configured experts collapse (stay inactive)",
                         f"{share:.0%} of configured experts active", 0.3 <= share <= 0.7))
    for prevention in COLLAPSE_PREVENTIONS[1:]:   # ours (issue 15's target), not the paper's
        pairs = [(c, next((p for p in summary["collapse"] if p["prevention"] == "none"
                           and p["num_experts"] == c["num_experts"]), None))
                 for c in summary["collapse"] if c["prevention"] == prevention and c["num_experts"] > 1]
        pairs = [(c, p) for c, p in pairs if p is not None]
        if pairs:
            findings.append((f"(ours) --collapse-prevention {prevention} keeps >= 90% of the experts active at no "
                             "SSE cost",
                             "; ".join(f"E={c['num_experts']}: {c['active_subsample']:.1f} active, SSE {c['sse']:.2f} "
                                       f"vs {p['sse']:.2f} without" for c, p in pairs),
                             all(c["active_subsample"] >= 0.9 * c["num_experts"] and c["sse"] <= p["sse"]
                                 for c, p in pairs)))
    for row in summary["separability"]:
        if row["separability_experts"] is not None and row["separability_labels"] is not None:
            findings.append((f"experts are more linearly separable than classes (E={row['num_experts']})",
                             f"{row['separability_experts']:.1%} vs {row['separability_labels']:.1%}",
                             row["separability_experts"] > row["separability_labels"]))
    return findings


