"""The wheel built from the repository works when installed outside the source tree."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
                   check=True, cwd=out)
    (path,) = out.glob("smoe_fast-*.whl")
    return path


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "smoe_fast/__init__.py" in names and "smoe_fast/kernels/__init__.py" in names
    assert any(n.startswith("smoe_fast/csrc/") and n.endswith((".cpp", ".cu")) for n in names), "C++/CUDA sources missing"
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names), "top-level kernels/tests leaked"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "smoe-fast = smoe_fast.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_imports_and_runs_outside_the_source_tree(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True)
    code = f"""
import sys; sys.path.insert(0, {str(site)!r})
import torch, smoe_fast, smoe_fast.kernels
from importlib.resources import files
assert smoe_fast.__file__.startswith({str(site)!r}), smoe_fast.__file__
assert smoe_fast.kernels.__file__.startswith({str(site)!r}), smoe_fast.kernels.__file__
assert any(p.name.endswith(('.cpp', '.cu')) for p in files('smoe_fast.csrc').iterdir())
m = smoe_fast.SMoEVAE(num_experts=3, backend='reference').eval()
assert m(torch.rand(2, 1, 28, 28)).recon.shape == (2, 1, 28, 28)
from smoe_fast.cli import main
assert main(['info']) == 0
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backends on cpu" in result.stdout
