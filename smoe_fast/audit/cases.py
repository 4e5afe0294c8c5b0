"""Every (kernel, config) a launcher in kernels/ can choose for an arch, with its work at the target shape.

The configs come from the same functions the launchers call (kernels/tuning.py, kernels/launch.py),
so a launcher cannot pick a config the audit has not compiled. ``full=False`` (CI, the default
`smoe-fast audit`) covers each kernel's default configs in fp32 with IEEE and TF32 dots (hard-gated
kernels also in bf16) and every B bucket and E range that changes a constexpr; ``full=True`` adds
every autotune candidate, fp16 and int32 expert indices.

A case names its kernel as "module:function" so that it can be built in a process where
TRITON_INTERPRET is set (the compile itself runs in a clean subprocess, see compile.py).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from . import work as W

KERNELS = "smoe_fast.kernels"


@dataclass(frozen=True)
class Case:
    kernel: str                  # "grouping:_group_by_expert_count_fwd_kernel" (module in kernels/)
    op: str                      # what users call it: "grouping count", "hard lite", ...
    config: str                  # the launcher's choice, readable: "BLOCK_T=256,...,fp32/ieee"
    pointers: dict               # argument -> "*fp32" | "*i32" | ...
    scalars: dict                # argument -> int value at the target shape (JIT specialisation)
    constexprs: dict
    num_warps: int
    work: W.Work
    precision: str = "ieee"      # "ieee" | "tf32" | "bf16" (the tensor-core rate when a dot uses them)
    num_stages: int = 3          # software-pipelining depth (triton's default on NVIDIA)
    maxnreg: int | None = None   # the launcher's register cap (launch.register_cap), None: ptxas's choice

    def key(self) -> tuple:
        stages = () if self.num_stages == 3 else (("num_stages", self.num_stages),)
        if self.maxnreg is not None:
            stages += (("maxnreg", self.maxnreg),)
        return (self.kernel, tuple(sorted(self.constexprs.items())) + stages, self.num_warps,
                tuple(sorted(self.pointers.items())), tuple(sorted(_specialisation(self.scalars).items())))


def _specialisation(scalars: dict) -> dict:
    """What the JIT specialises an int argument on: equal to 1 (a constant) or divisible by 16."""
    return {k: ("one" if v == 1 else "div16" if v % 16 == 0 else "any") for k, v in scalars.items()}


def kernel_module(name: str):
    return importlib.import_module(f"{KERNELS}.{name}")


def arg_names(kernel) -> list[str]:
    """A kernel's argument names (works for jit and interpreted functions alike)."""
    return list(inspect.signature(kernel.fn).parameters)


def _fmt(config: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in config.items() if k != "num_stages" or v != 3)


# ----------------------------------------------------------------------------------------------------
# grouping
# ----------------------------------------------------------------------------------------------------

