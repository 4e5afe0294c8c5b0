"""The ``smoe-fast`` command line: train, eval, info, profile, reproduce."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import platform
import sys
from pathlib import Path

from .backends import Backend
from .vae.data import DATA_SOURCES



def _add_data_arguments(p: argparse.ArgumentParser, num_train: int | None, num_test: int | None) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATA_SOURCES, default="synthetic",
                   help="data source: the built-in synthetic sketches (default), QuickDraw sketch-rnn .npz stroke "
                        "files, or QuickDraw full_numpy_bitmap .npy files")
    g.add_argument("--root", type=Path, default=None, help="directory holding the QuickDraw files")
    g.add_argument("--fraction", type=float, default=1.0,
                   help="dataset fraction p of PAPER.md (QuickDraw: train = first p*70,000 sketches per class)")
    g.add_argument("--download", action="store_true", help="fetch missing QuickDraw files into --root")
    g.add_argument("--num-train", type=int, default=num_train, help=f"training images (synthetic; default {num_train})")
    g.add_argument("--num-test", type=int, default=num_test, help=f"test images (synthetic; default {num_test})")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data set")


def _load_data(args):
    from .vae.data import load_data

    return load_data(args.data, root=args.root, fraction=args.fraction, seed=args.data_seed, download=args.download,
                     num_train=args.num_train, num_test=args.num_test)


def _add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=[b.value for b in Backend], default="auto",
                   help="expert dispatch backend (default auto: triton on CUDA, else cpp if it builds, else reference)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train an SMoE-VAE (no arguments: a short run on the synthetic sketches)",
                       description="Train an SMoE-VAE and print a summary table. With no arguments: a short run on "
                                   "the built-in synthetic sketches that finishes in a few minutes on 2 CPU cores.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_arguments(p, num_train=8000, num_test=2000)
    m = p.add_argument_group("model")
    m.add_argument("--experts", type=int, default=5, help="number of decoder experts E")
    m.add_argument("--latent-dim", type=int, default=32)
    m.add_argument("--encoder", choices=("medium", "lite"), default="medium")
    m.add_argument("--decoder", choices=("lite", "medium", "mlp"), default="lite")
    m.add_argument("--routing", choices=("unsupervised", "supervised", "label"), default="unsupervised")
    m.add_argument("--gating", choices=("soft", "hard", "topk"), default=None,
                   help="training gating override (default: soft for unsupervised, hard otherwise)")
    m.add_argument("--top-k", type=int, default=2, help="experts per image with --gating topk")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=3)
    o.add_argument("--batch-size", type=int, default=128)
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--beta", type=float, default=0.01, help="KL weight (the authors' code value)")
    o.add_argument("--reduction", choices=("paper", "per_sample"), default="paper",
                   help="loss normalisation: the paper's batch sums, or per-sample normalised")
    o.add_argument("--revive-dead-experts", action="store_true",
                   help="re-initialise experts that win < 10 training images in an epoch from the busiest one")
    o.add_argument("--seed", type=int, default=0)
    _add_runtime_arguments(p)
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="output directory (checkpoint, metrics.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_train(args) -> int:
    from .vae.train import NonFiniteLossError, TrainConfig, evaluate, resolve_device, train

    device = resolve_device(args.device)
    config = TrainConfig(num_experts=args.experts, latent_dim=args.latent_dim, encoder=args.encoder,
                         decoder=args.decoder, routing=args.routing, gating=args.gating, top_k=args.top_k,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, beta=args.beta,
                         reduction=args.reduction, seed=args.seed, backend=args.backend, device=str(device),
                         revive_dead_experts=args.revive_dead_experts)
    train_set, test_set = _load_data(args)
    print(f"training on {train_set.images.shape[0]:,} {args.data} images ({test_set.images.shape[0]:,} test), "
          f"E={args.experts}, {args.epochs} epochs, device {device}, backend {args.backend}"
          f"{'' if args.backend != 'auto' else ' -> ' + _auto_choice(device)}")
    try:
        result = train(config, train_set, test_set, out_dir=args.out, resume=args.resume, progress=not args.no_progress)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(result.model, evaluate(result.model, test_set, seed=config.seed), test_set,
                  title=f"after {len(result.history)} epochs: {args.out}/checkpoint.pt")
    return 0


def _auto_choice(device) -> str:
    from .backends import resolve_backend

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


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (ours, or the authors' .pth)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a smoe-fast checkpoint (or run directory) or an authors' state_dict .pth")
    p.add_argument("--decoder", choices=("lite", "medium", "mlp"), default=None,
                   help="for an authors' checkpoint: expected decoder kind (default: read from the file)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled z")
    _add_data_arguments(p, num_train=0, num_test=2000)
    _add_runtime_arguments(p)


def _run_eval(args) -> int:
    from .vae.model import SMoEVAE
    from .vae.train import evaluate, load_checkpoint, resolve_device

    device = resolve_device(args.device)
    try:
        model, _ = load_checkpoint(args.checkpoint, backend=args.backend, device=str(device))
    except ValueError as ours_error:
        try:
            model = SMoEVAE.load_authors_checkpoint(args.checkpoint, decoder=args.decoder, backend=args.backend).to(device)
        except ValueError as authors_error:
            print(f"error: {ours_error}\n       as an authors' checkpoint: {authors_error}", file=sys.stderr)
            return 2
    _, test_set = _load_data(args)
    sampled = evaluate(model, test_set, seed=args.seed)
    deterministic = evaluate(model, test_set, sample=False)
    print_summary(model, sampled, test_set, title=f"{args.checkpoint}: {test_set.images.shape[0]:,} {args.data} test images")
    print(f"\ntest SSE per image with z = mu (deterministic): {deterministic.sse_per_image:.2f}")
    return 0


def _info_parser(sub) -> None:
    sub.add_parser("info", help="versions, devices and which backends are available (and why not)")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _run_info(args) -> int:
    import torch

    from . import __version__
    from .backends import describe_backends

    print(f"smoe_fast {__version__}   python {platform.python_version()}   {platform.platform()}")
    for dist in ("torch", "triton", "numpy", "scikit-learn", "ninja", "pytest-benchmark"):
        print(f"  {dist:<17}{_version(dist)}")
    cuda = torch.cuda.is_available()
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda else [])
    print(f"devices: {', '.join(devices)}" + ("" if cuda else "   (torch sees no CUDA GPU)"))
    if cuda:
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i}  {torch.cuda.get_device_name(i)}  sm_{''.join(map(str, torch.cuda.get_device_capability(i)))}")
    if importlib.util.find_spec("smoe_fast.extension") is not None:
        from . import extension

        print("C++/CUDA extension:")
        for key, value in extension.status().items():
            print(f"  {key:<17}{value}")
    for device in devices[:2]:
        print(f"backends on {device}:")
        for name, state in describe_backends(device, build=False).items():
            print(f"  {name:<17}{state}")
    return 0


# Commands whose arguments and runner live in their own module (add_arguments(parser), run(args)).
DELEGATED_COMMANDS = {"profile": "smoe_fast.profile", "reproduce": "smoe_fast.vae.reproduce"}


def _delegated_parser(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    importlib.import_module(DELEGATED_COMMANDS[name]).add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoe-fast", description="Fast sparse mixture-of-experts dispatch and the "
                                     "SMoE-VAE of arXiv 2509.10025: train, evaluate, profile, reproduce.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"smoe_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)
    _eval_parser(sub)
    _info_parser(sub)
    _delegated_parser(sub, "profile", "time the expert stage against the number of experts (table, CSV, plot)")
    _delegated_parser(sub, "reproduce", "run the paper's experiments and write results.json and report.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    runners = {"train": _run_train, "eval": _run_eval, "info": _run_info}
    try:
        if args.command in runners:
            return runners[args.command](args)
        return importlib.import_module(DELEGATED_COMMANDS[args.command]).run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint written is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
