"""Multi-process: expert parallelism (shard_experts) and data-parallel training on real gloo process groups.

Each test starts 2 or 3 CPU processes (torch.multiprocessing, spawn) that meet through a FileStore in
the test's tmp_path, so no port is needed, and fails after a time limit instead of hanging. Workers
save what they computed; the comparisons against the one-process model run here, in the test process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from smoe_fast.distributed import expert_ranges, global_sum, shard_experts
from smoe_fast.experts import StackedExperts
from smoe_fast.profile_distributed import profile_distributed
from smoe_fast.vae.loss import smoe_loss, smoe_loss_sharded
from smoe_fast.vae.model import SMoEVAE
from smoe_fast.vae.train import TrainConfig, keyed_noise, train

from helpers import assert_close, blob_images

TIME_LIMIT_S = 120


def _run_workers(fn, world: int, tmp_path: Path, *args) -> list:
    """Run ``fn(rank, world, init_file, out_dir, *args)`` in ``world`` processes; returns each rank's result."""
    init_file = tmp_path / "store"
    ctx = mp.start_processes(fn, args=(world, str(init_file), str(tmp_path), *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIME_LIMIT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} worker processes did not finish within {TIME_LIMIT_S} s (a collective hung?)")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _join(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


# ---------------------------------------------------------------------------- shard_experts
class Case(NamedTuple):
    id: str
    kind: str
    num_experts: int
    gating: str            # "hard" (eval, no grad), "hard_train" (top-1 with constant gates), "soft", "topk"
    routing: str = "random"  # "random", or "first": every token to expert 0 (top-k: experts 0 and 1)
    split: str = "uneven"    # rank shares of the batch: "uneven" (sizes differ), "empty0" (rank 0 has none)
    capacity: int | None = None
    backend: str = "reference"


BATCH, LATENT, HIDDEN = 13, 8, 16

CASES = [
    Case("lite-hard-E5", "lite", 5, "hard"),                          # E not divisible by 2 or 3
    Case("lite-hard_train-E5", "lite", 5, "hard_train"),
    Case("mlp-soft-E5", "mlp", 5, "soft"),
    Case("lite-soft-E4", "lite", 4, "soft"),
    Case("mlp-topk-E7", "mlp", 7, "topk"),                            # prime E
    Case("medium-topk-E4", "medium", 4, "topk"),
    Case("medium-soft-E3", "medium", 3, "soft"),
    Case("mlp-hard_train-E2", "mlp", 2, "hard_train"),                # E < world size at 3: a rank with no experts
    Case("mlp-soft-E2", "mlp", 2, "soft"),                            # ... and soft gating there
    Case("mlp-topk-E2", "mlp", 2, "topk"),
    Case("mlp-hard_train-first", "mlp", 6, "hard_train", routing="first"),  # other ranks' experts get no tokens
    Case("mlp-topk-first", "mlp", 6, "topk", routing="first"),
    Case("mlp-soft-empty0", "mlp", 5, "soft", split="empty0"),        # a rank with no tokens at all
    Case("mlp-topk-empty0", "mlp", 5, "topk", split="empty0"),
    Case("lite-hard-cap-roomy", "lite", 5, "hard", capacity=BATCH),    # capacity never overflows: exact
    Case("mlp-hard_train-cap-roomy", "mlp", 5, "hard_train", capacity=BATCH),
    Case("mlp-topk-cap-roomy", "mlp", 4, "topk", capacity=2 * BATCH),
    Case("mlp-hard_train-cpp", "mlp", 5, "hard_train", backend="cpp"),
    Case("lite-soft-cpp", "lite", 3, "soft", backend="cpp"),
]


def _shares(case: Case, world: int) -> list[int]:
    if case.split == "empty0":
        rest = [BATCH // (world - 1)] * (world - 1)
        rest[-1] += BATCH - sum(rest)
        return [0, *rest]
    sizes = [BATCH // world + (1 if r < BATCH % world else 0) for r in range(world)]
    return sizes


def _inputs(case: Case):
    """The case's experts, z, gate logits and upstream gradient, in float64: a sharded run sums in another
    order than one process (per rank, then across ranks), so fp32 would compare rounding, not routing."""
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    experts = StackedExperts(case.num_experts, LATENT, case.kind, hidden_dim=HIDDEN).double()
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) * 0.6 - 0.3)
    z = torch.randn(BATCH, LATENT, generator=g, dtype=torch.float64)
    logits = torch.randn(BATCH, case.num_experts, generator=g, dtype=torch.float64)
    if case.routing == "first":
        logits[:, 0] += 100.0
        logits[:, 1] += 50.0
    upstream = torch.randn(BATCH, 1, 28, 28, generator=g, dtype=torch.float64)
    return experts, z, logits, upstream


def _forward(experts, case: Case, z, logits, upstream):
    """Run the case's gating on (z, logits); returns the output and every gradient (None in eval)."""
    grad = case.gating != "hard"
    z, logits = z.clone().requires_grad_(grad), logits.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        gates = logits.softmax(-1)
        if case.gating == "hard":
            out = experts.hard(z, logits.argmax(-1), backend=case.backend)
        elif case.gating == "hard_train":
            out = experts.topk(z, logits.argmax(-1)[:, None], torch.ones_like(z[:, :1]), backend=case.backend)
        elif case.gating == "soft":
            out = experts.soft(z, gates, backend=case.backend)
        else:
            topk_gates, topk_idx = gates.topk(2, dim=-1)
            out = experts.topk(z, topk_idx, topk_gates / topk_gates.sum(-1, keepdim=True), backend=case.backend)
    result = {"out": out.detach()}
    if grad:
        (out * upstream).sum().backward()
        result["d z"] = z.grad
        result["d logits"] = logits.grad if logits.grad is not None else torch.zeros_like(logits)
        for name, w in experts.weights().items():
            result[f"d {name}"] = w.grad if w.grad is not None else torch.zeros_like(w)
    return result


# Capacity 1 with every token on expert 0: each rank keeps its first token and drops the rest.
OVERFLOW = Case("mlp-hard_train-cap1-first", "mlp", 4, "hard_train", routing="first", capacity=1)


def _shard_cases(world):
    """This rank's results for every case: output, gradients, expert range, local shapes, dropped count."""
    rank = dist.get_rank()
    results = {}
    for case in [*CASES, OVERFLOW]:
        experts, z, logits, upstream = _inputs(case)
        holder = torch.nn.Module()
        holder.experts = experts
        sharded = shard_experts(holder, capacity=case.capacity).experts
        start = sum(_shares(case, world)[:rank])
        rows = slice(start, start + _shares(case, world)[rank])
        result = _forward(sharded, case, z[rows], logits[rows], upstream[rows])
        result["range"] = sharded.expert_range
        result["local_shapes"] = {name: tuple(w.shape) for name, w in sharded.weights().items()}
        result["dropped"] = None if sharded.last_dropped is None else int(sharded.last_dropped)
        results[case.id] = result
    return results


def _collectives_worker(rank, world, init_file, out_dir):
    # One process group per world size for every test that needs no training run (spawning is the slow part).
    _join(rank, world, init_file)
    results = {"shard": _shard_cases(world), "model": _model_cases(world), "gradients": _gradient_cases(world),
               "refused": _refused(), "profile": _profile_rows()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda world: f"{world}procs")
def ranks(request, tmp_path_factory):
    """What each of 2 (or 3) processes computed: a list indexed by rank."""
    return request.param, _run_workers(_collectives_worker, request.param, tmp_path_factory.mktemp("collectives"))


def test_shard_experts_matches_the_unsharded_experts(ranks):
    world, results = ranks
    for case in CASES:
        experts, z, logits, upstream = _inputs(case)
        expected = _forward(experts, case, z, logits, upstream)
        ranges = expert_ranges(case.num_experts, world)
        start = 0
        for rank, result in enumerate(results):
            got = result["shard"][case.id]
            first, end = ranges[rank]
            assert got["range"] == (first, end), f"{case.id} rank {rank}"
            assert all(shape[0] == end - first for shape in got["local_shapes"].values()), f"{case.id} rank {rank}"
            rows = slice(start, start + _shares(case, world)[rank])
            start = rows.stop
            for name, value in expected.items():  # the local rows of every weight gradient, the rank's tokens of the rest
                want = value[first:end] if name.startswith("d ") and name not in ("d z", "d logits") else value[rows]
                assert_close(got[name], want, name=f"{case.id} rank {rank} {name}")
            if case.capacity is not None:
                assert got["dropped"] == 0, f"{case.id} rank {rank} dropped {got['dropped']} tokens"


MODEL_BATCH = 7
MODEL_GATINGS = ("soft", "topk", "hard")


def _model_run(gating, rows=slice(None), shard=False):
    """A whole SMoEVAE (float64) on images ``rows``: eval reconstruction, then one training-mode backward."""
    torch.manual_seed(0)
    model = SMoEVAE(num_experts=5, latent_dim=LATENT, encoder="lite", decoder="mlp", hidden_dim=HIDDEN,
                    gating=gating, top_k=2, backend="reference").double()
    if shard:
        shard_experts(model)
    x = TRAIN.images[:MODEL_BATCH].double()[rows]
    model.eval()
    with torch.no_grad():
        recon_eval = model(x, sample=False).recon
    model.train()
    upstream = torch.randn(MODEL_BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = model(x, sample=False)
    (out.recon * upstream[rows]).sum().backward()
    grads = {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for name, p in model.named_parameters()}
    return {"eval": recon_eval, "train": out.recon.detach(), "grads": grads}


def _model_cases(world):
    rank = dist.get_rank()
    return {gating: _model_run(gating, slice(rank, None, world), shard=True) for gating in MODEL_GATINGS}


def test_a_sharded_smoevae_matches_the_whole_model(ranks):
    # The model calls the sharded experts exactly as it calls StackedExperts: eval routes hard, training
    # routes soft, top-k or hard. Per-rank gradients of the replicated layers sum to the whole batch's.
    world, results = ranks
    for gating in MODEL_GATINGS:
        expected = _model_run(gating)
        for rank, result in enumerate(results):
            rows = slice(rank, None, world)
            got = result["model"][gating]
            assert_close(got["eval"], expected["eval"][rows], name=f"{gating} rank {rank} eval recon")
            assert_close(got["train"], expected["train"][rows], name=f"{gating} rank {rank} train recon")
            first, end = expert_ranges(5, world)[rank]
            for name, grad in expected["grads"].items():
                if name.startswith("experts."):
                    assert_close(got["grads"][name], grad[first:end], name=f"{gating} rank {rank} d {name}")
        for name, grad in expected["grads"].items():
            if not name.startswith("experts."):
                total = sum(result["model"][gating]["grads"][name] for result in results)
                assert_close(total, grad, name=f"{gating} d {name} summed over ranks")


def test_capacity_overflow_drops_tokens_and_counts_them(ranks):
    world, results = ranks
    experts, z, logits, upstream = _inputs(OVERFLOW)
    expected = _forward(experts, OVERFLOW, z, logits, upstream)
    start = 0
    for rank, result in enumerate(results):
        got = result["shard"][OVERFLOW.id]
        share = _shares(OVERFLOW, world)[rank]
        assert got["dropped"] == share - 1
        assert_close(got["out"][:1], expected["out"][start:start + 1], name=f"rank {rank} kept token")
        assert torch.all(got["out"][1:] == 0), f"rank {rank}: dropped tokens must decode to zeros"
        assert torch.all(got["d z"][1:] == 0)
        start += share


# ---------------------------------------------------------------------------- data-parallel training


# 49 images in batches of 16 (3 full, 8/8 or 6/5/5 per rank): the last global batch has 1 image, so every
# rank but rank 0 takes a step with no images.
TRAIN, TEST = blob_images(49, 0), blob_images(48, 1)
DDP_CONFIG = TrainConfig(num_experts=3, encoder="lite", epochs=2, batch_size=16, backend="reference",
                         eval_batch_size=48, noise="keyed")


GRADIENT_GATINGS = (None, "topk", "hard")   # soft (the paper), top-k, hard (gate trained by the gate terms only)


def _ddp_model(gating):
    torch.manual_seed(0)
    config = dataclasses.replace(DDP_CONFIG, gating=gating)
    return SMoEVAE(**config.model_kwargs()).double()


def _ddp_gradients(model, x, indices, global_batch, world, sharded):
    """Gradients of one step's loss on ``x`` (the images ``indices``), in float64."""
    noise = keyed_noise(indices, DDP_CONFIG.latent_dim, seed=0, epoch=0).double()
    out = model(x.double(), noise=noise)
    if sharded:
        loss, _ = smoe_loss_sharded(out, x.double(), global_batch=global_batch, world_size=world,
                                    global_sum=global_sum)
    else:
        loss = smoe_loss(out, x.double()).total
    loss.backward()
    inner = model.module if sharded else model
    return {name: p.grad.clone() for name, p in inner.named_parameters()}


GRADIENT_BATCH = {2: 13, 3: 2}   # uneven shares; at 3 ranks with 2 images one rank has none


def _gradient_cases(world):
    rank = dist.get_rank()
    results = {}
    for gating in GRADIENT_GATINGS:
        model = torch.nn.parallel.DistributedDataParallel(_ddp_model(gating), find_unused_parameters=True)
        indices = torch.arange(GRADIENT_BATCH[world])[rank::world]
        results[gating] = _ddp_gradients(model, TRAIN.images[indices], indices, GRADIENT_BATCH[world], world,
                                         sharded=True)
    return results


def test_ddp_gradient_equals_the_one_process_gradient_of_the_global_batch(ranks):
    world, results = ranks
    batch = GRADIENT_BATCH[world]
    for gating in GRADIENT_GATINGS:
        indices = torch.arange(batch)
        expected = _ddp_gradients(_ddp_model(gating), TRAIN.images[indices], indices, batch, 1, sharded=False)
        for rank, result in enumerate(results):
            for name, grad in expected.items():
                assert_close(result["gradients"][gating][name], grad, name=f"gating {gating} rank {rank} d {name}")


def _refused():
    try:
        train(dataclasses.replace(DDP_CONFIG, noise="global"), TRAIN, TEST, progress=False)
    except ValueError as exc:
        return str(exc)
    return None


PROFILE_ARGS = argparse.Namespace(experts=[3], batch=[8], stage="topk", decoder="mlp", latent_dim=LATENT,
                                  hidden_dim=HIDDEN, top_k=2, warmup=0, repeats=1, backends=["reference"])


def _profile_rows():
    return profile_distributed(PROFILE_ARGS, torch.device("cpu"))


def test_profile_distributed_reports_the_exchange(ranks):
    # Top-k, 8 tokens x 2 slots per rank: each step sends every row bound elsewhere twice (z out and the
    # output back, each again in backward), so at most 16 rows x (L + 784) floats x 2 per rank.
    world, results = ranks
    (row,) = results[0]["profile"]
    assert all(result["profile"] == [] for result in results[1:])   # only rank 0 reports
    assert row["world"] == world and row["experts"] == 3
    assert 0 < row["bytes_sent_per_rank"] <= 2 * 16 * (LATENT + 784) * 4 + 16 * 8
    assert row["exchange_ms"] > 0 and row["step_ms"] >= row["exchange_ms"]


def test_data_parallel_training_refuses_global_noise(ranks):
    for message in (result["refused"] for result in ranks[1]):
        assert message is not None and "noise='keyed'" in message


def _train_worker(rank, world, init_file, out_dir, config, run_dir):
    _join(rank, world, init_file)
    result = train(config, TRAIN, TEST, out_dir=run_dir, progress=False)
    torch.save({"model": result.model.state_dict(), "history": result.history}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


# The gradients agree to float64 rounding (above). A training run is 8 Adam steps in float32, where the
# ranks' partial sums round differently from one process's sums and Adam's normalised update magnifies
# that in components whose gradient is near zero: the runs agree to 1e-3 (relative RMS; measured: about 5e-5
# at worst), a different global batch or noise would differ by order 1.
TRAJECTORY_RTOL = 1e-3


def _assert_same_run(got_model, got_history, want_model, want_history, what):
    for name, p in want_model.items():
        assert_close(got_model[name], p, rtol_rms=TRAJECTORY_RTOL, name=f"{what}: {name}")
    for got, want in zip(got_history, want_history, strict=True):
        for key in ("train_loss", "train_sse", "train_kl", "train_balance", "train_entropy", "test_sse"):
            assert abs(got[key] - want[key]) <= TRAJECTORY_RTOL * abs(want[key]), \
                f"{what}: epoch {want['epoch']} {key}: {got[key]} vs {want[key]}"
        assert got["active_experts"] == want["active_experts"]


def test_two_processes_train_the_one_process_model(tmp_path):
    one = train(DDP_CONFIG, TRAIN, TEST, out_dir=tmp_path / "one", progress=False)
    ranks = _run_workers(_train_worker, 2, tmp_path, DDP_CONFIG, str(tmp_path / "ddp"))
    for rank, result in enumerate(ranks):
        _assert_same_run(result["model"], result["history"], one.model.state_dict(), one.history, f"rank {rank}")
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]         # written once, by rank 0
    assert sorted(os.listdir(tmp_path / "ddp")) == ["checkpoint.pt", "config.json", "metrics.jsonl"]


def test_resume_with_another_world_size(tmp_path):
    # Top-k gating, epoch 1 on 3 processes, epoch 2 in this one: the same run as 2 epochs in one process.
    config = dataclasses.replace(DDP_CONFIG, gating="topk")
    one = train(config, TRAIN, TEST, out_dir=tmp_path / "one", progress=False)
    _run_workers(_train_worker, 3, tmp_path, dataclasses.replace(config, epochs=1), str(tmp_path / "split"))
    resumed = train(config, TRAIN, TEST, out_dir=tmp_path / "split", resume=True, progress=False)
    _assert_same_run(resumed.model.state_dict(), resumed.history, one.model.state_dict(), one.history, "resumed")
