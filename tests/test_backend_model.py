"""SMoEVAE on every compiled backend equals the reference backend with the same weights.

Eval (hard routing) outputs, a short training run's loss curve (soft and top-k gating), and
torch.compile of an eval forward with no graph break from our ops.
"""
import copy

import pytest
import torch

from helpers import assert_close
from smoe_fast import SMoEVAE, resolve_backend, smoe_loss

BACKENDS = ["triton", "cpp"]


def _models(backend, **kwargs):
    torch.manual_seed(0)
    reference = SMoEVAE(num_experts=5, latent_dim=8, encoder="lite", hidden_dim=16, backend="reference", **kwargs)
    other = copy.deepcopy(reference).set_backend(backend)
    resolve_backend(backend, "cpu")  # raises (fails the test) if the backend cannot run here
    return reference, other


@pytest.mark.parametrize("decoder", ["lite", "mlp", "medium"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_forward_equals_reference(backend, decoder):
    reference, other = _models(backend, decoder=decoder)
    x = torch.rand(9, 1, 28, 28)
    expected = reference.eval()(x, sample=False)
    got = other.eval()(x, sample=False)
    assert torch.equal(got.expert_idx, expected.expert_idx)  # identical routing decisions
    assert_close(got.recon, expected.recon, name=f"{backend} {decoder} recon")


@pytest.mark.parametrize("gating", ["soft", "topk"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_short_training_run_follows_the_reference_loss_curve(backend, gating):
    reference, other = _models(backend, decoder="lite", gating=gating, top_k=2)
    x = torch.rand(3, 12, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    curves = []
    for model in (reference, other):
        torch.manual_seed(2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses = []
        for batch in x:
            terms = smoe_loss(model.train()(batch), batch)
            opt.zero_grad()
            terms.total.backward()
            opt.step()
            losses.append(terms.total.detach())
        curves.append(torch.stack(losses))
    assert_close(curves[1], curves[0], name=f"{backend} {gating} loss curve")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_eval_forward_has_no_graph_break(backend):
    _, model = _models(backend, decoder="lite")
    model.eval()
    x = torch.rand(6, 1, 28, 28)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x, sample=False).recon, model(x, sample=False).recon)
