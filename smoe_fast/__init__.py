"""smoe_fast: fast sparse mixture-of-experts dispatch for PyTorch, and the SMoE-VAE built on it.

>>> import smoe_fast
>>> model = smoe_fast.SMoEVAE(num_experts=7, backend="auto")
>>> out = model(x)                                     # SMoEOutput(recon, mu, logvar, logits, gates, expert_idx)
>>> terms = smoe_fast.smoe_loss(out, x, num_experts=7)  # LossTerms(total, recon, kl, balance, entropy)

Importing smoe_fast never imports triton, touches a GPU or compiles anything.
"""
from __future__ import annotations

import importlib

from . import ops
from .backends import Backend, BackendUnavailableError, describe_backends, resolve_backend
from .contract import Routing
from .experts import StackedExperts
from .vae.loss import LossTerms, smoe_loss
from .vae.model import SMoEOutput, SMoEVAE

__version__ = "0.1.0"

__all__ = [
    "SMoEVAE", "SMoEOutput", "StackedExperts", "smoe_loss", "LossTerms", "Routing", "ops", "analysis",
    "Backend", "BackendUnavailableError", "resolve_backend", "describe_backends", "__version__",
]


# The application's modules that the README documents as smoe_fast.<name>, loaded on first use only
# (analysis and figures pull in scikit-learn and matplotlib, data pulls in Pillow).
_APPLICATION_MODULES = {"analysis": ".vae.analysis", "data": ".vae.data", "figures": ".vae.figures"}


def __getattr__(name: str):
    if name in _APPLICATION_MODULES:
        return importlib.import_module(_APPLICATION_MODULES[name], __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
