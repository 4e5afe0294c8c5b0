"""Training and evaluation of the SMoE-VAE, seeded and resumable (shared/PAPER.md defaults).

Each epoch appends one JSON line to ``out_dir/metrics.jsonl`` and atomically rewrites
``out_dir/checkpoint.pt`` (model, optimiser, RNG states, history), so ``resume=True`` continues to
the same result as an uninterrupted run with the same seed. A non-finite loss stops training with
:class:`NonFiniteLossError` and leaves the last good checkpoint in place.

Under torch.distributed (``torchrun``; a process group initialised before :func:`train`) the run is
data-parallel with DistributedDataParallel: every rank draws the same seeded permutation, each
global batch of ``batch_size`` images is split over the ranks (rank k takes every W-th image from
the k-th: uneven shards, no duplicates), the loss is :func:`~smoe_fast.vae.loss.smoe_loss_sharded`,
the noise is keyed per sample (``noise="keyed"``), metrics are reduced over the ranks, expert
revival is decided from the global win counts, and only rank 0 writes files. The result equals a
one-process ``noise="keyed"`` run on the same global batches, at any world size, resumed or not.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed
from ..io import atomic_save, atomic_write_text
from .analysis import active_experts, expert_usage
from .loss import smoe_loss, smoe_loss_sharded
from .model import SMoEVAE

NOISE_MODES = ("global", "keyed")
# Expert-collapse prevention (issue 15; none is the paper's training): "revive" re-initialises experts that
# won fewer than revive_min_wins images in an epoch by splitting the busiest (revive_dead_experts);
# "gate-bias" raises, after every step, the gate's output bias of each expert that won less than
# GATE_BIAS_FLOOR of its fair share of the batch (raise_starved_experts).
COLLAPSE_PREVENTIONS = ("none", "revive", "gate-bias")
GATE_BIAS_FLOOR = 0.5
GATE_BIAS_RATE = 0.05
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run. Defaults are the paper's (Adam 1e-3, batch 128, 20 epochs)."""

    num_experts: int = 10
    latent_dim: int = 32
    encoder: str = "medium"
    decoder: str = "lite"
    routing: str = "unsupervised"
    gating: str | None = None
    top_k: int = 2
    hidden_dim: int = 256
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 0.01
    balance_weight: float = 200.0
    entropy_weight: float = 400.0
    ce_weight: float = 200.0
    reduction: str = "paper"
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"
    eval_batch_size: int = 500
    collapse_prevention: str = "none"   # expert-collapse option: COLLAPSE_PREVENTIONS (the paper: none)
    revive_min_wins: int = 10
    noise: str = "global"   # reparameterisation noise: "global" (torch's RNG, as always) or "keyed", see keyed_noise()

    def model_kwargs(self) -> dict[str, Any]:
        return dict(num_experts=self.num_experts, latent_dim=self.latent_dim, encoder=self.encoder,
                    decoder=self.decoder, routing=self.routing, gating=self.gating, top_k=self.top_k,
                    hidden_dim=self.hidden_dim, backend=self.backend)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "num_experts", "latent_dim", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {self.noise!r}")
        if self.collapse_prevention not in COLLAPSE_PREVENTIONS:
            raise ValueError(f"collapse_prevention must be one of {COLLAPSE_PREVENTIONS}, got {self.collapse_prevention!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config stored by any smoe_fast version (checkpoints before collapse_prevention stored a
        ``revive_dead_experts`` flag)."""
        values = dict(values)
        if "revive_dead_experts" in values:
            values.setdefault("collapse_prevention", "revive" if values.pop("revive_dead_experts") else "none")
        return cls(**values)


def keyed_noise(indices: torch.Tensor, latent_dim: int, seed: int, epoch: int) -> torch.Tensor:
    """Standard-normal noise [B, L] for the images ``indices`` (their index in the training set).

    Row b depends on (seed, epoch, indices[b]) only, not on the batch or on which rank draws it, so
    z is the same at any world size. One small CPU generator per image (about 10 us each).
    """
    base = ((seed % 2**31) * 65_537 + epoch) % 2**31 << 32
    rows = [torch.randn(latent_dim, generator=torch.Generator().manual_seed(base + int(i) % 2**32))
            for i in indices.tolist()]
    return torch.stack(rows) if rows else torch.empty(0, latent_dim)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says where and what to try."""


