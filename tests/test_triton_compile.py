"""Every @triton.jit kernel compiles for real NVIDIA targets (sm_90, sm_80) without a GPU.

The other kernel tests run in TRITON_INTERPRET=1 mode, which accepts what a GPU compile rejects
(tl.dot tiles under 16, ops with no lowering) and says nothing about registers. Here each kernel is
compiled ahead of time, TTIR -> PTX -> cubin with the bundled ptxas, with the constexprs, warps and
dtypes its launcher uses on CUDA (kernels/tuning.py's CUDA branch, decoder_blocks.BLOCK_M, the grouped
layers' ``_block`` sizes for the medium decoder's four layers). Scalars get the JIT's
specialisation: a value of 1 becomes a constant, a multiple of 16 gets the divisibility hint, as do
all pointers (fresh torch allocations are 16-byte aligned).

The compiles run in a subprocess with TRITON_INTERPRET removed from its environment (conftest.py
sets it before triton is imported here) and a throw-away TRITON_CACHE_DIR, one subprocess per
target. The subprocess prints one JSON line per (kernel, config) with the registers and local
spill bytes that ptxas -v reports; run with ``-s`` to see the table:

    .venv/bin/python -m pytest tests/test_triton_compile.py -q -s
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time

import pytest

TARGETS = [90, 80]
# Off: the production defaults (fp32 inputs, IEEE dots: torch's default). On: also every autotune
# candidate, TF32 dots and fp16/bf16 inputs (about 3x the compile time).
ALL_CONFIGS_ENV = "SMOE_FAST_COMPILE_ALL_CONFIGS"
_SKIP_EXIT = 77  # the subprocess found no usable AOT API / CUDA backend


# ----------------------------------------------------------------------------------------------------
# the configurations (read by the subprocess only; importing them needs the real triton.jit objects)
# ----------------------------------------------------------------------------------------------------

def _cases():
    """[(label, kernel, pointer dtypes, scalar values, constexprs, num_warps)] as the CUDA launchers use them."""
    import importlib

    # the package re-exports functions named like some modules: import the modules themselves
    decoder_blocks, experts_hard, experts_soft, experts_topk, grouped_layers, grouping, tuning = (
        importlib.import_module(f"smoe_fast.kernels.{name}") for name in (
            "decoder_blocks", "experts_hard", "experts_soft", "experts_topk", "grouped_layers", "grouping", "tuning"))

    cuda = _FakeCudaDevice()
    extended = os.environ.get(ALL_CONFIGS_ENV) == "1"
    precisions = ("ieee", "tf32") if extended else ("ieee",)
    latent, hidden, experts = 32, 256, 7   # DESIGN.md: L = 32; contract.DEFAULT_MLP_HIDDEN; the paper's E
    cases = []

    # grouping.py: tuning.grouping_config's CUDA branch, small (bucket <= 256) and large buckets
    for bucket, num_experts, idx_dtype, top_k in ((64, experts, "i64", 1), (4096, 300, "i32", 2), (4096, experts, "i64", 2)):
        cfg = _grouping_config(tuning, bucket, num_experts, cuda)
        scalars = dict(N=1000, K=top_k, stride_b=top_k, stride_k=1, E=num_experts, tokens_per_program=4 * cfg["BLOCK_T"])
        cases.append((f"count B~{bucket} E={num_experts} {idx_dtype}", grouping._group_by_expert_count_fwd_kernel,
                      {"expert_idx": "*" + idx_dtype, "token_rank": "*i32", "block_counts": "*i32"}, scalars,
                      {k: cfg[k] for k in ("BLOCK_T", "BLOCK_J", "BLOCK_E")}, cfg["num_warps"]))
        for has_tiles in (False, True):
            ptrs = {"expert_idx": "*" + idx_dtype}
            ptrs.update({name: "*i32" for name in ("block_counts", "block_base", "expert_counts", "expert_offsets",
                                                   "tile_offsets", "sorted_token_idx", "token_sorted_pos")})
            cases.append((f"scatter B~{bucket} E={num_experts} tiles={has_tiles}", grouping._group_by_expert_scatter_fwd_kernel,
                          ptrs, dict(scalars, P=5, tile_block_m=16 if has_tiles else 1),
                          dict(HAS_TILES=has_tiles, BLOCK_T=cfg["BLOCK_T"], BLOCK_E=cfg["BLOCK_E"], BLOCK_P=cfg["BLOCK_P"]),
                          cfg["num_warps"]))

    # experts_hard.py: every autotune candidate in IEEE fp32, the defaults also in TF32, fp16 and bf16
    hard_dtypes = [("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "tf32"), ("bf16", "tf32")]
    for kind in ("lite", "medium", "mlp"):
        default = dict(tuning._HARD_DEFAULTS[kind])
        configs = [(c, [hard_dtypes[0]]) for c in tuning.experts_hard_candidates(kind) if c != default and extended]
        configs.append((default, hard_dtypes if extended else hard_dtypes[:1]))
        if kind == "mlp":
            small = dict(default, BM=32, num_warps=4)   # experts_hard_default's bucket <= 256 branch
            if small not in [c for c, _ in configs]:
                configs.append((small, [hard_dtypes[0]]))
        for cfg, dtypes in configs:
            for dtype, precision in dtypes:
                label = f"hard {kind} {_fmt(cfg)} {dtype}/{precision}"
                if kind == "mlp":
                    ptrs = {name: "*" + dtype for name in ("z", "out", "fc1_w", "fc1_b", "fc2_w", "fc2_b")}
                    ptrs.update(scratch="*fp32", sorted_token_idx="*i32", expert_offsets="*i32", tile_offsets="*i32")
                    scalars = dict(E=experts, L=latent, HIDDEN=hidden, stride_zb=latent, stride_zl=1, max_tiles=100,
                                   num_search_steps=3)
                    consts = dict(PIXELS=784, BM=cfg["BM"], BH=cfg["BH"], BN=cfg["BN"], BLOCK_L=32,
                                  INPUT_PRECISION=precision)
                    cases.append((label, experts_hard._experts_hard_mlp_fwd_kernel, ptrs, scalars, consts, cfg["num_warps"]))
                    continue
                c0, c1, c2 = experts_hard._CONV_CHANNELS[kind]
                ptrs = {name: "*" + dtype for name in ("z", "out", "fc_w", "fc_b", "conv1_w", "conv1_b", "conv2_w",
                                                        "conv2_b", "conv3_w", "conv3_b")}
                ptrs.update(scratch="*fp32", sorted_token_idx="*i32", expert_offsets="*i32", tile_offsets="*i32")
                per_program = cfg["BM"] * c0 * 49 + cfg["TS"] * c1 * 196 + (cfg["TS"] * c2 * 784 if kind == "medium" else 0)
                scalars = dict(E=experts, L=latent, stride_zb=latent, stride_zl=1, max_tiles=100, num_search_steps=3,
                               scratch_per_program=per_program)
                consts = dict(C0=c0, C1=c1, C2=c2, HAS_CONV3=kind == "medium", BM=cfg["BM"], TS=cfg["TS"], BR=cfg["BR"],
                              BLOCK_L=32, BN_FC=64, INPUT_PRECISION=precision)
                cases.append((label, experts_hard._experts_hard_conv_fwd_kernel, ptrs, scalars, consts, cfg["num_warps"]))

    # experts_soft.py / experts_topk.py: fixed BM, BR, BN and 8 warps; PREC follows torch's TF32 switch
    block_m = decoder_blocks.BLOCK_M
    for module, op, kernels in ((experts_soft, "soft", ("_experts_soft_fwd_kernel", "_experts_soft_bwd_kernel")),
                                (experts_topk, "topk", ("_experts_topk_fwd_kernel", "_experts_topk_bwd_kernel"))):
        for kind in ("lite", "mlp"):
            is_mlp = kind == "mlp"
            h = hidden if is_mlp else 1
            for precision in precisions:
                for name in kernels:
                    is_fwd = "fwd" in name
                    kernel = getattr(module, name)
                    ptrs = {arg: "*fp32" for arg in kernel.arg_names if arg.startswith("p_")}
                    ptrs.update({arg: "*i32" for arg in ("p_sorted", "p_eoff", "p_toff") if arg in ptrs})
                    scalars = dict(stride_zb=latent, stride_zl=1, stride_gb=experts, stride_ge=1, stride_gk=1,
                                   stride_dob=784, stride_dop=1, W_TOTAL=5000, B=1000, L=latent, H=h, E=experts,
                                   K=2, n_items=70, blocks_per_item=3)
                    if op == "topk":
                        scalars["stride_gb"] = 2
                    consts = dict(IS_MLP=is_mlp, LP=decoder_blocks.latent_pad(latent), HP=max(16, _next_pow2(h)),
                                  BM=block_m, BR=module.CONV_BLOCK_R,
                                  BN=(decoder_blocks.MLP_BLOCK_N if is_mlp else 1024) if is_fwd else decoder_blocks.MLP_BLOCK_N,
                                  PREC=precision)
                    if op == "topk":
                        consts["LOG_E"] = max(1, (experts - 1).bit_length())
                    direction = "fwd" if is_fwd else "bwd"
                    cases.append((f"{op} {direction} {kind} {precision}", kernel, ptrs, _only(kernel, scalars), consts, 8))
    cases.append(("topk wgrad_sum", experts_topk._segment_sum_kernel,
                  {"p_part": "*fp32", "p_toff": "*i32", "p_out": "*fp32"}, dict(W_TOTAL=5000),
                  dict(BLOCK=experts_topk._REDUCE_BLOCK), 4))

    # grouped_layers.py: the medium decoder's four layers as experts_medium.py launches them (4 warps)
    gl = grouped_layers
    log_e = max(1, (experts - 1).bit_length())
    # (name, C_IN, C_OUT, KS, UP, H_IN, ACT, reads z through the row index)
    layers = [("fc", latent, 1568, 1, 1, 1, gl.ACT_NONE, True), ("conv1", 32, 64, 3, 2, 7, gl.ACT_ELU, False),
              ("conv2", 64, 32, 3, 2, 14, gl.ACT_ELU, False), ("conv3", 32, 1, 3, 1, 28, gl.ACT_SIGMOID, False)]
    for precision in precisions:
        for name, c_in, c_out, ks, up, hw, act, has_idx in layers:
            pixels_out, pixels_in, k_total = (hw * up) ** 2, hw * hw, c_in * ks * ks
            common = dict(E=experts, C_IN=c_in, C_OUT=c_out, H_IN=hw, W_IN=hw)
            base = dict(KS=ks, UP=up, ACT=act, LOG_E=log_e, TILE_ROWS=gl.TILE_ROWS, PREC=precision)
            x_strides = dict(stride_xr=c_in * pixels_in, stride_xc=pixels_in, IDX_DIV=2 if has_idx else 1)
            ptr_i32 = {"p_idx": "*i32", "p_eoff": "*i32", "p_toff": "*i32"}
            fwd = gl._grouped_conv_fwd_kernel
            cases.append((f"grouped fwd {name} {precision}", fwd,
                          dict({a: "*fp32" for a in fwd.arg_names if a.startswith("p_")}, **ptr_i32),
                          dict(common, **x_strides),
                          dict(base, HAS_IDX=has_idx, BM=gl._block(gl.TILE_ROWS * pixels_out, 128), BN=gl._block(c_out, 64),
                               BK=gl._BLOCK_K), 4))
            dgrad = gl._grouped_conv_dgrad_kernel
            cases.append((f"grouped dgrad {name} {precision}", dgrad,
                          dict({a: "*fp32" for a in dgrad.arg_names if a.startswith("p_")}, p_eoff="*i32", p_toff="*i32"),
                          common,
                          dict(base, BM=gl._block(gl.TILE_ROWS * pixels_in, 128), BN=gl._block(c_in, 64), BK=gl._BLOCK_K), 4))
            wgrad = gl._grouped_conv_wgrad_kernel
            cases.append((f"grouped wgrad {name} {precision}", wgrad,
                          dict({a: "*fp32" for a in wgrad.arg_names if a.startswith("p_")}, **ptr_i32),
                          dict(common, **x_strides),
                          dict(base, HAS_IDX=has_idx, BM=gl._block(c_out, 64), BN=gl._block(k_total, 64),
                               BK=gl._WGRAD_BLOCK_R), 4))
    cases.append(("grouped segment_sum", gl._segment_sum_kernel,
                  {"p_part": "*fp32", "p_toff": "*i32", "p_out": "*fp32"}, dict(W_TOTAL=18432),
                  dict(BLOCK=gl._SUM_BLOCK), 4))
    return cases


class _FakeCudaDevice:
    """Stands in for torch.device('cuda') in tuning's config functions (they only read ``.type``)."""
    type = "cuda"
    index = 0

    def __hash__(self):
        return 0


