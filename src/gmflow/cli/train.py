"""``gmflow train``: train an experiment preset plus overrides (resumes automatically)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from ..config import apply_overrides, apply_sets, load_overrides
from ..experiments import PRESETS, get_preset, run_experiment
from .common import fmt, is_main_rank

__all__ = ["add_parser"]

EPILOG = """\
examples:
  gmflow train --list-presets
  gmflow train --preset toy-gmflow --out runs/k64              # run again to resume
  gmflow train --preset toy-smoke --set loop.steps=50 model.num_components=16 --dry-run
  gmflow train --preset toy-fm --config my.yaml --set loop.lr=1e-3
  gmflow train --preset digits-smoke --set data.name=digits16 --out runs/digits
  torchrun --standalone --nproc_per_node=2 -m gmflow train --preset toy-gmflow --out runs/ddp

Keys are dotted: data.*, model.*, loss.*, loop.* (see --dry-run for all of them).
Ctrl-C saves a checkpoint at the current step; the same command then continues the run."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="train a model from a preset (resumes automatically)",
        **fmt(
            "Train a model from a named preset plus overrides. Running the same command again resumes "
            "from the checkpoint in --out.",
            EPILOG,
        ),
    )
    t.add_argument(
        "--preset", default="toy-gmflow", help="named config (default: toy-gmflow; see --list-presets)"
    )
    t.add_argument("--config", metavar="FILE", help="YAML or TOML file of overrides (nested keys)")
    t.add_argument(
        "--set",
        dest="sets",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        default=[],
        help="override config keys, e.g. loop.steps=2000 model.num_components=8 (applied after --config)",
    )
    t.add_argument("--out", metavar="DIR", help="run directory (default: runs/PRESET)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--format", choices=("yaml", "json"), default="yaml", help="--dry-run output format")
    t.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run)


def _describe(name: str, cfg) -> str:
    m, lp = cfg.model, cfg.loop
    k = f"K={m.num_components}" if m.head == "gm" else "velocity head"
    return (
        f"{name:22s} {cfg.kind:7s} data={cfg.data_name:13s} loss={cfg.loss.kind:10s} {k:14s} "
        f"batch={lp.batch_size} steps={lp.steps} {lp.optimizer} lr={lp.lr:g} ema={lp.ema}"
    )


def run(args: argparse.Namespace) -> int:
    if args.list_presets:
        for name, c in PRESETS.items():
            print(_describe(name, c))
        return 0
    cfg = get_preset(args.preset)
    if args.config:
        cfg = apply_overrides(cfg, load_overrides(args.config))
    cfg = apply_sets(cfg, args.sets)
    if args.out:
        cfg = apply_sets(cfg, [f"loop.out_dir={args.out}"])
    if cfg.loop.out_dir is None:
        cfg = apply_sets(cfg, [f"loop.out_dir={Path('runs') / args.preset}"])
    cfg.validate()
    if args.dry_run:
        d = {"experiment": cfg.kind, **cfg.to_dict()}
        if args.format == "json":
            print(json.dumps(d, indent=2))
        else:
            print(yaml.safe_dump(d, sort_keys=False), end="")
        return 0
    res = run_experiment(cfg, progress=not args.no_progress, verbose=True)
    if is_main_rank():
        print(
            f"gmflow: trained to step {res.step} in {res.out_dir} (last loss {res.last_loss:.4f}, "
            f"median {res.median_step_ms:.1f} ms/step)",
            file=sys.stderr,
        )
    return 0