def grouping_cases(arch: int, full: bool) -> list[Case]:
    from smoe_fast.kernels import grouping, launch, tuning

    cases = []
    n, e_target = W.GROUPING_N, W.GROUPING_E
    shapes = [(64, 7), (n, 7), (n, 64), (n, e_target), (n, 65_536)]   # every BLOCK_E / bucket branch
    idx_dtypes = ("i64", "i32") if full else ("i64",)
    for bucket, num_experts in shapes:
        config = tuning.grouping_config(tuning.bucket_tokens(bucket), num_experts, arch)
        plan = grouping.plan_grouping(bucket, num_experts, config, target_programs=264)
        for idx_dtype in idx_dtypes:
            for top_k in (1, 2):
                idx_bytes = 8 if idx_dtype == "i64" else 4
                label = f"{_fmt(config)},E={num_experts},K={top_k},idx={idx_dtype}"
                scalars = dict(N=bucket, K=top_k, stride_b=top_k, stride_k=1, E=num_experts,
                               tokens_per_program=plan.tokens_per_program)
                consts = {k: config[k] for k in ("BLOCK_T", "BLOCK_J", "BLOCK_E")}
                t = plan.tokens_per_program
                count_work = W.Work(
                    shape=f"N={bucket} E={num_experts}", programs=plan.programs,
                    stages=(W.Stage("rank compare", 4.0 * bucket * config["BLOCK_T"], unit="alu"),),
                    streams=(W.Stream("expert_idx", 3 * bucket * idx_bytes, "hbm"),
                             W.Stream("ranks, local sort", 3 * bucket * 4, "hbm", gather=True),
                             W.Stream("chunk counts", 3 * plan.programs * num_experts * 4, "l2")),
                    serial_steps=2 * t / config["BLOCK_T"] * 2 + 2 * W.cdiv(num_experts, config["BLOCK_E"]),
                    compulsory_bytes=bucket * idx_bytes + 2 * bucket * 4)
                cases.append(Case("grouping:_group_by_expert_count_fwd_kernel", "grouping count", label,
                                  {"expert_idx": "*" + idx_dtype, "token_rank": "*i32", "chunk_counts": "*i32",
                                   "chunk_offsets": "*i32", "local_sorted": "*i32"},
                                  scalars, consts, config["num_warps"], count_work))
                scatter_programs = plan.expert_blocks * plan.chunk_ranges
                scatter_work = W.Work(
                    shape=f"N={bucket} E={num_experts}", programs=scatter_programs,
                    streams=(W.Stream("count matrix pass", plan.chunk_ranges * plan.programs * num_experts * 4, "l2"),
                             W.Stream("tokens (local, index, rank)", bucket * (8 + idx_bytes), "hbm"),
                             W.Stream("sorted rows, positions", 2 * bucket * 4, "hbm", gather=True)),
                    serial_steps=(W.cdiv(plan.programs, config["BLOCK_P"])
                                  + plan.chunks_per_range * (3 + bucket / plan.programs / config["BLOCK_T"])),
                    compulsory_bytes=bucket * idx_bytes + 2 * bucket * 4)
                cases.append(Case("grouping:_group_by_expert_scatter_fwd_kernel", "grouping scatter", label,
                                  {"expert_idx": "*" + idx_dtype, **{k: "*i32" for k in (
                                      "chunk_counts", "chunk_offsets", "local_sorted", "block_base", "expert_counts",
                                      "expert_offsets", "sorted_token_idx", "token_sorted_pos")}},
                                  dict(scalars, P=plan.programs, chunks_per_range=plan.chunks_per_range),
                                  {k: config[k] for k in ("BLOCK_T", "BLOCK_E", "BLOCK_P")}, config["num_warps"],
                                  scatter_work))
    scan_work = W.Work(shape=f"E={e_target}", programs=1,
                       streams=(W.Stream("counts, tile offsets", 2 * e_target * 4, "hbm"),),
                       serial_steps=W.cdiv(e_target, launch.TILE_SCAN_BLOCK), compulsory_bytes=2 * e_target * 4)
    cases.append(Case("launch:_tile_offsets_kernel", "tile offsets", f"BLOCK={launch.TILE_SCAN_BLOCK}",
                      {"p_counts": "*i32", "p_toff": "*i32"}, dict(E=e_target, block_m=16),
                      dict(BLOCK=launch.TILE_SCAN_BLOCK), 4, scan_work))
    return cases


# ----------------------------------------------------------------------------------------------------
# hard-gated experts
# ----------------------------------------------------------------------------------------------------

# label -> (pointer dtype, the INPUT_PRECISION constexpr launch.dot_mode picks for it on a GPU)
_HARD_DTYPES = {"fp32/ieee": ("fp32", "ieee"), "fp32/tf32": ("fp32", "tf32"), "bf16": ("bf16", "bf16"),
                "fp16": ("fp16", "fp16")}


def _conv_tile_stages(kind: str, rows: int) -> list[W.Stage]:
    """The GEMM stages of decoder_tiles._conv_decoder_tile for ``rows`` (token, expert) rows."""
    flops = W.lite_flops() if kind == "lite" else W.medium_flops()
    stages = [W.Stage("fc", rows * flops["fc"], dot="_linear_rows_to_scratch")]
    if kind == "medium":
        stages.append(W.Stage("conv1", rows * flops["conv1"], dot="_upconv3x3_to_scratch", occurrence=0))
        stages.append(W.Stage("conv2", rows * flops["conv2"], dot="_upconv3x3_to_scratch", occurrence=1))
        # the parts GEMM computes 16 columns for the 9 taps
        stages.append(W.Stage("conv3 (1 channel)", rows * flops["conv3"] * 16 / 9, dot="_one_channel_parts"))
    else:
        stages.append(W.Stage("conv1", rows * flops["conv1"], dot="_upconv3x3_to_scratch"))
        stages.append(W.Stage("conv2 (1 channel)", rows * flops["conv2"], dot="_one_channel_parts"))
    return stages


def _conv_tile_scratch_per_row(kind: str, maps: str = "fp32", store_a1: bool = False) -> int:
    """Scratch bytes one row moves in decoder_tiles._conv_decoder_tile with its maps in ``maps``
    (decoder_tiles.map_dtype; lite's conv2 parts are fp32 in every mode); ``store_a1``: lite's a1 also
    written (fp32), as the backward's recomputed forward does."""
    m = kernel_module("decoder_tiles").MAP_BYTES[maps]
    if kind == "medium":
        # h0 + a1 written once and gathered 4 times (phase taps) per output row; conv3's 9 parts per
        # pixel written once (a2 stays in registers) and read once each
        return m * (1568 + 12544) + m * (49 * 4 * 128 + 196 * 4 * 256) + 4 * 784 * 9 * 2
    # h0 and conv2's (phase, tap) parts written once (a1 stays in registers between conv1 and the
    # parts GEMM); conv1 gathers 32 taps per (pixel, phase), the image 4 parts per output pixel
    return m * 392 + m * 49 * 4 * 32 + 4 * 3136 + 4 * 784 * 4 + (4 * 3136 if store_a1 else 0)


