"""Backend selection: one small enum and one ``resolve_backend()`` that says why not.

Backends implement the same four functions with the same signatures as :mod:`smoe_fast.reference`
(``group_by_expert``, ``experts_hard``, ``experts_soft``, ``experts_topk``):

| backend   | lives in                         | runs on                                              |
|-----------|----------------------------------|------------------------------------------------------|
| reference | smoe_fast/reference.py           | any device; the specification                        |
| triton    | kernels/ (``smoe_fast.kernels``) | CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1`` |
| cpp       | csrc/ (``torch.ops.smoe_fast``)  | CPU tensors (C++), CUDA tensors (CUDA); built on first use |
| auto      | picks one                        | triton on CUDA, else cpp if it builds, else reference |

Probes are lazy and cached: importing smoe_fast never imports triton, touches a GPU or compiles.
An explicitly requested backend that cannot run raises :class:`BackendUnavailableError` naming the
backend, the reason and the fix; only ``auto`` falls back, and :func:`describe_backends` reports
what it would choose.
"""
from __future__ import annotations

import enum
import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch


class Backend(str, enum.Enum):
    REFERENCE = "reference"
    TRITON = "triton"
    CPP = "cpp"
    AUTO = "auto"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what would fix it."""


def parse_backend(name: str | Backend) -> Backend:
    try:
        return Backend(name)
    except ValueError:
        choices = ", ".join(repr(b.value) for b in Backend)
        raise ValueError(f"unknown backend {name!r}; expected one of {choices}") from None


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_module_problem() -> str | None:
    """Why smoe_fast.kernels cannot be used at all (device aside), or None."""
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed (pip install 'smoe-fast[triton]' or pip install triton)"
    try:
        kernels = importlib.import_module("smoe_fast.kernels")
    except Exception as exc:  # a broken triton install must not break smoe_fast
        return f"importing smoe_fast.kernels failed: {type(exc).__name__}: {exc}"
    missing = [f for f in ("group_by_expert", "experts_hard", "experts_soft", "experts_topk") if not hasattr(kernels, f)]
    if missing:
        return f"the Triton kernels are not available yet in this version (missing: {', '.join(missing)})"
    return None


def triton_problem(device: torch.device | str | None = None) -> str | None:
    """Why the triton backend cannot run on ``device`` (None: on any device), or None if it can."""
    problem = _triton_module_problem()
    if problem is not None:
        return problem
    if device is not None and torch.device(device).type != "cuda" and not _triton_interpreting():
        return (f"Triton kernels need CUDA tensors, got a {torch.device(device).type} tensor; move the model "
                "and data to a GPU, use backend='cpp' or 'reference' on CPU, or set TRITON_INTERPRET=1 "
                "(slow; for testing)")
    return None


def cpp_problem(device: torch.device | str | None = None) -> str | None:
    """Why the cpp backend cannot run on ``device`` (building the extension if needed), or None."""
    try:
        extension = importlib.import_module("smoe_fast.extension")
    except ImportError:
        return "the C++/CUDA extension is not available yet in this version"
    return extension.problem(None if device is None else torch.device(device))


def _problem(backend: Backend, device: torch.device | str | None) -> str | None:
    if backend is Backend.REFERENCE:
        return None
    if backend is Backend.TRITON:
        return triton_problem(device)
    if backend is Backend.CPP:
        return cpp_problem(device)
    raise AssertionError(backend)


_MODULES: dict[str, ModuleType] = {}
_RESOLVED: dict[tuple[str, str], str] = {}


def _resolve(name: str, device: str) -> str:
    key = (name, device)
    if key not in _RESOLVED:
        backend = parse_backend(name)
        if backend is Backend.AUTO:
            order = (Backend.TRITON, Backend.CPP) if torch.device(device).type == "cuda" else (Backend.CPP,)
            backend = next((b for b in order if _problem(b, device) is None), Backend.REFERENCE)
        elif (problem := _problem(backend, device)) is not None:
            raise BackendUnavailableError(f"backend {backend.value!r} is unavailable on {device}: {problem}")
        _MODULES.setdefault(backend.value, _import_backend(backend))
        _RESOLVED[key] = backend.value
    return _RESOLVED[key]


# Probing imports modules and may build the extension: torch.compile must run _resolve eagerly and
# treat its answer as a constant, so a compiled forward has no graph break here. This is the mark
# torch.compiler.assume_constant_result sets; calling that would import torch._dynamo (and with it
# triton) when smoe_fast is imported.
_resolve._dynamo_marked_constant = True  # type: ignore[attr-defined]


def resolve_backend(name: str | Backend, device: torch.device | str) -> Backend:
    """The concrete backend to run on ``device``: raises for an explicit backend that cannot run."""
    return Backend(_resolve(getattr(name, "value", name), str(torch.device(device))))


def resolved_module(name: str | Backend, device: torch.device | str) -> ModuleType:
    """The module implementing the dispatch functions of the backend ``name`` resolves to on ``device``."""
    return _MODULES[_resolve(getattr(name, "value", name), str(device))]


def check_backend_exists(name: str | Backend) -> Backend:
    """Device-independent check used at construction time (no compiling, no GPU)."""
    backend = parse_backend(name)
    if backend is Backend.TRITON and (problem := _triton_module_problem()) is not None:
        raise BackendUnavailableError(f"backend 'triton' is unavailable: {problem}")
    if backend is Backend.CPP and importlib.util.find_spec("smoe_fast.extension") is None:
        raise BackendUnavailableError("backend 'cpp' is unavailable: the C++/CUDA extension is not available yet in this version")
    return backend


def _import_backend(backend: Backend) -> ModuleType:
    if backend is Backend.REFERENCE:
        return importlib.import_module("smoe_fast.reference")
    if backend is Backend.TRITON:
        return importlib.import_module("smoe_fast.kernels")
    if backend is Backend.CPP:
        return importlib.import_module("smoe_fast.extension")
    raise ValueError(f"backend {backend.value!r} is not concrete; resolve it first with resolve_backend()")


def describe_backends(device: torch.device | str, build: bool = True) -> dict[str, str]:
    """{backend: 'available' or the reason it is not} on ``device``, plus what 'auto' picks.

    ``build=False`` never compiles: an extension not built yet is reported as such (``smoe-fast info``).
    """
    report = {}
    for backend in (Backend.REFERENCE, Backend.TRITON, Backend.CPP):
        if backend is Backend.CPP and not build:
            extension = importlib.import_module("smoe_fast.extension")
            state = extension.status()
            if state.get("loaded") != "yes" and not state.get("built", "").startswith("yes"):
                report[backend.value] = f"not built yet (builds on first use; toolchain: {state.get('buildable')})"
                continue
        report[backend.value] = _problem(backend, device) or "available"
    order = [Backend.TRITON, Backend.CPP] if torch.device(device).type == "cuda" else [Backend.CPP]
    chosen = next((b.value for b in order if report[b.value] == "available"), None)
    if chosen is None and not build and report[Backend.CPP.value].startswith("not built"):
        chosen = "cpp once built (reference until then if the build fails)"
    report["auto"] = f"chooses {chosen or Backend.REFERENCE.value}"
    return report
