"""Public dispatch ops: check the inputs once, then run the chosen backend.

Every function takes ``backend=`` ("auto", "reference", "triton", "cpp"); see
:mod:`smoe_fast.backends`. Bad input raises ``ValueError``/``TypeError`` saying what was expected and
what was found. ``check_indices=False`` skips the expert-index range check, which reads two numbers
back from the device (a host synchronisation); skip it only for indices you produced yourself, such
as an argmax over E gate logits.
"""
from __future__ import annotations

import torch

from .backends import Backend, resolved_module
from .contract import DECODER_KINDS, Routing, decoder_param_shapes

__all__ = ["Routing", "group_by_expert", "experts_hard", "experts_soft", "experts_topk", "check_weights"]


def _impl(backend: str | Backend, device: torch.device):
    return resolved_module(backend, device)


def _check_expert_idx(expert_idx: torch.Tensor, num_experts: int, ndim: int, name: str, check_indices: bool) -> None:
    if not isinstance(expert_idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(expert_idx).__name__}")
    if expert_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor of expert indices, got dtype {expert_idx.dtype}")
    if expert_idx.dim() != ndim:
        want = "[B]" if ndim == 1 else "[B, K]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(expert_idx.shape)}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if check_indices and expert_idx.numel() > 0:
        lo, hi = int(expert_idx.min()), int(expert_idx.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"{name} must lie in [0, {num_experts - 1}] for {num_experts} experts, "
                             f"found values in [{lo}, {hi}]")


def check_weights(weights: dict[str, torch.Tensor], kind: str, latent_dim: int | None = None) -> int:
    """Check stacked expert weights against ``kind``; returns E. Raises naming the offending tensor."""
    if kind not in DECODER_KINDS:
        raise ValueError(f"unknown decoder kind {kind!r}; expected one of {DECODER_KINDS}")
    if not isinstance(weights, dict) or not weights:
        raise TypeError(f"weights must be a non-empty dict of stacked expert tensors, got {type(weights).__name__}")
    first = next(iter(weights.values()))
    num_experts = first.shape[0] if first.dim() > 0 else 0
    if kind == "mlp" and "fc1.weight" in weights:
        hidden, latent = weights["fc1.weight"].shape[1:3]
    else:
        latent = weights["fc.weight"].shape[-1] if "fc.weight" in weights else latent_dim
        hidden = 0
    latent = latent if latent_dim is None else latent_dim
    expected = decoder_param_shapes(kind, latent, hidden or 1)
    if set(weights) != set(expected):
        raise ValueError(f"decoder kind {kind!r} expects weights {sorted(expected)}, got {sorted(weights)}")
    if num_experts < 1:
        raise ValueError(f"expert weights need a leading E >= 1 dimension, got {tuple(first.shape)}")
    for name, shape in expected.items():
        w = weights[name]
        if tuple(w.shape) != (num_experts, *shape):
            raise ValueError(f"weight {name!r} must have shape {(num_experts, *shape)} for {num_experts} {kind} experts "
                             f"with latent size {latent}, got {tuple(w.shape)}")
        if w.dtype != first.dtype or w.device != first.device:
            raise ValueError(f"all expert weights must share one dtype and device; {name!r} is {w.dtype} on {w.device}, "
                             f"expected {first.dtype} on {first.device}")
    return num_experts


def _check_z(z: torch.Tensor, weights: dict[str, torch.Tensor], kind: str) -> int:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"z must have shape [B, L], got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got dtype {z.dtype}")
    num_experts = check_weights(weights, kind, latent_dim=z.shape[1])
    w = next(iter(weights.values()))
    if w.device != z.device:
        raise ValueError(f"z is on {z.device} but the expert weights are on {w.device}; move them to one device")
    if w.dtype != z.dtype and not torch.is_autocast_enabled(z.device.type):
        raise TypeError(f"z has dtype {z.dtype} but the expert weights have dtype {w.dtype}; cast one of them")
    return num_experts