def _maps(dtype_or_precision: str) -> str:
    """The maps' dtype a launcher picks for a pointer dtype or GEMM mode (decoder_tiles.map_dtype)."""
    return kernel_module("decoder_tiles").map_dtype(dtype_or_precision)


def _hard_work(kind: str, config: dict, dtype: str, arch: int, hidden: int) -> W.Work:
    from smoe_fast.kernels import launch

    b, e = W.HARD_B, W.HARD_E
    elem = 4 if dtype == "fp32" else 2
    bm = config["BM"]
    tiles = launch.tile_bound(b, e, bm)
    programs = min(tiles, 264)
    per_token_out = W.PIXELS * elem
    if kind == "mlp":
        flops = {"fc1": 2 * W.LATENT * hidden, "fc2": 2 * hidden * W.PIXELS}
        params = hidden * W.LATENT + hidden + W.PIXELS * hidden + W.PIXELS
        stages = (W.Stage("fc1", b * flops["fc1"], dot="_linear_rows_to_scratch"),
                  W.Stage("fc2", b * flops["fc2"], dot="_experts_hard_mlp_fwd_kernel"))
        scratch_per_token = 2 * hidden * 4
        scratch_footprint = programs * bm * hidden * 4
        useful = b * sum(flops.values())
    else:
        params = W.LITE_PARAMS if kind == "lite" else W.MEDIUM_PARAMS
        stages = tuple(_conv_tile_stages(kind, b))
        scratch_per_token = _conv_tile_scratch_per_row(kind, _maps(dtype))
        # zero-bordered maps, zero-filled once per call
        scratch_footprint = programs * kernel_module("decoder_tiles").conv_scratch_size(kind, bm, config["TS"],
                                                                                         _maps(dtype)) * 4
        useful = b * sum((W.lite_flops() if kind == "lite" else W.medium_flops()).values())
    weight_bytes = W.nonempty_experts(e, b) * params * elem   # each routed expert's weights, once from HBM
    streams = (W.Stream("z rows + indices", b * (W.LATENT * elem + 12), "hbm"),
               W.Stream("x_hat rows", b * per_token_out, "hbm"),
               W.Stream("expert weights, first read", weight_bytes, "hbm"),
               W.Stream("expert weights per tile", tiles * params * elem, "l2"),
               W.Stream("activation scratch", b * scratch_per_token, "scratch", gather=True,
                        sites=("_gather_phase_rows",) if kind == "lite" else None),
               W.Stream("scratch zero-fill", scratch_footprint if kind != "mlp" else 0, "scratch"))
    tiles_per_program = tiles / programs
    return W.Work(shape=f"B={b} E={e}", programs=programs, stages=stages, streams=streams,
                  serial_steps=tiles_per_program * (6 if kind == "lite" else 8 if kind == "medium" else 4),
                  scratch_bytes=scratch_footprint, useful_flops=useful,
                  compulsory_bytes=b * (W.LATENT * elem + 8 + per_token_out) + weight_bytes)


def _hard_lite_folded_work(config: dict, dtype: str) -> W.Work:
    """kernels/lite_folded.py at the target shape: no scratch; the fold weights once per tile."""
    lite_folded = kernel_module("lite_folded")
    from smoe_fast.kernels import launch

    b, e = W.HARD_B, W.HARD_E
    elem = 4 if dtype == "fp32" else 2
    tiles = launch.tile_bound(b, e, config["BM"])
    per_expert = lite_folded.fold_elements(W.LATENT)
    rows = 2 * lite_folded.A1_ROWS   # (half, a1 row) steps per token
    stages = (W.Stage("fc + conv1 (folded)", b * rows * 2 * W.LATENT * 128, dot="_folded_a1_row"),
              W.Stage("conv2 (banded)", b * rows * 4 * 2 * 128 * 16, dot="_banded"))
    weight_bytes = W.nonempty_experts(e, b) * per_expert * elem
    streams = (W.Stream("z rows + indices", b * (W.LATENT * elem + 12), "hbm"),
               W.Stream("x_hat rows", b * W.PIXELS * elem, "hbm"),
               W.Stream("fold weights, first read", weight_bytes, "hbm"),
               W.Stream("fold weights per tile", tiles * per_expert * elem, "l2"))
    programs = min(tiles, 264)
    return W.Work(shape=f"B={b} E={e}", programs=programs, stages=stages, streams=streams,
                  # per tile: the tile lookup, token ids -> z rows, and per half its bands and first A
                  # row (the row loop's loads do not wait on its GEMMs: the pipeliner issues them ahead)
                  serial_steps=tiles / programs * 8,
                  useful_flops=b * sum(W.lite_flops().values()),
                  compulsory_bytes=b * (W.LATENT * elem + 8 + W.PIXELS * elem) + weight_bytes)


