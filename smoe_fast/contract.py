"""The dispatch contract shared by every backend (reference, Triton, C++/CUDA).

| tensor           | shape, dtype         | meaning                                                          |
|------------------|----------------------|------------------------------------------------------------------|
| expert_idx       | [B] or [B,K] int64   | chosen expert per token (per slot for top-k)                     |
| expert_counts    | [E] int32            | tokens routed to each expert                                     |
| expert_offsets   | [E+1] int32          | exclusive scan of counts; expert e owns rows offsets[e]:offsets[e+1] |
| sorted_token_idx | [B*K] int32          | sorted row -> flat (token, slot) index b*K + k; stable within an expert |
| token_sorted_pos | [B*K] int32          | the inverse permutation                                          |

Expert weights are stacked per layer with a leading E dimension and named after the authors'
modules (``fc.weight [E,392,L]``, ...). This module is the lowest layer: it imports nothing
from smoe_fast, and every backend imports it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

IMAGE_SHAPE = (1, 28, 28)
IMAGE_PIXELS = 784
DECODER_KINDS = ("lite", "medium", "mlp")
DEFAULT_MLP_HIDDEN = 256


class Routing(NamedTuple):
    """Top-1 (or top-k) assignments grouped by expert; see the table in the module docstring."""

    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    sorted_token_idx: torch.Tensor
    token_sorted_pos: torch.Tensor


def decoder_param_shapes(kind: str, latent_dim: int, hidden_dim: int = DEFAULT_MLP_HIDDEN) -> dict[str, tuple[int, ...]]:
    """Per-expert parameter shapes (no leading E) of a decoder kind, in the authors' names."""
    L = latent_dim
    if kind == "lite":
        return {
            "fc.weight": (392, L), "fc.bias": (392,),
            "conv1.weight": (16, 8, 3, 3), "conv1.bias": (16,),
            "conv2.weight": (1, 16, 3, 3), "conv2.bias": (1,),
        }
    if kind == "medium":
        return {
            "fc.weight": (1568, L), "fc.bias": (1568,),
            "conv1.weight": (64, 32, 3, 3), "conv1.bias": (64,),
            "conv2.weight": (32, 64, 3, 3), "conv2.bias": (32,),
            "conv3.weight": (1, 32, 3, 3), "conv3.bias": (1,),
        }
    if kind == "mlp":
        return {
            "fc1.weight": (hidden_dim, L), "fc1.bias": (hidden_dim,),
            "fc2.weight": (IMAGE_PIXELS, hidden_dim), "fc2.bias": (IMAGE_PIXELS,),
        }
    raise ValueError(f"unknown decoder kind {kind!r}; expected one of {DECODER_KINDS}")


POISON_ENV = "SMOE_FAST_POISON_OUTPUTS"


def alloc_output(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Allocate a kernel's output. Uninitialised, or NaN-filled when ``SMOE_FAST_POISON_OUTPUTS=1``
    (the test suite sets it) so that an element a kernel forgets to write fails the comparison."""
    import os

    dtype = dtype or like.dtype
    if os.environ.get(POISON_ENV, "0") == "1":
        fill = float("nan") if dtype.is_floating_point else -(2 ** 31 - 1)
        return torch.full(shape, fill, dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def autocast_input(z: torch.Tensor) -> torch.Tensor:
    """z cast to the autocast dtype when autocast is on for z's device, else z: the expert kernels are
    custom ops, which autocast does not cast, so each op's entry point does it for its GEMM input (the
    Triton launchers, and the cpp backend on CUDA tensors). The kernels then compute on the half z with
    fp32 accumulation; the weights stay as they are (fp32 masters), so weight gradients are fp32."""
    if torch.is_autocast_enabled(z.device.type) and z.is_floating_point():
        return z.to(torch.get_autocast_dtype(z.device.type))
    return z
