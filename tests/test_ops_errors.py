"""Every bad input to the public ops gets an error that says what was expected and what was found."""
import pytest
import torch

from helpers import random_weights
from smoe_fast import ops

W = random_weights("lite", 3, latent_dim=4)
Z = torch.randn(5, 4)
IDX = torch.tensor([0, 1, 2, 1, 0])


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.experts_hard(Z, torch.tensor([0, 1, 3, 1, 0]), W, backend="reference"), ValueError,
     r"expert_idx must lie in \[0, 2\] for 3 experts, found values in \[0, 3\]"),
    (lambda: ops.experts_hard(Z, torch.tensor([0, -1, 2, 1, 0]), W, backend="reference"), ValueError, r"found values in \[-1, 2\]"),
    (lambda: ops.experts_hard(Z, IDX.float(), W, backend="reference"), TypeError, "int64 .* got dtype torch.float32"),
    (lambda: ops.experts_hard(Z, IDX[:4], W, backend="reference"), ValueError, "expert_idx has 4 tokens but z has 5"),
    (lambda: ops.experts_hard(Z[:, :3], IDX, W, backend="reference"), ValueError, r"'fc.weight' must have shape \(3, 392, 3\)"),
    (lambda: ops.experts_hard(Z.unsqueeze(0), IDX, W, backend="reference"), ValueError, r"z must have shape \[B, L\]"),
    (lambda: ops.experts_hard(Z.double(), IDX, W, backend="reference"), TypeError, "z has dtype torch.float64 but the expert weights"),
    (lambda: ops.experts_hard(Z.long(), IDX, W, backend="reference"), TypeError, "floating-point"),
    (lambda: ops.experts_hard(Z, IDX, W, kind="medium", backend="reference"), ValueError, "decoder kind 'medium' expects weights"),
    (lambda: ops.experts_hard(Z, IDX, W, kind="huge", backend="reference"), ValueError, "unknown decoder kind 'huge'"),
    (lambda: ops.experts_hard(Z, IDX, W, backend="gpu"), ValueError, "unknown backend 'gpu'"),
    (lambda: ops.experts_soft(Z, torch.rand(5, 4), W, backend="reference"), ValueError, r"gates must have shape \[B, E\] = \(5, 3\), got \(5, 4\)"),
    (lambda: ops.experts_topk(Z, IDX[:, None], torch.rand(5, 2), W, backend="reference"), ValueError, "topk_gates must have the shape of topk_idx"),
    (lambda: ops.experts_topk(Z, IDX, torch.rand(5), W, backend="reference"), ValueError, r"topk_idx must have shape \[B, K\]"),
    (lambda: ops.group_by_expert(IDX, 0, backend="reference"), ValueError, "num_experts must be >= 1, got 0"),
    (lambda: ops.group_by_expert([0, 1], 2, backend="reference"), TypeError, "must be a torch.Tensor, got list"),
], ids=["index-too-large", "negative-index", "float-indices", "token-count-mismatch", "latent-size-mismatch",
        "z-3d", "dtype-mismatch", "integer-z", "wrong-kind-for-weights", "unknown-kind", "unknown-backend",
        "gates-wrong-E", "topk-gates-shape", "topk-idx-1d", "E-zero", "not-a-tensor"])
def test_bad_input_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_weights_with_inconsistent_expert_count():
    bad = dict(W, **{"conv1.bias": torch.zeros(4, 16)})
    with pytest.raises(ValueError, match=r"'conv1.bias' must have shape \(3, 16\).*got \(4, 16\)"):
        ops.experts_hard(Z, IDX, bad, backend="reference")


def test_index_check_can_be_turned_off():
    # check_indices=False skips the host-synchronising range check (documented in ops); valid input still works.
    out = ops.experts_hard(Z, IDX, W, backend="reference", check_indices=False)
    assert out.shape == (5, 1, 28, 28)


def test_nan_inputs_propagate_without_error():
    z = Z.clone()
    z[2] = float("nan")
    out = ops.experts_hard(z, IDX, W, backend="reference")
    assert torch.isnan(out[2]).all() and not torch.isnan(out[[0, 1, 3, 4]]).any()