def _hard_lite_folded_cases(arch: int, full: bool) -> list[Case]:
    """The folded lite kernel in each tensor-core mode the launcher runs it in (lite_folded.fold_pays)."""
    from smoe_fast.kernels import launch, tuning

    cases = []
    for dtype_label in (["fp32/tf32", "bf16", "fp16"] if full else ["fp32/tf32", "bf16"]):
        dtype, precision = _HARD_DTYPES[dtype_label]
        configs = [tuning.experts_hard_default("lite", arch, tuning.MAX_BUCKET, precision, fold=True)]
        if full:
            configs += [c for c in tuning.experts_hard_candidates("lite", fold=True) if c not in configs]
        for config in configs:
            bm = config["BM"]
            ptrs = {n: "*" + dtype for n in ("z", "out", "fold_w", "fold_b", "band", "conv2_b")}
            ptrs.update(sorted_token_idx="*i32", expert_offsets="*i32", tile_offsets="*i32")
            scalars = dict(E=W.HARD_E, L=W.LATENT, stride_zb=W.LATENT, stride_zl=1,
                           max_tiles=launch.tile_bound(W.HARD_B, W.HARD_E, bm))
            consts = dict(LOG_E=launch.log2_ceil(W.HARD_E), BM=bm, BLOCK_L=32, INPUT_PRECISION=precision)
            rate = "bf16" if dtype != "fp32" else precision
            cases.append(Case("lite_folded:_experts_hard_lite_folded_fwd_kernel", "hard lite",
                              f"{_fmt(config)},{dtype_label}", ptrs, scalars, consts, config["num_warps"],
                              _hard_lite_folded_work(config, dtype), rate))
    return cases


def hard_cases(arch: int, full: bool) -> list[Case]:
    from smoe_fast.kernels import launch, tuning

    decoder_tiles = kernel_module("decoder_tiles")

    cases = []
    latent, hidden, e = W.LATENT, 256, W.HARD_E
    dtypes = list(_HARD_DTYPES) if full else ["fp32/ieee", "fp32/tf32", "bf16"]
    for kind in ("lite", "medium", "mlp"):
        pairs = []  # (config, dtype label): the launcher's choices, which depend on the GEMM mode
        for dtype_label in dtypes:
            dot = _HARD_DTYPES[dtype_label][1]
            configs = [tuning.experts_hard_default(kind, arch, tuning.MAX_BUCKET, dot)]
            small = tuning.experts_hard_default(kind, arch, 64, dot)
            if small not in configs:
                configs.append(small)
            if full:
                configs += [c for c in tuning.experts_hard_candidates(kind) if c not in configs]
            pairs += [(config, dtype_label) for config in configs]
        order = []
        for config, _ in pairs:
            if config not in order:
                order.append(config)
        pairs.sort(key=lambda pair: order.index(pair[0]))  # rows grouped by config, modes in order
        for config, dtype_label in pairs:
            dtype, precision = _HARD_DTYPES[dtype_label]
            label = f"{_fmt(config)},{dtype_label}"
            bm = config["BM"]
            max_tiles = launch.tile_bound(W.HARD_B, e, bm)
            index_ptrs = {"scratch": "*fp32", "sorted_token_idx": "*i32", "expert_offsets": "*i32",
                          "tile_offsets": "*i32"}
            work = _hard_work(kind, config, dtype, arch, hidden)
            rate = "bf16" if dtype != "fp32" else precision
            if kind == "mlp":
                ptrs = {n: "*" + dtype for n in ("z", "out", "fc1_w", "fc1_b", "fc2_w", "fc2_b")}
                scalars = dict(E=e, L=latent, HIDDEN=hidden, stride_zb=latent, stride_zl=1, max_tiles=max_tiles)
                consts = dict(LOG_E=launch.log2_ceil(e), PIXELS=W.PIXELS, BM=bm, BH=config["BH"],
                              BN=config["BN"], BLOCK_L=32, INPUT_PRECISION=precision)
                cases.append(Case("experts_hard:_experts_hard_mlp_fwd_kernel", "hard mlp", label,
                                  dict(ptrs, **index_ptrs), scalars, consts, config["num_warps"], work, rate))
                continue
            c0, c1, c2 = decoder_tiles.CONV_CHANNELS[kind]
            ptrs = {n: "*" + dtype for n in ("z", "out", "fc_w", "fc_b", "conv1_w", "conv1_b", "conv2_w",
                                              "conv2_b", "conv3_w", "conv3_b")}
            per_program = decoder_tiles.conv_scratch_size(kind, bm, config["TS"], _maps(precision))
            scalars = dict(E=e, L=latent, stride_zb=latent, stride_zl=1, max_tiles=max_tiles,
                           scratch_per_program=per_program)
            consts = dict(LOG_E=launch.log2_ceil(e), MAPS=_maps(precision), C0=c0, C1=c1, C2=c2,
                          HAS_CONV3=kind == "medium", BM=bm,
                          TS=config["TS"], BR=config["BR"], BLOCK_L=32, BN_FC=64, INPUT_PRECISION=precision)
            cases.append(Case("experts_hard:_experts_hard_conv_fwd_kernel", f"hard {kind}", label,
                              dict(ptrs, **index_ptrs), scalars, consts, config["num_warps"], work, rate,
                              maxnreg=launch.register_cap(config["num_warps"]) if kind == "lite" else None))
        if kind == "lite":
            cases += _hard_lite_folded_cases(arch, full)
    return cases


