"""Measurements of expert specialisation (shared/PAPER.md "Metrics" and the other seed papers).

N samples, E experts, L latent size, C classes. Inputs may be torch tensors or numpy arrays; every
function returns numpy arrays or plain Python numbers (JSON-friendly through :func:`to_jsonable`).

| function | what it measures |
|---|---|
| :func:`expert_counts`, :func:`expert_usage` | wins per expert (hard argmax), as counts / fractions |
| :func:`active_experts` | the authors' rule: experts winning >= 10 samples, counted over all samples given |
| :func:`active_experts_subsample` | the same rule on a shuffled subsample of ~6,700 images, as the authors counted |
| :func:`network_sparsity` | active / configured experts ("Sparsity and Superposition in MoE") |
| :func:`contingency_table` | class x expert win counts [C, E] |
| :func:`linear_separability` | the paper's logistic-regression probe (accuracy in [0, 1]) |
| :func:`clustering_agreement` | AMI / NMI / purity of experts against any labelling (classes, sub-styles) |
| :func:`compare_experts_with_labels` | the paper's comparison: probe accuracy for experts vs classes, plus agreement |
| :func:`substyle_recovery` | with sub-style ground truth (synthetic data): do experts find sub-styles or classes? |
| :func:`per_expert_separability` | per-expert category separability and purity ("Beyond Routing") |
| :func:`most_exciting_inputs` | each expert's most exciting inputs: its wins with the highest gate probability |

scikit-learn (and matplotlib, in :mod:`smoe_fast.figures`) are imported inside the functions that need
them, so importing this module is cheap.

Counting active experts. The paper counted wins over about 6,700 shuffled test images (the authors'
loop stopped early); with the whole test set (12,500 images at 100 % data) the threshold of 10 wins is
easier to reach, so :func:`active_experts` on the full set can be higher than the published count.
Reports give both: ``active_experts`` (whole set) and ``active_experts_subsample`` (n = 6,700).

>>> from smoe_fast import analysis
>>> ev = evaluate(model, test)                                   # smoe_fast.vae.train.evaluate
>>> analysis.active_experts(ev.expert_idx, model.num_experts)    # whole test set
>>> analysis.compare_experts_with_labels(ev.z, ev.expert_idx, ev.labels)["separability_experts"]
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

AUTHORS_ACTIVE_SUBSAMPLE = 6_700   # test images over which the authors counted wins
SEPARABILITY_MAX_SAMPLES = 10_000  # the paper's probe uses 10,000 test samples
SEPARABILITY_RANDOM_STATE = 42


def _as_numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _as_indices(a, name: str) -> np.ndarray:
    """1-D integer array, or a ValueError that says what was found."""
    arr = _as_numpy(a).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer indices, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be >= 0, found {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def expert_counts(expert_idx, num_experts: int) -> np.ndarray:
    """Wins per expert: expert_idx [N] int -> [E] int64 counts summing to N.

    >>> expert_counts([0, 2, 2], 4)
    array([1, 0, 2, 0])
    """
    idx = _as_indices(expert_idx, "expert_idx")
    if idx.size and idx.max() >= num_experts:
        raise ValueError(f"expert_idx must be < num_experts={num_experts}, found {int(idx.max())}")
    return np.bincount(idx, minlength=num_experts).astype(np.int64)


def expert_usage(expert_idx, num_experts: int) -> np.ndarray:
    """Fraction of samples won by each expert: [E] floats summing to 1 (zeros for no samples)."""
    counts = np.bincount(_as_numpy(expert_idx).reshape(-1), minlength=num_experts).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def active_experts(expert_idx, num_experts: int, min_wins: int = 10) -> int:
    """The authors' rule: an expert is active if it wins the argmax for at least ``min_wins`` samples."""
    counts = np.bincount(_as_numpy(expert_idx).reshape(-1), minlength=num_experts)
    return int((counts >= min_wins).sum())


