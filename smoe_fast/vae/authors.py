"""The published SMoE-VAE's own formulation (shared/PAPER.md), for comparison and cross-checking.

One ``nn.Module`` per expert (the authors' ``decoders.{i}``), the per-sample Python loop they use for
hard-gated inference, and the ``[B, E, 1, 28, 28]`` stack they use for soft-gated training. Written
from PAPER.md's layer tables, independently of :mod:`smoe_fast.reference`, so the tests can use it
as a second oracle and the benchmarks as the baseline a user of the original code runs.

>>> decoders = decoders_from_stacked("lite", model.experts.weights())
>>> x_hat = per_sample_loop(decoders, z, expert_idx)      # what the authors' eval() does
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LiteDecoder(nn.Module):
    def __init__(self, latent_dim: int):
        super().__init__()
        self.fc = nn.Linear(latent_dim, 8 * 7 * 7)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, z):
        x = self.fc(z).view(-1, 8, 7, 7)
        x = F.elu(self.conv1(nn.Upsample(scale_factor=2, mode="nearest")(x)))
        return torch.sigmoid(self.conv2(nn.Upsample(scale_factor=2, mode="nearest")(x)))


class MediumDecoder(nn.Module):
    def __init__(self, latent_dim: int):
        super().__init__()
        self.fc = nn.Linear(latent_dim, 32 * 7 * 7)
        self.conv1 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 1, 3, padding=1)

    def forward(self, z):
        up = nn.Upsample(scale_factor=2, mode="nearest")
        x = self.fc(z).view(-1, 32, 7, 7)
        x = F.elu(self.conv1(up(x)))
        x = F.elu(self.conv2(up(x)))
        return torch.sigmoid(self.conv3(x))


class MLPDecoder(nn.Module):
    def __init__(self, latent_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(latent_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, 784)

    def forward(self, z):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(z)))).view(-1, 1, 28, 28)


def decoders_from_stacked(kind: str, stacked: dict[str, torch.Tensor]) -> nn.ModuleList:
    """One module per expert, loaded from stacked weights."""
    num_experts = next(iter(stacked.values())).shape[0]
    if kind == "mlp":
        hidden, latent = stacked["fc1.weight"].shape[1:]
        make = lambda: MLPDecoder(latent, hidden)  # noqa: E731
    else:
        latent = stacked["fc.weight"].shape[-1]
        make = (lambda: LiteDecoder(latent)) if kind == "lite" else (lambda: MediumDecoder(latent))  # noqa: E731
    first = next(iter(stacked.values()))
    decoders = nn.ModuleList(make() for _ in range(num_experts)).to(device=first.device, dtype=first.dtype)
    for e, decoder in enumerate(decoders):
        decoder.load_state_dict({name: w[e].detach() for name, w in stacked.items()})
    return decoders


def per_sample_loop(decoders: nn.ModuleList, z: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
    """The authors' hard-gated inference: a Python loop over samples."""
    if z.shape[0] == 0:
        return z.new_empty(0, 1, 28, 28)
    chosen = expert_idx.tolist()
    return torch.cat([decoders[chosen[i]](z[i:i + 1]) for i in range(z.shape[0])])


def stacked_soft(decoders: nn.ModuleList, z: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The authors' soft training formulation: stack [B, E, 1, 28, 28] and mix by the gates."""
    outputs = torch.stack([d(z) for d in decoders], dim=1)
    return (gates[:, :, None, None, None] * outputs).sum(1)


class AuthorsEncoder(nn.Module):
    def __init__(self, latent_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.fc_mu = nn.Linear(6272, latent_dim)
        self.fc_logvar = nn.Linear(6272, latent_dim)

    def forward(self, x):
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))).view(x.size(0), -1)
        return self.fc_mu(x), self.fc_logvar(x)


class AuthorsGate(nn.Module):
    def __init__(self, latent_dim: int, num_experts: int):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(latent_dim, 64), nn.Linear(64, 32), nn.Linear(32, num_experts)

    def forward(self, z):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(z)))))


class AuthorsVAE(nn.Module):
    """The published model's module layout (encoder / decoders.{i} / gating_network) and forward."""

    def __init__(self, latent_dim: int, num_experts: int, decoder: str = "lite"):
        super().__init__()
        self.encoder = AuthorsEncoder(latent_dim)
        make = {"lite": LiteDecoder, "medium": MediumDecoder}[decoder]
        self.decoders = nn.ModuleList(make(latent_dim) for _ in range(num_experts))
        self.gating_network = AuthorsGate(latent_dim, num_experts)

    def forward(self, x, eps):
        mu, log_var = self.encoder(x)
        z = mu + eps * torch.exp(0.5 * log_var)
        logits = self.gating_network(z)
        if self.training:
            return stacked_soft(self.decoders, z, logits.softmax(-1)), logits
        return per_sample_loop(self.decoders, z, logits.argmax(-1)), logits