# ----------------------------------------------------------------------------------------------------
# soft / top-k fused training kernels (lite, mlp)
# ----------------------------------------------------------------------------------------------------

# training GEMM modes: IEEE fp32 (default), TF32 (torch's setting), bf16 under autocast (z cast, fp32
# weights cast per tile, fp32 accumulation)
_TRAINING_PRECISIONS = ("ieee", "tf32", "bf16")
# (gating, direction, kind) of the kernels whose launchers pass ``maxnreg=launch.register_cap(...)``
_CAPPED_TRAINING_KERNELS = {("topk", "fwd", "lite"), ("soft", "bwd", "lite"), ("topk", "bwd", "lite")}


def _precision_label(precision: str) -> str:
    return "bf16" if precision == "bf16" else f"fp32/{precision}"


def _training_items(op: str, direction: str, bm: int, weights_per_expert: int) -> tuple[int, int, int]:
    """(items, expert groups, token runs) of a training launch at its target shape, from the launchers'
    own split functions (kernels/decoder_blocks.py)."""
    from smoe_fast.kernels import decoder_blocks, launch

    if op == "topk":
        return launch.tile_bound(W.TOPK_B * W.TOPK_K, W.TOPK_E, bm), 1, 1
    if direction == "fwd":
        n_blocks, groups, _ = decoder_blocks.soft_forward_split(W.SOFT_B, W.SOFT_E, 264, bm)
        return n_blocks * groups, groups, 1
    groups, _, runs, _ = decoder_blocks.soft_backward_split(W.SOFT_B, W.SOFT_E, 264, bm, weights_per_expert, W.LATENT)
    return groups * runs, groups, runs


