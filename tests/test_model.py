"""SMoEVAE: the published model's behaviour, the authors' checkpoint layout, gating modes, errors."""
import pytest
import torch

import smoe_fast
from smoe_fast.vae.authors import AuthorsVAE
from helpers import assert_close
from smoe_fast import BackendUnavailableError, SMoEVAE


def _same_eps_forward(model, x, eps):
    mu, logvar = model.encode(x)
    return model.decode(mu + eps * torch.exp(0.5 * logvar))


@pytest.mark.parametrize("decoder", ["lite", "medium"])
def test_authors_checkpoint_loads_with_identical_outputs(decoder, tmp_path):
    torch.manual_seed(0)
    authors = AuthorsVAE(latent_dim=32, num_experts=4, decoder=decoder)
    torch.save(authors.state_dict(), tmp_path / "vae_moe_model_final.pth")
    model = SMoEVAE.load_authors_checkpoint(tmp_path / "vae_moe_model_final.pth", decoder=decoder, backend="reference")
    assert model.num_experts == 4 and model.experts.kind == decoder
    x, eps = torch.rand(6, 1, 28, 28), torch.randn(6, 32)
    for training in (True, False):
        authors.train(training), model.train(training)
        expected_recon, expected_logits = authors(x, eps)
        recon, logits, _, _ = _same_eps_forward(model, x, eps)
        assert_close(logits, expected_logits, name=f"logits training={training}")
        assert_close(recon, expected_recon, name=f"recon training={training}")


def test_authors_state_dict_round_trip_is_exact():
    model = SMoEVAE(num_experts=3, backend="reference")
    state = model.authors_state_dict()
    assert "decoders.2.conv2.bias" in state and state["decoders.2.conv2.bias"].shape == (1,)
    assert sum(v.numel() for v in SMoEVAE(num_experts=10).authors_state_dict().values()) == 641_156  # PAPER.md
    again = SMoEVAE.load_authors_checkpoint(state, backend="reference").authors_state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


def test_mismatched_checkpoints_name_the_mismatch():
    lite = SMoEVAE(num_experts=3, decoder="lite").authors_state_dict()
    with pytest.raises(ValueError, match="checkpoint has 3 experts.*num_experts=5"):
        SMoEVAE(num_experts=5, backend="reference").load_authors_state_dict(lite)
    with pytest.raises(ValueError, match="'lite' experts.*decoder='medium'"):
        SMoEVAE.load_authors_checkpoint(lite, decoder="medium")
    with pytest.raises(ValueError, match="'lite' experts.*decoder='medium'"):
        SMoEVAE(num_experts=3, decoder="medium").load_authors_state_dict(lite)
    broken = dict(lite)
    broken["decoders.1.fc.weight"] = torch.zeros(392, 16)
    with pytest.raises(ValueError, match=r"decoders.1.fc.weight has shape \(392, 16\), expected \(392, 32\)"):
        SMoEVAE.load_authors_checkpoint(broken)
    with pytest.raises(ValueError, match="no decoders"):
        SMoEVAE.load_authors_checkpoint({"encoder.fc_mu.weight": torch.zeros(32, 6272)})


def test_missing_and_corrupt_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SMoEVAE.load_authors_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        SMoEVAE.load_authors_checkpoint(tmp_path / "bad.pth")


@pytest.mark.parametrize("decoder", ["lite", "medium", "mlp"])
@pytest.mark.parametrize("encoder", ["medium", "lite"])
def test_forward_shapes_and_named_result(encoder, decoder):
    model = SMoEVAE(num_experts=3, latent_dim=8, encoder=encoder, decoder=decoder, hidden_dim=16, backend="reference")
    out = model(torch.rand(5, 1, 28, 28))
    assert out.recon.shape == (5, 1, 28, 28) and out.mu.shape == out.logvar.shape == (5, 8)
    assert out.logits.shape == out.gates.shape == (5, 3) and out.expert_idx.shape == (5,)
    assert torch.allclose(out.gates.sum(-1), torch.ones(5))
    assert model.experts.weights()[next(iter(model.experts.weights()))].shape[0] == 3


