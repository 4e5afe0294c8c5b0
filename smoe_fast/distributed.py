"""Multi-process expert dispatch on torch.distributed: expert parallelism and the collectives it needs.

``shard_experts(model)`` keeps on each rank a contiguous slice of the E experts and replaces
``model.experts`` by a :class:`ShardedExperts`, which exchanges tokens with
``torch.distributed.all_to_all_single``: every (token, slot) row travels to the rank owning its
expert, is decoded there by the ordinary ops on any backend, and comes back in its original order.
The only transport is torch.distributed (NCCL on GPUs, gloo on CPUs); no process management here.

Placement. With E = q·W + r experts on W ranks, ranks 0 .. r-1 hold q + 1 experts and the others q,
in order: rank k holds experts [k·q + min(k, r), (k+1)·q + min(k+1, r)). With E < W the last W - E
ranks hold none; they still take part in every collective (and their weights are empty [0, ...]).

Cost per call, B_k tokens on rank k, K slots per token, L latent size, P = 784 output pixels:

| gating | exchange | bytes sent by rank k (fp32) | host syncs |
|---|---|---|---|
| hard / top-k, exact | rows to their expert's rank and back | 4·B_k·K·(L + P) + 8·B_k·K (+ the same again in backward) | 1 (split sizes) |
| hard / top-k, ``capacity=C`` | fixed [W, ceil(E/W), C] buffers, equal splits | 4·W·ceil(E/W)·C·(L + P) | 0 |
| soft | all-gather of z and gate columns, reduce-scatter of outputs | 4·(W·B_k·L + B_k·E + ΣB·P) | 1 (batch sizes) |

Softmax gates are never exactly zero, so soft gating sends every token to every rank: each rank
decodes all ΣB tokens through its E/W experts (compute divided by W) but receives W·B_k·P output
values, W times what a top-k exchange moves; soft gating scales in compute, not in traffic.

Host synchronisation. ``all_to_all_single`` takes its split sizes as Python ints, so the exact
path exchanges the per-rank counts first and reads them on the host (``.tolist()``): one sync per
forward (backward reuses them). ``capacity=C`` sends fixed-size buffers instead (no sync): rows
beyond C per (source rank, expert) are dropped (their output is zero) and counted in
``ShardedExperts.last_dropped``; with no overflow it equals the exact path.

>>> dist.init_process_group("gloo")                 # torchrun sets the rendezvous variables
>>> model = smoe_fast.SMoEVAE(num_experts=10, backend="cpp")
>>> shard_experts(model)                            # same weights on every rank before this call
>>> model.experts.expert_range                      # (0, 5) on rank 0 of 2, (5, 10) on rank 1
>>> out = model(x_local)                            # each rank its own share of the batch
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from .contract import IMAGE_SHAPE, decoder_param_shapes
from .experts import StackedExperts, _StackedLayer

__all__ = ["expert_ranges", "shard_experts", "ShardedExperts", "CommStats", "all_to_all", "global_sum",
           "init_from_env", "world_info"]


@dataclasses.dataclass
class CommStats:
    """What a :class:`ShardedExperts` moved and spent, summed over calls, when ``stats`` is set on it.

    Bytes count only rows that leave this rank (sent) or arrive from another (received); seconds are
    host wall time around each exchange and around the local experts, with a device synchronisation
    before and after (so measuring perturbs what it measures; leave it off in training).
    """

    exchanges: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    exchange_seconds: float = 0.0
    expert_seconds: float = 0.0


class _Timer:
    def __init__(self, stats: CommStats | None, field: str, device: torch.device):
        self.stats, self.field, self.device = stats, field, device

    def __enter__(self):
        if self.stats is not None:
            _sync(self.device)
            self.start = time.perf_counter()

    def __exit__(self, *exc):
        if self.stats is not None:
            _sync(self.device)
            setattr(self.stats, self.field, getattr(self.stats, self.field) + time.perf_counter() - self.start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count(stats: CommStats | None, x: torch.Tensor, out: torch.Tensor, output_splits, input_splits, group) -> None:
    if stats is None:
        return
    rank, world = world_info(group)
    row_bytes = x[0].numel() * x.element_size() if x.dim() > 1 else x.element_size()
    to_self = input_splits[rank] if input_splits is not None else x.shape[0] // world
    from_self = output_splits[rank] if output_splits is not None else out.shape[0] // world
    stats.exchanges += 1
    stats.bytes_sent += (x.shape[0] - to_self) * row_bytes
    stats.bytes_received += (out.shape[0] - from_self) * row_bytes


# ---------------------------------------------------------------------------- process group
def world_info(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def init_from_env(device: str = "auto") -> torch.device | None:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ...).

    Chooses NCCL when the device is CUDA (``device`` "cuda..." or "auto" with a GPU) and gloo
    otherwise; each process takes GPU ``LOCAL_RANK``. Returns the device this process computes on,
    or None without torchrun (no ``WORLD_SIZE`` in the environment: one process, nothing joined).
    """
    if "WORLD_SIZE" not in os.environ:
        return None
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but torch sees no CUDA GPU; use --device cpu")
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(local)
    else:
        local = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo", device_id=local if want_cuda else None)
    return local


