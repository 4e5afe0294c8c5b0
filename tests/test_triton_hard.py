"""Triton hard-gated experts (kernels/experts_hard.py) against the reference, fp32 IEEE (rel-RMS <= 1e-5).

Outputs are NaN-poisoned (conftest), so an x_hat element the kernel never writes fails assert_close.
The model-level test (SMoEVAE(backend="triton") == backend "reference") lives with the backend wiring.
"""
import contextlib
import importlib

import pytest
import torch

from helpers import RecordingKernel, assert_close, assert_within_half_tolerance, random_weights, routing_case
from smoe_fast import reference
from smoe_fast.kernels.experts_hard import experts_hard
from smoe_fast.kernels.tuning import bucket_tokens, forced_experts_hard_config

# the package re-exports the function under the module's name
experts_hard_module = importlib.import_module("smoe_fast.kernels.experts_hard")

# (batch B, experts E, routing), each with the edge it hits
ROUTINGS = [
    pytest.param(20, 4, "uniform", id="B20-E4-uniform"),
    pytest.param(35, 3, "skewed", id="B35-E3-skewed-full-and-partial-tiles"),
    pytest.param(20, 6, "one_expert", id="B20-E6-all-tokens-on-last-expert"),
    pytest.param(18, 8, "even_only", id="B18-E8-empty-odd-experts"),
    pytest.param(1, 3, "uniform", id="B1-single-token"),
    pytest.param(6, 17, "uniform", id="B6-E17-E-greater-than-B-prime-E"),
    pytest.param(26, 13, "skewed", id="B26-E13-prime-E-skewed"),
]
# medium is ~10x the interpreter time of lite: fewer, smaller cases
MEDIUM_ROUTINGS = [
    pytest.param(7, 3, "uniform", id="B7-E3-uniform"),
    pytest.param(5, 4, "even_only", id="B5-E4-empty-odd-experts"),
    pytest.param(1, 1, "uniform", id="B1-E1-single-token-single-expert"),
    pytest.param(3, 7, "uniform", id="B3-E7-E-greater-than-B-prime-E"),
]


def _run_case(kind, batch, num_experts, routing, latent_dim=32, hidden_dim=64, seed=0):
    weights = random_weights(kind, num_experts, latent_dim=latent_dim, hidden_dim=hidden_dim, seed=seed)
    z = torch.randn(batch, latent_dim, generator=torch.Generator().manual_seed(seed))
    idx = routing_case(routing, batch, num_experts, seed=seed)
    got = experts_hard(z, idx, weights, kind)
    assert got.shape == (batch, 1, 28, 28) and got.dtype == z.dtype
    assert_close(got, reference.experts_hard(z, idx, weights, kind), name=f"{kind} hard")


@pytest.mark.parametrize("kind", ["lite", "mlp"])
@pytest.mark.parametrize("batch,num_experts,routing", ROUTINGS)
def test_experts_hard_matches_reference(kind, batch, num_experts, routing):
    _run_case(kind, batch, num_experts, routing)


@pytest.mark.parametrize("batch,num_experts,routing", MEDIUM_ROUTINGS)
def test_experts_hard_medium_matches_reference(batch, num_experts, routing):
    _run_case("medium", batch, num_experts, routing)


@pytest.mark.parametrize("kind", ["lite", "medium", "mlp"])
def test_empty_batch_returns_empty_image_batch(kind):
    weights = random_weights(kind, 3)
    got = experts_hard(torch.empty(0, 32), torch.empty(0, dtype=torch.int64), weights, kind)
    assert got.shape == (0, 1, 28, 28)


@pytest.mark.parametrize("kind", ["lite", "mlp"])
def test_non_contiguous_z_and_int32_indices(kind):
    # z is a transposed view (strides (1, B)); expert_idx is int32
    weights = random_weights(kind, 5)
    z = torch.randn(32, 11).t()
    idx = routing_case("skewed", 11, 5).int()
    assert not z.is_contiguous()
    assert_close(experts_hard(z, idx, weights, kind), reference.experts_hard(z, idx.long(), weights, kind))


