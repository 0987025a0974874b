"""The ``gmflow`` command line: train, sample, eval, bench and reflow.

Every user error (bad argument, unknown preset or key, invalid value, missing or corrupt checkpoint,
unwritable output) prints ONE line ``gmflow: error: ...`` on stderr and exits with code 2, before any
output is written. An interrupted training run exits 130 (SIGINT) or 143 (SIGTERM) after saving a
checkpoint; a diverged run exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..train import TrainingDivergedError
from . import bench, eval, reflow, sample, train
from .common import Parser, UsageError, fmt, one_line

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gmflow",
        **fmt(
            "Few-step generative flows (GMFlow, Simple ReFlow, flow matching): train, sample, "
            "evaluate and benchmark models.",
            "run 'gmflow COMMAND --help' for details and examples",
        ),
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for module in (train, sample, eval, bench, reflow):
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gmflow`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.func(args)
    except (UsageError, ValueError, TypeError) as e:  # ConfigError, CheckpointError, PairError, ...
        print(f"gmflow: error: {one_line(e)}", file=sys.stderr)
        return 2
    except TrainingDivergedError as e:
        print(f"gmflow: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"gmflow: {one_line(e) if str(e) else 'interrupted'}", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
    except BrokenPipeError:  # output piped into e.g. `head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SystemExit as e:  # --help, or a benchmark calling sys.exit
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
