"""SMoEVAE on every compiled backend equals the reference backend with the same weights.

Eval (hard routing) outputs, a short training run's loss curve (soft and top-k gating), torch.compile
of an eval forward with no graph break from our ops, and of a whole training step (forward, loss,
backward, optimizer) with our ops kept as single custom ops.
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


class _GraphRecorder:
    """A torch.compile backend that records the ops of every graph it is given (forward and backward,
    through AOT autograd) and runs them eagerly."""

    def __init__(self):
        self.ops = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        from functorch.compile import make_boxed_func

        def record(graph_module, _inputs):
            self.ops += [str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"]
            return make_boxed_func(graph_module.forward)

        return aot_autograd(fw_compiler=record, bw_compiler=record)(gm, example_inputs)


def _training_steps(model, batches, compiled: bool):
    """Adam steps of forward + smoe_loss + backward; with ``compiled`` the forward + loss (and so its
    backward, through AOT autograd) and the optimizer step run under torch.compile with fullgraph."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    recorder = _GraphRecorder()

    def loss_of(batch):
        return smoe_loss(model.train()(batch, sample=False), batch).total

    loss_fn = torch.compile(loss_of, backend=recorder, fullgraph=True) if compiled else loss_of
    step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
    losses = []
    for batch in batches:
        loss = loss_fn(batch)
        opt.zero_grad()
        loss.backward()
        step()
        losses.append(loss.detach())
    return torch.stack(losses), recorder.ops


@pytest.mark.parametrize("gating", ["soft", "topk"])
def test_compiled_training_step_keeps_our_ops_whole(gating):
    # item 5 of the training-kernel issue: forward, smoe_loss, backward and the optimizer under
    # torch.compile (fullgraph), our experts one custom op each way, the loss curve the eager one's
    reference, model = _models("triton", decoder="lite", gating=gating, top_k=2)
    x = torch.rand(2, 12, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    eager, _ = _training_steps(copy.deepcopy(model), x, compiled=False)
    compiled, ops = _training_steps(model, x, compiled=True)
    expected, _ = _training_steps(reference, x, compiled=False)
    op = "triton_experts_soft" if gating == "soft" else "triton_experts_topk"
    ours = [name for name in ops if "smoe_fast" in name]
    assert sum(f"smoe_fast.{op}.default" == name for name in ours) >= 1, ours
    assert sum(f"smoe_fast.{op}_bwd.default" == name for name in ours) >= 1, ours
    assert_close(compiled, eager, name=f"{gating} compiled vs eager loss curve")
    assert_close(compiled, expected, name=f"{gating} compiled vs reference loss curve")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("decoder", ["lite", "mlp", "medium"])
@pytest.mark.parametrize("gating", ["soft", "topk"])
def test_training_steps_on_gpu_follow_the_reference(gating, decoder):
    # a few Adam steps of SMoEVAE(backend="triton") against backend="reference" on the GPU, IEEE fp32
    torch.manual_seed(0)
    reference = SMoEVAE(num_experts=6, latent_dim=32, encoder="medium", decoder=decoder, gating=gating, top_k=2,
                        backend="reference").cuda()
    model = copy.deepcopy(reference).set_backend("triton")
    x = torch.rand(4, 64, 1, 28, 28, generator=torch.Generator().manual_seed(1)).cuda()
    got, _ = _training_steps(model, x, compiled=False)
    expected, _ = _training_steps(reference, x, compiled=False)
    assert_close(got, expected, name=f"{gating} {decoder} loss curve")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p, q, rtol_rms=1e-4, name=f"{name} after 4 steps")