# The GPU's tile shapes (the interpreter defaults use whole tiles): token groups smaller than a tile,
# GEMM row chunks that end mid-token, fc/hidden chunks with masked tails.
GPU_TILES = [
    pytest.param("lite", {"BM": 16, "TS": 2, "BR": 64, "num_warps": 16}, 32, id="lite-BM16-TS2-BR64-gpu-default"),
    pytest.param("lite", {"BM": 32, "TS": 3, "BR": 128, "num_warps": 4}, 32, id="lite-BM32-TS3-odd-group"),
    pytest.param("lite", {"BM": 16, "TS": 2, "BR": 128, "num_warps": 16}, 32, id="lite-BM16-TS2-BR128-gpu-half-modes"),
    pytest.param("mlp", {"BM": 64, "BN": 64, "BH": 32, "num_warps": 8}, 64, id="mlp-BM64-BN64-BH32-gpu-tf32-bf16"),
    pytest.param("mlp", {"BM": 64, "BN": 32, "BH": 16, "num_warps": 8}, 64, id="mlp-BM64-BN32-BH16-gpu-ieee"),
    pytest.param("mlp", {"BM": 32, "BN": 64, "BH": 16, "num_warps": 4}, 64, id="mlp-BM32-BH16-gpu-small-tf32"),
    pytest.param("mlp", {"BM": 16, "BN": 64, "BH": 32, "num_warps": 4}, 80, id="mlp-hidden80-three-hidden-chunks"),
    pytest.param("medium", {"BM": 16, "TS": 2, "BR": 256, "num_warps": 4}, 64, id="medium-BM16-TS2-BR256"),
]


@pytest.mark.parametrize("kind,config,hidden_dim", GPU_TILES)
def test_gpu_tile_shapes_match_reference(kind, config, hidden_dim):
    batch = 5 if kind == "medium" else 19
    with forced_experts_hard_config(kind, **config):
        _run_case(kind, batch, 3, "skewed", hidden_dim=hidden_dim, seed=1)


def test_medium_gpu_default_tiles_match_reference():
    # one token per scratch group, 16-row GEMM steps (slow in the interpreter: two tokens)
    with forced_experts_hard_config("medium", BM=16, TS=1, BR=16, num_warps=4):
        _run_case("medium", 2, 2, "uniform", seed=2)


@pytest.mark.parametrize("kind", ["lite", "mlp"])
def test_ops_triton_backend_matches_reference(kind):
    # through the public op: input checks, backend resolution, then this module
    from smoe_fast import ops

    weights = random_weights(kind, 4)
    z, idx = torch.randn(9, 32), routing_case("skewed", 9, 4)
    assert_close(ops.experts_hard(z, idx, weights, kind=kind, backend="triton"),
                 ops.experts_hard(z, idx, weights, kind=kind, backend="reference"))


@pytest.mark.parametrize("kind,latent_dim,hidden_dim", [
    pytest.param("lite", 20, 64, id="lite-latent20-masked-K"),
    pytest.param("mlp", 6, 40, id="mlp-latent6-hidden40-below-dot-minimum"),
])
def test_odd_latent_and_hidden_sizes(kind, latent_dim, hidden_dim):
    _run_case(kind, 9, 2, "uniform", latent_dim=latent_dim, hidden_dim=hidden_dim)


@pytest.mark.parametrize("num_experts", [
    pytest.param(1, id="E1"),
    pytest.param(17, id="E17-most-experts-empty"),   # empty experts cost no launch
])
def test_launch_count_is_four_whatever_E(monkeypatch, num_experts):
    # two grouping launches, the tile scan, one fused decoder launch; no per-expert loop
    kernel_type = type(experts_hard_module._experts_hard_conv_fwd_kernel)
    launched = []
    original_run = kernel_type.run

    def counting_run(self, *args, **kwargs):
        launched.append(self.__name__ if hasattr(self, "__name__") else self.fn.__name__)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_type, "run", counting_run)
    weights = random_weights("lite", num_experts)
    experts_hard(torch.randn(4, 32), routing_case("uniform", 4, num_experts), weights, "lite")
    assert len(launched) == 4, launched


def test_tuning_key_is_bucketed():
    assert [bucket_tokens(b) for b in (0, 1, 3, 64, 65, 10 ** 7)] == [1, 1, 4, 64, 128, 1 << 16]


def test_experts_op_passes_opcheck():
    weights = random_weights("lite", 2)
    z, idx = torch.randn(3, 32), torch.tensor([1, 0, 1])
    layers = [weights[n] for n in ("fc.weight", "fc.bias", "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")]
    torch.library.opcheck(torch.ops.smoe_fast.triton_experts_hard_lite.default, (z, idx, *layers))


