"""Figures of the paper's analysis, written as PNG files (matplotlib, Agg canvas).

Every function takes arrays (torch or numpy), writes one PNG to ``path`` and returns the path. No
pyplot state is used: figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, so nothing
here changes a user's matplotlib backend. matplotlib and scikit-learn are imported inside the functions.

| function | figure |
|---|---|
| :func:`plot_tsne` | t-SNE of z, coloured by class and by expert (the paper's Fig. 3) |
| :func:`plot_sse_vs_active` | test SSE vs active experts per data set size, with the published points |
| :func:`plot_expert_usage` | wins per expert, one group of bars per run |
| :func:`plot_contingency` | class x expert heat map |
| :func:`plot_expert_reconstructions` | per expert: images it wins and its reconstructions |
| :func:`plot_most_exciting` | per expert: its most exciting inputs (highest gate probability) |
| :func:`plot_collapse` | active share of configured experts with and without reviving dead experts |

>>> from smoe_fast import figures
>>> figures.plot_tsne(ev.z, ev.labels, ev.expert_idx, "tsne.png", class_names=test.class_names)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .analysis import _as_numpy, expert_counts

TSNE_MAX_POINTS = 2_000
TSNE_SINGLE_THREAD_POINTS = 2_000


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def _colours(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def tsne_embedding(z, max_points: int = TSNE_MAX_POINTS, seed: int = 42, perplexity: float = 30.0,
                   max_iter: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE of z [N, L] on at most ``max_points`` samples -> (embedding [n, 2], indices [n]).

    ``sklearn.manifold.TSNE(n_components=2, perplexity=30, random_state=42, max_iter=...)`` as in the
    paper (the authors' ``n_iter`` keyword is called ``max_iter`` since scikit-learn 1.5). The subsample
    is drawn by ``np.random.default_rng(seed)``; perplexity is capped below n for tiny inputs.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    z = _as_numpy(z).astype(np.float32)
    n = z.shape[0]
    indices = np.sort(np.random.default_rng(seed).permutation(n)[:max_points]) if n > max_points else np.arange(n)
    if indices.size < 3:
        raise ValueError(f"t-SNE needs at least 3 samples, got {indices.size}")
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (indices.size - 1) / 3), random_state=42,
                max_iter=max_iter, init="pca")
    # Small inputs on one thread: on a loaded machine OpenMP barriers made 100 points take 22 s instead of 0.1 s.
    with threadpool_limits(1 if indices.size <= TSNE_SINGLE_THREAD_POINTS else None, user_api="openmp"):
        return tsne.fit_transform(z[indices]), indices


def plot_tsne(z, labels, expert_idx, path, class_names: Sequence[str] | None = None,
              max_points: int = TSNE_MAX_POINTS, max_iter: int = 1000, title: str = "") -> Path:
    """t-SNE of z [N, L] in two panels, coloured by class (labels [N]) and by expert (expert_idx [N])."""
    emb, idx = tsne_embedding(z, max_points=max_points, max_iter=max_iter)
    labels, experts = _as_numpy(labels)[idx], _as_numpy(expert_idx)[idx]
    fig = _figure(11, 5)
    axes = fig.subplots(1, 2)
    for ax, values, kind in ((axes[0], labels, "class"), (axes[1], experts, "expert")):
        present = np.unique(values)
        colours = _colours(int(values.max()) + 1 if values.size else 1)
        for v in present:
            name = class_names[v] if kind == "class" and class_names is not None and v < len(class_names) \
                else f"{kind} {v}"
            sel = values == v
            ax.scatter(emb[sel, 0], emb[sel, 1], s=4, color=colours[v], label=f"{name} ({sel.sum()})", alpha=0.7)
        ax.set_title(f"coloured by {kind}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(markerscale=3, fontsize=7, loc="best", ncols=2 if present.size > 8 else 1)
    fig.suptitle(title or f"t-SNE of the latent z ({idx.size} test images)")
    return _save(fig, path)


def plot_sse_vs_active(points: Sequence[dict], path, reference: dict | None = None, overlay: bool = True,
                       title: str = "") -> Path:
    """The paper's main figure: test SSE per image against the number of ACTIVE experts.

    points: dicts with ``train_size`` (int), ``active_experts`` (number) and ``sse`` (float); one line
    per train size, sorted by active experts. reference: the published numbers,
    {train_size: {"1": sse, "5": sse, "best": (active, sse)}} (see ``reproduce.PUBLISHED_SSE``), drawn
    as hollow squares on dashed lines: on the same axes with ``overlay=True`` (QuickDraw), or in a
    second panel with ``overlay=False`` (other data, whose absolute SSE is not comparable).
    """
    panels = 1 if overlay or not reference else 2
    fig = _figure(7.5 * panels, 5)
    axes = list(np.atleast_1d(fig.subplots(1, panels)))
    sizes = sorted({int(p["train_size"]) for p in points})
    for colour, size in zip(_colours(max(len(sizes), 1)), sizes):
        mine = sorted((p for p in points if int(p["train_size"]) == size), key=lambda p: p["active_experts"])
        axes[0].plot([p["active_experts"] for p in mine], [p["sse"] for p in mine], "o-", color=colour,
                     label=f"ours, {size:,} train images")
    if reference:
        ax = axes[-1]
        for colour, (size, ref) in zip(_colours(len(reference)), sorted(reference.items())):
            xs, ys = np.array([1, 5, ref["best"][0]]), np.array([ref["1"], ref["5"], ref["best"][1]])
            order = np.argsort(xs, kind="stable")
            ax.plot(xs[order], ys[order], "s--", color=colour, mfc="none", alpha=0.7,
                    label=f"published, {int(size):,} train images")
    axes[0].set_title(title or "Test reconstruction error vs active experts")
    if panels == 2:
        axes[1].set_title("Published (QuickDraw, arXiv 2509.10025):\nnot comparable in absolute value", fontsize=10)
    for ax in axes:
        ax.set_xlabel("active experts (win >= 10 test images)")
        ax.set_ylabel("test SSE per image (784 pixels)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncols=2 if panels == 1 and reference else 1)
    return _save(fig, path)


def plot_expert_usage(runs: dict[str, Sequence[float]], path, title: str = "") -> Path:
    """Bars of the share of test images each expert wins; runs maps a run name to usage [E]."""
    fig = _figure(max(6.0, 0.35 * max((len(u) for u in runs.values()), default=1) * max(len(runs), 1) + 2), 4)
    ax = fig.subplots()
    width = 0.8 / max(len(runs), 1)
    for i, (name, usage) in enumerate(runs.items()):
        usage = np.asarray(usage, dtype=float)
        ax.bar(np.arange(usage.size) + i * width - 0.4 + width / 2, usage, width, label=name)
    ax.set_xlabel("expert")
    ax.set_ylabel("share of test images won")
    ax.set_title(title or "Expert usage (hard routing)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_contingency(table, path, class_names: Sequence[str] | None = None, title: str = "") -> Path:
    """Heat map of the class x expert table [C, E] (counts), annotated, rows normalised for colour."""
    table = np.asarray(table)
    fig = _figure(max(4.0, 0.5 * table.shape[1] + 2.5), max(3.0, 0.45 * table.shape[0] + 1.5))
    ax = fig.subplots()
    shares = table / np.maximum(table.sum(1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    if table.size <= 400:
        for (c, e), count in np.ndenumerate(table):
            ax.text(e, c, str(count), ha="center", va="center", fontsize=7,
                    color="black" if shares[c, e] > 0.5 else "white")
    ax.set_yticks(range(table.shape[0]), class_names[:table.shape[0]] if class_names else range(table.shape[0]))
    ax.set_xticks(range(table.shape[1]))
    ax.set_xlabel("expert")
    ax.set_ylabel("class")
    fig.colorbar(image, ax=ax, label="share of the class")
    ax.set_title(title or "Class x expert (test images)")
    return _save(fig, path)


def _image_grid(fig, rows: list[tuple[str, list[np.ndarray | None]]], columns: int,
                column_titles: dict[int, str] | None = None) -> None:
    """Rows of 28x28 images (None leaves a cell blank), each row named on its left."""
    axes = np.atleast_2d(fig.subplots(len(rows), columns, squeeze=False))
    for r, (name, images) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(images) and images[c] is not None:
                ax.imshow(images[c].reshape(28, 28), cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    for c, text in (column_titles or {}).items():
        axes[0, c].set_title(text, fontsize=8)


def plot_most_exciting(images, top_indices: Sequence, path, expert_ids: Sequence[int] | None = None,
                       title: str = "") -> Path:
    """One row per expert: its most exciting inputs, left to right by descending gate probability.

    images [N, 1, 28, 28] in [0, 1]; top_indices: per expert an index array into images
    (:func:`smoe_fast.analysis.most_exciting_inputs`). Experts that win nothing are left out.
    """
    images = _as_numpy(images)
    ids = list(expert_ids) if expert_ids is not None else list(range(len(top_indices)))
    rows = [(f"expert {e}", [images[i] for i in np.asarray(top_indices[e])]) for e in ids if len(top_indices[e])]
    if not rows:
        raise ValueError("no expert wins any image: nothing to plot")
    columns = max(len(r[1]) for r in rows)
    fig = _figure(0.8 * columns + 1.2, 0.8 * len(rows) + 0.6)
    _image_grid(fig, rows, columns)
    fig.suptitle(title or "Most exciting inputs per expert (highest gate probability first)", fontsize=9)
    return _save(fig, path)


@torch.no_grad()
def plot_expert_reconstructions(model, images, expert_idx, path, labels=None, per_expert: int = 6,
                                average_over: int = 500, title: str = "") -> Path:
    """Per active expert, two rows: images it wins (top) and its hard-routed reconstructions (below),
    then in the last column the average input and the average reconstruction over (up to
    ``average_over`` of) the images it wins: what the expert draws for its share of the data.

    model: an SMoEVAE; images [N, 1, 28, 28]; expert_idx [N] (from an evaluation); labels [N] needed
    under label routing. Reconstructions use z = mu (deterministic). Shows the first ``per_expert``
    images each expert wins.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    idx = _as_numpy(expert_idx)
    rows = []
    try:
        with torch.no_grad():
            for e in np.flatnonzero(expert_counts(idx, model.num_experts)):
                chosen = np.flatnonzero(idx == e)[:max(per_expert, average_over)]
                x = torch.as_tensor(_as_numpy(images)[chosen]).to(device)
                y = torch.as_tensor(_as_numpy(labels)[chosen]).to(device) if labels is not None else None
                mu, _ = model.encode(x)
                recon = model.decode(mu, y if model.routing == "label" else None)[0].cpu().numpy()
                x = x.cpu().numpy()
                rows.append((f"expert {e}\ninput", list(x[:per_expert]) + [None] * (per_expert - min(per_expert, len(x)))
                             + [x.mean(0)]))
                rows.append(("output", list(recon[:per_expert]) + [None] * (per_expert - min(per_expert, len(x)))
                             + [recon.mean(0)]))
    finally:
        model.train(was_training)
    if not rows:
        raise ValueError("no expert wins any image: nothing to plot")
    fig = _figure(0.8 * (per_expert + 1) + 1.4, 0.8 * len(rows) + 0.6)
    _image_grid(fig, rows, per_expert + 1, column_titles={per_expert: "average"})
    fig.suptitle(title or "Reconstructions per expert (z = mu, hard routing); last column: averages", fontsize=9)
    return _save(fig, path)


