"""Compile the audit's cases ahead of time, without a GPU, and cache what the compiler said.

Triton's AOT path (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``) lowers a
kernel to TTGIR, PTX and a cubin with the ptxas bundled in the triton wheel, no driver needed. The
compiles run in one subprocess per arch with TRITON_INTERPRET removed (under the interpreter
``@triton.jit`` makes no compilable kernels) and ``TRITON_DUMP_PTXAS_LOG=1`` (ptxas -v's report; if a
triton version does not print it, ptxas is run on the PTX here). Each result is cached as JSON under
``<cache>/audit/<key>.json``, keyed by the kernel's Triton cache key (its source and every jit
function it calls), the case's constexprs, warps and specialisation, the arch and the triton
version: a repeat run reads the cache and takes seconds.

The CUDA sources (csrc/*.cu) are compiled with ``nvcc -Xptxas -v`` for each arch the same way; the
PTX nvcc keeps on the way gives each kernel's tensor-core (``mma``) instruction count.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from .inspect import TTGIR, ptx_stats, ptxas_usage

FORMAT = 6   # bump when a record's fields change


def default_cache_dir() -> str:
    root = os.environ.get("SMOE_FAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "smoe_fast")
    return os.path.join(root, "audit")


def _signature(kernel, case):
    names = list(kernel.arg_names)
    signature, constexprs, attrs = {}, dict(case.constexprs), {}
    for i, arg in enumerate(names):
        if arg in case.constexprs:
            signature[arg] = "constexpr"
        elif arg in case.pointers:
            signature[arg] = case.pointers[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]          # fresh torch allocations are 16-byte aligned
        elif arg in case.scalars:
            value = case.scalars[arg]
            if value == 1:                                   # the JIT makes an int equal to 1 a constant
                signature[arg], constexprs[arg] = "constexpr", 1
            else:
                signature[arg] = "i64" if abs(value) >= 2**31 else "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise KeyError(f"{case.op} ({case.kernel}): no type or value for argument {arg!r}")
    return signature, constexprs, attrs


def _cache_key(kernel, case, arch: int) -> str:
    import triton

    text = json.dumps([FORMAT, triton.__version__, kernel.cache_key, repr(case.key()), arch], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _ptxas_log_by_hand(ptx: str, arch: int) -> str:
    import inspect

    from triton.backends.nvidia.compiler import get_ptxas

    # triton 3.9 picks the ptxas by arch; older versions take no argument
    ptxas = get_ptxas(arch) if inspect.signature(get_ptxas).parameters else get_ptxas()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        open(src, "w").write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        run = subprocess.run([ptxas.path, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
        return run.stderr + run.stdout


def compile_case(case, arch: int) -> dict:
    """Compile one case for ``arch`` and read its resources, dots and accesses (the worker's job)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from .cases import kernel_module

    module_name, function = case.kernel.split(":")
    kernel = getattr(kernel_module(module_name), function)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constexprs, attrs = _signature(kernel, case)
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    if case.maxnreg is not None:
        options["maxnreg"] = case.maxnreg
    options = backend.parse_options(options)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    usage = ptxas_usage(log.getvalue())
    if usage["registers"] < 0:
        usage = ptxas_usage(_ptxas_log_by_hand(ptx, arch))
    ttgir = TTGIR(compiled.asm["ttgir"])
    dots = ttgir.dots()
    accesses = ttgir.accesses()
    return {
        "ok": True, "seconds": round(seconds, 2), **usage,
        "shared_bytes": int(compiled.metadata.shared), "ptx": ptx_stats(ptx),
        "dots": [{"chain": [[s.file, s.line, s.function] for s in d.chain], "m": d.m, "n": d.n, "k": d.k,
                  "operand": d.operand, "unit": d.unit, "mma_instructions": d.mma_instructions()} for d in dots],
        "accesses": [{"chain": [[s.file, s.line, s.function] for s in a.chain], "op": a.op, "shape": list(a.shape),
                      "dtype": a.dtype, "vector": a.vector, "lanes": a.lanes} for a in accesses],
    }


def _worker(arch: int, full: bool, cache_dir: str) -> None:
    """Subprocess entry: compile every case of ``arch`` not in the cache; one JSON line per case."""
    from .cases import all_cases, kernel_module

    os.makedirs(cache_dir, exist_ok=True)
    for index, case in enumerate(all_cases(arch, full)):
        module_name, function = case.kernel.split(":")
        kernel = getattr(kernel_module(module_name), function)
        path = os.path.join(cache_dir, _cache_key(kernel, case, arch) + ".json")
        record = None
        if os.path.exists(path):
            with contextlib.suppress(OSError, ValueError):
                record = json.load(open(path))
                record["cached"] = True
        if record is None:
            try:
                record = compile_case(case, arch)
            except Exception as exc:   # a config that does not compile is a row, not a crash
                record = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
            tmp = path + f".{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.replace(tmp, path)
            record["cached"] = False
        print(json.dumps({"index": index, **record}), flush=True)


def compile_all(archs, full: bool, cache_dir: str, timeout: float = 3600) -> dict[int, list[dict]]:
    """Run one worker per arch (in parallel) and return {arch: [record per case, in case order]}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    procs = {}
    triton_cache = tempfile.mkdtemp(prefix="smoe_fast_audit_triton_")
    try:
        for arch in archs:
            code = f"from smoe_fast.audit.compile import _worker; _worker({arch}, {full!r}, {cache_dir!r})"
            procs[arch] = subprocess.Popen([sys.executable, "-c", code],
                                           env=dict(env, TRITON_CACHE_DIR=os.path.join(triton_cache, str(arch))),
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        results = {}
        for arch, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=timeout)
            records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0:
                raise RuntimeError(f"the audit's compile worker for sm_{arch} exited with {proc.returncode} after "
                                   f"{len(records)} kernels; stderr tail:\n{stderr[-3000:]}")
            results[arch] = records
        return results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(triton_cache, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# CUDA sources
# ----------------------------------------------------------------------------------------------------

_NVCC_FUNCTION = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'(.*?)(?=Compiling entry function|\Z)",
                            re.S)


def _demangle(names: list[str]) -> list[str]:
    """Kernel names as written in csrc ("experts_fwd_kernel<ExpertsCudaArgs<float, __half, float> >"),
    through c++filt; the mangled names where it is not installed."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return names
    run = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    pretty = run.stdout.splitlines()
    if run.returncode != 0 or len(pretty) != len(names):
        return names
    out = []
    for name in pretty:
        name = re.sub(r"\(anonymous namespace\)::|smoe_fast::", "", name.removeprefix("void "))
        out.append(name[:name.index("(")] if "(" in name else name)
    return out


_PTX_ENTRY = re.compile(r"^(?:\.visible\s+)?\.entry\s+(\w+)", re.M)


def ptx_mma_counts(ptx: str) -> dict[str, int]:
    """{mangled kernel name: tensor-core instructions (wmma.mma / mma / wgmma) in its PTX body}."""
    starts = [(m.start(), m.group(1)) for m in _PTX_ENTRY.finditer(ptx)] + [(len(ptx), "")]
    return {name: len(re.findall(r"^\s*(?:wmma\.mma|mma|wgmma\.mma_async)\.", ptx[begin:end], re.M))
            for (begin, name), (end, _) in zip(starts, starts[1:])}


def nvcc_resources(archs, csrc_dir: str, cache_dir: str) -> list[dict]:
    """Per (CUDA kernel, arch): registers, spills, static shared memory from ``nvcc -Xptxas -v`` and
    tensor-core instructions from its PTX. Empty when nvcc is not installed."""
    nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
    if nvcc is None:
        return []
    rows = []
    headers = b"".join(open(h, "rb").read() for h in sorted(glob.glob(os.path.join(csrc_dir, "*.h"))))
    for source in sorted(glob.glob(os.path.join(csrc_dir, "*.cu"))):
        text = open(source, "rb").read() + headers
        for arch in archs:
            key = hashlib.sha256(text + f"{FORMAT}{arch}{nvcc}".encode()).hexdigest()[:32]
            path = os.path.join(cache_dir, f"nvcc-{key}.json")
            if os.path.exists(path):
                rows += json.load(open(path))
                continue
            with tempfile.TemporaryDirectory() as tmp:
                run = subprocess.run([nvcc, "-c", "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v",
                                      "--keep", f"--keep-dir={tmp}", f"-I{csrc_dir}", source,
                                      "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
                mma = {}
                for ptx in glob.glob(os.path.join(tmp, "*.ptx")):
                    mma.update(ptx_mma_counts(open(ptx).read()))
            found = []
            entries = _NVCC_FUNCTION.findall(run.stderr)
            for (name, target, body), pretty in zip(entries, _demangle([e[0] for e in entries])):
                usage = ptxas_usage(body)
                smem = re.search(r"(\d+) bytes smem", body)
                found.append({"kernel": pretty, "source": os.path.basename(source), "arch": arch,
                              "ok": run.returncode == 0, **usage, "shared_bytes": int(smem.group(1)) if smem else 0,
                              "mma_instructions": mma.get(name, 0)})
            if run.returncode != 0:
                found.append({"kernel": os.path.basename(source), "source": os.path.basename(source), "arch": arch,
                              "ok": False, "error": run.stderr[-1500:]})
            os.makedirs(cache_dir, exist_ok=True)
            json.dump(found, open(path, "w"))
            rows += found
    return rows
