"""`smoe-fast profile`: a tiny sweep on CPU writes a table, a CSV and a readable PNG."""
import argparse
import csv

import pytest
import torch
from PIL import Image

from smoe_fast import measure, profile


def parse(argv):
    parser = argparse.ArgumentParser()
    profile.add_arguments(parser)
    return parser.parse_args(argv)


def test_tiny_sweep_writes_table_csv_and_plot(tmp_path, capsys):
    csv_path, png_path = tmp_path / "p.csv", tmp_path / "p.png"
    args = parse(["--device", "cpu", "--backends", "reference,triton", "--experts", "1,2", "--batch", "16",
                  "--stage", "all", "--repeats", "1", "--warmup", "0", "--copy-mb", "4", "--no-progress",
                  "--csv", str(csv_path), "--plot", str(png_path)])
    assert profile.run(args) == 0
    printed = capsys.readouterr().out
    assert "ns/token" in printed and "skipped backend triton" in printed  # triton never times on CPU

    rows = list(csv.DictReader(open(csv_path)))
    measured = [r for r in rows if r["status"] == "ok"]
    # 3 stages x E in {1, 2} on the reference; top-2 at E=1 is impossible and listed as skipped.
    assert {(r["stage"], int(r["num_experts"])) for r in measured} == {
        ("hard", 1), ("hard", 2), ("soft", 1), ("soft", 2), ("topk", 2)}
    assert all(r["backend"] == "reference" and int(r["batch"]) == 16 for r in measured)
    for r in measured:
        assert float(r["seconds"]) > 0 and float(r["gb_per_s"]) > 0 and float(r["tflop_per_s"]) > 0
        assert float(r["speedup_vs_reference"]) == 1.0
        assert float(r["floor_ns_per_token"]) > 0  # the measured copy bandwidth gives a floor
    skipped = {(r["backend"], r["stage"], r["num_experts"]): r["status"] for r in rows if r["status"] != "ok"}
    assert skipped[("reference", "topk", "1")].startswith("skipped: top-k needs")
    assert all(status.startswith("skipped: ") for status in skipped.values())
    assert sum(r["backend"] == "triton" for r in rows) == 6

    image = Image.open(png_path)
    assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 400


def test_soft_points_above_the_pair_cap_are_skipped_with_the_reason(tmp_path):
    csv_path = tmp_path / "p.csv"
    args = parse(["--device", "cpu", "--backends", "reference", "--stage", "soft", "--experts", "1,4", "--batch", "8",
                  "--max-soft-pairs", "16", "--repeats", "1", "--warmup", "0", "--copy-mb", "0", "--no-progress",
                  "--csv", str(csv_path)])
    assert profile.run(args) == 0
    rows = {int(r["num_experts"]): r for r in csv.DictReader(open(csv_path))}
    assert rows[1]["status"] == "ok" and rows[1]["floor_ns_per_token"] == ""  # --copy-mb 0: no floor
    assert "B*E=32 > --max-soft-pairs 16" in rows[4]["status"]


def test_bad_arguments_are_reported(capsys):
    assert profile.run(parse(["--device", "cpu", "--backends", "nope", "--copy-mb", "0", "--no-progress"])) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
    assert profile.run(parse(["--device", "cpu", "--experts", "0", "--copy-mb", "0"])) == 2
    if not torch.cuda.is_available():
        assert profile.run(parse(["--device", "cuda", "--copy-mb", "0"])) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_work_model():
    # smoe_fast.measure, shared by the profile and benchmarks/.
    # hard: z + int64 routing + the touched experts' weights + the output; training stages count gradients too.
    per_expert = measure.expert_bytes("mlp", 32, 256)
    assert per_expert == 4 * (256 * 32 + 256 + 784 * 256 + 784)
    assert measure.stage_bytes("hard", 10, 4, 3, "mlp") == 10 * 32 * 4 + 10 * 8 + 3 * per_expert + 10 * 784 * 4
    assert measure.stage_bytes("soft", 10, 4, 4, "mlp") == 2 * (10 * 32 * 4 + 10 * 4 * 4 + 4 * per_expert + 10 * 784 * 4)
    assert measure.stage_flops("topk", 10, 4, "lite", top_k=2) == 3 * 10 * 2 * measure.decoder_flops_per_token("lite", 32)
    with pytest.raises(ValueError, match="unknown stage"):
        measure.stage_bytes("dense", 1, 1, 1, "lite")
