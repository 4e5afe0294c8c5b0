"""``smoe-fast eval``: evaluate a smoe-fast checkpoint, or the authors' .pth, and print the summary table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import add_data_arguments, add_runtime_arguments, load_data, print_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``smoe-fast eval``."""
    p.add_argument("checkpoint", type=Path, help="a smoe-fast checkpoint (or run directory) or an authors' state_dict .pth")
    p.add_argument("--decoder", choices=("lite", "medium", "mlp"), default=None,
                   help="for an authors' checkpoint: expected decoder kind (default: read from the file)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled z")
    add_data_arguments(p, num_train=0, num_test=2000)
    add_runtime_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..model import SMoEVAE
    from ..train import evaluate, load_checkpoint, resolve_device

    device = resolve_device(args.device)
    trained_on = None   # the class names a smoe-fast checkpoint records; the default for --categories
    try:
        model, ckpt = load_checkpoint(args.checkpoint, backend=args.backend, device=str(device))
        trained_on = ckpt.get("class_names") or None
    except ValueError as ours_error:
        try:
            model = SMoEVAE.load_authors_checkpoint(args.checkpoint, decoder=args.decoder, backend=args.backend).to(device)
        except ValueError as authors_error:
            print(f"error: {ours_error}\n       as an authors' checkpoint: {authors_error}", file=sys.stderr)
            return 2
    _, test_set = load_data(args, categories=trained_on)
    sampled = evaluate(model, test_set, seed=args.seed)
    deterministic = evaluate(model, test_set, sample=False)
    print_summary(model, sampled, test_set, title=f"{args.checkpoint}: {test_set.images.shape[0]:,} {args.data} test images")
    print(f"\ntest SSE per image with z = mu (deterministic): {deterministic.sse_per_image:.2f}")
    return 0