def active_experts_subsample(expert_idx, num_experts: int, n: int = AUTHORS_ACTIVE_SUBSAMPLE,
                             min_wins: int = 10, seed: int = 0) -> int:
    """The authors' count: :func:`active_experts` over ``n`` shuffled samples (all of them if N <= n).

    expert_idx [N] int. The subsample is drawn without replacement by ``np.random.default_rng(seed)``.

    >>> active_experts_subsample(ev.expert_idx, 10)          # comparable with PAPER.md's counts
    """
    idx = _as_indices(expert_idx, "expert_idx")
    if idx.size > n:
        idx = idx[np.random.default_rng(seed).permutation(idx.size)[:n]]
    return active_experts(idx, num_experts, min_wins)


def network_sparsity(expert_idx, num_experts: int, min_wins: int = 10) -> float:
    """Active / configured experts in [0, 1] ("Sparsity and Superposition in Mixture of Experts").

    >>> network_sparsity([0] * 10 + [1] * 10, 4)   # two of four experts active
    0.5
    """
    return active_experts(expert_idx, num_experts, min_wins) / num_experts


def contingency_table(labels, expert_idx, num_classes: int | None = None,
                      num_experts: int | None = None) -> np.ndarray:
    """Class x expert win counts: labels [N], expert_idx [N] -> [C, E] int64; entry (c, e) counts
    samples of class c routed to expert e. Rows sum to class sizes, columns to expert wins, all to N.

    >>> contingency_table([0, 0, 1], [2, 2, 0], num_experts=3)
    array([[0, 0, 2],
           [1, 0, 0]])
    """
    y, e = _as_indices(labels, "labels"), _as_indices(expert_idx, "expert_idx")
    if y.shape != e.shape:
        raise ValueError(f"labels and expert_idx must have the same length, got {y.size} and {e.size}")
    num_classes = int(y.max()) + 1 if num_classes is None and y.size else (num_classes or 0)
    num_experts = int(e.max()) + 1 if num_experts is None and e.size else (num_experts or 0)
    if y.size and (y.max() >= num_classes or e.max() >= num_experts):
        raise ValueError(f"labels must be < {num_classes} and expert_idx < {num_experts}; "
                         f"found max label {int(y.max())}, max expert {int(e.max())}")
    table = np.zeros((num_classes, num_experts), dtype=np.int64)
    np.add.at(table, (y, e), 1)
    return table