def test_eval_routes_hard_and_training_routes_soft():
    torch.manual_seed(0)
    model = SMoEVAE(num_experts=4, backend="reference")
    x = torch.rand(6, 1, 28, 28)
    mu, _ = model.encode(x)
    experts = model.experts
    model.eval()
    recon, logits, gates, idx = model.decode(mu)
    assert_close(recon, experts.hard(mu, logits.argmax(-1), backend="reference"))
    model.train()
    recon, _, gates, _ = model.decode(mu)
    assert_close(recon, experts.soft(mu, gates, backend="reference"))


def test_topk_gating_renormalises_the_k_largest_gates():
    torch.manual_seed(0)
    model = SMoEVAE(num_experts=5, gating="topk", top_k=2, backend="reference").train()
    z = torch.randn(4, 32)
    recon, _, gates, _ = model.decode(z)
    g, i = gates.topk(2, dim=-1)
    dense = torch.zeros_like(gates).scatter(1, i, g / g.sum(-1, keepdim=True))
    assert_close(recon, model.experts.soft(z, dense, backend="reference"))


def test_supervised_routing_trains_hard_without_gate_gradient_from_reconstruction():
    model = SMoEVAE(num_experts=3, routing="supervised", backend="reference").train()
    z = torch.randn(4, 32)
    recon, _, _, idx = model.decode(z)
    assert_close(recon, model.experts.hard(z, idx, backend="reference"))
    recon.sum().backward()
    assert all(p.grad is None for p in model.gating_network.parameters())


def test_label_routing_uses_the_labels_and_checks_them():
    model = SMoEVAE(num_experts=3, routing="label", backend="reference").eval()
    x, labels = torch.rand(4, 1, 28, 28), torch.tensor([2, 0, 1, 2])
    assert torch.equal(model(x, labels).expert_idx, labels)
    with pytest.raises(ValueError, match="needs class labels"):
        model(x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\].*found values in \[0, 3\]"):
        model(x, torch.tensor([0, 1, 3, 2]))


def test_sample_false_is_deterministic():
    model = SMoEVAE(num_experts=3, backend="reference").eval()
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(x, sample=False).recon, model(x, sample=False).recon)


def test_empty_batch_returns_empty_result():
    out = SMoEVAE(num_experts=3, backend="reference").eval()(torch.rand(0, 1, 28, 28))
    assert out.recon.shape == (0, 1, 28, 28) and out.expert_idx.shape == (0,)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"num_experts": 0}, ValueError, "num_experts must be an integer >= 1, got 0"),
    ({"encoder": "large"}, ValueError, "unknown encoder 'large'"),
    ({"decoder": "big"}, ValueError, "unknown decoder 'big'"),
    ({"routing": "oracle"}, ValueError, "unknown routing 'oracle'"),
    ({"gating": "gumbel"}, ValueError, "unknown gating 'gumbel'"),
    ({"gating": "topk", "top_k": 9, "num_experts": 4}, ValueError, r"top_k must lie in \[1, num_experts=4\], got 9"),
    ({"backend": "cuda"}, ValueError, "unknown backend 'cuda'"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SMoEVAE(**kwargs)


@pytest.mark.parametrize("x,match", [
    (torch.rand(2, 3, 28, 28), r"\[B, 1, 28, 28\].*got \(2, 3, 28, 28\)"),
    (torch.rand(2, 784), r"got \(2, 784\)"),
    (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "floating-point"),
])
def test_bad_images(x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SMoEVAE(num_experts=2, backend="reference")(x)


def test_unavailable_backend_error_names_backend_reason_and_fix(monkeypatch):
    monkeypatch.setattr(smoe_fast.backends, "_triton_module_problem", lambda: "the 'triton' package is not installed")
    with pytest.raises(BackendUnavailableError, match="backend 'triton' is unavailable.*not installed"):
        SMoEVAE(backend="triton")


def test_import_does_not_import_triton_or_initialise_cuda():
    import subprocess
    import sys
    code = ("import sys, smoe_fast, torch; m = smoe_fast.SMoEVAE(num_experts=2, backend='reference'); "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialised'")
    subprocess.run([sys.executable, "-c", code], check=True)
