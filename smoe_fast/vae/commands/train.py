"""``smoe-fast train``: train an SMoE-VAE and print the summary table (:func:`smoe_fast.vae.train.train`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..model import ROUTINGS
from ..train import COLLAPSE_PREVENTIONS
from . import add_data_arguments, add_runtime_arguments, auto_choice, load_data, print_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``smoe-fast train``."""
    p.description = ("Train an SMoE-VAE and print a summary table. With no arguments: a short run on the built-in "
                     "synthetic sketches that finishes in a few minutes on 2 CPU cores.")
    add_data_arguments(p, num_train=8000, num_test=2000)
    m = p.add_argument_group("model")
    m.add_argument("--experts", type=int, default=5, help="number of decoder experts E")
    m.add_argument("--latent-dim", type=int, default=32, help="latent size L")
    m.add_argument("--encoder", choices=("medium", "lite"), default="medium", help="encoder (medium is the paper's)")
    m.add_argument("--decoder", choices=("lite", "medium", "mlp"), default="lite",
                   help="decoder expert kind (lite is the paper's)")
    m.add_argument("--routing", choices=ROUTINGS, default="unsupervised",
                   help="unsupervised: the paper's gate; supervised: the authors' CE-trained baseline; label: expert = "
                        "class; random: a uniformly random expert per image (a control)")
    m.add_argument("--gating", choices=("soft", "hard", "topk"), default=None,
                   help="training gating override (default: soft for unsupervised, hard otherwise)")
    m.add_argument("--top-k", type=int, default=2, help="experts per image with --gating topk")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=12,
                   help="passes over the training set (the paper: 20; soft-gated training spends its first 2-3 epochs "
                        "at the mean image)")
    o.add_argument("--batch-size", type=int, default=128, help="images per optimiser step (the paper's)")
    o.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the paper's)")
    o.add_argument("--beta", type=float, default=0.01, help="KL weight (the authors' code value)")
    o.add_argument("--reduction", choices=("paper", "per_sample"), default="paper",
                   help="loss normalisation: the paper's batch sums, or per-sample normalised")
    o.add_argument("--collapse-prevention", choices=COLLAPSE_PREVENTIONS, default="none",
                   help="expert-collapse prevention: none (the paper's training); revive: re-initialise experts that "
                        "win < 10 training images in an epoch from the busiest one; gate-bias: after every step, raise "
                        "the gate bias of experts winning less than half their fair share of the batch")
    o.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and sampled z")
    o.add_argument("--noise", choices=("global", "keyed"), default=None,
                   help="reparameterisation noise: torch's global RNG, or keyed per (seed, epoch, image) so that z "
                        "does not depend on the number of processes (default: keyed under torchrun, else global)")
    add_runtime_arguments(p)
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="output directory (checkpoint, metrics.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """One process, or one rank of ``torchrun --nproc-per-node N -m smoe_fast train ...`` (DDP; only rank 0 prints)."""
    import torch.distributed as dist

    from ...distributed import init_from_env
    from ..train import resolve_device

    device = init_from_env(args.device)
    launched = device is not None
    try:
        return _run(args, device if launched else resolve_device(args.device), launched)
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, device, launched: bool) -> int:
    import torch.distributed as dist

    from ..train import NonFiniteLossError, TrainConfig, evaluate, train

    rank, world = (dist.get_rank(), dist.get_world_size()) if launched else (0, 1)
    noise = args.noise or ("keyed" if launched else "global")
    config = TrainConfig(num_experts=args.experts, latent_dim=args.latent_dim, encoder=args.encoder,
                         decoder=args.decoder, routing=args.routing, gating=args.gating, top_k=args.top_k,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, beta=args.beta,
                         reduction=args.reduction, seed=args.seed, backend=args.backend, device=str(device),
                         collapse_prevention=args.collapse_prevention, noise=noise)
    train_set, test_set = load_data(args)
    if rank == 0:
        print(f"training on {train_set.images.shape[0]:,} {args.data} images ({test_set.images.shape[0]:,} test) of "
              f"{', '.join(train_set.class_names)}, "
              f"E={args.experts}, {args.epochs} epochs, device {device}, backend {args.backend}"
              f"{'' if args.backend != 'auto' else ' -> ' + auto_choice(device)}"
              + (f", {world} processes ({dist.get_backend()}), global batch {args.batch_size}" if launched else ""))
    try:
        result = train(config, train_set, test_set, out_dir=args.out, resume=args.resume, progress=not args.no_progress)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if rank != 0:
        return 0
    print_summary(result.model, evaluate(result.model, test_set, seed=config.seed), test_set,
                  title=f"after {len(result.history)} epochs: {args.out}/checkpoint.pt")
    return 0
