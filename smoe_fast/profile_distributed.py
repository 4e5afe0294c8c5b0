"""``smoe-fast profile --distributed``: what expert parallelism costs, per step, next to the experts' time.

Run under torchrun (one process per rank). For each E, every rank holds E/W experts
(:func:`smoe_fast.distributed.shard_experts`) and pushes its own ``batch`` tokens through one step of
the chosen stage: ``hard`` (forward), ``topk`` or ``soft`` (forward and backward). Rank 0 prints one
row per E: bytes each rank sends to other ranks per step (mean over ranks), the exchange time
(all_to_all calls, forward and backward), the local experts' forward time, and the whole step, each
the median over repeats of the slowest rank. Timing synchronises the device around every exchange,
so the step time is an upper bound of an unmeasured step.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from .distributed import CommStats, init_from_env, shard_experts, world_info
from .experts import StackedExperts


def _step(experts, stage: str, z, logits, top_k: int, backend: str):
    if stage == "hard":
        with torch.no_grad():
            return experts.hard(z, logits.argmax(-1), backend=backend, check_indices=False)
    z = z.detach().requires_grad_()
    gates = logits.softmax(-1)
    if stage == "soft":
        out = experts.soft(z, gates, backend=backend)
    else:
        topk_gates, topk_idx = gates.topk(top_k, dim=-1)
        out = experts.topk(z, topk_idx, topk_gates / topk_gates.sum(-1, keepdim=True), backend=backend,
                           check_indices=False)
    out.sum().backward()
    return out


def profile_distributed(args, device: torch.device) -> list[dict]:
    """One row per E: the slowest rank's median times and the mean bytes per step (rank 0's list; others get [])."""
    rank, world = world_info()
    stage = args.stage if args.stage in ("hard", "soft", "topk") else "topk"
    rows = []
    for num_experts in args.experts or [8, 64]:
        for batch in args.batch or [4096]:
            torch.manual_seed(0)
            holder = torch.nn.Module()
            holder.experts = StackedExperts(num_experts, args.latent_dim, args.decoder, args.hidden_dim).to(device)
            experts = shard_experts(holder).experts
            g = torch.Generator().manual_seed(1000 + rank)
            z = torch.randn(batch, args.latent_dim, generator=g).to(device)
            logits = torch.randn(batch, num_experts, generator=g).to(device)
            backend = (args.backends or ["auto"])[0]
            for _ in range(args.warmup):
                _step(experts, stage, z, logits, args.top_k, backend)
            samples = []
            for _ in range(args.repeats or 5):
                experts.stats = CommStats()
                dist.barrier()
                start = time.perf_counter()
                _step(experts, stage, z, logits, args.top_k, backend)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                step = time.perf_counter() - start
                s = experts.stats
                samples.append(torch.tensor([step, s.exchange_seconds, s.expert_seconds, s.bytes_sent,
                                             s.bytes_received], dtype=torch.float64))
            experts.stats = None
            local = torch.stack(samples)                                   # [repeats, 5]
            slowest, total = local.clone(), local.clone()
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            dist.all_reduce(total)
            med = [statistics.median(slowest[:, i].tolist()) for i in range(3)]
            rows.append({"world": world, "stage": stage, "decoder": args.decoder, "experts": num_experts,
                         "batch_per_rank": batch, "bytes_sent_per_rank": float(total[:, 3].mean()) / world,
                         "bytes_received_per_rank": float(total[:, 4].mean()) / world,
                         "step_ms": med[0] * 1e3, "exchange_ms": med[1] * 1e3, "expert_fwd_ms": med[2] * 1e3})
    return rows if rank == 0 else []


def run(args) -> int:
    """``smoe-fast profile --distributed``: under torchrun; rank 0 prints the table (and --csv)."""
    device = init_from_env(args.device or "auto")
    if device is None:
        print("error: --distributed runs under torchrun, for example\n"
              "  torchrun --standalone --nproc-per-node 2 -m smoe_fast profile --distributed --stage topk", flush=True)
        return 2
    try:
        rows = profile_distributed(args, device)
    finally:
        dist.destroy_process_group()
    if not rows:
        return 0
    print(f"expert parallelism: {rows[0]['world']} ranks, stage {rows[0]['stage']}, {rows[0]['decoder']} experts, "
          f"device {device.type}; per step, slowest rank, median")
    print(f"{'E':>6} {'B/rank':>7} {'sent MB/rank':>13} {'recv MB/rank':>13} {'exchange ms':>12} "
          f"{'experts fwd ms':>15} {'step ms':>9}")
    for r in rows:
        print(f"{r['experts']:>6} {r['batch_per_rank']:>7} {r['bytes_sent_per_rank'] / 1e6:>13.3f} "
              f"{r['bytes_received_per_rank'] / 1e6:>13.3f} {r['exchange_ms']:>12.2f} {r['expert_fwd_ms']:>15.2f} "
              f"{r['step_ms']:>9.2f}")
    if args.csv is not None:
        import csv

        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0
