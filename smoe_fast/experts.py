"""Stacked expert decoders: every layer's parameters in one tensor with a leading E dimension."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import ops
from .contract import DECODER_KINDS, DEFAULT_MLP_HIDDEN, decoder_param_shapes


def random_weights(kind: str, num_experts: int, latent_dim: int = 32, hidden_dim: int = DEFAULT_MLP_HIDDEN,
                   dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                   requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """Seeded stacked expert weights ``{"fc.weight": [E,392,L], ...}`` with PyTorch's default scales.

    Drawn in float64 and then cast, so one seed gives the same values in every dtype.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = decoder_param_shapes(kind, latent_dim, hidden_dim)
    weights = {}
    for name, shape in shapes.items():
        bound = 1.0 / math.sqrt(math.prod(shapes[name.split(".")[0] + ".weight"][1:]))
        w = (torch.rand((num_experts, *shape), generator=generator, dtype=torch.float64) * 2 - 1) * bound
        weights[name] = w.to(dtype=dtype, device=device).requires_grad_(requires_grad)
    return weights


class _StackedLayer(nn.Module):
    """One decoder layer of all experts: ``weight [E, ...]`` and ``bias [E, ...]``."""

    def __init__(self, num_experts: int, weight_shape: tuple[int, ...], bias_shape: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, *weight_shape))
        self.bias = nn.Parameter(torch.empty(num_experts, *bias_shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PyTorch's default Linear/Conv2d init for each expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(math.prod(self.weight.shape[2:]))
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)


class StackedExperts(nn.Module):
    """E decoder experts of one kind ("lite", "medium" or "mlp") with stacked parameters.

    >>> experts = StackedExperts(num_experts=8, latent_dim=32, kind="lite")
    >>> experts.weights()["fc.weight"].shape
    torch.Size([8, 392, 32])
    >>> x_hat = experts.hard(z, expert_idx)   # [B, 1, 28, 28]
    """

    def __init__(self, num_experts: int, latent_dim: int = 32, kind: str = "lite", hidden_dim: int = DEFAULT_MLP_HIDDEN):
        super().__init__()
        if kind not in DECODER_KINDS:
            raise ValueError(f"unknown decoder kind {kind!r}; expected one of {DECODER_KINDS}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.kind, self.num_experts, self.latent_dim, self.hidden_dim = kind, num_experts, latent_dim, hidden_dim
        shapes = decoder_param_shapes(kind, latent_dim, hidden_dim)
        self.layer_names = tuple(dict.fromkeys(name.split(".")[0] for name in shapes))
        for layer in self.layer_names:
            self.add_module(layer, _StackedLayer(num_experts, shapes[f"{layer}.weight"], shapes[f"{layer}.bias"]))

    def weights(self) -> dict[str, torch.Tensor]:
        """The stacked tensors in the dispatch contract's names: ``{"fc.weight": [E,392,L], ...}``."""
        return {f"{layer}.{p}": getattr(getattr(self, layer), p) for layer in self.layer_names for p in ("weight", "bias")}

    def expert_state_dict(self, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s parameters in the authors' per-module layout (``fc.weight [392, L]``, ...)."""
        return {name: w[e].detach().clone() for name, w in self.weights().items()}

    def hard(self, z, expert_idx, backend="auto", check_indices=True):
        return ops.experts_hard(z, expert_idx, self.weights(), self.kind, backend, check_indices)

    def soft(self, z, gates, backend="auto"):
        return ops.experts_soft(z, gates, self.weights(), self.kind, backend)

    def topk(self, z, topk_idx, topk_gates, backend="auto", check_indices=True):
        return ops.experts_topk(z, topk_idx, topk_gates, self.weights(), self.kind, backend, check_indices)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_experts={self.num_experts}, latent_dim={self.latent_dim}" + (
            f", hidden_dim={self.hidden_dim}" if self.kind == "mlp" else "")
