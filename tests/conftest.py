"""Test set-up: Triton runs in its interpreter without a GPU, kernel outputs are NaN-poisoned."""
import os

import pytest
import torch

os.environ.setdefault("SMOE_FAST_POISON_OUTPUTS", "1")
if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="requires a CUDA GPU; none is available on this machine")
    for item in items:
        if "requires_cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """Equivalence tests compare IEEE fp32: no TF32 in matmuls or convolutions. Uses torch's
    fp32_precision API where it exists (torch refuses to read the legacy flags once it is used)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision, cudnn.fp32_precision
        matmul.fp32_precision = cudnn.fp32_precision = "ieee"
        yield
        matmul.fp32_precision, cudnn.fp32_precision = old
    else:
        old = matmul.allow_tf32, cudnn.allow_tf32
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        yield
        matmul.allow_tf32, cudnn.allow_tf32 = old