def test_mlp_op_passes_opcheck():
    weights = random_weights("mlp", 3, hidden_dim=32)
    z, idx = torch.randn(4, 32), torch.tensor([2, 2, 0, 1])
    layers = [weights[n] for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    torch.library.opcheck(torch.ops.smoe_fast.triton_experts_hard_mlp.default, (z, idx, *layers))


def test_experts_hard_compiles_without_graph_breaks():
    weights = random_weights("mlp", 3, hidden_dim=32)
    z, idx = torch.randn(6, 32), routing_case("uniform", 6, 3)
    compiled = torch.compile(lambda z, idx: experts_hard(z, idx, weights, "mlp") * 2, backend="aot_eager", fullgraph=True)
    assert_close(compiled(z, idx), reference.experts_hard(z, idx, weights, "mlp") * 2)


# (torch setting, TF32 allowed, z dtype the kernel sees, dot mode on CPU tensors)
PRECISION_SETTINGS = [
    pytest.param(None, False, torch.float32, "ieee", id="fp32-default-ieee"),
    pytest.param(None, True, torch.float32, "tf32", id="fp32-torch-allows-tf32"),
    pytest.param(torch.bfloat16, False, torch.bfloat16, "tf32", id="autocast-bf16-widened-off-gpu"),
    pytest.param(torch.float16, True, torch.float16, "tf32", id="autocast-fp16-widened-off-gpu"),
]


@pytest.mark.parametrize("kind", ["lite", "medium", "mlp"])
@pytest.mark.parametrize("autocast,tf32,dtype,mode", PRECISION_SETTINGS)
def test_launcher_passes_the_dot_mode_of_its_inputs(monkeypatch, kind, autocast, tf32, dtype, mode):
    # the launcher asks launch.dot_mode with the dtype and device the kernel reads (after autocast's
    # cast) and passes its answer as INPUT_PRECISION; which mode a GPU gets is test_launch's table
    name = "_experts_hard_mlp_fwd_kernel" if kind == "mlp" else "_experts_hard_conv_fwd_kernel"
    kernel, asked = RecordingKernel(), []
    real_dot_mode = experts_hard_module.dot_mode
    monkeypatch.setattr(experts_hard_module, name, kernel)
    monkeypatch.setattr(experts_hard_module, "dot_mode", lambda *a: asked.append(a) or real_dot_mode(*a))
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
    else:
        matmul.allow_tf32 = tf32
    weights = random_weights(kind, 3)
    z, idx = torch.randn(5, 32), routing_case("uniform", 5, 3)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        experts_hard(z, idx, weights, kind)
    assert asked and all(a == (dtype, z.device) for a in asked), asked
    assert kernel.launches and all(k["INPUT_PRECISION"] == mode and k["z"].dtype == dtype for k in kernel.launches)


# (kind, maps dtype, B, E, tile): what a half GEMM mode keeps in its scratch maps (decoder_tiles.map_dtype)
HALF_MAPS = [
    pytest.param("lite", "bf16", 21, 4, None, id="lite-bf16-maps"),
    pytest.param("lite", "fp16", 6, 17, None, id="lite-fp16-maps-E-greater-than-B"),
    pytest.param("lite", "bf16", 19, 3, {"BM": 16, "TS": 2, "BR": 128, "num_warps": 16}, id="lite-bf16-maps-gpu-half-tile"),
    pytest.param("medium", "bf16", 3, 2, None, id="medium-bf16-maps"),
]


@pytest.mark.parametrize("kind,maps,batch,num_experts,tile", HALF_MAPS)
def test_half_maps_match_reference_within_the_half_tolerance(monkeypatch, kind, maps, batch, num_experts, tile):
    # The interpreter cannot run half dots, so the GPU's half modes come here as IEEE dots over half
    # maps: this checks the maps' addressing and the fp32 parts behind them (a wrong offset is an O(1)
    # error); the half dots themselves are test_experts_hard_under_autocast's, on a GPU.
    monkeypatch.setattr(experts_hard_module, "map_dtype", lambda dot: maps)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[maps]
    weights = random_weights(kind, num_experts, seed=3)
    z = torch.randn(batch, 32, generator=torch.Generator().manual_seed(3))
    idx = routing_case("uniform", batch, num_experts, seed=3)
    with forced_experts_hard_config(kind, **tile) if tile else contextlib.nullcontext():
        got = experts_hard(z, idx, weights, kind)
    exact = reference.experts_hard(z.double(), idx, {k: w.double() for k, w in weights.items()}, kind)
    in_dtype = reference.experts_hard(z.to(dtype), idx, {k: w.to(dtype) for k, w in weights.items()}, kind)
    assert_within_half_tolerance(got, exact, in_dtype, name=f"{kind} {maps} maps")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("kind", ["lite", "medium", "mlp"])
@pytest.mark.parametrize("num_experts", [1, 8, 257], ids=["E1", "E8", "E257-prime"])
def test_experts_hard_on_gpu(kind, num_experts):
    batch = 2048 if kind != "medium" else 256
    weights = random_weights(kind, num_experts, device="cuda")
    z = torch.randn(batch, 32, device="cuda")
    idx = routing_case("skewed", batch, num_experts).cuda()
    assert_close(experts_hard(z, idx, weights, kind), reference.experts_hard(z, idx, weights, kind))


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["lite", "medium", "mlp"])
def test_experts_hard_under_autocast(kind, dtype):
    # half-precision tensor-core dots (launch.dot_mode), fp32 accumulation. DESIGN.md: at most 2x the
    # error of the reference run in the same dtype, with a small floor
    weights = random_weights(kind, 8, device="cuda")
    z = torch.randn(512, 32, device="cuda")
    idx = routing_case("uniform", 512, 8).cuda()
    exact = reference.experts_hard(z.double(), idx, {k: w.double() for k, w in weights.items()}, kind)
    with torch.autocast("cuda", dtype=dtype):
        got = experts_hard(z, idx, weights, kind)
        ref = reference.experts_hard(z, idx, weights, kind)
    assert got.dtype == dtype
    assert_within_half_tolerance(got, exact, ref, name=f"{kind} {dtype}")