def _training_work(op: str, kind: str, direction: str, config: dict, hidden: int, precision: str) -> W.Work:
    from smoe_fast.kernels import decoder_blocks

    bm = config["BM"]
    if op == "soft":
        b, e = W.SOFT_B, W.SOFT_E
        rows = b * e                                   # every (token, expert) pair
    else:
        b, e = W.TOPK_B, W.TOPK_E
        rows = b * W.TOPK_K
    weights_per_expert = sum(decoder_blocks.partial_layout(kind, W.LATENT, hidden))
    items, groups, runs = _training_items(op, direction, bm, weights_per_expert)
    programs = min(items, 264)
    # tiles: (rows of one expert) launches of the decoder; soft: every (block, expert) pair
    tiles = items if op == "topk" else W.cdiv(b, bm) * e
    # the image rows each (token, expert) row writes: soft accumulates in place (read + write),
    # top-k writes its (token, slot) row, which torch sums
    out_rows = W.Stream("gated images (accumulated in place)" if op == "soft" else "y_slots rows",
                        rows * W.PIXELS * 4 * (2 if op == "soft" else 1), "l2")
    scratch_footprint = 0.0
    if kind == "mlp":
        f = {"fc1": 2 * W.LATENT * hidden, "fc2": 2 * hidden * W.PIXELS}
        stages = [W.Stage("fc1", rows * f["fc1"], dot="_mlp_hidden"), W.Stage("fc2", rows * f["fc2"], dot="_mlp_out_tile")]
        params = hidden * W.LATENT + hidden + W.PIXELS * hidden + W.PIXELS
        scratch = W.Stream("activation scratch", 0, "scratch")
    elif direction == "fwd":
        # the hard kernel's per-tile decoder (kernels/decoder_tiles.py)
        f = W.lite_flops()
        stages = _conv_tile_stages("lite", rows)
        params = W.LITE_PARAMS
        scratch = W.Stream("activation scratch", rows * _conv_tile_scratch_per_row("lite", _maps(precision)), "scratch",
                           gather=True, sites=("_gather_phase_rows",))
        scratch_footprint = programs * kernel_module("decoder_tiles").conv_scratch_size("lite", bm, config["TS"],
                                                                                         _maps(precision)) * 4
    else:
        # kernels/decoder_tiles_bwd.py: the forward recomputed with the forward's device functions, then
        # per (pixel, token) row GEMMs whose weight gradients reuse the data gradients' gathered tiles
        f = W.lite_flops()
        stages = [W.Stage("fc", rows * f["fc"], dot="_linear_rows_to_scratch"),
                  W.Stage("conv1", rows * f["conv1"], dot="_upconv3x3_to_scratch"),
                  W.Stage("conv2 parts", rows * 2 * 196 * 16 * 16, dot="_one_channel_parts")]
        params = W.LITE_PARAMS
        # conv2 dgrad + wgrad (K = 16), conv1 dgrad + wgrad (K = 256, N = 8 padded to 16), fc dW and dz
        grads = 2 * (2 * 196 * 16 * 16) + 2 * (2 * 49 * 256 * 16) + 2 * (2 * 392 * W.LATENT)
        # the forward's traffic with a1 written, then g2 written, its 16-tap gather and a1 read, dc1
        # written, its 256-column gather and h0 read, dh0 written and read
        per_row = (_conv_tile_scratch_per_row("lite", store_a1=True)
                   + 4 * (784 + 196 * 16 + 3136 + 3136 + 49 * 256 + 392 * 3))
        # its gathers: the recomputed forward's phase rows and the transposed GEMMs' tap columns (as the
        # forward's stream counts its phase rows only: weight loads and stores are not gathers)
        scratch = W.Stream("activation scratch", rows * per_row, "scratch", gather=True,
                           sites=("_gather_phase_rows", "_gather_tap_columns"))
        scratch_footprint = programs * kernel_module("decoder_tiles_bwd").conv_bwd_scratch_size(bm, config["TS"]) * 4
    useful = rows * sum(f.values())
    if direction == "bwd":
        # recompute the forward, then two GEMMs per forward GEMM (data and weight gradients)
        recompute = [W.Stage(s.name + " (recompute)", s.flops, s.dot, s.occurrence, s.unit) for s in stages]
        if kind == "lite":
            stages = recompute + [W.Stage("data + weight grads", rows * grads, dot="_lite_tile_bwd")]
        else:
            stages = recompute + [W.Stage(s.name + " grads", 2 * s.flops, "_mlp_experts_bwd_body", 0, s.unit)
                                  for s in stages]
        useful *= 3
    # the weights of every expert a row visits, once from HBM (fp32 masters), then per tile from L2
    weights_read = (e if op == "soft" else W.nonempty_experts(e, rows)) * params * 4
    streams = [W.Stream("z, gates, x_hat (and d x_hat)", b * (W.LATENT * 4 + e * 4 + W.PIXELS * 4 * (2 if direction == "bwd" else 1)), "hbm"),
               W.Stream("expert weights, first read", weights_read, "hbm"),
               W.Stream("expert weights per tile", tiles * params * 4, "l2"), scratch]
    if scratch_footprint:
        streams.append(W.Stream("scratch zero-fill", scratch_footprint, "scratch"))
    if direction == "fwd":
        streams.append(out_rows)
        if op == "soft" and groups > 1:
            streams.append(W.Stream("partial outputs [groups, B, 784] summed", groups * b * W.PIXELS * 4 * 2, "hbm"))
    else:
        streams.append(W.Stream("partial weight grads (written, summed)", (e * runs if op == "soft" else items)
                                * weights_per_expert * 4 * 2, "hbm"))
        if kind == "lite":
            # d fc.weight added in place per tile; dL/dx_hat re-read per (token, expert) row
            streams.append(W.Stream("d fc.weight in place", tiles * 392 * W.LATENT * 4 * 2, "l2"))
            streams.append(W.Stream("dL/dx_hat rows per expert", rows * W.PIXELS * 4, "l2", gather=True))
        if op == "soft":
            streams.append(W.Stream("partial dz [groups, B, L] (added per expert, summed)",
                                    rows * W.LATENT * 4 * 2 + groups * b * W.LATENT * 4, "l2"))
    # compulsory: z, gates and x_hat (or d x_hat) once, the weights of every expert a row visits once,
    # and in the backward every expert's weight gradient written once
    weight_bytes = weights_read + (e * params * 4 if direction == "bwd" else 0)
    return W.Work(shape=f"B={b} E={e}" + (f" K={W.TOPK_K}" if op == "topk" else ""), programs=programs,
                  stages=tuple(stages), streams=tuple(streams), serial_steps=tiles / programs * 6,
                  scratch_bytes=scratch_footprint, useful_flops=useful,
                  compulsory_bytes=b * (W.LATENT * 4 + e * 4 + W.PIXELS * 4) + weight_bytes)


