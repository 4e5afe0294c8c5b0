"""The SMoE-VAE loss, exactly as the authors' code computes it (shared/PAPER.md).

Per mini-batch of B images, with p = softmax(logits):

| term     | definition                                                     | weight (paper)       |
|----------|----------------------------------------------------------------|----------------------|
| recon    | sum over batch and pixels of (x_hat - x)^2                      | 1                    |
| kl       | -1/2 sum over batch and latent dims of (1 + logvar - mu^2 - e^logvar) | beta = 0.01     |
| balance  | E * sum_e (mean_b p_be - 1/E)^2                                 | lambda_b = 200       |
| entropy  | mean_b of -sum_e p_be log(p_be + 1e-8)                          | lambda_h = 400       |
| ce       | sum over batch of cross-entropy(logits, label) (supervised)     | lambda_ce = 200      |

Unsupervised routing uses recon, kl, balance, entropy; supervised uses recon, kl, ce; label routing
uses recon, kl. ``reduction="per_sample"`` is our documented alternative: the sums are divided by B
and the batch-level gating terms by the paper's batch size 128, so every term keeps the paper's
relative weight at B=128 while the loss no longer changes scale (and the gate terms their
relative weight) with the batch size. ``reduction="paper"`` (the default) reproduces the paper.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

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
    if routing not in ("unsupervised", "supervised", "label"):
        raise ValueError(f"unknown routing {routing!r}; expected 'unsupervised', 'supervised' or 'label'")
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