def linear_separability(features, targets, max_samples: int = SEPARABILITY_MAX_SAMPLES,
                        test_size: float = 0.2, random_state: int = SEPARABILITY_RANDOM_STATE,
                        max_iter: int = 1000) -> float:
    """The paper's linear probe: held-out accuracy in [0, 1] of a logistic regression features -> targets.

    features [N, L] float (the paper: sampled z of test images), targets [N] int (expert argmax or class).
    Protocol (PAPER.md): ``max_samples`` (10,000) samples (all of them if N <= 10,000, else a random subset
    drawn by ``np.random.default_rng(random_state)``, kept in order: test sets ordered by class, such as
    QuickDraw's, must not lose their last classes); ``train_test_split`` with
    ``test_size=0.2``, ``stratify=targets``, ``random_state=42``; ``LogisticRegression(max_iter=1000,
    random_state=42)`` fit on the 80 %, accuracy on the 20 %. Features are not standardised (as published).

    Edge cases (documented choices, not in the paper):
      * targets with fewer than 2 samples cannot be stratified: those samples are dropped (an expert
        that wins a single image carries no information about separability);
      * if a single target value remains, every classifier is exact: returns 1.0;
      * if too few samples remain for a split with one test sample per class, raises ValueError.

    >>> linear_separability(ev.z, ev.expert_idx)   # paper: 0.934 (experts) vs 0.851 (classes)
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = _prepare_probe(features, targets, max_samples, random_state)
    classes = np.unique(y)
    if classes.size == 1:
        return 1.0
    if math.ceil(test_size * y.size) < classes.size or y.size - math.ceil(test_size * y.size) < classes.size:
        raise ValueError(f"linear_separability needs at least one train and one test sample per target value: "
                         f"{y.size} samples, {classes.size} target values, test_size={test_size}")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, stratify=y,
                                                        random_state=random_state)
    probe = LogisticRegression(max_iter=max_iter, random_state=random_state)
    probe.fit(x_train, y_train)
    return float(probe.score(x_test, y_test))


def _probe_rows(n: int, max_samples: int, random_state: int) -> np.ndarray:
    """Rows the probe uses: all n, or a seeded random subset of max_samples in ascending order."""
    if n <= max_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(random_state).permutation(n)[:max_samples])


def _prepare_probe(features, targets, max_samples: int, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    x = _as_numpy(features).astype(np.float64, copy=False)
    y = _as_numpy(targets).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.size:
        raise ValueError(f"features must be [N, D] with N = len(targets) = {y.size}, got shape {tuple(x.shape)}")
    rows = _probe_rows(y.size, max_samples, random_state)
    x, y = x[rows], y[rows]
    values, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, values[counts >= 2])
    x, y = x[keep], y[keep]
    if y.size == 0:
        raise ValueError("linear_separability needs at least 2 samples of some target value, found none")
    return x, y


def clustering_agreement(expert_idx, reference) -> dict[str, float]:
    """How well the expert partition matches a reference labelling (classes or sub-styles).

    expert_idx [N], reference [N] ints -> {"ami", "nmi", "purity"}: adjusted mutual information and
    normalised mutual information (``sklearn.metrics``; 1 for identical partitions up to renaming,
    AMI ~ 0 for independent ones) and purity (share of samples whose expert's majority reference
    label equals their own; 1 when every expert is pure).

    >>> clustering_agreement([0, 0, 1, 1], [5, 5, 7, 7])["ami"]
    1.0
    """
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    e, r = _as_indices(expert_idx, "expert_idx"), _as_indices(reference, "reference")
    if e.shape != r.shape:
        raise ValueError(f"expert_idx and reference must have the same length, got {e.size} and {r.size}")
    if e.size == 0:
        return {"ami": math.nan, "nmi": math.nan, "purity": math.nan}
    _, r_dense = np.unique(r, return_inverse=True)
    _, e_dense = np.unique(e, return_inverse=True)
    table = contingency_table(r_dense, e_dense)
    return {"ami": float(adjusted_mutual_info_score(r, e)), "nmi": float(normalized_mutual_info_score(r, e)),
            "purity": float(table.max(axis=0).sum() / e.size)}


def compare_experts_with_labels(features, expert_idx, labels, **probe_kwargs) -> dict[str, float]:
    """The paper's comparison: is the latent space more linearly separable by expert or by class?

    features [N, L], expert_idx [N], labels [N] -> {"separability_experts", "separability_labels",
    "chance_experts", "chance_labels", "ami", "nmi", "purity"}. ``chance_*`` is the majority-class
    accuracy of the same probe samples (what a constant predictor scores); the agreement terms are
    :func:`clustering_agreement` of experts against classes. ``probe_kwargs`` go to
    :func:`linear_separability`.

    >>> compare_experts_with_labels(ev.z, ev.expert_idx, ev.labels)   # paper: 0.934 vs 0.851
    """
    max_samples = probe_kwargs.get("max_samples", SEPARABILITY_MAX_SAMPLES)
    random_state = probe_kwargs.get("random_state", SEPARABILITY_RANDOM_STATE)
    out = {"separability_experts": linear_separability(features, expert_idx, **probe_kwargs),
           "separability_labels": linear_separability(features, labels, **probe_kwargs),
           "chance_experts": _majority_share(expert_idx, max_samples, random_state),
           "chance_labels": _majority_share(labels, max_samples, random_state)}
    out.update(clustering_agreement(expert_idx, labels))
    return out


def _majority_share(targets, max_samples: int, random_state: int) -> float:
    y = _as_numpy(targets).reshape(-1)
    y = y[_probe_rows(y.size, max_samples, random_state)]
    return float(np.unique(y, return_counts=True)[1].max() / y.size) if y.size else math.nan


def substyle_recovery(expert_idx, labels, substyles) -> dict[str, float]:
    """Do experts recover sub-styles (finer than classes) or classes? For data with sub-style truth.

    expert_idx, labels, substyles [N] ints. Sub-styles are made globally unique as (class, sub-style)
    pairs, so both per-class and global sub-style numbering work. Returns
    {"ami_classes", "nmi_classes", "purity_classes", "ami_substyles", "nmi_substyles",
    "purity_substyles", "num_substyles"}: an expert set that splits classes into their sub-styles
    scores higher against sub-styles than against classes.

    >>> substyle_recovery(ev.expert_idx, test.labels, test.substyles)
    """
    y, s = _as_indices(labels, "labels"), _as_indices(substyles, "substyles")
    if y.shape != s.shape:
        raise ValueError(f"labels and substyles must have the same length, got {y.size} and {s.size}")
    joint = y * (int(s.max()) + 1 if s.size else 1) + s
    classes, styles = clustering_agreement(expert_idx, y), clustering_agreement(expert_idx, joint)
    out = {f"{k}_classes": v for k, v in classes.items()}
    out.update({f"{k}_substyles": v for k, v in styles.items()})
    out["num_substyles"] = int(np.unique(joint).size)
    return out


def per_expert_separability(features, expert_idx, labels, num_experts: int, min_samples: int = 20,
                            **probe_kwargs) -> list[dict[str, Any]]:
    """Per-expert category separability and tuning ("Beyond Routing", arXiv 2605.20610).

    features [N, L], expert_idx [N], labels [N] -> one dict per expert e in 0..E-1 with
      * ``wins``: samples routed to e; ``num_classes``: distinct classes among them;
      * ``purity``: share of its wins from its dominant class ``top_class`` (1 = monosemantic by class);
      * ``class_separability``: :func:`linear_separability` of the class labels among e's wins (how well
        e's region of latent space still separates categories); NaN with fewer than ``min_samples`` wins
        or a single class there (nothing to separate);
      * ``expert_vs_rest``: balanced accuracy of a one-vs-rest probe "won by e or not" on all samples
        (the paper's probe with a binary target; 0.5 = chance); NaN for an expert with < 2 wins.

    >>> rows = per_expert_separability(ev.z, ev.expert_idx, ev.labels, model.num_experts)
    """
    x = _as_numpy(features)
    e, y = _as_indices(expert_idx, "expert_idx"), _as_indices(labels, "labels")
    if not (x.shape[0] == e.size == y.size):
        raise ValueError(f"features, expert_idx and labels need the same N, got {x.shape[0]}, {e.size}, {y.size}")
    counts = expert_counts(e, num_experts)
    rows = []
    for expert in range(num_experts):
        mine = e == expert
        row: dict[str, Any] = {"expert": expert, "wins": int(counts[expert]), "num_classes": 0, "top_class": None,
                               "purity": math.nan, "class_separability": math.nan, "expert_vs_rest": math.nan}
        if counts[expert]:
            values, class_counts = np.unique(y[mine], return_counts=True)
            row.update(num_classes=int(values.size), top_class=int(values[class_counts.argmax()]),
                       purity=float(class_counts.max() / counts[expert]))
            if counts[expert] >= min_samples and values.size > 1:
                row["class_separability"] = _try_probe(x[mine], y[mine], **probe_kwargs)
        if 2 <= counts[expert] <= e.size - 2:
            row["expert_vs_rest"] = _balanced_probe(x, mine.astype(np.int64), **probe_kwargs)
        rows.append(row)
    return rows


def _try_probe(x: np.ndarray, y: np.ndarray, **probe_kwargs) -> float:
    try:
        return linear_separability(x, y, **probe_kwargs)
    except ValueError:   # too few samples per class for a stratified split
        return math.nan


def _balanced_probe(x: np.ndarray, y: np.ndarray, max_samples: int = SEPARABILITY_MAX_SAMPLES,
                    test_size: float = 0.2, random_state: int = SEPARABILITY_RANDOM_STATE,
                    max_iter: int = 1000) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import train_test_split

    x, y = _prepare_probe(x, y, max_samples, random_state)
    if np.unique(y).size < 2:
        return math.nan
    try:
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, stratify=y,
                                                            random_state=random_state)
    except ValueError:
        return math.nan
    probe = LogisticRegression(max_iter=max_iter, random_state=random_state).fit(x_train, y_train)
    return float(balanced_accuracy_score(y_test, probe.predict(x_test)))


def most_exciting_inputs(gates, expert_idx, k: int = 8) -> list[np.ndarray]:
    """Each expert's most exciting inputs: the samples it wins, highest gate probability first.

    gates [N, E] probabilities (or logits: only the order matters), expert_idx [N] the winning expert
    (usually gates.argmax(1); under label routing the label) -> list of E int64 arrays, entry e holds
    up to ``k`` sample indices i with expert_idx[i] == e, sorted by gates[i, e] descending (ties by
    ascending index). Experts that win nothing get an empty array.

    >>> top = most_exciting_inputs(ev.gates, ev.expert_idx, k=8)
    >>> test.images[top[3]]          # [<=8, 1, 28, 28]: what excites expert 3 most
    """
    g = _as_numpy(gates)
    e = _as_indices(expert_idx, "expert_idx")
    if g.ndim != 2 or g.shape[0] != e.size:
        raise ValueError(f"gates must be [N, E] with N = len(expert_idx) = {e.size}, got shape {tuple(g.shape)}")
    out = []
    for expert in range(g.shape[1]):
        mine = np.flatnonzero(e == expert)
        order = np.lexsort((mine, -g[mine, expert]))   # last key is primary: gate descending, then index
        out.append(mine[order[:k]].astype(np.int64))
    return out


def expert_report(evaluation, num_experts: int, substyles=None, min_wins: int = 10,
                  subsample: int = AUTHORS_ACTIVE_SUBSAMPLE, seed: int = 0,
                  per_expert: bool = True) -> dict[str, Any]:
    """Every measurement above for one :class:`smoe_fast.vae.train.Evaluation`, as a JSON-ready dict.

    Keys: sse_per_image, kl_per_image, num_experts, active_experts (whole set),
    active_experts_subsample (authors' count on ``subsample`` shuffled images), network_sparsity,
    usage [E], counts [E], contingency [C][E], the :func:`compare_experts_with_labels` keys, the
    :func:`substyle_recovery` keys when ``substyles`` is given, and per_expert (list of dicts).

    >>> report = expert_report(evaluate(model, test), model.num_experts, substyles=test.substyles)
    """
    idx, labels = evaluation.expert_idx, evaluation.labels
    out: dict[str, Any] = {
        "sse_per_image": float(evaluation.sse_per_image), "kl_per_image": float(evaluation.kl_per_image),
        "num_experts": int(num_experts), "num_samples": int(_as_numpy(idx).size),
        "active_experts": active_experts(idx, num_experts, min_wins),
        "active_experts_subsample": active_experts_subsample(idx, num_experts, subsample, min_wins, seed),
        "network_sparsity": network_sparsity(idx, num_experts, min_wins),
        "usage": expert_usage(idx, num_experts).tolist(), "counts": expert_counts(idx, num_experts).tolist(),
        "contingency": contingency_table(labels, idx, num_experts=num_experts).tolist(),
    }
    out.update(compare_experts_with_labels(evaluation.z, idx, labels))
    if substyles is not None:
        out.update(substyle_recovery(idx, labels, substyles))
    if per_expert:
        out["per_expert"] = per_expert_separability(evaluation.z, idx, labels, num_experts)
    return to_jsonable(out)


def to_jsonable(value):
    """Recursively turn numpy / torch scalars and arrays into plain Python; NaN becomes None."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return to_jsonable(_as_numpy(value).tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value
