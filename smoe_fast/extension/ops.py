"""The "cpp" backend's four functions over the loaded extension, and the Python parts of its ops.

| function        | op (torch.ops.smoe_fast.*)                                 | differentiable |
|-----------------|------------------------------------------------------------|----------------|
| group_by_expert | cpp_group_by_expert                                        | -              |
| experts_hard    | cpp_experts_hard (top-1 via cpp_experts_topk_* under grad) | z, weights     |
| experts_soft    | cpp_experts_soft_fwd / cpp_experts_soft_bwd                | z, gates, weights |
| experts_topk    | cpp_experts_topk_fwd / cpp_experts_topk_bwd                | z, topk_gates, weights |

Each op gets a fake (meta) implementation, and the soft and top-k forwards a registered backward,
once the library is loaded (:func:`smoe_fast.extension.load` calls :func:`register_python_parts`),
so ``torch.compile`` traces through them. Inputs arrive validated by :mod:`smoe_fast.ops`.
"""
from __future__ import annotations

import torch

from ..contract import Routing, autocast_input
from . import load

# (weight, bias) pairs in the order the C++ decoder plans take them (csrc/decoder_plan.h).
LAYERS = {"lite": ("fc", "conv1", "conv2"), "medium": ("fc", "conv1", "conv2", "conv3"), "mlp": ("fc1", "fc2")}

_registered = False


def register_python_parts() -> None:
    """Register the fakes and the autograd formulas of the loaded ops (once per process)."""
    global _registered
    if _registered:
        return
    lib = "smoe_fast::"

    @torch.library.register_fake(lib + "cpp_group_by_expert")
    def _group_fake(expert_idx, num_experts):
        n = expert_idx.numel()
        new = lambda size: expert_idx.new_empty(size, dtype=torch.int32)  # noqa: E731
        return new(num_experts), new(num_experts + 1), new(n), new(n)

    def _out_fake(z, *args):
        return z.new_empty(z.shape[0], 1, 28, 28)

    def _bwd_fake(grad_out, z, *args):
        gates, weights = args[-3], args[-2]
        return torch.empty_like(z), torch.empty_like(gates), [torch.empty_like(w) for w in weights]

    for name in ("cpp_experts_hard", "cpp_experts_topk_fwd", "cpp_experts_soft_fwd"):
        torch.library.register_fake(lib + name, _out_fake)
    for name in ("cpp_experts_topk_bwd", "cpp_experts_soft_bwd"):
        torch.library.register_fake(lib + name, _bwd_fake)

    def _soft_setup(ctx, inputs, output):
        z, gates, weights, ctx.kind = inputs
        ctx.save_for_backward(z, gates, *weights)

    def _soft_backward(ctx, grad):
        z, gates, *weights = ctx.saved_tensors
        dz, dgates, dweights = torch.ops.smoe_fast.cpp_experts_soft_bwd(grad, z, gates, weights, ctx.kind)
        return dz, dgates, list(dweights), None

    def _topk_setup(ctx, inputs, output):
        z, topk_idx, topk_gates, weights, ctx.kind = inputs
        ctx.save_for_backward(z, topk_idx, topk_gates, *weights)

    def _topk_backward(ctx, grad):
        z, topk_idx, topk_gates, *weights = ctx.saved_tensors
        dz, dgates, dweights = torch.ops.smoe_fast.cpp_experts_topk_bwd(grad, z, topk_idx, topk_gates, weights, ctx.kind)
        return dz, None, dgates, list(dweights), None

    torch.library.register_autograd(lib + "cpp_experts_soft_fwd", _soft_backward, setup_context=_soft_setup)
    torch.library.register_autograd(lib + "cpp_experts_topk_fwd", _topk_backward, setup_context=_topk_setup)
    _registered = True


# ------------------------------------------------------------------------------------------------
# The four backend functions.

def _ops():
    load()
    return torch.ops.smoe_fast


def _weight_list(weights: dict[str, torch.Tensor], kind: str) -> list[torch.Tensor]:
    return [weights[f"{layer}.{part}"] for layer in LAYERS[kind] for part in ("weight", "bias")]


_HALF = (torch.float16, torch.bfloat16)


def _match_dtype(z: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """z as the kernels take it. CUDA: an fp16 / bf16 z (autocast's dtype when autocast is on for CUDA,
    as the Triton backend) is read as is by the kernels, which compute in fp32 and return x_hat in z's
    dtype, with fp32 or same-dtype weights. CPU (fp32 / fp64 kernels), and any other mix: the weights'
    dtype."""
    if z.is_cuda:
        z = autocast_input(z)
        if z.dtype in _HALF and weights[0].dtype in (z.dtype, torch.float32):
            return z
    return z if z.dtype == weights[0].dtype else z.to(weights[0].dtype)


def _match_gates(gates: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """Gates in the weights' dtype on CPU; as they are on CUDA (the kernels read them in fp32 or fp64,
    and their gradient comes back in their dtype)."""
    return gates if gates.is_cuda or gates.dtype == weights[0].dtype else gates.to(weights[0].dtype)


def group_by_expert(expert_idx: torch.Tensor, num_experts: int) -> Routing:
    """Routing(expert_counts [E], expert_offsets [E+1], sorted_token_idx, token_sorted_pos [B*K]); int32, stable."""
    return Routing(*_ops().cpp_group_by_expert(expert_idx, num_experts))


def experts_hard(z: torch.Tensor, expert_idx: torch.Tensor, weights: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """x_hat[b] = D_{expert_idx[b]}(z[b]); z [B,L], expert_idx [B] -> [B,1,28,28]."""
    ops, w = _ops(), _weight_list(weights, kind)
    z = _match_dtype(z, w)
    if torch.is_grad_enabled() and (z.requires_grad or any(t.requires_grad for t in w)):
        # Differentiable path: top-1 with unit gates (multiplying by 1 is exact, so the values agree).
        return ops.cpp_experts_topk_fwd(z, expert_idx.unsqueeze(1), z.new_ones(z.shape[0], 1), w, kind)
    return ops.cpp_experts_hard(z, expert_idx, w, kind)


def experts_soft(z: torch.Tensor, gates: torch.Tensor, weights: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """x_hat = sum_e gates[:, e] * D_e(z); z [B,L], gates [B,E] -> [B,1,28,28]."""
    ops, w = _ops(), _weight_list(weights, kind)
    return ops.cpp_experts_soft_fwd(_match_dtype(z, w), _match_gates(gates, w), w, kind)


def experts_topk(z: torch.Tensor, topk_idx: torch.Tensor, topk_gates: torch.Tensor,
                 weights: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """x_hat[b] = sum_k topk_gates[b,k] * D_{topk_idx[b,k]}(z[b]); topk_idx, topk_gates [B,K]."""
    ops, w = _ops(), _weight_list(weights, kind)
    return ops.cpp_experts_topk_fwd(_match_dtype(z, w), topk_idx, _match_gates(topk_gates, w), w, kind)