def training_cases(arch: int, full: bool) -> list[Case]:
    from smoe_fast.kernels import decoder_blocks, launch, tuning

    decoder_tiles = kernel_module("decoder_tiles")
    cases = []
    latent, hidden = W.LATENT, 256
    for op in ("soft", "topk"):
        module = kernel_module(f"experts_{op}")
        e = W.SOFT_E if op == "soft" else W.TOPK_E
        batch = W.SOFT_B if op == "soft" else W.TOPK_B
        for kind in ("lite", "mlp"):
            is_mlp = kind == "mlp"
            h = hidden if is_mlp else 1
            for precision in _TRAINING_PRECISIONS:
                for direction in ("fwd", "bwd"):
                    if is_mlp:
                        config = tuning.training_mlp_config(arch, direction, precision)
                    elif direction == "fwd":
                        config = tuning.training_lite_fwd_config(arch, precision, op)
                    else:
                        config = tuning.training_lite_bwd_config(arch)
                    name = f"_experts_{op}_{kind}_{direction}_kernel"
                    kernel = getattr(module, name)
                    args = arg_names(kernel)
                    work = _training_work(op, kind, direction, config, hidden, precision)
                    label = f"{_fmt(config)},{_precision_label(precision)}"
                    if not is_mlp:
                        ptrs = {a: "*fp32" for a in args if a.startswith("p_") or a in (
                            "z", "out", "scratch", "gates", "fc_w", "fc_b", "conv1_w", "conv1_b", "conv2_w", "conv2_b")}
                        ptrs.update({a: "*i32" for a in ("token_ids", "sorted_token_idx", "expert_offsets",
                                                          "tile_offsets") if a in args})
                        c0, c1, _ = decoder_tiles.CONV_CHANNELS["lite"]
                        per_program = (decoder_tiles.conv_scratch_size("lite", config["BM"], config["TS"],
                                                                       _maps(precision))
                                       if direction == "fwd" else
                                       kernel_module("decoder_tiles_bwd").conv_bwd_scratch_size(config["BM"], config["TS"]))
                        scalars = dict(B=batch, E=e, K=W.TOPK_K, L=latent, stride_zb=latent, stride_zl=1,
                                       stride_gb=e, stride_ge=1, stride_dob=W.PIXELS, stride_dop=1, W_TOTAL=14_249,
                                       n_blocks=W.cdiv(batch, config["BM"]), n_items=70, runs=3, blocks_per_run=3,
                                       experts_per_group=3, max_tiles=70, scratch_per_program=per_program)
                        z_name = "z"
                        consts = dict(LOG_E=launch.log2_ceil(e), MAPS=_maps(precision), C0=c0, C1=c1, BM=config["BM"],
                                      TS=config["TS"],
                                      BR=config["BR"], BLOCK_L=32, LP=32, BN_FC=64, INPUT_PRECISION=precision)
                    else:
                        ptrs = {a: "*fp32" for a in args if a.startswith("p_")}
                        ptrs.update({a: "*i32" for a in ("p_sorted", "p_eoff", "p_toff") if a in ptrs})
                        scalars = dict(stride_zb=latent, stride_zl=1, stride_gb=e if op == "soft" else W.TOPK_K,
                                       stride_ge=1, stride_gk=1, stride_dob=W.PIXELS, stride_dop=1, W_TOTAL=5000,
                                       B=batch, L=latent, H=h, E=e, K=W.TOPK_K, n_items=70, n_blocks=64,
                                       experts_per_group=3, runs=3, blocks_per_run=3)
                        z_name = "p_z"
                        consts = dict(LOG_E=launch.log2_ceil(e), LP=decoder_blocks.latent_pad(latent),
                                      HP=max(16, 1 << max(0, h - 1).bit_length()), BM=config["BM"], BN=config["BN"],
                                      PREC=precision)
                    if precision == "bf16":   # under autocast the op casts z; weights stay fp32 masters
                        ptrs[z_name] = "*bf16"
                    cases.append(Case(f"experts_{op}:{name}", f"{op} {direction} {kind}", label, ptrs,
                                      {k: v for k, v in scalars.items() if k in args},
                                      {k: v for k, v in consts.items() if k in args}, config["num_warps"], work,
                                      precision, config.get("num_stages", 3),
                                      # the launcher's register cap (experts_topk.py)
                                      launch.register_cap(config["num_warps"])
                                      if (op, direction, kind) in _CAPPED_TRAINING_KERNELS else None))
    w_total = 14_249
    rows = launch.tile_bound(W.TOPK_B * W.TOPK_K, W.TOPK_E, decoder_blocks.BLOCK_M)
    experts_topk = kernel_module("experts_topk")
    sum_work = W.Work(shape=f"E={W.TOPK_E} W={w_total}", programs=W.TOPK_E * W.cdiv(w_total, experts_topk._REDUCE_BLOCK),
                      streams=(W.Stream("partials in, grads out", (rows + W.TOPK_E) * w_total * 4, "hbm"),),
                      serial_steps=rows / W.TOPK_E, compulsory_bytes=(rows + W.TOPK_E) * w_total * 4)
    cases.append(Case("decoder_blocks:_segment_sum_kernel", "segment sum", f"BLOCK={experts_topk._REDUCE_BLOCK}",
                      {"p_part": "*fp32", "p_toff": "*i32", "p_out": "*fp32"}, dict(W_TOTAL=w_total),
                      dict(BLOCK=experts_topk._REDUCE_BLOCK), 4, sum_work))
    return cases


# ----------------------------------------------------------------------------------------------------
# the medium decoder's grouped layers (soft and top-k training)
# ----------------------------------------------------------------------------------------------------

