"""The SMoE-VAE's ``smoe-fast train`` and ``smoe-fast eval`` (:mod:`.train`, :mod:`.eval`), and what they share:
the data and runtime options and the summary table both print."""
from __future__ import annotations

import argparse
from pathlib import Path

from ...backends import Backend
from ..data import DATA_SOURCES, QUICKDRAW_CATEGORIES


def add_data_arguments(p: argparse.ArgumentParser, num_train: int | None, num_test: int | None) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATA_SOURCES, default="synthetic",
                   help="data source: the built-in synthetic sketches (default), QuickDraw sketch-rnn .npz stroke "
                        "files, or QuickDraw full_numpy_bitmap .npy files")
    g.add_argument("--root", type=Path, default=None, help="directory holding the QuickDraw files")
    g.add_argument("--categories", nargs="+", metavar="NAME", default=None,
                   help=f"class names, in label order (default: {' '.join(QUICKDRAW_CATEGORIES)}, the paper's); "
                        "QuickDraw reads one file per name, synthetic data knows only these five")
    g.add_argument("--fraction", type=float, default=1.0,
                   help="dataset fraction p of PAPER.md (QuickDraw: train = first p*70,000 sketches per class)")
    g.add_argument("--download", action="store_true", help="fetch missing QuickDraw files into --root")
    g.add_argument("--num-train", type=int, default=num_train, help="training images (synthetic)")
    g.add_argument("--num-test", type=int, default=num_test, help="test images (synthetic)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data set")


def load_data(args, categories=None):
    """(train, test) as the data options in ``args`` choose them; ``categories`` is the fallback when
    ``--categories`` is not given (eval passes the checkpoint's)."""
    from ..data import load_data

    return load_data(args.data, root=args.root, fraction=args.fraction, seed=args.data_seed, download=args.download,
                     num_train=args.num_train, num_test=args.num_test, categories=args.categories or categories)


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=[b.value for b in Backend], default="auto",
                   help="expert dispatch backend (auto: triton on CUDA, else cpp if it builds, else reference)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (auto: cuda if available)")


def auto_choice(device) -> str:
    from ...backends import resolve_backend

    return resolve_backend("auto", device).value


def print_summary(model, evaluation, data, title: str = "") -> None:
    """The summary table: test SSE per image, active experts, per-expert usage and dominant class."""
    import numpy as np

    E = model.num_experts
    counts = np.bincount(evaluation.expert_idx.numpy(), minlength=E)
    names = getattr(data, "class_names", None) or ()
    print()
    if title:
        print(title)
    print(f"test SSE per image: {evaluation.sse_per_image:.2f}   (per pixel {evaluation.sse_per_image / 784:.4f}; "
          f"hard routing, sampled z)")
    print(f"active experts:     {evaluation.active_experts} of {E}   (an expert is active if it wins >= 10 test images)")
    print()
    print(f"{'expert':>6}  {'images':>7}  {'usage':>6}  {'SSE/img':>8}  dominant class")
    for e in range(E):
        won = evaluation.expert_idx == e
        if counts[e]:
            labels = evaluation.labels[won].numpy()
            top = np.bincount(labels).argmax()
            share = (labels == top).mean()
            name = names[top] if top < len(names) else str(top)
            dominant = f"{name} ({share:.0%})"
            sse = f"{float(evaluation.image_sse[won].mean()):8.2f}"
        else:
            dominant, sse = "-", f"{'-':>8}"
        print(f"{e:>6}  {counts[e]:>7}  {counts[e] / max(counts.sum(), 1):>6.1%}  {sse}  {dominant}")