# ---------------------------------------------------------------------------- collectives with autograd
class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 whose backward is the reverse all_to_all (splits swapped)."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, stats):
        ctx.output_splits, ctx.input_splits, ctx.group, ctx.stats = output_splits, input_splits, group, stats
        return _exchange(x, output_splits, input_splits, group, stats)

    @staticmethod
    def backward(ctx, grad_out):
        return _exchange(grad_out, ctx.input_splits, ctx.output_splits, ctx.group, ctx.stats), None, None, None, None


def _exchange(x, output_splits, input_splits, group, stats):
    rows = sum(output_splits) if output_splits is not None else x.shape[0]
    out = x.new_empty(rows, *x.shape[1:])
    with _Timer(stats, "exchange_seconds", x.device):
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    _count(stats, x, out, output_splits, input_splits, group)
    return out


def all_to_all(x: torch.Tensor, output_splits: list[int] | None = None, input_splits: list[int] | None = None,
               group=None, stats: CommStats | None = None) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0: rows ``input_splits[j]`` go to rank j.

    x [sum(input_splits), ...] -> [sum(output_splits), ...]; ``None`` splits mean equal chunks (no
    host sync). The gradient travels back by the reverse exchange. ``stats`` accumulates bytes and time.
    """
    return _AllToAll.apply(x, output_splits, input_splits, group, stats)


def _all_gather(out: torch.Tensor, x: torch.Tensor, group) -> None:
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


class _GlobalSum(torch.autograd.Function):
    """all_reduce(SUM) whose backward hands the incoming gradient to the local contribution."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None