# (name, C_IN, C_OUT, KS, UP, H_IN, ACT, reads z through the row index)
MEDIUM_LAYERS = [("fc", 32, 1568, 1, 1, 1, 0, True), ("conv1", 32, 64, 3, 2, 7, 1, False),
                 ("conv2", 64, 32, 3, 2, 14, 1, False), ("conv3", 32, 1, 3, 1, 28, 2, False)]


def grouped_cases(arch: int, full: bool) -> list[Case]:
    from smoe_fast.kernels import grouped_layers as gl, launch, tuning

    cases = []
    e, rows = W.MEDIUM_E, W.MEDIUM_ROWS
    tiles = launch.tile_bound(rows, e, gl.TILE_ROWS)
    for precision in _TRAINING_PRECISIONS:
        for name, c_in, c_out, ks, up, hw, act, has_idx in MEDIUM_LAYERS:
            pixels_in, pixels_out = hw * hw, (hw * up) ** 2
            k_total = c_in * ks * ks
            common = dict(E=e, C_IN=c_in, C_OUT=c_out, H_IN=hw, W_IN=hw)
            base = dict(KS=ks, UP=up, ACT=act, LOG_E=launch.log2_ceil(e), TILE_ROWS=gl.TILE_ROWS, PREC=precision)
            x_strides = dict(stride_xr=c_in * pixels_in, stride_xc=pixels_in, IDX_DIV=2 if has_idx else 1)
            ptr_i32 = {"p_idx": "*i32", "p_eoff": "*i32", "p_toff": "*i32"}
            # implicit GEMM: rows x pixels_out x C_OUT x (C_IN * taps), dgrad and wgrad the same size
            flops = 2.0 * rows * pixels_out * c_out * k_total
            act_bytes = rows * 4 * (c_in * pixels_in + c_out * pixels_out)
            params = c_out * k_total + c_out
            for kernel_name, role in (("fwd", "_grouped_conv_fwd_kernel"), ("dgrad", "_grouped_conv_dgrad_kernel"),
                                      ("wgrad", "_grouped_conv_wgrad_kernel")):
                config = tuning.grouped_layer_config(kernel_name, c_in, c_out, pixels_in, pixels_out, ks, arch)
                kernel = getattr(gl, role)
                ptrs = {a: "*fp32" for a in arg_names(kernel) if a.startswith("p_")}
                ptrs.update({k: v for k, v in ptr_i32.items() if k in ptrs})
                if precision == "bf16" and has_idx and kernel_name != "dgrad":
                    ptrs["p_x"] = "*bf16"   # z, cast by the op under autocast; activations stay fp32
                scalars = dict(common, **x_strides) if kernel_name != "dgrad" else dict(common)
                consts = dict(base, BM=config["BM"], BN=config["BN"], BK=config["BK"])
                if kernel_name != "dgrad":
                    consts["HAS_IDX"] = has_idx
                if kernel_name == "fwd":
                    grid = tiles * W.cdiv(gl.TILE_ROWS * pixels_out, config["BM"]) * W.cdiv(c_out, config["BN"])
                elif kernel_name == "dgrad":
                    grid = tiles * W.cdiv(gl.TILE_ROWS * pixels_in, config["BM"]) * W.cdiv(c_in, config["BN"])
                else:
                    grid = tiles * W.cdiv(c_out, config["BM"]) * W.cdiv(k_total, config["BN"])
                stage = W.Stage(name, flops, dot=role) if min(c_out, c_in) >= 16 and not (kernel_name != "wgrad" and c_out == 1) \
                    else W.Stage(name, flops)
                gathered = 9 if ks == 3 else 1
                streams = (W.Stream("activations in/out", act_bytes, "hbm"),
                           W.Stream("im2col gathers", rows * 4 * k_total * pixels_out * (gathered > 1), "l2", gather=True),
                           W.Stream("weights per tile", grid * params * 4 / max(1, W.cdiv(c_out, config["BN"])), "l2"))
                work = W.Work(shape=f"rows={rows} E={e}", programs=grid, stages=(stage,), streams=streams,
                              serial_steps=W.cdiv(k_total if kernel_name != "wgrad" else gl.TILE_ROWS * pixels_out, config["BK"]),
                              useful_flops=flops, compulsory_bytes=act_bytes)
                cases.append(Case(f"grouped_layers:{role}", f"medium {kernel_name} {name}",
                                  f"{_fmt(config)},{_precision_label(precision)}",
                                  ptrs, {k: v for k, v in scalars.items() if k in arg_names(kernel)},
                                  {k: v for k, v in consts.items() if k in arg_names(kernel)}, config["num_warps"],
                                  work, precision, config["num_stages"]))
    return cases


def all_cases(arch: int, full: bool = False) -> list[Case]:
    """Every distinct compile of the launchers' configs for ``arch`` (duplicates removed)."""
    seen, out = set(), []
    for case in grouping_cases(arch, full) + hard_cases(arch, full) + training_cases(arch, full) + grouped_cases(arch, full):
        if case.key() not in seen:
            seen.add(case.key())
            out.append(case)
    return out
