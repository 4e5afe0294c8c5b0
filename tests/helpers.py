"""Shared test helpers: the one tolerance check, random expert weights, named routing cases."""
from __future__ import annotations

import torch

from smoe_fast.contract import decoder_param_shapes

# DESIGN.md tolerance policy: relative RMS error against the reference.
RTOL_RMS = {torch.float32: 1e-5, torch.float64: 1e-12}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol_rms: float | None = None, name: str = "output",
                 atol: float = 1e-12) -> None:
    """Fail with max-abs and relative-RMS error unless ``actual`` matches ``expected``.

    Relative RMS = ||actual - expected||_2 / max(||expected||_2, atol). NaNs in ``actual`` (for example
    a poisoned element a kernel never wrote) always fail.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    rtol_rms = RTOL_RMS.get(expected.dtype, 1e-5) if rtol_rms is None else rtol_rms
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{name}: {int((nan_a & ~nan_e).sum())} unexpected NaNs (unwritten output?)"
    a, e = a[~nan_e], e[~nan_e]
    if e.numel() == 0:
        return
    diff = a - e
    max_abs = diff.abs().max().item()
    rel_rms = (diff.norm() / max(e.norm().item(), atol)).item()
    assert rel_rms <= rtol_rms, f"{name}: relative RMS error {rel_rms:.3e} > {rtol_rms:.1e} (max abs error {max_abs:.3e})"


def random_weights(kind: str, num_experts: int, latent_dim: int = 32, hidden_dim: int = 64, dtype=torch.float32,
                   device="cpu", seed: int = 0, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """Stacked expert weights with PyTorch-default-like scales, so activations stay in a sane range."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in decoder_param_shapes(kind, latent_dim, hidden_dim).items():
        layer_fan_in = decoder_param_shapes(kind, latent_dim, hidden_dim)[name.split(".")[0] + ".weight"]
        bound = 1.0 / (torch.tensor(layer_fan_in[1:]).prod().item() ** 0.5)
        w = (torch.rand((num_experts, *shape), generator=g, dtype=torch.float64) * 2 - 1) * bound
        out[name] = w.to(dtype=dtype, device=device).requires_grad_(requires_grad)
    return out


def routing_case(name: str, batch: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Named top-1 routings: 'uniform', 'one_expert' (all tokens on the last), 'skewed', 'even_only' (odd experts empty)."""
    g = torch.Generator().manual_seed(seed)
    if name == "uniform":
        return torch.randint(0, num_experts, (batch,), generator=g)
    if name == "one_expert":
        return torch.full((batch,), num_experts - 1, dtype=torch.int64)
    if name == "skewed":
        probs = torch.tensor([2.0 ** -i for i in range(num_experts)])
        return torch.multinomial(probs, batch, replacement=True, generator=g)
    if name == "even_only":
        return torch.randint(0, (num_experts + 1) // 2, (batch,), generator=g) * 2
    raise ValueError(name)