# ----------------------------------------------------------------------------------------------------
# lite with fc folded into conv1 (kernels/lite_folded.py): the launcher runs it in TF32 / half modes
# with >= 64 tokens per expert; here it is forced, and its GEMMs run in IEEE fp32
# ----------------------------------------------------------------------------------------------------

FOLDED = {"FOLD": 1, "BM": 16, "num_warps": 4}


@pytest.mark.parametrize("batch,num_experts,routing", ROUTINGS)
def test_folded_lite_matches_reference(batch, num_experts, routing):
    with forced_experts_hard_config("lite", **FOLDED):
        _run_case("lite", batch, num_experts, routing)


@pytest.mark.parametrize("latent_dim,config", [
    pytest.param(20, FOLDED, id="latent20-fold-pads-K-to-32"),
    pytest.param(32, {"FOLD": 1, "BM": 64, "num_warps": 8}, id="gpu-tile-BM64-partial-tiles"),
])
def test_folded_lite_odd_latent_and_gpu_tile(latent_dim, config):
    with forced_experts_hard_config("lite", **config):
        _run_case("lite", 70, 3, "skewed", latent_dim=latent_dim, seed=5)


def test_folded_lite_non_contiguous_z_and_int32_indices():
    weights = random_weights("lite", 5)
    z = torch.randn(32, 11).t()
    idx = routing_case("skewed", 11, 5).int()
    with forced_experts_hard_config("lite", **FOLDED):
        got = experts_hard(z, idx, weights, "lite")
    assert_close(got, reference.experts_hard(z, idx.long(), weights, "lite"))


def test_fold_pays_only_on_tensor_cores_with_enough_tokens_per_expert():
    from smoe_fast.kernels.lite_folded import FOLD_MIN_TOKENS_PER_EXPERT as MIN, fold_pays

    assert not fold_pays("ieee", 65_536, 64, 32, 4)            # FMA dots: the 2.1x FLOPs cost more
    assert fold_pays("tf32", 65_536, 64, 32, 4) and fold_pays("bf16", MIN * 64, 64, 32, 2)
    assert not fold_pays("tf32", MIN * 64 - 1, 64, 32, 4)       # too few tokens per expert
    assert fold_pays("tf32", 100, 1_000, 32, 4) is False        # E > B: each token its own expert
    assert not fold_pays("bf16", 1 << 30, 8_192, 32, 2)         # fold weights over FOLD_MAX_BYTES


def test_launcher_folds_in_tf32_with_enough_tokens_per_expert(monkeypatch):
    calls = []
    real = experts_hard_module.experts_hard_lite_folded_fwd
    monkeypatch.setattr(experts_hard_module, "experts_hard_lite_folded_fwd",
                        lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):     # conftest restores torch's precision flags
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
    weights = random_weights("lite", 2)
    z, idx = torch.randn(128, 32), routing_case("uniform", 128, 2)
    got = experts_hard(z, idx, weights, "lite")       # the interpreter runs the dots in fp32
    assert calls and calls[0]["FOLD"] == 1
    assert_close(got, reference.experts_hard(z, idx, weights, "lite"))
    experts_hard(z[:100], idx[:100], weights, "lite")  # 50 tokens per expert: the scratch kernel
    assert len(calls) == 1


def test_fold_is_cached_per_weight_version():
    from smoe_fast.kernels.lite_folded import folded_lite_weights

    weights = random_weights("lite", 3)
    layers = [weights[f"{n}.{p}"] for n in ("fc", "conv1", "conv2") for p in ("weight", "bias")]
    first = folded_lite_weights(layers, torch.float32)
    assert folded_lite_weights(layers, torch.float32) is first
    z, idx = torch.randn(9, 32), routing_case("uniform", 9, 3)
    layers[2].mul_(0.5)                                # an in-place update (an optimizer step) refolds
    assert folded_lite_weights(layers, torch.float32) is not first
    with forced_experts_hard_config("lite", **FOLDED):
        assert_close(experts_hard(z, idx, weights, "lite"), reference.experts_hard(z, idx, weights, "lite"))
