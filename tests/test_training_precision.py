"""Training ops (soft and top-k gating, every kind) under autocast: the GEMM mode they pick and the
numerics they give.

Under autocast each op casts z to the autocast dtype once at entry (``launch.autocast_input``) and its
kernels take ``launch.dot_mode`` of that dtype: half-precision tensor cores with fp32 accumulation on
a GPU; the weights stay fp32 masters (cast per tile), so weight gradients come back in fp32. The
interpreter cannot run half-precision dots: on CPU tensors the half z is widened to fp32 (exact), so
here the ops must give the fp32 reference's result on the rounded z. The GPU numerics are the
``requires_cuda`` tests below (DESIGN.md: at most 2x the error of the reference run in the same
dtype, with a small floor).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from helpers import RecordingKernel, assert_close, assert_within_half_tolerance, random_weights
from smoe_fast import reference

triton = pytest.importorskip("triton")
from smoe_fast.kernels.experts_soft import experts_soft  # noqa: E402
from smoe_fast.kernels.experts_topk import experts_topk  # noqa: E402

soft_module = importlib.import_module("smoe_fast.kernels.experts_soft")
topk_module = importlib.import_module("smoe_fast.kernels.experts_topk")
medium_module = importlib.import_module("smoe_fast.kernels.experts_medium")

LATENT = 32


def _case(kind: str, gating: str, batch: int, num_experts: int, device: str = "cpu", seed: int = 0):
    """(run(z, gates, weights, op) -> x_hat, z, gates, weights): soft gates [B, E] or renormalised
    top-2 gates [B, 2] with their indices."""
    g = torch.Generator().manual_seed(seed)
    weights = {k: w.to(device).detach().requires_grad_(True)
               for k, w in random_weights(kind, num_experts, LATENT, seed=seed + 1).items()}
    z = torch.randn(batch, LATENT, generator=g).to(device).requires_grad_(True)
    probs = torch.randn(batch, num_experts, generator=g).softmax(-1).to(device)
    if gating == "soft":
        gates = probs.clone().requires_grad_(True)
        return (lambda z, gates, w, op: op.experts_soft(z, gates, w, kind)), z, gates, weights
    values, idx = probs.topk(2, dim=-1)
    gates = (values / values.sum(-1, keepdim=True)).requires_grad_(True)
    return (lambda z, gates, w, op: op.experts_topk(z, idx, gates, w, kind)), z, gates, weights


class _Ops:
    """The Triton functionals and the reference behind one call signature."""

    def __init__(self, soft, topk):
        self.experts_soft, self.experts_topk = soft, topk


TRITON = _Ops(experts_soft, experts_topk)
REFERENCE = _Ops(reference.experts_soft, reference.experts_topk)

TRAINING_CASES = [
    # (kind, gating, B, E)
    pytest.param("lite", "soft", 5, 3, id="lite-soft-B5-E3"),        # partial token block, several experts
    pytest.param("lite", "topk", 5, 3, id="lite-top2-B5-E3"),
    pytest.param("mlp", "soft", 17, 3, id="mlp-soft-B17-E3"),        # one row past a block boundary
    pytest.param("mlp", "topk", 17, 5, id="mlp-top2-B17-E5"),        # prime E, empty experts
    pytest.param("medium", "soft", 3, 2, id="medium-soft-B3-E2"),    # expert chunks, recomputed backward
    pytest.param("medium", "topk", 3, 3, id="medium-top2-B3-E3"),
]


@pytest.mark.parametrize("kind,gating,batch,num_experts", TRAINING_CASES)
def test_cpu_autocast_computes_on_the_rounded_latent(kind, gating, batch, num_experts):
    # CPU tensors: bf16 z widened to fp32, so the fp32 reference on the rounded z, forward and every
    # gradient; weight and gate gradients fp32 at fp32 tolerance, dz rounded once to bf16 (autocast's
    # gradient of the cast input), then widened by the cast's backward
    run, z, gates, weights = _case(kind, gating, batch, num_experts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(z, gates, weights, TRITON)
    assert out.dtype == torch.float32
    z_rounded = z.detach().bfloat16().float().requires_grad_(True)
    expected = run(z_rounded, gates, weights, REFERENCE)
    assert_close(out, expected, name="x_hat")
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    leaves = [gates, *weights.values()]
    got = torch.autograd.grad(out, [z, *leaves], upstream)
    want = torch.autograd.grad(expected, [z_rounded, *leaves], upstream)
    assert got[0].dtype == torch.float32
    assert_close(got[0], want[0], rtol_rms=4e-3, name="d z (bf16 once)")
    for name, g_actual, g_expected in zip(["gates", *weights], got[1:], want[1:]):
        assert g_actual.dtype == torch.float32, name
        assert_close(g_actual, g_expected, name=f"d {name}")


def _record_launches(monkeypatch, module, names):
    log = []
    for name in names:
        monkeypatch.setattr(module, name, RecordingKernel(log))
    return log


@pytest.mark.parametrize("kind", ["lite", "mlp"])
@pytest.mark.parametrize("gating", ["soft", "topk"])
def test_fused_launchers_take_the_dot_mode_of_the_cast_latent(monkeypatch, kind, gating):
    # every forward and backward launch asks dot_mode with the dtype autocast gave z and passes its
    # answer; on a GPU that answer is "bf16" / "fp16" (test_launch's table)
    module = soft_module if gating == "soft" else topk_module
    kernels = [f"_experts_{gating}_{kind}_{d}_kernel" for d in ("fwd", "bwd")]
    log = _record_launches(monkeypatch, module, kernels)
    asked = []
    monkeypatch.setattr(module, "dot_mode", lambda dtype, device: asked.append(dtype) or f"mode-of-{dtype}")
    run, z, gates, weights = _case(kind, gating, 5, 3)
    with torch.autocast("cpu", dtype=torch.float16):
        out = run(z, gates, weights, TRITON)
    out.sum().backward()
    assert asked and set(asked) == {torch.float16}, asked
    modes = [k.get("INPUT_PRECISION", k.get("PREC")) for k in log]
    assert len(modes) == 2 and set(modes) == {f"mode-of-{torch.float16}"}, modes


def test_medium_layers_take_the_dot_mode_of_the_cast_latent(monkeypatch):
    # the grouped layers of the forward, the recomputed chunk and the backward all get one mode
    gl = importlib.import_module("smoe_fast.kernels.grouped_layers")
    log = _record_launches(monkeypatch, gl, ["_grouped_conv_fwd_kernel", "_grouped_conv_dgrad_kernel",
                                             "_grouped_conv_wgrad_kernel", "_segment_sum_kernel"])
    monkeypatch.setattr(medium_module, "dot_mode", lambda dtype, device: f"mode-of-{dtype}")
    run, z, gates, weights = _case("medium", "soft", 3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(z, gates, weights, TRITON)
    out.sum().backward()
    modes = [k["PREC"] for k in log if "PREC" in k]
    # forward 4 layers, backward: recomputed forward 4 + dgrad 4 + wgrad 4
    assert len(modes) == 16 and set(modes) == {f"mode-of-{torch.bfloat16}"}, modes


def test_without_autocast_z_is_not_cast(monkeypatch):
    log = _record_launches(monkeypatch, soft_module, ["_experts_soft_mlp_fwd_kernel"])
    asked = []
    monkeypatch.setattr(soft_module, "dot_mode", lambda dtype, device: asked.append(dtype) or "ieee")
    run, z, gates, weights = _case("mlp", "soft", 5, 3)
    run(z, gates, weights, TRITON)
    assert asked == [torch.float32] and len(log) == 1


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind,gating", [("lite", "soft"), ("lite", "topk"), ("mlp", "soft"), ("mlp", "topk"),
                                         ("medium", "soft"), ("medium", "topk")])
def test_training_under_autocast_on_gpu(kind, gating, dtype):
    # half-precision tensor-core dots with fp32 accumulation, forward and every gradient, against the
    # fp64 reference: at most 2x the error of the reference run under the same autocast (DESIGN.md)
    batch, num_experts = (256, 8) if kind != "medium" else (64, 4)
    run, z, gates, weights = _case(kind, gating, batch, num_experts, device="cuda")
    leaves = [z, gates, *weights.values()]
    names = ["z", "gates", *weights]
    exact_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    exact_w = dict(zip(weights, exact_leaves[2:]))
    exact = run(exact_leaves[0], exact_leaves[1], exact_w, REFERENCE)
    upstream = torch.randn(exact.shape, device="cuda", dtype=torch.float64)
    exact_grads = torch.autograd.grad(exact, exact_leaves, upstream)
    with torch.autocast("cuda", dtype=dtype):
        got = run(z, gates, weights, TRITON)
        ref = run(z, gates, weights, REFERENCE)
    got_grads = torch.autograd.grad(got, leaves, upstream.to(got.dtype))
    ref_grads = torch.autograd.grad(ref, leaves, upstream.to(ref.dtype))
    for name, g in zip(names[2:], got_grads[2:]):
        assert g.dtype == torch.float32, f"d {name} is {g.dtype}: weight gradients must be fp32"
    for name, g_got, g_ref, g_exact in zip(["x_hat", *names], (got, *got_grads), (ref, *ref_grads),
                                           (exact, *exact_grads)):
        assert_within_half_tolerance(g_got, g_exact, g_ref, name=f"{kind} {gating} {dtype} {name}")
