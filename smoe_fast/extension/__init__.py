"""The "cpp" backend: the C++ (CPU) and CUDA extension in csrc/, built on first use.

The four backend functions and the ops they call are listed in :mod:`smoe_fast.extension.ops`;
this module builds and loads the library.

The sources (shipped as the package ``smoe_fast.csrc``) are compiled with ninja by
``torch.utils.cpp_extension.load`` the first time an op is needed, into
``<cache>/ext/<key>/`` where ``<cache>`` is ``$SMOE_FAST_CACHE_DIR``, else
``$XDG_CACHE_HOME/smoe_fast``, else ``~/.cache/smoe_fast``, and ``<key>`` names the torch version,
the smoe_fast version, the CPU type (the C++ code is compiled for the host CPU's vector units), the
CUDA version and GPU arch when CUDA is built, and a hash of the sources. A build
happens in a private temporary folder under a file lock and is renamed into place when complete,
so concurrent processes never see half a build; later processes load it without compiling. The
compiler output goes to ``<cache>/ext/<key>.build.log``.

Supported: float32 and float64 (and on CUDA float16 / bfloat16 z, with fp32 or same-dtype weights,
computed in fp32: csrc/experts_cuda.h); decoder kinds "lite", "medium" and "mlp"; CPU tensors (C++,
multithreaded with at::parallel_for) and, when torch has CUDA and a GPU is visible at build time,
CUDA tensors. Weight gradients are deterministic on both (the CUDA kernels reduce per-expert partials in a fixed order, no float atomics).

Importing this module compiles nothing and touches no GPU; :func:`problem`, :func:`load` and the
dispatch functions build on first call.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["ExtensionBuildError", "problem", "load", "status", "cache_dir",
           "group_by_expert", "experts_hard", "experts_soft", "experts_topk"]

EXTENSION_NAME = "smoe_fast_ext"
CPU_SOURCES = ("torch_bindings.cpp", "experts_cpu.cpp")
CUDA_SOURCES = ("grouping_cuda.cu", "experts_cuda.cu", "wgrad_reduce_cuda.cu", "experts_cuda_glue.cpp")


class ExtensionBuildError(RuntimeError):
    """The extension could not be built or loaded; the message names the cause and the build log."""


# Per-process state: the outcome of the one load attempt (None until tried).
_state: dict = {"outcome": None, "built_here": False, "with_cuda": False, "path": None}
_load_lock = threading.Lock()


def _source_dir() -> Path:
    """csrc/ in a source checkout, or the installed ``smoe_fast/csrc`` package data."""
    return Path(str(importlib.resources.files("smoe_fast.csrc")))


def cache_dir() -> Path:
    """Root of the build cache: $SMOE_FAST_CACHE_DIR, else $XDG_CACHE_HOME/smoe_fast, else ~/.cache/smoe_fast."""
    if os.environ.get("SMOE_FAST_CACHE_DIR"):
        return Path(os.environ["SMOE_FAST_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "smoe_fast"


def _cuda_build_problem() -> str | None:
    """Why this build leaves CUDA out (None: it includes the CUDA kernels)."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


def _sources(with_cuda: bool) -> list[Path]:
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [_source_dir() / name for name in names]


def _cpu_flags() -> list[str]:
    """Compiler flags for this machine's CPU. The build is local, so on x86-64 it targets the host's
    vector units (-march=native: AVX2/AVX-512 measured 2-3.5x faster than the SSE2 baseline on the lite
    decoder); elsewhere the baseline (NEON on aarch64) is used."""
    return ["-march=native"] if platform.machine().lower() in ("x86_64", "amd64") else []


def _parallel_flags() -> list[str]:
    """OpenMP for at::parallel_for when torch's own intra-op backend is OpenMP (the Linux wheels).
    at::parallel_for is a header template that runs its body serially unless the including file is
    compiled with OpenMP: without -fopenmp every C++ kernel ran on one thread whatever
    torch.set_num_threads said (measured: hard lite, B=16,384, E=64, 1 and 2 threads 105 ms and 110 ms).
    The extension's libgomp.so.1 resolves to the copy torch has already loaded (same soname), so
    torch.set_num_threads governs both."""
    if platform.system() != "Linux" or "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []
    return ["-fopenmp"]


def _cpu_tag() -> str:
    """The CPU part of the cache key: the machine type and a hash of its CPU feature flags, so that a
    cache folder shared by different machines never hands one a build for another's instruction set."""
    flags = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), flags)
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


