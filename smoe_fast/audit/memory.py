"""The soft-gated training step's memory model: what it keeps and what it allocates, per kind and E.

DESIGN.md: no [B, E, ...] activation is ever stored. The figures come from the launchers' own split
functions and buffer sizes (kernels/decoder_blocks.py ``soft_forward_split`` / ``soft_backward_split``,
kernels/experts_medium.py ``SOFT_CHUNK_ROWS``), at B = 1,024 on an H100's 264 programs:

- saved: bytes per token autograd keeps between forward and backward beyond the op's inputs (z, the
  gates and the weights). tests/test_triton_soft.py and test_triton_medium.py check with
  ``saved_tensors_hooks`` that it is nothing.
- forward / backward: the launch's temporary buffers per token (partial outputs, partial dz,
  scratch; medium: one chunk's activations and, in the backward, their gradients), and per expert
  (the partial weight gradients, O(E * weights) like the gradients themselves).

The reference keeps every expert's activations for every token: ``reference_saved`` per token grows
with E (measured: lite 72 KB, mlp 3.4 KB, medium 480 KB per (token, expert) pair).

>>> rows = memory_rows()
>>> {r.kind: r.saved_per_token for r in rows if r.num_experts == 8192}
{'lite': 0, 'mlp': 0, 'medium': 0}
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from . import work as W

PROGRAMS = 264        # an H100's persistent grid (2 programs per SM)
MLP_HIDDEN = 256
MEMORY_EXPERTS = (8, 64, 256, 1024, 8192)


@dataclass(frozen=True)
class MemoryRow:
    kind: str
    num_experts: int
    batch: int
    saved_per_token: int
    forward_per_token: float
    backward_per_token: float
    backward_per_expert: float
    reference_saved_per_token: float


@functools.lru_cache(maxsize=None)
def reference_saved_per_pair(kind: str) -> float:
    """Bytes the reference's autograd keeps per (token, expert) pair, measured: the saved tensors of
    reference.experts_soft (``saved_tensors_hooks``, each storage once, inputs excluded) at B = 8 and
    16 with E = 2 on CPU, the difference per token and expert."""
    import torch

    from smoe_fast import reference
    from smoe_fast.experts import random_weights

    def saved(batch: int, num_experts: int) -> int:
        generator = torch.Generator().manual_seed(0)
        weights = random_weights(kind, num_experts, W.LATENT, MLP_HIDDEN, requires_grad=True)
        z = torch.randn(batch, W.LATENT, generator=generator, requires_grad=True)
        gates = torch.rand(batch, num_experts, generator=generator, requires_grad=True)
        inputs = {t.untyped_storage().data_ptr() for t in (z, gates, *weights.values())}
        storages = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in inputs:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            reference.experts_soft(z, gates, weights, kind)
        return sum(storages.values())

    return (saved(16, 2) - saved(8, 2)) / (8 * 2)


def soft_step_memory(kind: str, num_experts: int, batch: int = W.SOFT_B, programs: int = PROGRAMS) -> MemoryRow:
    """The memory model of one soft step (forward + backward) of ``kind`` at (B, E)."""
    from smoe_fast.kernels import decoder_blocks, decoder_tiles, decoder_tiles_bwd, experts_medium, tuning

    latent = W.LATENT
    if kind == "medium":
        width = max(1, min(num_experts, experts_medium.SOFT_CHUNK_ROWS // batch))
        activations = 4 * (W.PIXELS + 1568 + 12544 + 25088)     # y, h0, a1, a2 of one (token, expert) row
        forward = 4 * W.PIXELS + width * activations            # the output sum + one chunk
        backward = forward + width * activations                # + the chunk's activation gradients
        per_expert = 0.0                                        # weight gradients written in place per chunk
    else:
        config = tuning.training_lite_fwd_config(90) if kind == "lite" else tuning.training_mlp_config(90)
        _, groups, _ = decoder_blocks.soft_forward_split(batch, num_experts, programs, config["BM"])
        forward = 4 * W.PIXELS * groups
        if kind == "lite":
            scratch = decoder_tiles.conv_scratch_size("lite", config["BM"], config["TS"])
            forward += (4 * scratch * min(programs, groups * W.cdiv(batch, config["BM"])) + 4 * batch) / batch
        weights = sum(decoder_blocks.partial_layout(kind, latent, MLP_HIDDEN))
        bwd = tuning.training_lite_bwd_config(90) if kind == "lite" else tuning.training_mlp_config(90, "bwd")
        groups, _, runs, _ = decoder_blocks.soft_backward_split(batch, num_experts, programs, bwd["BM"], weights, latent)
        backward = 4 * latent * groups
        if kind == "lite":
            scratch = decoder_tiles_bwd.conv_bwd_scratch_size(bwd["BM"], bwd["TS"])
            backward += (4 * scratch * min(programs, groups * runs) + 4 * batch) / batch
        per_expert = 4.0 * runs * weights
    return MemoryRow(kind, num_experts, batch, 0, forward, backward, per_expert,
                     num_experts * reference_saved_per_pair(kind))


def memory_rows(experts=MEMORY_EXPERTS, batch: int = W.SOFT_B) -> list[MemoryRow]:
    return [soft_step_memory(kind, e, batch) for kind in ("lite", "mlp", "medium") for e in experts]


def format_memory(rows: list[MemoryRow]) -> str:
    head = (f"{'soft step memory':<18} {'E':>6} {'saved B/token':>14} {'fwd B/token':>12} {'bwd B/token':>12} "
            f"{'bwd B/expert':>13} {'reference saved B/token':>24}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.kind:<18} {r.num_experts:>6} {r.saved_per_token:>14,} {r.forward_per_token:>12,.0f} "
                     f"{r.backward_per_token:>12,.0f} {r.backward_per_expert:>13,.0f} {r.reference_saved_per_token:>24,.0f}")
    lines.append(f"B = {rows[0].batch:,} on {PROGRAMS} programs; saved = kept between forward and backward beyond z, "
                 "gates and weights; fwd / bwd = temporary buffers (partial outputs, partial dz, scratch; medium: one "
                 "expert chunk's activations); bwd B/expert = partial weight gradients.")
    return "\n".join(lines)