def plot_collapse(rows: Sequence[dict], path, reference: dict | None = None, title: str = "") -> Path:
    """Expert collapse: share of configured experts that stay active, per collapse-prevention mechanism.

    rows: dicts with ``num_experts``, ``prevention`` ("none" = as published, or a mechanism's name),
    ``active_experts`` and ``sse``. Left panel: active / configured by E; right panel: test SSE by E.
    reference: published {E: mean active} (``reproduce.PUBLISHED_ACTIVE``), hollow squares on the left.
    """
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    mechanisms = list(dict.fromkeys(r["prevention"] for r in rows))
    for prevention, style in zip(mechanisms, ("o-", "s--", "^-.", "v:", "D-")):
        mine = sorted((r for r in rows if r["prevention"] == prevention), key=lambda r: r["num_experts"])
        label = "ours, as published" if prevention == "none" else f"ours, with {prevention}"
        es = [r["num_experts"] for r in mine]
        axes[0].plot(es, [r["active_experts"] / r["num_experts"] for r in mine], style, label=label)
        axes[1].plot(es, [r["sse"] for r in mine], style, label=label)
    if reference:
        es = sorted(reference)
        axes[0].plot(es, [reference[e] / e for e in es], "s:", color="gray", mfc="none", label="published (QuickDraw)")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_ylabel("active / configured experts")
    axes[1].set_ylabel("test SSE per image")
    for ax in axes:
        ax.set_xlabel("configured experts E")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Expert collapse")
    return _save(fig, path)
