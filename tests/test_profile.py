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
                  "--stage", "all", "--repeats", "1", "--warmup", "0", "--copy-mb", "4", "--sgemm-size", "128",
                  "--no-progress", "--csv", str(csv_path), "--plot", str(png_path)])
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
        assert float(r["gflop_per_s"]) > 0 and float(r["sgemm_fraction"]) > 0  # the process's own sgemm ceiling
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
    assert profile.run(parse(["--device", "cpu", "--threads", "0", "--copy-mb", "0"])) == 2
    assert "--threads needs positive integers" in capsys.readouterr().err
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


def test_useful_flops_count_the_phase_split_convolutions():
    # DESIGN.md: lite is fc 25 k + phase-split conv1 201 k + conv2 100 k = 326 kFLOP per token (each output
    # phase of a conv after nearest x2 upsampling is a 2x2 conv of the low-res map: 4 taps, not 9).
    assert measure.decoder_flops_per_token("lite", 32) == 2 * (32 * 392 + 196 * 16 * 8 * 4 + 784 * 16 * 4) == 326_144
    assert measure.decoder_flops_per_token("medium", 32) == 2 * (
        32 * 1568 + 196 * 64 * 32 * 4 + 784 * 32 * 64 * 4 + 784 * 32 * 9)  # conv3 has no upsampling: 9 taps
    assert measure.decoder_flops_per_token("mlp", 32, 256) == 2 * (32 * 256 + 256 * 784)
    # Training stages: forward + backward counted as twice the forward.
    assert measure.stage_flops("soft", 1024, 64, "lite") == 3 * 1024 * 64 * 326_144
    assert measure.stage_flops("hard", 65536, 64, "lite") == 65536 * 326_144


def test_sgemm_ceiling_is_the_matmul_flops_over_the_timed_seconds():
    calls = []

    def fake_timer(fn, device):
        calls.append(fn())  # the timed call is a real n x n fp32 matmul
        return 0.01

    gflops = measure.measure_sgemm_gflops(torch.device("cpu"), n=64, timer=fake_timer)
    assert gflops == 2 * 64 ** 3 / 0.01 / 1e9
    assert len(calls) == 1 and calls[0].shape == (64, 64) and calls[0].dtype == torch.float32
    # Without a fake timer the measurement happens once per process and is reused.
    first = measure.measure_sgemm_gflops(torch.device("cpu"), n=32, repeats=1)
    assert first > 0 and measure.measure_sgemm_gflops(torch.device("cpu"), n=32, repeats=1) == first


def test_gflops_and_sgemm_fraction_come_from_the_measured_times(tmp_path, capsys, monkeypatch):
    # A fake clock: every point takes 0.25 s; the sgemm ceiling is 40 GFLOP/s at 1 thread, 80 at 2.
    monkeypatch.setattr(profile, "time_device", lambda fn, device, warmup, repeats: 0.25)
    ceilings_seen = []

    def fake_ceiling(device, n):
        ceilings_seen.append((torch.get_num_threads(), n))
        return 40.0 * torch.get_num_threads()

    monkeypatch.setattr(profile, "measure_sgemm_gflops", fake_ceiling)
    threads_before = torch.get_num_threads()
    csv_path = tmp_path / "p.csv"
    args = parse(["--device", "cpu", "--backends", "reference", "--experts", "2", "--batch", "8", "--threads", "1,2",
                  "--stage", "all", "--repeats", "1", "--warmup", "0", "--copy-mb", "0", "--sgemm-size", "64",
                  "--no-progress", "--csv", str(csv_path)])
    try:
        assert profile.run(args) == 0
    finally:
        torch.set_num_threads(threads_before)
    assert ceilings_seen == [(1, 64), (2, 64)]  # measured once per thread count, at that thread count
    printed = capsys.readouterr().out
    assert "GFLOP/s" in printed and "%sgemm" in printed and "sgemm ceiling: 64^3" in printed

    rows = list(csv.DictReader(open(csv_path)))
    assert {(r["stage"], int(r["threads"])) for r in rows} == {(s, t) for s in measure.STAGES for t in (1, 2)}
    for r in rows:
        threads = int(r["threads"])
        flops = measure.stage_flops(r["stage"], 8, 2, "lite", top_k=2)
        assert float(r["seconds"]) == 0.25
        assert float(r["gflop_per_s"]) == pytest.approx(flops / 0.25 / 1e9, rel=1e-12)
        assert float(r["tflop_per_s"]) == pytest.approx(flops / 0.25 / 1e12, rel=1e-12)
        assert float(r["sgemm_gflop_per_s"]) == 40.0 * threads
        assert float(r["sgemm_fraction"]) == pytest.approx(flops / 0.25 / 1e9 / (40.0 * threads), rel=1e-12)
        assert f"{100 * float(r['sgemm_fraction']):.1f}" in printed  # the %sgemm column


def test_no_sgemm_ceiling_leaves_the_fraction_empty(tmp_path):
    csv_path = tmp_path / "p.csv"
    args = parse(["--device", "cpu", "--backends", "reference", "--experts", "1", "--batch", "4", "--repeats", "1",
                  "--warmup", "0", "--copy-mb", "0", "--sgemm-size", "0", "--no-progress", "--csv", str(csv_path)])
    assert profile.run(args) == 0
    (row,) = csv.DictReader(open(csv_path))
    assert float(row["gflop_per_s"]) > 0 and row["sgemm_fraction"] == "" and row["sgemm_gflop_per_s"] == ""
