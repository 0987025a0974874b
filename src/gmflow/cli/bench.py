"""``gmflow bench NAME``: run one of the reproducible benchmarks of :mod:`gmflow.bench`."""

from __future__ import annotations

import argparse
import importlib

from .common import Parser, UsageError, fmt

__all__ = ["BENCHMARKS", "add_parser"]

BENCHMARKS = ("toy2d", "oracle", "reflow", "pairs", "images")

EPILOG = """\
benchmarks:
  toy2d   FM vs GMFlow (K = 1, 8, 64) on the checkerboard, all solvers and NFEs
  oracle  every solver with the exact posterior of a ring GMM (no training)
  reflow  Simple ReFlow ablation ladder (checkerboard, ring GMM, digits)
  pairs   ReFlow pair accuracy vs cost: GMFlow teacher + gm-ode vs FM teacher
  images  class-conditional GM-DiT vs its flow-matching twin on Fashion-MNIST (FD vs the test split)
          --part guidance: CFG vs probabilistic guidance (precision vs saturation, Table 2 analogue)
          --part guided: the headline comparison with guidance (FM + CFG vs GMFlow + probabilistic)
          --part ddpm: unconditional K = 2 GM-SDE 2 vs DDPM small / large (Table 5 analogue)
          --part nll: bits/dim vs K, K = 16 + spectral (Table 3 analogue)
          --part ladder: the K = 8 ablation ladder at NFE 8 (Table 4 analogue)

examples:
  gmflow bench toy2d --preset quick --out runs/toy2d-quick
  gmflow bench oracle --out runs/oracle
  gmflow bench images --part guidance --preset quick --out runs/images-quick
  gmflow bench images --part nll --preset quick --out runs/images-quick"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench",
        help="reproducible benchmarks (JSON + figures)",
        **fmt("Run a benchmark script; 'gmflow bench NAME --help' lists its options.", EPILOG),
    )
    b.add_argument("name", choices=BENCHMARKS, help="benchmark: " + ", ".join(BENCHMARKS))
    b.add_argument("args", nargs=argparse.REMAINDER, help="benchmark options")
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # imported on demand: each benchmark pulls in its own test beds (data sets, classifiers, figures)
    try:
        mod = importlib.import_module(f"gmflow.bench.{args.name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("gmflow.bench"):
            raise UsageError(
                f"benchmark {args.name!r} is not available (module gmflow.bench.{args.name} is missing)"
            ) from None
        raise
    p = Parser(
        prog=f"gmflow bench {args.name}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None,
    )
    mod.add_arguments(p)
    return int(mod.run(p.parse_args(args.args)) or 0)