def group_by_expert(expert_idx: torch.Tensor, num_experts: int, backend: str = "auto", check_indices: bool = True) -> Routing:
    """Group top-1 ([B]) or top-k ([B,K]) expert assignments by expert.

    Returns ``Routing(expert_counts [E] int32, expert_offsets [E+1] int32, sorted_token_idx [B*K] int32,
    token_sorted_pos [B*K] int32)``; rows are stable (ascending token order within an expert).

    >>> r = group_by_expert(torch.tensor([2, 0, 2, 1]), 3, backend="reference")
    >>> r.expert_counts.tolist(), r.sorted_token_idx.tolist()
    ([1, 1, 2], [1, 3, 0, 2])
    """
    if not isinstance(expert_idx, torch.Tensor):
        raise TypeError(f"expert_idx must be a torch.Tensor, got {type(expert_idx).__name__}")
    _check_expert_idx(expert_idx, num_experts, expert_idx.dim() if expert_idx.dim() in (1, 2) else 1, "expert_idx", check_indices)
    return _impl(backend, expert_idx.device).group_by_expert(expert_idx, num_experts)


def experts_hard(z: torch.Tensor, expert_idx: torch.Tensor, weights: dict[str, torch.Tensor], kind: str = "lite",
                 backend: str = "auto", check_indices: bool = True) -> torch.Tensor:
    """Hard-gated (top-1) experts: ``x_hat[b] = D_{expert_idx[b]}(z[b])``.

    z [B, L] float, expert_idx [B] int64, weights stacked per layer ``{"fc.weight": [E,392,L], ...}``
    -> x_hat [B, 1, 28, 28]. An inference op on the compiled backends (no backward); to train with
    hard routing use ``experts_topk(z, expert_idx[:, None], ones)``, as SMoEVAE does.

    >>> y = experts_hard(z, logits.argmax(-1), model.experts.weights(), kind="lite")
    """
    num_experts = _check_z(z, weights, kind)
    _check_expert_idx(expert_idx, num_experts, 1, "expert_idx", check_indices)
    if expert_idx.shape[0] != z.shape[0]:
        raise ValueError(f"expert_idx has {expert_idx.shape[0]} tokens but z has {z.shape[0]}")
    return _impl(backend, z.device).experts_hard(z, expert_idx, weights, kind)


def experts_soft(z: torch.Tensor, gates: torch.Tensor, weights: dict[str, torch.Tensor], kind: str = "lite",
                 backend: str = "auto") -> torch.Tensor:
    """Soft-gated experts: ``x_hat = sum_e gates[:, e] * D_e(z)``; differentiable in z, gates and weights.

    z [B, L], gates [B, E] (any weights; the model passes a softmax) -> x_hat [B, 1, 28, 28].

    >>> y = experts_soft(z, logits.softmax(-1), model.experts.weights(), kind="lite")
    """
    num_experts = _check_z(z, weights, kind)
    if not isinstance(gates, torch.Tensor) or gates.dim() != 2 or tuple(gates.shape) != (z.shape[0], num_experts):
        found = tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ValueError(f"gates must have shape [B, E] = {(z.shape[0], num_experts)}, got {found}")
    if gates.device != z.device:
        raise ValueError(f"gates are on {gates.device} but z is on {z.device}")
    return _impl(backend, z.device).experts_soft(z, gates, weights, kind)


def experts_topk(z: torch.Tensor, topk_idx: torch.Tensor, topk_gates: torch.Tensor, weights: dict[str, torch.Tensor],
                 kind: str = "lite", backend: str = "auto", check_indices: bool = True) -> torch.Tensor:
    """Top-k experts: ``x_hat[b] = sum_k topk_gates[b, k] * D_{topk_idx[b, k]}(z[b])``.

    z [B, L], topk_idx [B, K] int64, topk_gates [B, K] -> x_hat [B, 1, 28, 28]; differentiable in z,
    topk_gates and weights. Cost depends on B*K, not on E.

    >>> g, i = logits.softmax(-1).topk(2); y = experts_topk(z, i, g / g.sum(-1, keepdim=True), w)
    """
    num_experts = _check_z(z, weights, kind)
    _check_expert_idx(topk_idx, num_experts, 2, "topk_idx", check_indices)
    if topk_idx.shape[0] != z.shape[0]:
        raise ValueError(f"topk_idx has {topk_idx.shape[0]} tokens but z has {z.shape[0]}")
    if not isinstance(topk_gates, torch.Tensor) or topk_gates.shape != topk_idx.shape:
        found = tuple(topk_gates.shape) if isinstance(topk_gates, torch.Tensor) else type(topk_gates).__name__
        raise ValueError(f"topk_gates must have the shape of topk_idx {tuple(topk_idx.shape)}, got {found}")
    if topk_gates.device != z.device:
        raise ValueError(f"topk_gates are on {topk_gates.device} but z is on {z.device}")
    return _impl(backend, z.device).experts_topk(z, topk_idx, topk_gates, weights, kind)
