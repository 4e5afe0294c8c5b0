"""The wheel built from the repository works when installed outside the source tree."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Where each installed package's sources live in the tree (pyproject's package-dir).
SOURCE_DIRS = {"smoe_fast": REPO / "smoe_fast", "smoe_fast.kernels": REPO / "kernels", "smoe_fast.csrc": REPO / "csrc"}


def source_modules() -> dict[str, str]:
    """{import name: path in the wheel} of every Python module the tree holds for the wheel."""
    modules = {}
    for package, root in SOURCE_DIRS.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).parts
            if "__pycache__" in parts:
                continue
            name = ".".join((package, *Path(*parts).with_suffix("").parts)).removesuffix(".__init__")
            modules[name] = "/".join((*package.split("."), *parts))
    return modules


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy of the sources: setuptools keeps files in an old build/ folder that the tree no
    # longer has (modules moved away) and would put them in the wheel.
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src") / "smoe-fast"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                                             "runs", ".pytest_cache", ".benchmarks", ".gpu"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                   check=True, cwd=out)
    (path,) = out.glob("smoe_fast-*.whl")
    return path


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "smoe_fast/__init__.py" in names and "smoe_fast/kernels/__init__.py" in names
    assert any(n.startswith("smoe_fast/csrc/") and n.endswith((".cpp", ".cu")) for n in names), "C++/CUDA sources missing"
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names), "top-level kernels/tests leaked"
    missing = sorted(path for path in source_modules().values() if path not in names)
    assert not missing, f"modules of the tree missing from the wheel (pyproject's package list?): {missing}"
    stale = sorted(n for n in names if n.endswith(".py") and n not in source_modules().values())
    assert not stale, f"modules in the wheel that the tree does not have: {stale}"
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
import importlib
for name in {sorted(m for m in source_modules() if m != "smoe_fast.__main__")!r}:
    module = importlib.import_module(name)
    assert module.__file__.startswith({str(site)!r}), (name, module.__file__)
# the application's modules the README documents as smoe_fast.<name>
assert smoe_fast.data.load_data and smoe_fast.analysis.linear_separability and smoe_fast.figures.plot_tsne
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backends on cpu" in result.stdout
