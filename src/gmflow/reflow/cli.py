"""``gmflow reflow pairs`` and ``gmflow reflow train``: argparse builders and handlers.

Wire into the main parser with :func:`add_reflow_subparser` (or the four functions separately). Every
bad input (missing/corrupt checkpoint or shards, teacher/pair mismatch, rho outside [0, 1], kappa <= 0,
r outside (0, 1], unknown keys) prints ONE line ``gmflow: error: ...`` on stderr and returns 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..data import DATASETS, load_dataset

__all__ = [
    "add_pairs_arguments",
    "run_pairs",
    "add_train_arguments",
    "run_train",
    "add_reflow_subparser",
    "load_teacher",
]

PAIRS_EPILOG = """\
examples:
  gmflow reflow pairs --teacher runs/fm --direction backward --n 100000 --solver dpm++2m --nfe 32 \\
      --out pairs/bwd                                  # run again to resume
  gmflow reflow pairs --teacher runs/fm --direction forward --n 20000 --solver heun --nfe 33 \\
      --data checkerboard --out pairs/fwd"""

TRAIN_EPILOG = """\
examples:
  gmflow reflow train --teacher runs/fm --pairs pairs/bwd --out runs/2rf           # 2-rectified flow
  gmflow reflow train --teacher runs/fm --pairs pairs/bwd --forward-pairs pairs/fwd --rho 0.4 \\
      --out runs/srf --set normalize=true time_sampler=pow10 steps=5000 --dry-run
  gmflow reflow train --recipe simple --teacher runs/unet --pairs p/bwd --forward-pairs p/fwd \\
      --real-data digits16 --set projection_alpha=0.5 student_dropout=0.05 --out runs/srf-digits"""


def _fail(msg: str) -> int:
    print(f"gmflow: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


def _real_data(name: str, n: int | None, arg: str) -> Any:
    """:func:`gmflow.data.load_dataset` ``(name)``; a finite set (digits) becomes its image tensor when ``n``
    is ``None`` or at most its size (each real image once, in order), else stays a sampler."""
    try:
        ds = load_dataset(name)
    except ValueError as e:
        raise ValueError(f"{arg}: {e}") from None
    return ds.tensor() if hasattr(ds, "tensor") and (n is None or n <= len(ds)) else ds


def load_teacher(path: str | Path, *, use_ema: bool = True, device: str = "cpu") -> Any:
    """:func:`gmflow.train.load_model` (eval mode, EMA weights by default), also for ``SmallUNet`` runs
    while :mod:`gmflow.nn` does not export that class (``build_model`` looks classes up there)."""
    from ..train import CheckpointError, load_checkpoint, load_model

    try:
        return load_model(path, use_ema=use_ema, device=device)[0]
    except CheckpointError as e:
        ck = load_checkpoint(path)
        info = ck.config.get("model") or {}
        if info.get("class") != "SmallUNet":
            raise
        from ..nn.unet import SmallUNet

        try:
            model = SmallUNet.from_config(info["config"])
            model.load_state_dict(ck.ema_state if use_ema and ck.ema_state is not None else ck.model_state)
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise e from None
        return model.to(device).eval().requires_grad_(False)


def _event_shape(model: Any) -> tuple[int, ...]:
    if hasattr(model, "event_shape"):
        return tuple(int(v) for v in model.event_shape)
    if hasattr(model, "channels"):
        return (int(model.channels),)
    raise ValueError("cannot tell the teacher's sample shape; pass --data")


def _check_sampling(kappa: float, r: float) -> None:
    if not kappa > 0:
        raise ValueError(f"--kappa: the sigmoid-grid kappa must be > 0, got {kappa}")
    if not 0.0 < r <= 1.0:
        raise ValueError(f"--r: the DPM-Solver-2 intermediate point r must be in (0, 1], got {r}")


# ------------------------------------------------------------------------------------------ pairs
def add_pairs_arguments(p: argparse.ArgumentParser) -> None:
    from ..flow import GRID_KINDS
    from ..sampling import SOLVERS

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
    """Generate (or resume) a pair directory from a teacher checkpoint; 0 on success, 2 on bad input."""
    from .pairs import generate_pairs, teacher_hash

    try:
        _check_sampling(args.kappa, args.r)
        if args.n < 1 or args.nfe < 1 or args.shard_size < 1:
            raise ValueError("--n, --nfe and --shard-size must be >= 1")
        solver = args.solver or ("dpm++2m" if args.direction == "backward" else "heun")
        teacher = load_teacher(args.teacher, use_ema=not args.raw, device=args.device)
        data = None
        if args.direction == "forward" and args.data is None:
            raise ValueError("--data: forward pairs start from real data; name the data set")
        if args.data is not None:
            data = _real_data(args.data, args.n, "--data")
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
    except (ValueError, TypeError, ImportError) as e:  # PairError, ConfigError, CheckpointError included
        return _fail(e)
    print(
        f"gmflow: {m.count} {args.direction} pairs ({solver}, nfe {args.nfe}) in {args.out}", file=sys.stderr
    )
    return 0


# ------------------------------------------------------------------------------------------ train
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .train import RECIPES

    p.epilog = TRAIN_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--teacher", required=True, metavar="CKPT_DIR", help="teacher run (the student starts from it)"
    )
    p.add_argument("--pairs", required=True, metavar="DIR", help="backward pair directory")
    p.add_argument("--forward-pairs", default=None, metavar="DIR", help="forward pair directory")
    p.add_argument("--rho", type=float, default=None, help="forward-pair ratio in [0, 1]")
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (resumed if it exists)")
    p.add_argument("--recipe", default="2rf", choices=tuple(RECIPES), help="starting config (default 2rf)")
    p.add_argument("--set", dest="sets", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--real-data", default=None, help="real x0 for projection_alpha > 0 (toy name, digits16)")
    p.add_argument("--raw", action="store_true", help="start from the teacher's raw weights, not its EMA")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _resolve_config(args: argparse.Namespace):
    from .train import RECIPES, apply_reflow_sets

    cfg = apply_reflow_sets(RECIPES[args.recipe], list(args.sets))
    extra = []
    if args.rho is not None:
        extra.append(f"rho={args.rho}")
    if args.out is not None:
        extra.append(f"out_dir={args.out}")
    cfg = apply_reflow_sets(cfg, extra)
    if cfg.out_dir is None:
        cfg = apply_reflow_sets(cfg, [f"out_dir={Path('runs') / ('reflow-' + args.recipe)}"])
    return cfg.validate()


def run_train(args: argparse.Namespace) -> int:
    """Train a ReFlow student from a teacher checkpoint and pair directories; 0 on success, 2 on bad input."""
    from ..train.checkpoint import read_manifest as read_ckpt
    from .dataset import PairDataset
    from .store import read_manifest
    from .train import train_reflow

    try:
        cfg = _resolve_config(args)
        if cfg.rho > 0 and args.forward_pairs is None:
            raise ValueError(f"rho={cfg.rho} > 0 draws forward pairs: pass --forward-pairs DIR")
        if cfg.projection_alpha > 0 and args.real_data is None:
            raise ValueError("projection_alpha > 0 projects onto real data: pass --real-data NAME")
        if args.dry_run:
            read_ckpt(args.teacher)
            info = {"reflow": cfg.to_dict(), "pairs": {"backward": read_manifest(args.pairs).settings()}}
            if args.forward_pairs is not None:
                info["pairs"]["forward"] = read_manifest(args.forward_pairs).settings()
            print(json.dumps(info, indent=2))
            return 0
        teacher = load_teacher(args.teacher, use_ema=not args.raw)
        pairs = PairDataset(args.pairs, args.forward_pairs, rho=cfg.rho)
        real = _real_data(args.real_data, None, "--real-data") if args.real_data is not None else None
        res = train_reflow(cfg, teacher, pairs, real_data=real, progress=not args.no_progress, verbose=True)
    except (ValueError, TypeError, ImportError) as e:  # ConfigError, PairError, CheckpointError, ReflowError
        return _fail(e)
    print(
        f"gmflow: trained the ReFlow student to step {res.step} in {res.out_dir} "
        f"(last loss {res.last_loss:.4g}, median {res.median_step_ms:.1f} ms/step)",
        file=sys.stderr,
    )
    return 0


def add_reflow_subparser(sub: Any) -> argparse.ArgumentParser:
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
    return r
