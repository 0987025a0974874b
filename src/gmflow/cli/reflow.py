"""``gmflow reflow pairs`` and ``gmflow reflow train``: teacher pairs and the ReFlow student.

Every bad input (missing/corrupt checkpoint or shards, teacher/pair mismatch, rho outside [0, 1],
kappa <= 0, r outside (0, 1], unknown keys) prints ONE line ``gmflow: error: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import apply_sets
from ..data import DATASETS, load_dataset
from ..experiments import RECIPES, load_network, recipe, run_experiment
from ..flow import GRID_KINDS
from ..reflow import generate_pairs, read_manifest, teacher_hash
from ..sampling import SOLVERS
from ..train import read_manifest as read_checkpoint_manifest

__all__ = ["add_parser"]

PAIRS_EPILOG = """\
examples:
  gmflow reflow pairs --teacher runs/fm --direction backward --n 100000 --solver dpm++2m --nfe 32 \\
      --out pairs/bwd                                  # run again to resume
  gmflow reflow pairs --teacher runs/fm --direction forward --n 20000 --solver heun --nfe 33 \\
      --data checkerboard --out pairs/fwd"""

TRAIN_EPILOG = """\
examples:
  gmflow reflow train --teacher runs/fm --pairs pairs/bwd --data checkerboard --out runs/2rf   # 2-RF
  gmflow reflow train --teacher runs/fm --pairs pairs/bwd --forward-pairs pairs/fwd --rho 0.4 \\
      --data checkerboard --out runs/srf --set loss.normalize=sample loss.time_sampler=pow10 --dry-run
  gmflow reflow train --recipe simple --teacher runs/unet --pairs p/bwd --data digits16 \\
      --set student_dropout=0.05 --out runs/srf-digits     # images: no HPF, no forward pairs

