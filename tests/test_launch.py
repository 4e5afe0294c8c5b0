"""The launch layer (kernels/launch.py) and what every launcher promises: no host synchronisation and
no host-to-device copy on the hot path, precision from torch's own settings, CUDA-graph capture."""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

from helpers import random_weights, routing_case
from smoe_fast import SMoEVAE, ops, smoe_loss
from smoe_fast.kernels import launch

KERNELS_DIR = os.path.dirname(launch.__file__)


# ----------------------------------------------------------------------------------------------------
# host helpers
# ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _tf32(enabled: bool):
    """Turn TF32 matmuls on or off through the API this torch has (restored by conftest's fixture)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if enabled else "ieee"
    else:
        matmul.allow_tf32 = enabled
    yield


def test_dot_precision_follows_torch_setting():
    assert launch.dot_precision(torch.float32) == "ieee"   # conftest forces IEEE
    with _tf32(True):
        assert launch.dot_precision(torch.float32) == "tf32"
    with _tf32(False):
        assert launch.dot_precision(torch.float32) == "ieee"
    # half operands are exact in TF32
    assert launch.dot_precision(torch.bfloat16) == "tf32"
    assert launch.dot_precision(torch.float16) == "tf32"


def test_dot_mode_uses_half_precision_tensor_cores_for_half_inputs_on_a_gpu(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    # fp32 follows torch's TF32 setting
    assert launch.dot_mode(torch.float32, cuda) == "ieee"
    with _tf32(True):
        assert launch.dot_mode(torch.float32, cuda) == "tf32"
        # half inputs (autocast): half-precision dots whatever the TF32 setting
        assert launch.dot_mode(torch.bfloat16, cuda) == "bf16"
        assert launch.dot_mode(torch.float16, cuda) == "fp16"
    with _tf32(False):
        assert launch.dot_mode(torch.bfloat16, cuda) == "bf16"
        assert launch.dot_mode(torch.float16, cuda) == "fp16"
        # no compiled kernel on CPU tensors: half operands widened to fp32 (exact), as dot_precision says
        assert launch.dot_mode(torch.bfloat16, cpu) == launch.dot_precision(torch.bfloat16) == "tf32"
    # the interpreter cannot run half-precision dots, even for CUDA tensors
    monkeypatch.setattr(launch, "interpreting", lambda: True)
    assert launch.dot_mode(torch.bfloat16, cuda) == "tf32"
    assert launch.dot_mode(torch.float32, cuda) == "ieee"


@pytest.mark.parametrize("num_experts,steps", [(1, 1), (2, 1), (3, 2), (64, 6), (65, 7), (65536, 16)])
def test_log2_ceil(num_experts, steps):
    assert launch.log2_ceil(num_experts) == steps


def test_programs_and_arch_on_cpu():
    cpu = torch.device("cpu")
    assert launch.max_programs(cpu) == launch.INTERPRETER_PROGRAMS
    assert launch.device_arch(cpu) == 0


# (counts, block_m), each with the edge it hits
TILE_CASES = [
    pytest.param([0, 5, 0, 16, 17], 16, id="empty-experts-own-no-tile"),
    pytest.param([3], 1, id="one-expert-block1"),
    pytest.param([0] * 7, 4, id="all-empty"),
    pytest.param(list(range(2500)), 16, id="E2500-several-scan-blocks"),
]


@pytest.mark.parametrize("counts,block_m", TILE_CASES)
def test_tile_offsets_is_the_scan_of_tiles(counts, block_m):
    counts = torch.tensor(counts, dtype=torch.int32)
    got = launch.tile_offsets(counts, block_m)
    tiles = (counts.long() + block_m - 1) // block_m
    assert got.dtype == torch.int32
    assert got.tolist() == [0] + torch.cumsum(tiles, 0).tolist()
    assert int(got[-1]) <= launch.tile_bound(int(counts.sum()), len(counts), block_m)


# ----------------------------------------------------------------------------------------------------
# no host synchronisation, no host-to-device copy in any launcher
# ----------------------------------------------------------------------------------------------------

_SYNCING = {"item": torch.Tensor.item, "tolist": torch.Tensor.tolist, "cpu": torch.Tensor.cpu,
            "nonzero": torch.Tensor.nonzero}


@contextlib.contextmanager
def _no_host_sync_from_kernels(monkeypatch):
    """Fail on .item() / .tolist() / .cpu() / .nonzero() / torch.nonzero / torch.tensor(..., device=...)
    called from a file in kernels/ (Triton's interpreter itself may call them: it is not ours)."""
    calls = []

    def from_kernels() -> str | None:
        frame = sys._getframe(2)
        filename = frame.f_code.co_filename
        return f"{os.path.basename(filename)}:{frame.f_lineno}" if filename.startswith(KERNELS_DIR) else None

    def forbid(name, original):
        def wrapper(*args, **kwargs):
            where = from_kernels()
            if where:
                calls.append(f"{name} at {where}")
            return original(*args, **kwargs)
        return wrapper

    for name, original in _SYNCING.items():
        monkeypatch.setattr(torch.Tensor, name, forbid(f"Tensor.{name}", original))
    monkeypatch.setattr(torch, "nonzero", forbid("torch.nonzero", torch.nonzero))
    original_tensor = torch.tensor

    def tensor(*args, **kwargs):
        where = from_kernels()
        if where and kwargs.get("device") is not None:
            calls.append(f"torch.tensor(..., device=...) at {where}")
        return original_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    yield calls


LAUNCH_CASES = [pytest.param(kind, gating, id=f"{kind}-{gating}")
                for kind in ("lite", "mlp", "medium") for gating in ("hard", "soft", "topk")]


@pytest.mark.parametrize("kind,gating", LAUNCH_CASES)
def test_launchers_never_synchronise_with_the_host(monkeypatch, kind, gating):
    num_experts, batch = 3, 5
    weights = {k: v.requires_grad_(gating != "hard") for k, v in random_weights(kind, num_experts).items()}
    z = torch.randn(batch, 32, requires_grad=gating != "hard")
    idx = routing_case("uniform", batch, num_experts)
    gates = torch.rand(batch, num_experts).softmax(-1)
    topk_gates, topk_idx = gates.topk(2)
    # warm the per-device caches (their first fill is the one allowed host-to-device copy)
    ops.experts_hard(z.detach(), idx, {k: v.detach() for k, v in weights.items()}, kind=kind, backend="triton")
    with _no_host_sync_from_kernels(monkeypatch) as calls:
        if gating == "hard":
            y = ops.experts_hard(z, idx, weights, kind=kind, backend="triton", check_indices=False)
        elif gating == "soft":
            y = ops.experts_soft(z, gates, weights, kind=kind, backend="triton")
        else:
            y = ops.experts_topk(z, topk_idx, topk_gates, weights, kind=kind, backend="triton", check_indices=False)
        if gating != "hard":
            y.sum().backward()
    assert not calls, f"host synchronisation or copy in a launcher: {calls}"


def test_the_mock_catches_a_sync():
    # the check above can fail: a .item() from a file in kernels/ is reported
    with pytest.MonkeyPatch.context() as monkeypatch, _no_host_sync_from_kernels(monkeypatch) as calls:
        code = compile("torch.ones(1).item()", os.path.join(KERNELS_DIR, "probe.py"), "exec")
        exec(code, {"torch": torch})
    assert calls and calls[0].startswith("Tensor.item at probe.py")


# ----------------------------------------------------------------------------------------------------
# CUDA graphs (a GPU only)
# ----------------------------------------------------------------------------------------------------

def _capture(fn, warmup: int = 2):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.requires_cuda
def test_hard_gated_eval_forward_captures_in_a_cuda_graph():
    model = SMoEVAE(num_experts=16, encoder="lite", backend="triton").cuda().eval()
    x = torch.rand(64, 1, 28, 28, device="cuda")
    with torch.no_grad():
        expected = model(x, sample=False).recon
        graph, out = _capture(lambda: model(x, sample=False).recon)
        x.copy_(torch.rand_like(x))
        graph.replay()
        torch.testing.assert_close(out, model(x, sample=False).recon)
    assert expected.shape == out.shape


@pytest.mark.requires_cuda
def test_topk_training_step_captures_in_a_cuda_graph():
    model = SMoEVAE(num_experts=16, encoder="lite", gating="topk", top_k=2, backend="triton").cuda().train()
    x = torch.rand(64, 1, 28, 28, device="cuda")

    def step():
        model.zero_grad(set_to_none=False)
        out = model(x, sample=False)
        loss = smoe_loss(out, x, num_experts=16).total
        loss.backward()
        return loss

    graph, loss = _capture(step)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss)
