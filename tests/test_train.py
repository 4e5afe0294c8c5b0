"""Training: the loss goes down, resume reproduces an uninterrupted run, failures stop cleanly."""
import dataclasses
import json
import zipfile

import pytest
import torch

import smoe_fast.vae.train as train_module
from helpers import blob_images
from smoe_fast.vae.train import NonFiniteLossError, TrainConfig, evaluate, load_checkpoint, train




TRAIN, TEST = blob_images(192, 0), blob_images(64, 1)
CONFIG = TrainConfig(num_experts=3, encoder="lite", epochs=3, batch_size=32, backend="reference", eval_batch_size=32)


def _without_timing(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_training_lowers_the_loss(tmp_path):
    result = train(CONFIG, TRAIN, TEST, out_dir=tmp_path / "run", progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.history[-1]["test_sse"] < result.history[0]["test_sse"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert {"train_sse", "train_kl", "train_balance", "train_entropy", "test_sse", "active_experts", "usage"} <= set(
        json.loads(lines[-1]))


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    full = train(CONFIG, TRAIN, TEST, out_dir=tmp_path / "full", progress=False)
    train(dataclasses.replace(CONFIG, epochs=1), TRAIN, TEST, out_dir=tmp_path / "split", progress=False)
    resumed = train(CONFIG, TRAIN, TEST, out_dir=tmp_path / "split", resume=True, progress=False)
    assert _without_timing(resumed.history) == _without_timing(full.history)
    for name, p in full.model.state_dict().items():
        assert torch.equal(p, resumed.model.state_dict()[name]), name


def test_checkpoint_names_no_module_of_ours(tmp_path):
    # Only tensors and plain containers are pickled (it loads with weights_only=True), never a class or
    # function of smoe_fast: moving or renaming our modules cannot break old checkpoints.
    train(dataclasses.replace(CONFIG, epochs=1), TRAIN, TEST, out_dir=tmp_path / "run", progress=False)
    with zipfile.ZipFile(tmp_path / "run" / "checkpoint.pt") as archive:
        (pickle_name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        pickled = archive.read(pickle_name)
    assert b"smoe_fast" not in pickled
    model, _ = load_checkpoint(tmp_path / "run")
    assert model.num_experts == CONFIG.num_experts


def test_same_seed_same_run_and_evaluation_is_seeded():
    a = train(dataclasses.replace(CONFIG, epochs=1), TRAIN, TEST, progress=False)
    b = train(dataclasses.replace(CONFIG, epochs=1), TRAIN, TEST, progress=False)
    assert _without_timing(a.history) == _without_timing(b.history)
    e1, e2 = evaluate(a.model, TEST, seed=3), evaluate(a.model, TEST, seed=3)
    assert e1.sse_per_image == e2.sse_per_image and torch.equal(e1.expert_idx, e2.expert_idx)
    assert evaluate(a.model, TEST, sample=False).z.equal(evaluate(a.model, TEST, sample=False).mu)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(dataclasses.replace(CONFIG, epochs=1), TRAIN, TEST, out_dir=run, progress=False)
    good = (run / "checkpoint.pt").read_bytes()
    real_loss = train_module.smoe_loss

    def exploding_loss(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        return dataclasses.replace(terms, total=terms.total * float("nan"))

    monkeypatch.setattr(train_module, "smoe_loss", exploding_loss)
    with pytest.raises(NonFiniteLossError, match="non-finite at epoch 2, step 1.*last good checkpoint \\(epoch 1\\)"):
        train(dataclasses.replace(CONFIG, epochs=2), TRAIN, TEST, out_dir=run, resume=True, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == good
    model, ckpt = load_checkpoint(run)
    assert ckpt["epoch"] == 1 and model.num_experts == 3


def test_existing_run_is_not_overwritten_and_changed_config_cannot_resume(tmp_path):
    run = tmp_path / "run"
    train(dataclasses.replace(CONFIG, epochs=1), TRAIN, TEST, out_dir=run, progress=False)
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run; pass resume=True"):
        train(CONFIG, TRAIN, TEST, out_dir=run, progress=False)
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        train(dataclasses.replace(CONFIG, lr=0.1), TRAIN, TEST, out_dir=run, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(CONFIG, TRAIN, TEST, out_dir=tmp_path / "empty", resume=True, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_checkpoint_loads_with_weights_only_and_errors_are_clear(tmp_path):
    result = train(dataclasses.replace(CONFIG, epochs=1), TRAIN, TEST, out_dir=tmp_path / "run", progress=False)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), result.model.state_dict().values()))
    assert ckpt["config"]["num_experts"] == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"encoder.fc_mu.weight": torch.zeros(1)}, tmp_path / "authors.pth")
    with pytest.raises(ValueError, match="load_authors_checkpoint"):
        load_checkpoint(tmp_path / "authors.pth")


def test_supervised_label_and_topk_runs_train():
    for overrides in ({"routing": "supervised"}, {"routing": "label"}, {"routing": "random"},
                      {"gating": "topk", "top_k": 2}, {"collapse_prevention": "revive", "revive_min_wins": 1000},
                      {"collapse_prevention": "gate-bias"}):
        history = train(dataclasses.replace(CONFIG, epochs=1, **overrides), TRAIN, TEST, progress=False).history
        assert torch.isfinite(torch.tensor(history[-1]["train_loss"])), overrides
    assert "train_ce" in train(dataclasses.replace(CONFIG, epochs=1, routing="supervised"), TRAIN, TEST,
                               progress=False).history[-1]


def test_revive_dead_experts_copies_the_busiest_expert():
    from smoe_fast import SMoEVAE
    from smoe_fast.vae.train import revive_dead_experts

    model = SMoEVAE(num_experts=3, backend="reference")
    opt = torch.optim.Adam(model.parameters())
    revived = revive_dead_experts(model, opt, torch.tensor([50, 0, 3]), min_wins=10, generator=torch.Generator().manual_seed(0))
    assert revived == [1, 2]
    w = model.experts.weights()["fc.weight"].detach()
    assert torch.allclose(w[1], w[0], atol=0.05 * float(w[0].abs().max())) and not torch.equal(w[1], w[0])


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", -1), ("lr", 0.0)])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        train(dataclasses.replace(CONFIG, **{field: value}), TRAIN, TEST, progress=False)


def test_revived_expert_takes_a_share_of_the_donors_images():
    from smoe_fast import SMoEVAE
    from smoe_fast.vae.train import revive_dead_experts

    torch.manual_seed(0)
    model = SMoEVAE(num_experts=4, backend="reference")
    z = torch.randn(2000, 32)
    with torch.no_grad():
        wins = torch.bincount(model.gating_network(z).argmax(-1), minlength=4)
    donor = int(wins.argmax())
    dead = [e for e in range(4) if wins[e] < 10] or [int(wins.argmin())]
    wins[dead] = 0
    revived = revive_dead_experts(model, torch.optim.Adam(model.parameters()), wins, 10, torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = torch.bincount(model.gating_network(z).argmax(-1), minlength=4)
    assert revived == dead
    assert all(after[e] > 0 for e in dead) and after[donor] > 0, (wins.tolist(), after.tolist())


def test_gate_bias_raises_only_the_starved_experts():
    from smoe_fast import SMoEVAE
    from smoe_fast.vae.train import GATE_BIAS_RATE, raise_starved_experts

    model = SMoEVAE(num_experts=4, backend="reference")
    before = model.gating_network.fc3.bias.detach().clone()
    # 100 images: fair share 25, floor 12.5. Experts 2 (12 wins) and 3 (none) are starved; every
    # image's winning logit is 10, expert 2 sits 4 below it on average and expert 3 always 6 below.
    winner = torch.tensor([0] * 60 + [1] * 28 + [2] * 12)
    logits = torch.full((100, 4), 7.0)
    logits[:, 2] = torch.where(winner == 2, 10.0, 10.0 - 40 / 8.8)   # mean gap 4 over the 100 images
    logits[:, 3] = 4.0
    logits[torch.arange(100), winner] = 10.0
    starved = raise_starved_experts(model, logits)
    assert starved.tolist() == [False, False, True, True]
    torch.testing.assert_close(model.gating_network.fc3.bias.detach() - before,
                               GATE_BIAS_RATE * torch.tensor([0.0, 0.0, 4.0, 6.0]))
    seen = []
    raise_starved_experts(model, logits, reduce=lambda t: seen.append(t.clone()) or t * 2)
    assert seen[0].tolist() == [60.0, 28.0, 12.0, 0.0]   # the win counts data-parallel ranks would sum


def test_random_routing_ignores_the_gate_and_covers_every_expert():
    from smoe_fast import SMoEVAE, smoe_loss

    torch.manual_seed(0)
    model = SMoEVAE(num_experts=3, encoder="lite", routing="random", backend="reference")
    x = torch.rand(300, 1, 28, 28)
    out = model(x)
    assert torch.bincount(out.expert_idx, minlength=3).min() > 60
    smoe_loss(out, x, routing="random").total.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.gating_network.parameters())


def test_configs_of_older_checkpoints_still_load():
    from smoe_fast.vae.train import TrainConfig

    assert TrainConfig.from_dict({"revive_dead_experts": True}).collapse_prevention == "revive"
    assert TrainConfig.from_dict({"revive_dead_experts": False}).collapse_prevention == "none"
    with pytest.raises(ValueError, match="collapse_prevention"):
        TrainConfig(collapse_prevention="dropout").validate()