def global_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Σ over ranks of ``x``, differentiable, with no collective in backward.

    The backward passes the gradient to this rank's contribution only. A quantity f(global_sum(s))
    that every rank computes identically and that enters each rank's loss multiplied by the world
    size W then gets exactly its one-process gradient from DDP's average:
    (1/W) Σ_k W·f'·∂s_k/∂θ = Σ_k f'·∂s_k/∂θ. Without a process group it returns ``x``.
    """
    if world_info(group)[1] == 1:
        return x
    return _GlobalSum.apply(x, group)


# ---------------------------------------------------------------------------- placement
def expert_ranges(num_experts: int, world_size: int) -> list[tuple[int, int]]:
    """(first, end) experts of every rank: contiguous, the first E mod W ranks hold one more."""
    q, r = divmod(num_experts, world_size)
    starts = [k * q + min(k, r) for k in range(world_size + 1)]
    return [(starts[k], starts[k + 1]) for k in range(world_size)]


def shard_experts(model: nn.Module, group=None, capacity: int | None = None) -> nn.Module:
    """Keep on this rank only its slice of ``model.experts`` and route tokens across ranks.

    ``model`` must hold the same weights on every rank (same seed or a broadcast) and have a
    :class:`~smoe_fast.experts.StackedExperts` at ``model.experts``; it is replaced, in place, by a
    :class:`ShardedExperts` of this rank's rows (``model.experts.expert_range``). ``capacity`` makes
    the hard and top-k exchange synchronisation-free (see the module docstring). Returns ``model``.
    """
    experts = model.experts
    if not isinstance(experts, StackedExperts):
        raise TypeError(f"model.experts must be a StackedExperts to shard, got {type(experts).__name__}")
    model.experts = ShardedExperts(experts, group=group, capacity=capacity)
    return model


class ShardedExperts(nn.Module):
    """This rank's contiguous slice of E stacked experts; hard, soft and top-k calls span all ranks.

    Same call signatures as :class:`~smoe_fast.experts.StackedExperts` (``hard``, ``soft``,
    ``topk``) with global expert indices, on this rank's share of the batch. ``weights()`` returns
    the local stacked rows ``[end - first, ...]``; ``num_experts`` stays the global E.
    Every rank must make the same sequence of calls (each is a collective).
    """

    def __init__(self, experts: StackedExperts, group=None, capacity: int | None = None):
        super().__init__()
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be None or an integer >= 1, got {capacity!r}")
        self.group, self.capacity = group, capacity
        self.rank, self.world_size = world_info(group)
        self.kind, self.num_experts = experts.kind, experts.num_experts
        self.latent_dim, self.hidden_dim, self.layer_names = experts.latent_dim, experts.hidden_dim, experts.layer_names
        self.ranges = expert_ranges(self.num_experts, self.world_size)
        self.expert_range = self.ranges[self.rank]
        first, end = self.expert_range
        self.num_local_experts = end - first
        self.max_local_experts = max(e - f for f, e in self.ranges)
        shapes = decoder_param_shapes(self.kind, self.latent_dim, self.hidden_dim)
        full = experts.weights()
        for layer in self.layer_names:
            local = _StackedLayer(self.num_local_experts, shapes[f"{layer}.weight"], shapes[f"{layer}.bias"])
            local.to(device=full[f"{layer}.weight"].device, dtype=full[f"{layer}.weight"].dtype)
            with torch.no_grad():
                local.weight.copy_(full[f"{layer}.weight"][first:end])
                local.bias.copy_(full[f"{layer}.bias"][first:end])
            self.add_module(layer, local)
        device = full[f"{self.layer_names[0]}.weight"].device
        owner = torch.repeat_interleave(torch.arange(self.world_size), torch.tensor([e - f for f, e in self.ranges]))
        self.register_buffer("expert_owner", owner.to(device), persistent=False)    # [E] rank of each expert
        self.register_buffer("expert_first", torch.tensor([f for f, _ in self.ranges], device=device), persistent=False)
        self.last_dropped: torch.Tensor | None = None
        self.stats: CommStats | None = None    # set to CommStats() to measure every exchange (smoe-fast profile)

    def weights(self) -> dict[str, torch.Tensor]:
        """This rank's stacked rows in the dispatch contract's names: ``{"fc.weight": [end-first,392,L], ...}``."""
        return {f"{layer}.{p}": getattr(getattr(self, layer), p) for layer in self.layer_names for p in ("weight", "bias")}

    def expert_state_dict(self, e: int) -> dict[str, torch.Tensor]:
        first, end = self.expert_range
        if not first <= e < end:
            raise ValueError(f"expert {e} lives on another rank; this rank holds experts [{first}, {end})")
        return {name: w[e - first].detach().clone() for name, w in self.weights().items()}

    # ------------------------------------------------------------ the three gatings
    def hard(self, z, expert_idx, backend="auto", check_indices=True):
        """x_hat[b] = D_{expert_idx[b]}(z[b]) for this rank's tokens z [B,L], expert_idx [B] (global ids)."""
        if check_indices:
            self._check_indices(expert_idx)
        return self._routed(z, expert_idx[:, None], None, backend)

    def topk(self, z, topk_idx, topk_gates, backend="auto", check_indices=True):
        """x_hat[b] = Σ_k topk_gates[b,k]·D_{topk_idx[b,k]}(z[b]); topk_idx, topk_gates [B,K]."""
        if check_indices:
            self._check_indices(topk_idx)
        return self._routed(z, topk_idx, topk_gates, backend)

    def soft(self, z, gates, backend="auto"):
        """x_hat = Σ_e gates[:,e]·D_e(z) for this rank's tokens; gates [B,E] over all E experts.

        All-gathers z and this rank's gate columns from every rank (uneven batches allowed), decodes
        every token through the local experts, and reduce-scatters the partial sums back to the
        tokens' ranks, in rank order.
        """
        world, group = self.world_size, self.group
        B = z.shape[0]
        sizes = torch.tensor([B], dtype=torch.int64, device=z.device)
        all_sizes = sizes.new_empty(world)
        _all_gather(all_sizes, sizes, group)
        batch_sizes = all_sizes.tolist()                                              # host sync
        z_all = all_to_all(z.repeat(world, 1), batch_sizes, [B] * world, group, self.stats)  # [ΣB, L]
        widths = [end - first for first, end in self.ranges]
        gate_blocks = torch.cat([gates[:, f:e].reshape(-1) for f, e in self.ranges])   # [B·E] by destination
        gates_local = all_to_all(gate_blocks, [b * widths[self.rank] for b in batch_sizes],
                                 [B * w for w in widths], group, self.stats)
        first, end = self.expert_range
        if self.num_local_experts and z_all.shape[0]:
            gates_local = torch.cat([g.view(b, end - first) for g, b in
                                     zip(gates_local.split([b * (end - first) for b in batch_sizes]), batch_sizes)])
            with _Timer(self.stats, "expert_seconds", z_all.device):
                partial = ops.experts_soft(z_all, gates_local, self.weights(), self.kind, backend)
        else:
            partial = self._empty_output(z_all.shape[0], z_all, gates_local)
        back = all_to_all(partial, [B] * world, batch_sizes, group, self.stats)       # [W·B, 1, 28, 28]
        return back.view(world, B, *IMAGE_SHAPE).sum(0)

    # ------------------------------------------------------------ token exchange
    def _routed(self, z, topk_idx, topk_gates, backend):
        """Send every (token, slot) row to its expert's rank, decode there, bring it back, weight it."""
        B, K = topk_idx.shape
        flat_idx = topk_idx.reshape(-1).long()
        z_rows = z.repeat_interleave(K, dim=0) if K > 1 else z                          # [B·K, L]
        if self.capacity is None:
            y_rows = self._exchange_exact(z_rows, flat_idx, backend)
        else:
            y_rows = self._exchange_capacity(z_rows, flat_idx, backend)
        y = y_rows.view(B, K, *IMAGE_SHAPE)
        if topk_gates is None:
            return y[:, 0]
        return (y * topk_gates.reshape(B, K, 1, 1, 1)).sum(1)

    def _exchange_exact(self, z_rows, flat_idx, backend):
        world, group = self.world_size, self.group
        dest = self.expert_owner[flat_idx]
        order = torch.sort(dest, stable=True).indices                                   # rows grouped by rank
        send_counts = torch.bincount(dest, minlength=world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send, recv = send_counts.tolist(), recv_counts.tolist()                        # the host sync
        z_recv = all_to_all(z_rows[order], recv, send, group, self.stats)
        local_idx = flat_idx.new_empty(sum(recv))
        dist.all_to_all_single(local_idx, (flat_idx - self.expert_first[dest])[order].contiguous(), recv, send,
                               group=group)
        y_recv = self._decode_local(z_recv, local_idx, backend)
        y_sorted = all_to_all(y_recv, send, recv, group, self.stats)
        y_rows = torch.empty_like(y_sorted)
        return y_rows.index_copy(0, order, y_sorted)

    def _exchange_capacity(self, z_rows, flat_idx, backend):
        """Fixed buffers [W, M, C] (M = the most experts a rank holds): no split sizes, no host sync."""
        world, group, C, M = self.world_size, self.group, self.capacity, self.max_local_experts
        rows, L = z_rows.shape
        dest = self.expert_owner[flat_idx]
        local = flat_idx - self.expert_first[dest]
        counts = torch.bincount(flat_idx, minlength=self.num_experts)
        offsets = torch.cumsum(counts, 0) - counts
        order = torch.sort(flat_idx, stable=True).indices
        pos = torch.empty_like(flat_idx)
        pos[order] = torch.arange(rows, device=flat_idx.device) - offsets[flat_idx[order]]   # rank within expert
        kept = pos < C
        self.last_dropped = (~kept).sum()
        slot = (dest * M + local) * C + pos.clamp_max(C - 1)
        slot = torch.where(kept, slot, world * M * C)                                  # dropped rows: a spare slot
        send = z_rows.new_zeros(world * M * C + 1, L).index_copy(0, slot, z_rows)[:-1]
        z_recv = all_to_all(send, None, None, group, self.stats)                       # [W·M·C, L]
        local_idx = torch.arange(M, device=z_rows.device).repeat_interleave(C).repeat(world)
        local_idx = local_idx.clamp_max(max(self.num_local_experts - 1, 0))             # padding rows of a short rank
        y_recv = self._decode_local(z_recv, local_idx, backend)
        y_back = all_to_all(y_recv, None, None, group, self.stats)
        y_back = torch.cat([y_back, y_back.new_zeros(1, *IMAGE_SHAPE)])                 # the spare slot reads zeros
        return y_back[slot]

    def _decode_local(self, z_recv, local_idx, backend):
        """Decode received rows through this rank's experts (global ids already made local)."""
        if self.num_local_experts == 0 or z_recv.shape[0] == 0:
            return self._empty_output(z_recv.shape[0], z_recv)
        w = self.weights()
        with _Timer(self.stats, "expert_seconds", z_recv.device):
            if torch.is_grad_enabled() and (z_recv.requires_grad or any(p.requires_grad for p in w.values())):
                return ops.experts_topk(z_recv, local_idx[:, None], torch.ones_like(z_recv[:, :1]), w, self.kind,
                                        backend, check_indices=False)
            return ops.experts_hard(z_recv, local_idx, w, self.kind, backend, check_indices=False)

    def _empty_output(self, rows, *inputs):
        """Zeros [rows, 1, 28, 28] still joined to the autograd graph of the inputs and the local weights,
        so this rank runs the backward collectives like every other rank."""
        out = inputs[0].new_zeros(rows, *IMAGE_SHAPE)
        if not torch.is_grad_enabled():
            return out
        anchors = [t.sum() for t in (*inputs, *self.weights().values()) if t.requires_grad]
        return out + 0 * sum(anchors) if anchors else out

    def _check_indices(self, idx):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_experts):
            raise ValueError(f"expert indices must lie in [0, {self.num_experts - 1}], "
                             f"found values in [{int(idx.min())}, {int(idx.max())}]")

    def extra_repr(self) -> str:
        first, end = self.expert_range
        return (f"kind={self.kind!r}, num_experts={self.num_experts}, expert_range=({first}, {end}), "
                f"rank={self.rank}/{self.world_size}" + (f", capacity={self.capacity}" if self.capacity else ""))
