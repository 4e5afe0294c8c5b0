"""NaN and Inf through every Triton path, as in the reference: the affected tokens and no others.

The batch carries a NaN entry in token 1's z, +inf in all of token 2's and -inf in all of token 3's
(whole rows: every fc unit then sums infinities of both signs, so the token is NaN from the first layer
on in any summation order; one infinite entry would make NaN-ness depend on how the phase-merged
convolutions reassociate their taps, which is not a NaN-propagation property). Training cases also
give token 4 a NaN gate. For the output and every gradient (z, gates, each weight) the NaN mask and
the finite mask equal the reference's exactly, and finite entries match at the fp32 tolerance.
Weight gradients of an expert that a poisoned token reaches are NaN in the reference too; top-k
routes the poisoned tokens to experts 0 and 1 only, so experts 2 and 3 must stay finite (a NaN row
of a tile must not leak into other experts' partials).

Kernels run in the Triton interpreter (tests/conftest.py). The interpreter's default ``tl.minimum``
and ``tl.maximum`` follow the GPU (np.fmin/np.fmax: NaN dropped) in triton 3.9, but that is an
interpreter detail, so the source guards at the end also keep every activation in
kernels/activations.py and every min/max without ``propagate_nan=ALL`` off the data.
"""
from __future__ import annotations

import ast
import contextlib
import pathlib

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, random_weights
from smoe_fast import reference

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from smoe_fast.kernels import activations  # noqa: E402
from smoe_fast.kernels.experts_hard import experts_hard  # noqa: E402
from smoe_fast.kernels.experts_soft import experts_soft  # noqa: E402
from smoe_fast.kernels.experts_topk import experts_topk  # noqa: E402
from smoe_fast.kernels.tuning import forced_experts_hard_config  # noqa: E402

KERNELS_DIR = pathlib.Path(activations.__file__).parent
POISONED = [1, 2, 3]      # z: NaN entry, +inf row, -inf row
NAN_GATE = 4              # training cases: one NaN gate


def _poisoned_z(batch: int, latent: int, seed: int) -> torch.Tensor:
    z = torch.randn(batch, latent, generator=torch.Generator().manual_seed(seed))
    z[1, 0], z[2, :], z[3, :] = float("nan"), float("inf"), float("-inf")
    return z


def _clean_mask(batch: int, poisoned: list[int]) -> torch.Tensor:
    clean = torch.ones(batch, dtype=torch.bool)
    clean[poisoned] = False
    return clean


def _assert_same_nonfinite_pattern(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """NaN mask and finite mask equal to the reference's; finite entries close (rel-RMS <= 1e-5)."""
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), (
        f"{name}: NaN at {int((torch.isnan(actual) != torch.isnan(expected)).sum())} entries where the reference differs")
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{name}: +-inf pattern differs from the reference"
    assert_close(actual[finite], expected[finite], name=f"{name} (finite entries)")


# ----------------------------------------------------------------------------------------------------
# hard gating (inference): every kind
# ----------------------------------------------------------------------------------------------------

HARD_CASES = [
    # poisoned tokens share expert 0's tile with clean tokens; expert 1 has clean tokens only
    pytest.param("lite", 10, id="lite-B10-E2"),
    pytest.param("mlp", 10, id="mlp-B10-E2"),
    pytest.param("medium", 6, id="medium-B6-E2"),
    pytest.param("lite folded", 10, id="lite-folded-B10-E2"),   # kernels/lite_folded.py (TF32 / half modes)
]


@pytest.mark.parametrize("kind,batch", HARD_CASES)
def test_hard_nan_and_inf_stay_in_their_tokens(kind, batch):
    folded = kind == "lite folded"
    kind = "lite" if folded else kind
    weights = random_weights(kind, 2, seed=3)
    z = _poisoned_z(batch, 32, seed=4)
    expert_idx = torch.arange(batch) % 2
    expert_idx[POISONED] = 0
    with forced_experts_hard_config("lite", FOLD=1, BM=16, num_warps=4) if folded else contextlib.nullcontext():
        got = experts_hard(z, expert_idx, weights, kind)
    expected = reference.experts_hard(z, expert_idx, weights, kind)
    _assert_same_nonfinite_pattern(got, expected, f"{kind} hard x_hat")
    assert torch.isnan(got[POISONED]).all(), "a non-finite latent gave a finite image"
    assert torch.isfinite(got[_clean_mask(batch, POISONED)]).all(), "a non-finite token leaked into another token"


# ----------------------------------------------------------------------------------------------------
# soft and top-k gating (training): forward and every gradient
# ----------------------------------------------------------------------------------------------------

