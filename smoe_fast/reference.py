"""The reference backend: the specification every other backend is tested against.

Plain, vectorised PyTorch written for obviousness. A loop over experts is fine here; a loop over
samples is not. Everything is differentiable with autograd. Inputs are assumed valid: the public
entry points in :mod:`smoe_fast.ops` check them first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import IMAGE_SHAPE, Routing


def group_by_expert(expert_idx: torch.Tensor, num_experts: int) -> Routing:
    """Group top-1 ([B]) or top-k ([B,K]) assignments by expert, stably."""
    flat = expert_idx.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    sorted_token_idx = torch.sort(flat, stable=True).indices
    token_sorted_pos = torch.empty_like(sorted_token_idx)
    token_sorted_pos[sorted_token_idx] = torch.arange(flat.numel(), device=flat.device)
    return Routing(counts.int(), offsets.int(), sorted_token_idx.int(), token_sorted_pos.int())


def expert_weights(weights: dict[str, torch.Tensor], e: int) -> dict[str, torch.Tensor]:
    """The parameters of expert ``e`` (the leading E dimension indexed away)."""
    return {name: w[e] for name, w in weights.items()}


def decode(z: torch.Tensor, w: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """One expert's decoder on a batch: z [N, L] -> x_hat [N, 1, 28, 28]."""
    if kind == "mlp":
        h = F.relu(F.linear(z, w["fc1.weight"], w["fc1.bias"]))
        return torch.sigmoid(F.linear(h, w["fc2.weight"], w["fc2.bias"])).view(-1, *IMAGE_SHAPE)
    if kind == "lite":
        h = F.linear(z, w["fc.weight"], w["fc.bias"]).view(-1, 8, 7, 7)
        h = F.elu(F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), w["conv1.weight"], w["conv1.bias"], padding=1))
        return torch.sigmoid(F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), w["conv2.weight"], w["conv2.bias"], padding=1))
    if kind == "medium":
        h = F.linear(z, w["fc.weight"], w["fc.bias"]).view(-1, 32, 7, 7)
        h = F.elu(F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), w["conv1.weight"], w["conv1.bias"], padding=1))
        h = F.elu(F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), w["conv2.weight"], w["conv2.bias"], padding=1))
        return torch.sigmoid(F.conv2d(h, w["conv3.weight"], w["conv3.bias"], padding=1))
    raise ValueError(f"unknown decoder kind {kind!r}")


def _num_experts(weights: dict[str, torch.Tensor]) -> int:
    return next(iter(weights.values())).shape[0]


def _decode_grouped(z_rows: torch.Tensor, routing: Routing, weights, kind: str, row_scale=None) -> torch.Tensor:
    """Decode rows already sorted by expert: row r of ``z_rows`` goes through its expert."""
    counts = routing.expert_counts.tolist()
    outputs, start = [], 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        outputs.append(decode(z_rows[start:start + count], expert_weights(weights, e), kind))
        start += count
    if not outputs:
        return z_rows.new_empty(0, *IMAGE_SHAPE)
    y_sorted = torch.cat(outputs)
    if row_scale is not None:
        y_sorted = y_sorted * row_scale.view(-1, 1, 1, 1)
    return y_sorted


def experts_hard(z: torch.Tensor, expert_idx: torch.Tensor, weights: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """x_hat[b] = D_{expert_idx[b]}(z[b]); z [B,L], expert_idx [B] -> [B,1,28,28]."""
    routing = group_by_expert(expert_idx, _num_experts(weights))
    sorted_idx = routing.sorted_token_idx.long()
    y_sorted = _decode_grouped(z[sorted_idx], routing, weights, kind)
    return y_sorted[routing.token_sorted_pos.long()]


def experts_soft(z: torch.Tensor, gates: torch.Tensor, weights: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """x_hat = sum_e gates[:, e] * D_e(z); z [B,L], gates [B,E] -> [B,1,28,28]."""
    out = z.new_zeros(z.shape[0], *IMAGE_SHAPE)
    for e in range(_num_experts(weights)):
        out = out + gates[:, e].view(-1, 1, 1, 1) * decode(z, expert_weights(weights, e), kind)
    return out


def experts_topk(z: torch.Tensor, topk_idx: torch.Tensor, topk_gates: torch.Tensor,
                 weights: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """x_hat[b] = sum_k topk_gates[b,k] * D_{topk_idx[b,k]}(z[b]); topk_idx, topk_gates [B,K]."""
    B, K = topk_idx.shape
    routing = group_by_expert(topk_idx, _num_experts(weights))
    sorted_idx = routing.sorted_token_idx.long()
    y_sorted = _decode_grouped(z[sorted_idx // K], routing, weights, kind, row_scale=topk_gates.reshape(-1)[sorted_idx])
    return y_sorted[routing.token_sorted_pos.long()].view(B, K, *IMAGE_SHAPE).sum(1)