def _build_key(with_cuda: bool) -> str:
    """Cache key: torch version, smoe_fast version, CPU type, CUDA version + GPU arch, flags + source hash."""
    from .. import __version__

    digest = hashlib.sha256(" ".join(_cpu_flags() + _parallel_flags()).encode())
    for path in sorted(_source_dir().iterdir()):
        if path.suffix in (".cpp", ".cu", ".h", ".cuh"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    target = _cpu_tag()
    if with_cuda:
        major, minor = torch.cuda.get_device_capability()
        target += f"-cu{torch.version.cuda}-sm{major}{minor}"
    key = f"torch{torch.__version__}-smoe_fast{__version__}-{target}-{digest.hexdigest()[:12]}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def _toolchain_problem() -> str | None:
    """Missing C++ compiler or ninja, or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} is not on PATH (install g++ or clang, or set CXX)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not available (pip install ninja)"
    return None


@contextlib.contextmanager
def _output_to(log_path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``log_path`` meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def _environ(name: str, value: str | None):
    """Set (value not None) an environment variable meanwhile, then restore it."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive inter-process lock (flock); a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_uncached() -> None:
    """Load the cached build, or build it first; raises ExtensionBuildError."""
    cuda_problem = _cuda_build_problem()
    with_cuda = cuda_problem is None
    ext_root = cache_dir() / "ext"
    key = _build_key(with_cuda)
    final_dir, log_path = ext_root / key, ext_root / f"{key}.build.log"
    library = final_dir / f"{EXTENSION_NAME}.so"
    _state.update(with_cuda=with_cuda, path=library)
    try:
        ext_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExtensionBuildError(f"cannot create the build cache {ext_root}: {exc}; set SMOE_FAST_CACHE_DIR "
                                  "to a writable folder") from exc
    with _file_lock(ext_root / f"{key}.lock"):
        if library.exists():
            torch.ops.load_library(str(library))
            return
        toolchain = _toolchain_problem()
        if toolchain is not None:
            log_path.write_text(f"not built: {toolchain}\n")
            raise ExtensionBuildError(f"cannot build the smoe_fast C++ extension: {toolchain} (log: {log_path})")
        from torch.utils import cpp_extension

        build_dir = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=ext_root))
        try:
            with _output_to(log_path):
                print(f"building {EXTENSION_NAME} ({'CPU + CUDA' if with_cuda else f'CPU only: {cuda_problem}'}) "
                      f"in {build_dir}", flush=True)
                arch = "{}.{}".format(*torch.cuda.get_device_capability()) if with_cuda else None
                with _environ("TORCH_CUDA_ARCH_LIST", arch):  # this GPU's arch only (it is in the key)
                    cpp_extension.load(
                        name=EXTENSION_NAME,
                        sources=[str(p) for p in _sources(with_cuda)],
                        extra_cflags=["-O3", "-Wno-psabi", *_cpu_flags(), *_parallel_flags()],
                        extra_ldflags=_parallel_flags(),
                        extra_cuda_cflags=["-O3"] if with_cuda else None,
                        build_directory=str(build_dir),
                        with_cuda=with_cuda,
                        is_python_module=False,
                        verbose=True,
                    )
            # Complete builds only ever appear under the final name (an atomic rename).
            os.replace(build_dir, final_dir)
            _state["built_here"] = True
        except Exception as exc:
            shutil.rmtree(build_dir, ignore_errors=True)
            with open(log_path, "a") as log:
                log.write(f"\n{type(exc).__name__}: {exc}\n")
            raise ExtensionBuildError(f"building the smoe_fast C++ extension failed ({type(exc).__name__}); "
                                      f"the compiler output is in {log_path}") from exc


def load() -> None:
    """Build (first time) and load the extension into this process; raises ExtensionBuildError.

    >>> from smoe_fast import extension; extension.load(); torch.ops.smoe_fast.cpp_experts_hard
    """
    if _state["outcome"] is None:  # checked before locking: torch.compile traces through the loaded case
        with _load_lock:
            if _state["outcome"] is None:
                try:
                    _load_uncached()
                    register_python_parts()
                    _state["outcome"] = "ok"
                except ExtensionBuildError as exc:
                    _state["outcome"] = exc
    if isinstance(_state["outcome"], ExtensionBuildError):
        raise _state["outcome"]


def problem(device: torch.device | None = None) -> str | None:
    """None if the extension runs on ``device`` (building it on first call), else the reason why not."""
    if device is not None and device.type == "cuda" and torch.version.cuda is None:
        return f"CUDA tensors need a torch built with CUDA; this torch ({torch.__version__}) is CPU-only"
    if device is not None and device.type not in ("cpu", "cuda"):
        return f"the C++/CUDA extension runs on CPU and CUDA tensors, not on {device.type}"
    try:
        load()
    except ExtensionBuildError as exc:
        return str(exc)
    if device is not None and device.type == "cuda" and not _state["with_cuda"]:
        return f"the extension was built without its CUDA kernels: {_cuda_build_problem()}"
    return None


def status() -> dict[str, str]:
    """What `smoe-fast info` prints about the extension; builds nothing."""
    cuda_problem = _cuda_build_problem()
    try:
        key = _build_key(cuda_problem is None)
    except OSError as exc:
        return {"sources": f"not found ({exc})"}
    ext_root = cache_dir() / "ext"
    outcome = _state["outcome"]
    return {
        "built": "yes" if (ext_root / key / f"{EXTENSION_NAME}.so").exists() else "no (builds on first use)",
        "loaded": "yes" if outcome == "ok" else ("failed" if outcome is not None else "no"),
        "buildable": _toolchain_problem() or "yes",
        "cuda kernels": "yes" if cuda_problem is None else f"no ({cuda_problem})",
        "cache dir": str(ext_root / key),
        "build log": str(ext_root / f"{key}.build.log"),
        "reason": str(outcome) if isinstance(outcome, ExtensionBuildError) else "-",
    }


# The backend functions need load() above, so they are imported after it (_weight_list: for tests/test_cpp.py).
from .ops import (_weight_list, experts_hard, experts_soft, experts_topk, group_by_expert,  # noqa: E402, F401
                  register_python_parts)