TRAIN_CASES = [
    # (kind, gating, B, E, latent); medium is ~10x lite's interpreter time: fewest rows
    pytest.param("lite", "soft", 7, 2, 32, id="lite-soft-B7-E2"),
    pytest.param("mlp", "soft", 7, 3, 32, id="mlp-soft-B7-E3"),
    pytest.param("medium", "soft", 6, 2, 32, id="medium-soft-B6-E2"),
    pytest.param("lite", "topk", 9, 4, 32, id="lite-top2-B9-E4"),
    pytest.param("mlp", "topk", 9, 4, 32, id="mlp-top2-B9-E4"),
    pytest.param("medium", "topk", 6, 4, 32, id="medium-top2-B6-E4"),
]


def _train_inputs(kind, gating, batch, num_experts, latent):
    """(z, topk_idx or None, gates, weights) as leaves: poisoned z, a NaN gate on token NAN_GATE."""
    weights = random_weights(kind, num_experts, latent, seed=5, requires_grad=True)
    z = _poisoned_z(batch, latent, seed=6)
    g = torch.Generator().manual_seed(7)
    if gating == "soft":
        topk_idx = None
        gates = torch.randn(batch, num_experts, generator=g).softmax(-1)
    else:
        # clean tokens over all experts (each expert gets some), poisoned ones on experts 0 and 1 only
        topk_idx = torch.stack([torch.arange(batch) % num_experts, (torch.arange(batch) + 1) % num_experts], 1)
        topk_idx[POISONED + [NAN_GATE]] = torch.tensor([0, 1])
        gates = torch.rand(batch, 2, generator=g) + 0.25
    gates[NAN_GATE, 0] = float("nan")
    return z.requires_grad_(True), topk_idx, gates.requires_grad_(True), weights


@pytest.mark.parametrize("kind,gating,batch,num_experts,latent", TRAIN_CASES)
def test_training_nan_and_inf_stay_in_their_tokens(kind, gating, batch, num_experts, latent):
    z, topk_idx, gates, weights = _train_inputs(kind, gating, batch, num_experts, latent)
    if gating == "soft":
        got = experts_soft(z, gates, weights, kind)
        expected = reference.experts_soft(z, gates, weights, kind)
    else:
        got = experts_topk(z, topk_idx, gates, weights, kind)
        expected = reference.experts_topk(z, topk_idx, gates, weights, kind)
    _assert_same_nonfinite_pattern(got, expected, f"{kind} {gating} x_hat")
    bad = POISONED + [NAN_GATE]
    clean = _clean_mask(batch, bad)
    assert torch.isnan(got[bad]).all() and torch.isfinite(got[clean]).all()

    leaves, names = [z, gates, *weights.values()], ["z", "gates", *weights]
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(8))
    want = torch.autograd.grad(expected, leaves, grad_out)
    have = torch.autograd.grad(got, leaves, grad_out)
    for name, g_have, g_want in zip(names, have, want):
        _assert_same_nonfinite_pattern(g_have, g_want, f"d {name}")
    for name, g_have in zip(["z", "gates"], have[:2]):
        assert torch.isfinite(g_have[clean]).all(), f"d {name}: a non-finite token leaked into another token"
    if gating == "topk":
        for name, g_have in zip(names[2:], have[2:]):
            assert torch.isfinite(g_have[2:]).all(), f"d {name}: NaN reached experts no poisoned token uses"


# ----------------------------------------------------------------------------------------------------
# the shared helpers against torch, on the values where activations differ
# ----------------------------------------------------------------------------------------------------

SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0,
           30.0, -30.0, 100.0, -100.0]


