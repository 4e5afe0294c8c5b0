"""Shared test helpers: the one tolerance check, the forward-and-every-gradient comparison, random expert
weights, named routing cases."""
from __future__ import annotations

import torch

from smoe_fast import experts

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


def assert_within_half_tolerance(actual: torch.Tensor, exact: torch.Tensor, reference_in_dtype: torch.Tensor,
                                 name: str = "output") -> None:
    """DESIGN.md's bf16/fp16 policy: ``actual`` within 2x the relative RMS error of the reference run in
    the same dtype (``reference_in_dtype``) against ``exact`` (fp64), with a floor of 1e-3."""
    e = exact.detach().double().cpu()
    ref_err = ((reference_in_dtype.detach().double().cpu() - e).norm() / e.norm().clamp_min(1e-30)).item()
    assert_close(actual, e, rtol_rms=max(2 * ref_err, 1e-3), name=name)


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor, leaves: list[torch.Tensor], names: list[str],
                       output_name: str = "x_hat", seed: int = 7) -> None:
    """Compare a forward output with its reference, then the gradient with respect to every leaf.

    Both outputs are back-propagated with the same random upstream gradient (seeded by ``seed``);
    ``names[i]`` labels the gradient of ``leaves[i]`` in a failure (reported as ``d <name>``).

    >>> assert_grads_close(experts_soft(z, gates, w, "lite"), reference.experts_soft(z, gates, w, "lite"),
    ...                    [z, gates, *w.values()], ["z", "gates", *w])
    """
    assert len(names) == len(leaves), f"{len(names)} names for {len(leaves)} leaves"
    assert_close(actual, expected, name=output_name)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed))
    want = torch.autograd.grad(expected, leaves, grad_out)
    got = torch.autograd.grad(actual, leaves, grad_out)
    for name, g_actual, g_expected in zip(names, got, want):
        assert_close(g_actual, g_expected, name=f"d {name}")


def random_weights(kind: str, num_experts: int, latent_dim: int = 32, hidden_dim: int = 64, **kwargs):
    """Stacked expert weights with PyTorch-default scales (a small mlp hidden size for the tests)."""
    return experts.random_weights(kind, num_experts, latent_dim, hidden_dim, **kwargs)


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


def blob_images(n: int, seed: int):
    """Tiny learnable images for training tests: one of three dark squares on a white background."""
    from smoe_fast.vae.data import ImageDataset

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.ones(n, 1, 28, 28)
    for c in range(3):
        images[labels == c, :, 4 + 7 * c:11 + 7 * c, 8:20] = 0.0
    images = (images + 0.05 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return ImageDataset(images, labels, None, ("a", "b", "c"))


class RecordingKernel:
    """Stands in for a @triton.jit kernel (``kernel[grid](**kwargs)``): appends each launch's keyword
    arguments to ``launches`` (a list of its own, or one shared by several kernels) and runs nothing."""

    def __init__(self, launches: list | None = None):
        self.launches = [] if launches is None else launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)