Keys are dotted: teacher, data, student_dropout, loss.*, pairs.*, sampling.*, loop.* (see --dry-run)."""


def _check_sampling(kappa: float, r: float) -> None:
    if not kappa > 0:
        raise ValueError(f"--kappa: the sigmoid-grid kappa must be > 0, got {kappa}")
    if not 0.0 < r <= 1.0:
        raise ValueError(f"--r: the DPM-Solver-2 intermediate point r must be in (0, 1], got {r}")


def _event_shape(model: Any) -> tuple[int, ...]:
    if hasattr(model, "event_shape"):
        return tuple(int(v) for v in model.event_shape)
    return (int(model.channels),)


def _forward_data(name: str, n: int) -> Any:
    """Real data for forward pairs: a finite set (digits) as its image tensor when ``n`` fits (each real
    image once, in order), else the data set as a sampler."""
    try:
        ds = load_dataset(name)
    except ValueError as e:
        raise ValueError(f"--data: {e}") from None
    return ds.tensor() if hasattr(ds, "tensor") and n <= len(ds) else ds


def add_pairs_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = PAIRS_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--teacher", required=True, metavar="CKPT_DIR", help="teacher run directory")
    p.add_argument("--direction", required=True, choices=("backward", "forward"), help="pair direction")
    p.add_argument("--n", type=int, required=True, help="number of pairs")
    p.add_argument("--solver", default=None, choices=SOLVERS, help="default: dpm++2m backward, heun forward")
    p.add_argument("--nfe", type=int, default=32, help="teacher evaluations per pair (default 32)")
    p.add_argument("--out", required=True, metavar="DIR", help="pair directory (resumed if it exists)")
    p.add_argument("--data", default=None, help=f"real data for forward pairs: {', '.join(DATASETS)}")
    p.add_argument("--grid", default="uniform", choices=GRID_KINDS, help="time grid (default uniform)")
    p.add_argument("--kappa", type=float, default=20.0, help="sigmoid-grid kappa > 0 (default 20)")
    p.add_argument("--r", type=float, default=0.5, help="DPM-Solver-2 intermediate point in (0, 1]")
    p.add_argument("--shard-size", type=int, default=4096, help="pairs per shard file (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--raw", action="store_true", help="use the teacher's raw weights instead of the EMA")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_pairs(args: argparse.Namespace) -> int:
    """Generate (or resume) a pair directory from a teacher checkpoint."""
    _check_sampling(args.kappa, args.r)
    if args.n < 1 or args.nfe < 1 or args.shard_size < 1:
        raise ValueError("--n, --nfe and --shard-size must be >= 1")
    solver = args.solver or ("dpm++2m" if args.direction == "backward" else "heun")
    teacher = load_network(args.teacher, use_ema=not args.raw, device=args.device)
    if args.direction == "forward" and args.data is None:
        raise ValueError("--data: forward pairs start from real data; name the data set")
    data = _forward_data(args.data, args.n) if args.data is not None else None
    kw: dict[str, Any] = {}
    if args.grid == "sigmoid":
        kw["kappa"] = args.kappa
    if solver == "dpm-solver-2":
        kw["r"] = args.r
    m = generate_pairs(
        teacher, args.out, direction=args.direction, n=args.n, shard_size=args.shard_size, solver=solver,
        nfe=args.nfe, grid=args.grid, data=data if args.direction == "forward" else None,
        event_shape=None if data is not None else _event_shape(teacher), seed=args.seed,
        teacher_id=teacher_hash(args.teacher, use_ema=not args.raw), device=args.device,
        progress=not args.no_progress, solver_kwargs=kw,
    )  # fmt: skip
    print(
        f"gmflow: {m.count} {args.direction} pairs ({solver}, nfe {args.nfe}) in {args.out}", file=sys.stderr
    )
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = TRAIN_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--teacher", required=True, metavar="CKPT_DIR", help="teacher run (the student starts from it)"
    )
    p.add_argument("--pairs", required=True, metavar="DIR", help="backward pair directory")
    p.add_argument("--forward-pairs", default=None, metavar="DIR", help="forward pair directory")
    p.add_argument("--rho", type=float, default=None, help="forward-pair ratio in [0, 1] (pairs.rho)")
    p.add_argument(
        "--data",
        "--real-data",
        dest="data",
        default=None,
        help=f"the real data set (recorded for eval; projection target): {', '.join(DATASETS)}",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (resumed if it exists)")
    p.add_argument("--recipe", default="2rf", choices=tuple(RECIPES), help="starting config (default 2rf)")
    p.add_argument("--set", dest="sets", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--raw", action="store_true", help="start from the teacher's raw weights, not its EMA")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _resolve_config(args: argparse.Namespace):
    # the recipe's image or vector form, by the pairs' event shape
    cfg = apply_sets(recipe(args.recipe, read_manifest(args.pairs).event_shape), list(args.sets))
    extra = [f"teacher={args.teacher}", f"pairs.backward={args.pairs}"]
    if args.forward_pairs is not None:
        extra.append(f"pairs.forward={args.forward_pairs}")
    if args.rho is not None:
        extra.append(f"pairs.rho={args.rho}")
    if args.data is not None:
        extra.append(f"data={args.data}")
    if args.out is not None:
        extra.append(f"loop.out_dir={args.out}")
    cfg = apply_sets(cfg, extra)
    if cfg.loop.out_dir is None:
        cfg = apply_sets(cfg, [f"loop.out_dir={Path('runs') / ('reflow-' + args.recipe)}"])
    if args.raw:
        cfg = apply_sets(cfg, ["teacher_ema=false"])
    return cfg.validate()


def run_train(args: argparse.Namespace) -> int:
    """Train a ReFlow student from a teacher checkpoint and pair directories."""
    cfg = _resolve_config(args)
    if cfg.pairs.rho > 0 and cfg.pairs.forward is None:
        raise ValueError(f"rho={cfg.pairs.rho} > 0 draws forward pairs: pass --forward-pairs DIR")
    if cfg.pairs.projection_lambda > 0 and cfg.data is None:
        raise ValueError("projection_lambda > 0 projects onto real data: pass --data NAME")
    if cfg.pairs.forward is not None and cfg.pairs.rho == 0:
        print("gmflow: note: pairs.rho = 0, so the forward pairs are not drawn (set --rho to mix them)",
              file=sys.stderr)  # fmt: skip
    if args.dry_run:
        read_checkpoint_manifest(args.teacher)
        info = {"experiment": cfg.kind, **cfg.to_dict()}
        info["pair_settings"] = {"backward": read_manifest(args.pairs).settings()}
        if args.forward_pairs is not None:
            info["pair_settings"]["forward"] = read_manifest(args.forward_pairs).settings()
        print(json.dumps(info, indent=2))
        return 0
    res = run_experiment(cfg, progress=not args.no_progress, verbose=True)
    print(
        f"gmflow: trained the ReFlow student to step {res.step} in {res.out_dir} "
        f"(last loss {res.last_loss:.4g}, median {res.median_step_ms:.1f} ms/step)",
        file=sys.stderr,
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``reflow {pairs,train}`` to the subparsers ``sub`` of the main ``gmflow`` parser."""
    r = sub.add_parser(
        "reflow",
        help="Simple ReFlow: teacher pairs and student training",
        description="Simple ReFlow (Kim et al. 2025): generate teacher pairs, train a ReFlow student.",
    )
    steps = r.add_subparsers(dest="reflow_command", metavar="STEP", required=True)
    p = steps.add_parser("pairs", help="generate teacher pairs (resumable)", description=run_pairs.__doc__)
    add_pairs_arguments(p)
    p.set_defaults(func=run_pairs)
    t = steps.add_parser("train", help="train a ReFlow student", description=run_train.__doc__)
    add_train_arguments(t)
    t.set_defaults(func=run_train)