@triton.jit
def _activation_probe_kernel(p_x, p_g, p_y, p_dx, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < N
    b_y = activations.activate(tl.load(p_x + o, mask=m, other=0.), ACT)
    tl.store(p_y + o, b_y, mask=m)
    tl.store(p_dx + o, activations.activate_grad(tl.load(p_g + o, mask=m, other=0.), b_y, ACT), mask=m)


TORCH_ACTIVATIONS = [
    pytest.param(activations.ACT_RELU, torch.relu, id="relu"),
    pytest.param(activations.ACT_ELU, F.elu, id="elu"),
    pytest.param(activations.ACT_SIGMOID, torch.sigmoid, id="sigmoid"),
    pytest.param(activations.ACT_NONE, lambda x: x * 1, id="none"),
]


@pytest.mark.parametrize("act,torch_fn", TORCH_ACTIVATIONS)
@pytest.mark.parametrize("upstream", ["random", "nan"])
def test_activation_helpers_match_torch_on_special_values(act, torch_fn, upstream):
    x = torch.tensor(SPECIAL, requires_grad=True)
    g = torch.randn(len(SPECIAL), generator=torch.Generator().manual_seed(9))
    if upstream == "nan":
        g[::2] = float("nan")
    y, dx = torch.empty_like(g), torch.empty_like(g)
    _activation_probe_kernel[(1,)](x.detach(), g, y, dx, len(SPECIAL), ACT=act, BLOCK=16)
    y_ref = torch_fn(x)
    (dx_ref,) = torch.autograd.grad(y_ref, x, g)
    _assert_same_nonfinite_pattern(y, y_ref.detach(), "activation")
    _assert_same_nonfinite_pattern(dx, dx_ref, "activation gradient")


# ----------------------------------------------------------------------------------------------------
# source guards: the GPU-only NaN bug cannot come back
# ----------------------------------------------------------------------------------------------------

_MIN_MAX = {"minimum", "maximum", "clamp", "fmin", "fmax"}
_TRANSCENDENTAL = {"exp", "exp2", "sigmoid", "log", "log2", "tanh", "expm1"}


def _tl_calls(tree: ast.AST):
    """(function name, call node) of every ``tl.<name>(...)``, ``tl.math.<name>(...)`` or ``libdevice.<name>(...)``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base = ast.unparse(node.func.value)
            if base in ("tl", "tl.math", "libdevice", "tl.extra.cuda.libdevice", "triton.language"):
                yield node.func.attr, node


def _touches_data(node: ast.Call) -> bool:
    """A literal operand (``tl.maximum(x, 0.)``) or a loaded block / accumulator (``b_*``, ``acc*``)."""
    for arg in node.args:
        literal = arg.operand if isinstance(arg, ast.UnaryOp) else arg
        if isinstance(literal, ast.Constant) and isinstance(literal.value, (int, float)):
            return True
        if any(isinstance(sub, ast.Name) and sub.id.startswith(("b_", "acc")) for sub in ast.walk(arg)):
            return True
    return False


def _propagates_nan(node: ast.Call) -> bool:
    return any(kw.arg == "propagate_nan" and ast.unparse(kw.value).endswith("PropagateNan.ALL") for kw in node.keywords)


def activation_violations(source: str) -> list[str]:
    """What a kernel module outside kernels/activations.py may not do: call exp/sigmoid/... itself
    (every one of them in a decoder is an activation) or take min/max of data (a clamp: fminf/fmaxf
    drop NaN on the GPU). Only index bounds such as ``tl.minimum(B - r0, BM)`` remain."""
    found = []
    for name, node in _tl_calls(ast.parse(source)):
        if name in _TRANSCENDENTAL or (name in _MIN_MAX and _touches_data(node) and not _propagates_nan(node)):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_guard_catches_the_old_elu_and_relu():
    # the ELU and ReLU that turned a NaN latent into a finite image on the GPU
    old = ("b_h = tl.where(b_h > 0, b_h, tl.exp(tl.minimum(b_h, 0.0)) - 1.0)\n"
           "b_h = tl.maximum(b_h, 0.0)\n"
           "y = tl.sigmoid(acc)\n"
           "n = tl.minimum(B - r0, BM)\n"
           "b_h = tl.maximum(b_h, 0., propagate_nan=tl.PropagateNan.ALL)\n")
    # exp, minimum, maximum, sigmoid; not the row bound, not the NaN-propagating max
    assert len(activation_violations(old)) == 4


@pytest.mark.parametrize("path", sorted(p.name for p in KERNELS_DIR.glob("*.py") if p.name != "activations.py"))
def test_kernels_take_every_activation_from_the_shared_helpers(path):
    assert activation_violations((KERNELS_DIR / path).read_text()) == []


def test_the_shared_helpers_take_min_or_max_only_nan_propagating():
    calls = [node for name, node in _tl_calls(ast.parse((KERNELS_DIR / "activations.py").read_text()))
             if name in _MIN_MAX and not _propagates_nan(node)]
    assert not calls, f"kernels/activations.py: {[ast.unparse(c) for c in calls]} drop NaN on the GPU"


@pytest.mark.parametrize("path", ["decoder_tiles.py", "decoder_tiles_bwd.py", "decoder_blocks.py", "grouped_layers.py"])
def test_decoder_kernels_import_the_shared_helpers(path):
    assert "from .activations import" in (KERNELS_DIR / path).read_text()
