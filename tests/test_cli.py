"""The smoe-fast command line: train, eval, info, help, and clear failures."""
import subprocess
import sys

import pytest
import torch

from smoe_fast import SMoEVAE
from smoe_fast.cli import main

def tiny(epochs=1):
    return ["--num-train", "96", "--num-test", "48", "--experts", "2", "--encoder", "lite", "--epochs", str(epochs),
            "--batch-size", "32", "--backend", "reference", "--device", "cpu", "--no-progress"]


TINY = tiny()


def test_train_prints_the_summary_table_and_eval_reads_the_checkpoint(tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "test SSE per image:" in printed and "active experts:" in printed and "dominant class" in printed
    assert (tmp_path / "run" / "checkpoint.pt").exists() and (tmp_path / "run" / "metrics.jsonl").exists()
    assert main(["eval", str(tmp_path / "run"), "--num-test", "48", "--backend", "reference", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "test SSE per image:" in printed and "z = mu (deterministic)" in printed


def test_resume_and_refusing_to_overwrite(tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 0
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", *tiny(epochs=2), "--out", str(tmp_path / "run"), "--resume"]) == 0


def test_eval_of_an_authors_checkpoint(tmp_path, capsys):
    torch.save(SMoEVAE(num_experts=3, encoder="lite").authors_state_dict(), tmp_path / "authors.pth")
    assert main(["eval", str(tmp_path / "authors.pth"), "--num-test", "20", "--backend", "reference", "--device", "cpu"]) == 0
    assert "active experts" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "authors.pth"), "--decoder", "medium", "--num-test", "20"]) == 2
    assert "decoder='medium' was requested" in capsys.readouterr().err


def test_info_reports_versions_and_backends(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "torch" in printed and "backends on cpu:" in printed and "reference" in printed and "auto" in printed


def test_missing_quickdraw_files_give_a_clear_error(tmp_path, capsys):
    assert main(["train", *TINY, "--data", "quickdraw", "--root", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["profile"], ["reproduce"]], ids=lambda c: " ".join(c) or "top")
def test_help(command):
    result = subprocess.run([sys.executable, "-m", "smoe_fast", *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: smoe-fast" in result.stdout, result.stderr
