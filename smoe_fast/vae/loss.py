"""The SMoE-VAE loss, exactly as the authors' code computes it (shared/PAPER.md).

Per mini-batch of B images, with p = softmax(logits):

| term     | definition                                                     | weight (paper)       |
|----------|----------------------------------------------------------------|----------------------|
| recon    | sum over batch and pixels of (x_hat - x)^2                      | 1                    |
| kl       | -1/2 sum over batch and latent dims of (1 + logvar - mu^2 - e^logvar) | beta = 0.01     |
| balance  | E * sum_e (mean_b p_be - 1/E)^2                                 | lambda_b = 200       |
| entropy  | mean_b of -sum_e p_be log(p_be + 1e-8)                          | lambda_h = 400       |
| ce       | sum over batch of cross-entropy(logits, label) (supervised)     | lambda_ce = 200      |

Unsupervised routing uses recon, kl, balance, entropy; supervised uses recon, kl, ce; label and random
routing use recon, kl. ``reduction="per_sample"`` is our documented alternative: the sums are divided by B
and the batch-level gating terms by the paper's batch size 128, so every term keeps the paper's
relative weight at B=128 while the loss no longer changes scale (and the gate terms their
relative weight) with the batch size. ``reduction="paper"`` (the default) reproduces the paper.

:func:`smoe_loss_sharded` is the same loss for a global batch split over data-parallel ranks: the
sums are local, the gate terms come from the global mean gate, and each rank's share is scaled so
that DDP's gradient average is the one-process gradient of the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

PAPER_BATCH_SIZE = 128


@dataclass(frozen=True)
class LossTerms:
    """The total loss and its unweighted components (each a scalar tensor)."""

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    balance: torch.Tensor
    entropy: torch.Tensor
    ce: torch.Tensor | None = None

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self) if getattr(self, f.name) is not None}


def load_balance(gates: torch.Tensor) -> torch.Tensor:
    """E * sum_e (mean_b gates[b, e] - 1/E)^2 for gate probabilities [B, E]."""
    num_experts = gates.shape[1]
    return num_experts * ((gates.mean(0) - 1.0 / num_experts) ** 2).sum()


def gate_entropy(gates: torch.Tensor) -> torch.Tensor:
    """Batch mean of the per-sample gate entropy, with the authors' 1e-8 inside the log."""
    return -(gates * torch.log(gates + 1e-8)).sum(1).mean()


