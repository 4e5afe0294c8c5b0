"""``smoe-fast info``: versions, devices, the C++/CUDA extension's state and which backends run here (and why not)."""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``smoe-fast info`` takes no options."""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .backends import describe_backends

    print(f"smoe_fast {__version__}   python {platform.python_version()}   {platform.platform()}")
    for dist in ("torch", "triton", "numpy", "scikit-learn", "ninja", "pytest-benchmark"):
        print(f"  {dist:<17}{_version(dist)}")
    cuda = torch.cuda.is_available()
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda else [])
    print(f"devices: {', '.join(devices)}" + ("" if cuda else "   (torch sees no CUDA GPU)"))
    if cuda:
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i}  {torch.cuda.get_device_name(i)}  sm_{''.join(map(str, torch.cuda.get_device_capability(i)))}")
    if importlib.util.find_spec("smoe_fast.extension") is not None:
        from . import extension

        print("C++/CUDA extension:")
        for key, value in extension.status().items():
            print(f"  {key:<17}{value}")
    for device in devices[:2]:
        print(f"backends on {device}:")
        for name, state in describe_backends(device, build=False).items():
            print(f"  {name:<17}{state}")
    return 0
