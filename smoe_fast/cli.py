"""The ``smoe-fast`` command line: one table maps each command to the module that implements it.

A command module provides ``add_arguments(parser)`` (its options, and the parser's description) and
``run(args) -> int`` (the exit status). Modules are imported when the parser is built, so adding a
command is one line in :data:`COMMANDS`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command: (module with add_arguments(parser) and run(args), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("smoe_fast.vae.commands.train",
              "train an SMoE-VAE (no arguments: a short run on the synthetic sketches)"),
    "eval": ("smoe_fast.vae.commands.eval", "evaluate a checkpoint (ours, or the authors' .pth)"),
    "info": ("smoe_fast.info", "versions, devices and which backends are available (and why not)"),
    "profile": ("smoe_fast.profile", "time the expert stage against the number of experts (table, CSV, plot)"),
    "audit": ("smoe_fast.audit", "compile every kernel config for sm_80/sm_90 without a GPU: registers, spills, "
                                 "shared memory, tensor cores, PREDICTED time"),
    "reproduce": ("smoe_fast.vae.reproduce", "run the paper's experiments and write results.json and report.md"),
}


class DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that states each default once: "(default: X)" is appended only to a help text that does not
    already explain its default, and only when there is a default to state (not None or a False flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoe-fast", description="Fast sparse mixture-of-experts dispatch and the "
                                     "SMoE-VAE of arXiv 2509.10025: train, evaluate, profile, reproduce.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"smoe_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, formatter_class=DefaultsOnceFormatter)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint written is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