class Evaluation(NamedTuple):
    """One pass over a data set with hard routing (the paper's test protocol)."""

    sse_per_image: float        # mean over images of the per-image sum of squared errors (784 pixels)
    image_sse: torch.Tensor     # [N] per-image SSE
    kl_per_image: float
    expert_idx: torch.Tensor    # [N] int64, hard (argmax) expert
    gates: torch.Tensor         # [N, E] gate probabilities
    z: torch.Tensor             # [N, L] the latent used (sampled, or mu with sample=False)
    mu: torch.Tensor            # [N, L]
    labels: torch.Tensor        # [N]
    active_experts: int         # experts winning >= 10 images (the authors' rule)
    usage: np.ndarray           # [E] fraction of images won


class TrainResult(NamedTuple):
    model: SMoEVAE
    history: list[dict[str, Any]]
    out_dir: Path | None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but torch sees no CUDA GPU; use --device cpu")
    return device


@torch.no_grad()
def evaluate(model: SMoEVAE, data, batch_size: int = 500, seed: int = 0, sample: bool = True) -> Evaluation:
    """Hard-routed pass over ``data`` (an ImageDataset), the paper's test protocol.

    z is sampled with a generator seeded by ``seed`` (or z = mu with ``sample=False``), so the result
    is reproducible and the global RNG stream of a training run is left untouched.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("sse", "kl", "idx", "gates", "z", "mu")}
    try:
        for start in range(0, data.images.shape[0], batch_size):
            x = data.images[start:start + batch_size].to(device)
            labels = data.labels[start:start + batch_size].to(device) if model.routing == "label" else None
            mu, logvar = model.encode(x)
            z = mu + torch.randn(mu.shape, generator=generator, device=device, dtype=mu.dtype) * torch.exp(0.5 * logvar) \
                if sample else mu
            recon, _, gates, expert_idx = model.decode(z, labels)
            parts["sse"].append(((recon - x) ** 2).flatten(1).sum(1).cpu())
            parts["kl"].append((-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)).cpu())
            parts["idx"].append(expert_idx.cpu())
            parts["gates"].append(gates.cpu())
            parts["z"].append(z.cpu())
            parts["mu"].append(mu.cpu())
    finally:
        model.train(was_training)
    cat = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    n = max(int(cat["sse"].numel()), 1)
    idx = cat["idx"].long()
    return Evaluation(float(cat["sse"].sum()) / n, cat["sse"], float(cat["kl"].sum()) / n, idx, cat["gates"],
                      cat["z"], cat["mu"], data.labels.clone(), active_experts(idx, model.num_experts),
                      expert_usage(idx, model.num_experts))


# ---------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | os.PathLike, backend: str | None = None, device: str | None = None) -> tuple[SMoEVAE, dict]:
    """Load a smoe_fast training checkpoint -> (model, checkpoint dict). Uses ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (expected a file written by smoe-fast train, "
                                f"or its output directory)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"could not read {str(path)!r} as a smoe_fast checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{str(path)!r} is not a smoe_fast training checkpoint (no 'config'/'model' entries); "
                         "for the authors' checkpoints use SMoEVAE.load_authors_checkpoint")
    config = TrainConfig.from_dict(ckpt["config"])
    if backend is not None:
        config.backend = backend
    model = SMoEVAE(**config.model_kwargs())
    model.load_state_dict(ckpt["model"])
    return model.to(resolve_device(device or "cpu")), ckpt


