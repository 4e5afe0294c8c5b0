"""The paper's loss against hand computation and an independent straightforward implementation."""
import math

import pytest
import torch

from smoe_fast import SMoEOutput, smoe_loss
from smoe_fast.vae.loss import PAPER_BATCH_SIZE


def _output(batch=4, latent=3, experts=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    recon = torch.rand(batch, 1, 28, 28, generator=g, dtype=torch.float64)
    mu, logvar = torch.randn(batch, latent, generator=g, dtype=torch.float64), torch.randn(batch, latent, generator=g, dtype=torch.float64)
    logits = torch.randn(batch, experts, generator=g, dtype=torch.float64)
    x = torch.rand(batch, 1, 28, 28, generator=g, dtype=torch.float64)
    return SMoEOutput(recon, mu, logvar, logits, logits.softmax(-1), logits.argmax(-1)), x


def test_hand_computed_two_sample_case():
    # B=2, E=2, L=1; every term worked out by hand.
    recon = torch.zeros(2, 1, 28, 28, dtype=torch.float64)
    x = torch.zeros_like(recon)
    x[0, 0, 0, 0], x[1, 0, 5, 5] = 1.0, 0.5              # R = 1 + 0.25
    mu = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0], [math.log(2.0)]], dtype=torch.float64)
    # KL = -1/2 * [(1 + 0 - 1 - 1) + (1 + ln2 - 0 - 2)] = -1/2 * (-2 + ln 2)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)  # p = (.5,.5), (.75,.25)
    out = SMoEOutput(recon, mu, logvar, logits, logits.softmax(-1), logits.argmax(-1))
    terms = smoe_loss(out, x, num_experts=2)
    kl = -0.5 * (-2.0 + math.log(2.0))
    pbar = torch.tensor([0.625, 0.375], dtype=torch.float64)
    balance = 2 * float(((pbar - 0.5) ** 2).sum())       # = 2 * 2 * 0.125^2 = 0.0625
    h = lambda p: -sum(q * math.log(q + 1e-8) for q in p)  # noqa: E731
    entropy = (h([0.5, 0.5]) + h([0.75, 0.25])) / 2
    assert terms.recon.item() == pytest.approx(1.25)
    assert terms.kl.item() == pytest.approx(kl)
    assert terms.balance.item() == pytest.approx(balance) == pytest.approx(0.0625)
    assert terms.entropy.item() == pytest.approx(entropy)
    assert terms.total.item() == pytest.approx(1.25 + 0.01 * kl + 200 * 0.0625 + 400 * entropy)


def _independent_paper_loss(out, x, E):
    """A straightforward loop implementation of PAPER.md's loss, written separately."""
    B = x.shape[0]
    r = sum(float(((out.recon[b] - x[b]) ** 2).sum()) for b in range(B))
    kl = sum(-0.5 * float(1 + out.logvar[b, j] - out.mu[b, j] ** 2 - out.logvar[b, j].exp())
             for b in range(B) for j in range(out.mu.shape[1]))
    p = [[math.exp(v) for v in row] for row in out.logits.tolist()]
    p = [[v / sum(row) for v in row] for row in p]
    pbar = [sum(p[b][e] for b in range(B)) / B for e in range(E)]
    lb = E * sum((q - 1 / E) ** 2 for q in pbar)
    ent = sum(-sum(q * math.log(q + 1e-8) for q in row) for row in p) / B
    return r + 0.01 * kl + 200 * lb + 400 * ent, r, kl, lb, ent


def test_matches_independent_implementation():
    out, x = _output(batch=5, experts=4)
    total, r, kl, lb, ent = _independent_paper_loss(out, x, 4)
    terms = smoe_loss(out, x, num_experts=4)
    for got, want in [(terms.total, total), (terms.recon, r), (terms.kl, kl), (terms.balance, lb), (terms.entropy, ent)]:
        assert got.item() == pytest.approx(want, rel=1e-10)


def test_supervised_variant_uses_cross_entropy_not_gating_terms():
    out, x = _output(batch=6, experts=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    terms = smoe_loss(out, x, routing="supervised", labels=labels)
    ce = -sum(float(out.logits[b].log_softmax(-1)[labels[b]]) for b in range(6))
    assert terms.ce.item() == pytest.approx(ce)
    assert terms.total.item() == pytest.approx(terms.recon.item() + 0.01 * terms.kl.item() + 200 * ce)


def test_label_routing_is_recon_plus_kl():
    out, x = _output()
    terms = smoe_loss(out, x, routing="label")
    assert terms.total.item() == pytest.approx(terms.recon.item() + 0.01 * terms.kl.item())


def test_per_sample_reduction_equals_paper_loss_over_batch_at_batch_128():
    out, x = _output(batch=PAPER_BATCH_SIZE, experts=3)
    paper, per_sample = smoe_loss(out, x), smoe_loss(out, x, reduction="per_sample")
    assert per_sample.total.item() == pytest.approx(paper.total.item() / PAPER_BATCH_SIZE)


def test_per_sample_reduction_is_batch_size_invariant_for_repeated_batches():
    out, x = _output(batch=4)
    doubled = SMoEOutput(*(torch.cat([t, t]) for t in out))
    a = smoe_loss(out, x, reduction="per_sample").total.item()
    b = smoe_loss(doubled, torch.cat([x, x]), reduction="per_sample").total.item()
    assert a == pytest.approx(b)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_experts": 5}, "num_experts=5"),
    ({"reduction": "mean"}, "reduction"),
    ({"routing": "supervised"}, "needs labels"),
    ({"routing": "oracle"}, "unknown routing"),
])
def test_bad_arguments(kwargs, match):
    out, x = _output()
    with pytest.raises(ValueError, match=match):
        smoe_loss(out, x, **kwargs)


def test_image_shape_mismatch():
    out, _ = _output()
    with pytest.raises(ValueError, match="shape"):
        smoe_loss(out, torch.rand(4, 1, 14, 14))
