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


def test_train_and_eval_on_chosen_quickdraw_bitmap_classes(tmp_path, capsys):
    # Three classes outside the paper's five, stored as [N, 1, 784] (as some public subsets are)
    import numpy as np

    rng = np.random.default_rng(0)
    for name in ("apple", "hot air balloon", "zebra"):
        np.save(tmp_path / f"full_numpy_bitmap_{name}.npy", rng.integers(0, 256, (60, 1, 784), dtype=np.uint8))
    data = ["--data", "quickdraw-bitmap", "--root", str(tmp_path), "--categories", "zebra", "apple", "hot air balloon"]
    assert main(["train", *TINY, *data, "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "of zebra, apple, hot air balloon" in printed and "zebra (" in printed   # label order = order given
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["class_names"] == ["zebra", "apple", "hot air balloon"]
    # eval defaults to the classes the checkpoint records; resuming on other classes is refused
    assert main(["eval", str(tmp_path / "run"), "--data", "quickdraw-bitmap", "--root", str(tmp_path),
                 "--backend", "reference", "--device", "cpu"]) == 0
    assert "active experts" in capsys.readouterr().out
    assert main(["train", *tiny(epochs=2), *data[:4], "--categories", "apple", "zebra", "--out", str(tmp_path / "run"),
                 "--resume"]) == 2
    assert "pass the same --categories" in capsys.readouterr().err


def test_help_states_each_default_once():
    import argparse

    from smoe_fast.cli import DefaultsOnceFormatter, build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, parser in commands.items():
        formatter = DefaultsOnceFormatter(name)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"smoe-fast {name} {action.option_strings or action.dest}: no help text"
            text = formatter._get_help_string(action) % dict(vars(action), prog=name)
            stated = text.lower().count("default")
            needs = action.default not in (None, False, argparse.SUPPRESS)
            assert stated <= 1 and (stated == 1 or not needs), f"smoe-fast {name} {action.option_strings}: {text!r}"