# ---------------------------------------------------------------------------- expert collapse
@torch.no_grad()
def revive_dead_experts(model: SMoEVAE, optimizer: torch.optim.Optimizer, wins: torch.Tensor, min_wins: int,
                        generator: torch.Generator, split: float = 0.5) -> list[int]:
    """Re-initialise every expert that won fewer than ``min_wins`` training samples this epoch.

    Each dead expert splits the busiest expert, as k-means splits a cluster: its decoder becomes a
    slightly perturbed copy of the donor's (weights and Adam moments), and the two gate rows move
    apart along a random direction, ``w_donor -/+ d`` with ``|d| = split * |w_donor|``, so the donor's
    images are divided between them by a hyperplane instead of one copy taking all. Returns the
    revived expert indices.
    """
    dead = [e for e in range(model.num_experts) if int(wins[e]) < min_wins]
    if not dead or len(dead) == model.num_experts:
        return []
    gate = model.gating_network.fc3
    wins = wins.double().clone()

    def noise(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)

    for e in dead:
        donor = int(wins.argmax())
        for p in model.experts.weights().values():
            scale = 0.01 * float(p[donor].std()) if p[donor].numel() > 1 else 0.0
            p[e] = p[donor] + scale * noise(p[donor])
            state = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][e] = state[key][donor]
        direction = noise(gate.weight[donor])
        direction *= split * gate.weight[donor].norm() / direction.norm().clamp_min(1e-12)
        gate.weight[e], gate.weight[donor] = gate.weight[donor] + direction, gate.weight[donor] - direction
        gate.bias[e] = gate.bias[donor]
        for p in (gate.weight, gate.bias):
            for state in optimizer.state.get(p, {}).values():
                if isinstance(state, torch.Tensor) and state.dim() > 0:
                    state[[e, donor]] = 0
        wins[donor] /= 2
        wins[e] = wins[donor]
    return dead


@torch.no_grad()
def raise_starved_experts(model: SMoEVAE, logits: torch.Tensor, floor: float = GATE_BIAS_FLOOR,
                          rate: float = GATE_BIAS_RATE, reduce=None) -> torch.Tensor:
    """Loss-free load balancing on the gate's output bias, after the routing bias of Wang et al. (2024)
    and DeepSeek-V3: every expert that won fewer than ``floor / E`` of this batch's images (argmax of
    the gate ``logits`` [B, E]) has its logit bias ``gating_network.fc3.bias`` raised by ``rate``
    times its mean gap to the winning logit, so it closes that share of the gap at every step
    whatever the logits' scale (the entropy term makes them grow during training).

    The bias moves the soft gates in training and the argmax in eval alike, so a starved expert is
    offered the images it is nearest to winning until its decoder earns them; experts above the floor
    are left alone (no forced uniformity). Nothing is added to the loss and the authors' checkpoint
    layout is unchanged. ``reduce`` sums over data-parallel ranks. Returns the starved mask [E].
    """
    logits = logits.detach().float()
    wins = torch.bincount(logits.argmax(-1), minlength=model.num_experts).float()
    gaps = (logits.max(-1, keepdim=True).values - logits).sum(0)
    if reduce is not None:
        wins, gaps = reduce(wins), reduce(gaps)
    images = wins.sum()
    starved = wins < floor * images / model.num_experts
    bias = model.gating_network.fc3.bias
    bias += rate * starved.to(bias) * gaps.to(bias) / images.clamp_min(1).to(bias)
    return starved