def _grouping_config(tuning, bucket, num_experts, device):
    # grouping_config is lru-cached and checks TRITON_INTERPRET (unset here): call the undecorated function
    return tuning.grouping_config.__wrapped__(bucket, num_experts, device)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _fmt(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items())


def _only(kernel, scalars: dict) -> dict:
    return {k: v for k, v in scalars.items() if k in kernel.arg_names}


# ----------------------------------------------------------------------------------------------------
# the subprocess: compile every case for one target
# ----------------------------------------------------------------------------------------------------

def _ptxas_usage(log: str) -> tuple[int, int]:
    """(registers per thread, spill store + load bytes) from ptxas -v's report (TRITON_DUMP_PTXAS_LOG)."""
    import re

    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return (int(regs.group(1)) if regs else -1), (sum(spills) if spills else -1)


def _compile_all(arch: int) -> None:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
    except Exception as exc:  # an older/newer triton without this AOT API, or no CUDA backend
        print(f"triton AOT compile API unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(_SKIP_EXIT)

    for label, kernel, ptrs, scalars, consts, num_warps in _cases():
        signature, constexprs, attrs = {}, dict(consts), {}
        for i, arg in enumerate(kernel.arg_names):
            if arg in consts:
                signature[arg] = "constexpr"
            elif arg in ptrs:
                signature[arg] = ptrs[arg]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif arg in scalars:
                value = scalars[arg]
                if value == 1:   # the JIT turns an int argument equal to 1 into a constant
                    signature[arg], constexprs[arg] = "constexpr", 1
                else:
                    signature[arg] = "i32"
                    if value % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                raise KeyError(f"{label}: no type or value given for argument {arg!r} of {kernel.__name__}")
        record = {"label": label, "kernel": kernel.__name__, "num_warps": num_warps}
        try:
            options = backend.parse_options({"num_warps": num_warps})
            start, log = time.perf_counter(), io.StringIO()
            # triton prints ptxas -v's report to stdout with TRITON_DUMP_PTXAS_LOG=1
            with contextlib.redirect_stdout(log):
                triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                               target=target, options=options.__dict__)
            record["seconds"] = round(time.perf_counter() - start, 1)
            record["regs"], record["spill_bytes"] = _ptxas_usage(log.getvalue())
            record["ok"] = True
        except Exception as exc:
            record["ok"] = False
            record["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
        print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------------------------------
# the test
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compile_runs(tmp_path_factory):
    """One compile subprocess per target, started together (each is single-threaded)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_DUMP_PTXAS_LOG="1")
    runs = {}
    for arch in TARGETS:
        cache = tmp_path_factory.mktemp(f"triton_cache_sm{arch}")
        runs[arch] = subprocess.Popen([sys.executable, __file__, str(arch)], env=dict(env, TRITON_CACHE_DIR=str(cache)),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield runs
    for proc in runs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("arch", TARGETS, ids=[f"sm_{a}" for a in TARGETS])
def test_every_kernel_compiles_for_cuda(arch, compile_runs):
    stdout, stderr = compile_runs[arch].communicate(timeout=900)
    returncode = compile_runs[arch].returncode
    if returncode == _SKIP_EXIT:
        pytest.skip(f"cannot compile ahead of time with this triton: {stderr.strip().splitlines()[-1]}")
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert returncode == 0 and records, (
        f"the compile subprocess for sm_{arch} exited with {returncode} after {len(records)} kernels; "
        f"stderr tail:\n{stderr[-3000:]}")
    print(f"\nsm_{arch}: {'kernel config':<62} warps regs spill(B) compile(s)")
    for r in records:
        print(f"  {r['label']:<70} {r['num_warps']:>2} " + (f"{r['regs']:>4} {r['spill_bytes']:>6} {r['seconds']:>6}" if r["ok"] else "FAILED"))
    failed = [f"{r['label']} ({r['kernel']}): {r['error']}" for r in records if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(records)} kernel configs do not compile for sm_{arch}:\n" + "\n\n".join(failed)


if __name__ == "__main__":
    _compile_all(int(sys.argv[1]))
