"""``smoe-fast reproduce``: presets, run planning, a tiny end-to-end run, skipping and resuming."""
import argparse
import json

import pytest

from smoe_fast.vae import reproduce

# A tiny quick preset: 300 synthetic training images, 1 epoch, E in {1, 3}, reference backend.
TINY = ["--preset", "quick", "--num-train", "300", "--num-test", "100", "--epochs", "1", "--experts", "1", "3",
        "--fractions", "0.5", "1.0", "--analysis-experts", "3", "--tsne-points", "100", "--backend", "reference",
        "--device", "cpu", "--no-progress", "--experiments", "sweep", "routing", "collapse", "analysis"]


def _args(*argv):
    parser = argparse.ArgumentParser()
    reproduce.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_paper_preset_is_the_published_grid():
    plan = reproduce.make_plan(_args("--preset", "paper", "--out", "x"))
    assert plan.fractions == (0.05, 0.1, 0.2, 0.4, 1.0)
    assert plan.experts == (1, 5, 10, 15, 20, 50)
    assert (plan.epochs, plan.encoder, plan.decoder, plan.batch_size) == (20, "medium", "lite", 128)
    assert set(reproduce.PUBLISHED_SSE) == set(plan.fractions)


def test_overrides_win_over_the_preset():
    plan = reproduce.make_plan(_args("--preset", "paper", "--epochs", "2", "--experts", "7", "3", "3",
                                     "--encoder", "lite", "--analysis-experts", "6"))
    assert plan.epochs == 2 and plan.experts == (3, 7) and plan.encoder == "lite"
    assert plan.analysis_experts == 7   # nearest configured E to the requested 6 (ties go to the larger)


def test_quickdraw_needs_a_root():
    with pytest.raises(ValueError, match="--root"):
        reproduce.make_plan(_args("--data", "quickdraw"))
    with pytest.raises(ValueError, match="fractions"):
        reproduce.make_plan(_args("--fractions", "0", "1"))


def test_plan_runs_covers_every_experiment_once():
    plan = reproduce.make_plan(_args(*TINY, "--seeds", "0", "1"))
    specs = reproduce.plan_runs(plan, num_classes=5)
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    for seed in (0, 1):
        # sweep: 2 fractions x 2 E
        assert {(s.fraction, s.num_experts) for s in specs if s.seed == seed and s.routing == "unsupervised"
                and s.prevention == "none"} >= {(0.5, 1), (0.5, 3), (1.0, 1), (1.0, 3), (1.0, 5)}
        # routing at the largest fraction with E = classes; collapse: E > 1 with every mechanism
        assert {s.routing for s in specs if s.seed == seed and s.num_experts == 5} == {"unsupervised", "supervised",
                                                                                          "label", "random"}
        assert [(s.num_experts, s.prevention) for s in specs if s.seed == seed and s.prevention != "none"] == [
            (3, "gate-bias"), (3, "revive")]
    assert len(specs) == 2 * (4 + 4 + 2)


def test_quick_preset_leaves_the_collapse_experiment_out():
    plan = reproduce.make_plan(_args("--preset", "quick"))
    assert plan.experiments == ("sweep", "routing", "analysis")
    assert reproduce.make_plan(_args("--preset", "paper")).experiments == reproduce.EXPERIMENTS
    assert reproduce.make_plan(_args("--experiments", "collapse")).experiments == ("collapse",)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    assert reproduce.run(_args(*TINY, "--out", str(out))) == 0
    return out


def test_tiny_run_writes_results_report_and_figures(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert len(runs) == 10
    assert {r["train_size"] for r in runs.values()} == {150, 300}
    for r in runs.values():
        assert (tiny_run / "runs" / r["name"] / "result.json").exists()
        assert r["sse_per_image"] > 0 and len(r["history"]) == 1 and r["backend"] == "reference"
        assert 0 <= r["separability_experts"] <= 1 and 0 <= r["separability_labels"] <= 1
        assert 0 <= r["active_experts"] <= r["spec"]["num_experts"]
        assert "ami_substyles" in r   # synthetic data carries sub-style ground truth
    assert runs["p1-E5-label-s0"]["active_experts"] == 5   # the label oracle uses one expert per class
    summary = results["summary"]
    assert [row["train_size"] for row in summary["sweep"]] == [150, 300]
    assert set(summary["routing"]) == {"unsupervised", "supervised", "label", "random"}
    assert {(c["num_experts"], c["prevention"]) for c in summary["collapse"]} >= {(3, "none"), (3, "revive"),
                                                                                 (3, "gate-bias")}
    assert results["meta"]["categories"] == ["face", "cat", "snowflake", "pencil", "eye"]
    report = (tiny_run / "report.md").read_text()
    assert "Not comparable in absolute value" in report
    assert "random routing (the control)" in report and "| gate-bias" not in report.split("## Expert collapse")[0]
    for figure in ("sse_vs_active", "collapse", "usage", "contingency", "tsne", "most_exciting", "reconstructions"):
        assert (tiny_run / "figures" / f"{figure}.png").stat().st_size > 1000
        assert f"](figures/{figure}.png)" in report   # relative link from report.md


def test_finished_runs_are_skipped(tiny_run, monkeypatch):
    import smoe_fast.vae.train

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(smoe_fast.vae.train, "train", no_training)
    assert reproduce.run(_args(*TINY, "--out", str(tiny_run))) == 0


def test_interrupted_run_resumes_from_its_checkpoint(tiny_run):
    result_path = tiny_run / "runs" / "p0.5-E3-unsupervised-s0" / "result.json"
    before = json.loads(result_path.read_text())
    result_path.unlink()   # as if interrupted after the last checkpoint and before its result was written
    assert reproduce.run(_args(*TINY, "--out", str(tiny_run))) == 0
    after = json.loads(result_path.read_text())
    assert after["sse_per_image"] == before["sse_per_image"] and after["history"] == before["history"]


def test_changed_configuration_is_refused(tiny_run):
    with pytest.raises(ValueError, match="batch_size"):
        reproduce.run(_args(*TINY, "--batch-size", "64", "--out", str(tiny_run)))


def test_categories_choose_the_classes_and_a_changed_choice_is_refused(tmp_path):
    argv = [*TINY[:TINY.index("--experiments")], "--experiments", "sweep", "--experts", "2", "--fractions", "1.0",
            "--categories", "pencil", "cat", "--out", str(tmp_path)]
    assert reproduce.run(_args(*argv)) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["categories"] == ["pencil", "cat"]
    assert all(r["class_names"] == ["pencil", "cat"] for r in results["runs"])
    with pytest.raises(ValueError, match="classes"):
        reproduce.run(_args(*argv[:-5], "--categories", "cat", "pencil", "--out", str(tmp_path)))