def smoe_loss(out, x: torch.Tensor, num_experts: int | None = None, *, routing: str = "unsupervised",
              labels: torch.Tensor | None = None, beta: float = 0.01, balance_weight: float = 200.0,
              entropy_weight: float = 400.0, ce_weight: float = 200.0, reduction: str = "paper") -> LossTerms:
    """The paper's loss for one mini-batch of an :class:`~smoe_fast.vae.model.SMoEOutput`.

    >>> terms = smoe_loss(model(x), x, num_experts=7)
    >>> terms.total.backward()
    """
    if reduction not in ("paper", "per_sample"):
        raise ValueError(f"reduction must be 'paper' or 'per_sample', got {reduction!r}")
    if routing not in ("unsupervised", "supervised", "label", "random"):
        raise ValueError(f"unknown routing {routing!r}; expected 'unsupervised', 'supervised', 'label' or 'random'")
    recon_x, mu, logvar, logits = out.recon, out.mu, out.logvar, out.logits
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape != recon_x.shape:
        raise ValueError(f"x must match the reconstruction's shape {tuple(recon_x.shape)}, got {tuple(x.shape)}")
    if num_experts is not None and logits.shape[1] != num_experts:
        raise ValueError(f"num_experts={num_experts} but the gate logits have {logits.shape[1]} experts")
    gates = torch.softmax(logits, dim=-1)
    recon = F.mse_loss(recon_x, x, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    balance, entropy = load_balance(gates), gate_entropy(gates)
    zero = recon.new_zeros(())
    ce = None
    if routing == "supervised":
        if labels is None:
            raise ValueError("routing='supervised' needs labels for the gate's cross-entropy term")
        ce = F.cross_entropy(logits, labels.long(), reduction="sum")
    batch = max(x.shape[0], 1)
    sum_scale, batch_scale = (1.0, 1.0) if reduction == "paper" else (1.0 / batch, 1.0 / PAPER_BATCH_SIZE)
    total = (recon + beta * kl) * sum_scale
    if routing == "unsupervised":
        total = total + (balance_weight * balance + entropy_weight * entropy) * batch_scale
    elif routing == "supervised":
        total = total + ce_weight * ce * sum_scale
    return LossTerms(total, recon, kl, balance if routing == "unsupervised" else zero + balance.detach(),
                     entropy if routing == "unsupervised" else zero + entropy.detach(), ce)


def smoe_loss_sharded(out, x: torch.Tensor, *, global_batch: int, world_size: int,
                      global_sum: Callable[[torch.Tensor], torch.Tensor], routing: str = "unsupervised",
                      labels: torch.Tensor | None = None, beta: float = 0.01, balance_weight: float = 200.0,
                      entropy_weight: float = 400.0, ce_weight: float = 200.0,
                      reduction: str = "paper") -> tuple[torch.Tensor, LossTerms]:
    """This rank's loss on its share of a global batch of ``global_batch`` images -> (rank_loss, terms).

    ``terms`` are the global batch's, equal to :func:`smoe_loss` on the whole batch (its total
    detached, for metrics); ``rank_loss`` is what this rank back-propagates:
    W·(local sums·scale + gate terms), the gate terms from Σ over ranks of the gate sums taken by
    ``global_sum`` (:func:`smoe_fast.distributed.global_sum`: one all-reduce, a local backward).
    DDP averages gradients over the W ranks, so the update is the one-process update.
    """
    if reduction not in ("paper", "per_sample"):
        raise ValueError(f"reduction must be 'paper' or 'per_sample', got {reduction!r}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    gates = torch.softmax(out.logits, dim=-1)
    num_experts = gates.shape[1]
    recon = F.mse_loss(out.recon, x, reduction="sum")
    kl = -0.5 * torch.sum(1 + out.logvar - out.mu.pow(2) - out.logvar.exp())
    ce = F.cross_entropy(out.logits, labels.long(), reduction="sum") if routing == "supervised" else recon.new_zeros(())
    entropy_sum = -(gates * torch.log(gates + 1e-8)).sum()
    local = torch.cat([gates.sum(0), entropy_sum[None], torch.stack([recon, kl, ce]).detach()])
    stats = global_sum(local)                                   # [E + 4]: gate sums, entropy sum, recon, kl, ce
    mean_gate, entropy = stats[:num_experts] / global_batch, stats[num_experts] / global_batch
    balance = num_experts * ((mean_gate - 1.0 / num_experts) ** 2).sum()
    recon_all, kl_all, ce_all = stats[num_experts + 1:]
    sum_scale, batch_scale = (1.0, 1.0) if reduction == "paper" else (1.0 / global_batch, 1.0 / PAPER_BATCH_SIZE)
    local_sums, all_sums = recon + beta * kl, recon_all + beta * kl_all
    if routing == "supervised":
        local_sums, all_sums = local_sums + ce_weight * ce, all_sums + ce_weight * ce_all
    gate_terms = (balance_weight * balance + entropy_weight * entropy) * batch_scale if routing == "unsupervised" \
        else recon.new_zeros(())
    rank_loss = world_size * (local_sums * sum_scale + gate_terms)
    total = (all_sums * sum_scale + gate_terms).detach()
    return rank_loss, LossTerms(total, recon_all, kl_all, balance.detach(), entropy.detach(),
                                ce_all if routing == "supervised" else None)