# ---------------------------------------------------------------------------- training
def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "shuffle": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(config: TrainConfig, train_data, test_data, out_dir: str | os.PathLike | None = None, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Train an SMoE-VAE on ``train_data`` and evaluate on ``test_data`` after every epoch.

    >>> train_set, test_set = smoe_fast.data.load_data("synthetic", num_train=2000, num_test=500)
    >>> result = train(TrainConfig(num_experts=5, epochs=2), train_set, test_set, out_dir="runs/demo")
    >>> result.history[-1]["test_sse"]
    """
    config.validate()
    device = resolve_device(config.device)
    rank, world = distributed.world_info()
    if world > 1 and config.noise != "keyed":
        raise ValueError(f"data-parallel training ({world} processes) needs noise='keyed' (--noise keyed), so that z "
                         "does not depend on the number of processes; got noise='global'")
    writer = rank == 0
    progress = progress and writer
    out = Path(out_dir) if out_dir is not None else None
    torch.manual_seed(config.seed)
    model = SMoEVAE(**config.model_kwargs()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    shuffle = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    # Rank 0 reads and checks the output directory; the other ranks get its verdict and checkpoint.
    ckpt, error = _open_run(config, out, resume) if writer else (None, None)
    if world > 1:
        shared = [ckpt, error]
        torch.distributed.broadcast_object_list(shared, src=0)
        ckpt, error = shared
    if error is not None:
        raise error
    class_names = list(getattr(train_data, "class_names", ()) or ())
    if ckpt is not None and ckpt.get("class_names", class_names) != class_names:
        raise ValueError(f"cannot resume: the checkpoint in {str(out)!r} was trained on classes "
                         f"{ckpt['class_names']}, this data has {class_names}; pass the same --categories")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], shuffle, device)
        history, start_epoch = list(ckpt["history"]), int(ckpt["epoch"])
    trained = model
    if world > 1:
        # find_unused_parameters: hard/top-k/label routing leaves some parameters without a gradient on a rank
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    images, labels = train_data.images, train_data.labels
    num_images = images.shape[0]
    if num_images == 0:
        raise ValueError("the training set is empty")
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(num_images, generator=shuffle)   # the same on every rank
        sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "balance": 0.0, "entropy": 0.0, "ce": 0.0}
        wins = torch.zeros(config.num_experts, dtype=torch.int64)
        batches = range(0, num_images, config.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not progress, unit="batch")
        for step, start in enumerate(bar):
            idx = order[start:start + config.batch_size]
            n = idx.shape[0]                                    # the global batch
            idx = idx[rank::world]                              # this rank's share
            x, y = images[idx].to(device), labels[idx].to(device)
            noise = keyed_noise(idx, config.latent_dim, config.seed, epoch).to(device) if config.noise == "keyed" else None
            out_b = trained(x, labels=y if config.routing == "label" else None, noise=noise)
            loss_kwargs = dict(routing=config.routing, labels=y, beta=config.beta, balance_weight=config.balance_weight,
                               entropy_weight=config.entropy_weight, ce_weight=config.ce_weight,
                               reduction=config.reduction)
            if world > 1:
                rank_loss, terms = smoe_loss_sharded(out_b, x, global_batch=n, world_size=world,
                                                     global_sum=distributed.global_sum, **loss_kwargs)
            else:
                terms = smoe_loss(out_b, x, **loss_kwargs)
                rank_loss = terms.total
            if not torch.isfinite(terms.total):
                raise NonFiniteLossError(
                    f"the loss became non-finite at epoch {epoch + 1}, step {step + 1}: {terms.as_dict()}; "
                    f"training stopped and the last good checkpoint (epoch {epoch}) was kept. "
                    "Try a lower learning rate (--lr) or check the data for NaN/Inf.")
            optimizer.zero_grad(set_to_none=True)
            rank_loss.backward()
            optimizer.step()
            if config.collapse_prevention == "gate-bias":
                raise_starved_experts(model, out_b.logits, reduce=distributed.global_sum if world > 1 else None)
            terms = dataclasses.replace(terms, **{k: v.detach() for k, v in vars(terms).items() if v is not None})
            sums["loss"] += float(terms.total) * (n if config.reduction == "per_sample" else 1)
            sums["recon"] += float(terms.recon)
            sums["kl"] += float(terms.kl)
            sums["balance"] += float(terms.balance) * n
            sums["entropy"] += float(terms.entropy) * n
            sums["ce"] += float(terms.ce) if terms.ce is not None else 0.0
            wins += torch.bincount(out_b.expert_idx.cpu(), minlength=config.num_experts)
            bar.set_postfix(loss=f"{float(terms.total) / (1 if config.reduction == 'per_sample' else n):.2f}")
        if world > 1:
            torch.distributed.all_reduce(wins)   # gloo and NCCL both reduce int64
        revived = (revive_dead_experts(model, optimizer, wins, config.revive_min_wins, shuffle)
                   if config.collapse_prevention == "revive" else [])
        if revived and world > 1:
            _broadcast_training_state(model, optimizer)  # every rank revived alike; make it bitwise so
        test = evaluate(model, test_data, config.eval_batch_size, seed=config.seed)
        record = {
            "epoch": epoch + 1,
            "train_loss": sums["loss"] / num_images,
            "train_sse": sums["recon"] / num_images,
            "train_kl": sums["kl"] / num_images,
            "train_balance": sums["balance"] / num_images,
            "train_entropy": sums["entropy"] / num_images,
            **({"train_ce": sums["ce"] / num_images} if config.routing == "supervised" else {}),
            "test_sse": test.sse_per_image,
            "test_kl": test.kl_per_image,
            "active_experts": test.active_experts,
            "train_active_experts": int((wins >= config.revive_min_wins).sum()),
            "usage": [round(float(u), 6) for u in test.usage],
            "revived": revived,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        history.append(record)
        if out is not None and writer:
            atomic_save({"config": dataclasses.asdict(config), "class_names": class_names, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "rng": _rng_state(shuffle, device),
                         "history": history, "epoch": epoch + 1}, out / CHECKPOINT_NAME)
            with open(out / METRICS_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.2f}  "
                       f"test SSE/image {record['test_sse']:.2f}  active experts {record['active_experts']}"
                       f"/{config.num_experts}  ({record['seconds']:.1f}s)")
    return TrainResult(model, history, out)


def _open_run(config: TrainConfig, out: Path | None, resume: bool) -> tuple[dict | None, Exception | None]:
    """Check the output directory and, with ``resume``, read its checkpoint -> (checkpoint, error to raise)."""
    if resume:
        if out is None or not (out / CHECKPOINT_NAME).exists():
            return None, FileNotFoundError(f"resume=True but there is no checkpoint in {str(out)!r} to resume from")
        ckpt = torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
        free = ("epochs", "backend", "device", "eval_batch_size")  # may change between sessions of one run
        stored = dataclasses.asdict(TrainConfig.from_dict(ckpt["config"]))
        changed = {k for k, v in stored.items() if k not in free and v != dataclasses.asdict(config).get(k)}
        if changed:
            return None, ValueError(f"cannot resume: the checkpoint in {str(out)!r} was trained with a different "
                                    f"configuration (differs in {sorted(changed)}); use the same options or a new "
                                    "output directory")
        atomic_write_text("".join(json.dumps(h) + "\n" for h in ckpt["history"]), out / METRICS_NAME)
        return ckpt, None
    if out is not None:
        if (out / CHECKPOINT_NAME).exists():
            return None, FileExistsError(f"{str(out)!r} already holds a run; pass resume=True (--resume) to continue "
                                         "it, or choose another output directory")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n", out / "config.json")
        atomic_write_text("", out / METRICS_NAME)
    return None, None


@torch.no_grad()
def _broadcast_training_state(model: SMoEVAE, optimizer: torch.optim.Optimizer) -> None:
    """Rank 0's parameters and Adam moments to every rank (after expert revival)."""
    for p in model.parameters():
        torch.distributed.broadcast(p.data, src=0)
        for state in optimizer.state.get(p, {}).values():
            if isinstance(state, torch.Tensor) and state.dim() > 0:
                torch.distributed.broadcast(state, src=0)
