"""The SMoE-VAE of arXiv 2509.10025, the first application of the dispatch library above it.

Model, loss and the authors' reference code, data, training, analysis, figures and the paper's
reproduction. It imports the library (``smoe_fast.ops``, ``smoe_fast.experts``, ...); nothing in the
library imports it. The package face :mod:`smoe_fast` re-exports the public names.
"""
from __future__ import annotations

from .loss import LossTerms, smoe_loss
from .model import SMoEOutput, SMoEVAE

__all__ = ["SMoEVAE", "SMoEOutput", "smoe_loss", "LossTerms"]
