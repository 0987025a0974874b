"""The ``gmflow`` command line: train, sample, eval and bench.

Every user error (bad argument, unknown preset or key, invalid value, missing or corrupt checkpoint,
unwritable output) prints ONE line ``gmflow: error: ...`` on stderr and exits with code 2, before any
output is written. An interrupted training run exits 130 (SIGINT) or 143 (SIGTERM) after saving a
checkpoint; a diverged run exits 1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """A bad command line (reported as one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _fmt(description: str, epilog: str | None = None) -> dict[str, Any]:
    """Wrapped description, verbatim epilog (examples)."""
    return {
        "formatter_class": argparse.RawDescriptionHelpFormatter,
        "description": textwrap.fill(description, 88),
        "epilog": epilog,
    }


def _positive(name: str):
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return conv


TRAIN_EPILOG = """\
examples:
  gmflow train --list-presets
  gmflow train --preset toy-gmflow --out runs/k64              # run again to resume
  gmflow train --preset toy-smoke --set steps=50 model.num_components=16 --dry-run
  gmflow train --preset toy-fm --config my.yaml --set lr=1e-3
  torchrun --standalone --nproc_per_node=2 -m gmflow train --preset toy-gmflow --out runs/ddp

Ctrl-C saves a checkpoint at the current step; the same command then continues the run."""

SAMPLE_EPILOG = """\
examples:
  gmflow sample --ckpt runs/k64 --solver gm-sde --order 2 --nfe 4 --n 100000 --png k64.png
  gmflow sample --ckpt runs/fm --solver euler --nfe 8 --out fm.npy --raw"""

EVAL_EPILOG = """\
examples:
  gmflow eval --ckpt runs/k64                        # gm-sde / gm-ode (order 2) and euler at NFE 1 2 4 8
  gmflow eval --ckpt runs/k64 --solvers gm-sde --nfes 1 2 --n 50000"""


def build_parser() -> argparse.ArgumentParser:
    from .sampling import SOLVERS

    p = _Parser(
        prog="gmflow",
        **_fmt(
            "Few-step generative flows (GMFlow, Simple ReFlow, flow matching): train, sample, "
            "evaluate and benchmark models.",
            "run 'gmflow COMMAND --help' for details and examples",
        ),
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model from a preset (resumes automatically)",
        **_fmt(
            "Train a model from a named preset plus overrides. Running the same command again resumes "
            "from the checkpoint in --out.",
            TRAIN_EPILOG,
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
        help="override config keys, e.g. steps=2000 model.num_components=8 (applied after --config)",
    )
    t.add_argument("--out", metavar="DIR", help="run directory (default: runs/PRESET)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--format", choices=("yaml", "json"), default="yaml", help="--dry-run output format")
    t.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser(
        "sample",
        help="draw samples from a trained model",
        **_fmt(
            "Draw samples from a checkpoint (EMA weights by default) with any solver; save them as "
            ".pt/.npy and, for 2-D data, a histogram PNG.",
            SAMPLE_EPILOG,
        ),
    )
    _ckpt_args(s)
    s.add_argument(
        "--solver", required=True, choices=SOLVERS, metavar="SOLVER", help=f"one of: {', '.join(SOLVERS)}"
    )
    s.add_argument("--nfe", type=_positive("--nfe"), required=True, help="network evaluations per sample")
    s.add_argument("--order", type=int, choices=(1, 2), default=1, help="GM solvers: 1st or 2nd order")
    s.add_argument(
        "--substeps", type=_positive("--substeps"), help="gm-ode sub-steps (default ceil(128/nfe))"
    )
    s.add_argument("--n", type=_positive("--n"), default=10000, help="number of samples (default 10000)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    s.add_argument("--out", metavar="FILE", help="samples file, .pt or .npy (default: in the run directory)")
    s.add_argument("--png", metavar="FILE", help="histogram image (default: next to --out, 2-D data only)")
    s.set_defaults(func=_cmd_sample)

    e = sub.add_parser(
        "eval",
        help="sample quality table for toy 2-D models",
        **_fmt(
            "Sample with several solvers and NFEs and print sliced-W2 (and its ratio to the "
            "data-vs-data floor), MMD and, for the checkerboard, in-support fraction and cell-mass KL. "
            "Writes the table as JSON next to the checkpoint.",
            EVAL_EPILOG,
        ),
    )
    _ckpt_args(e)
    e.add_argument(
        "--solvers",
        nargs="+",
        choices=SOLVERS,
        metavar="SOLVER",
        help=f"any of: {', '.join(SOLVERS)} (default: gm-sde gm-ode euler for GM models, "
        "euler dpm++2m for velocity models)",
    )
    e.add_argument(
        "--nfes", nargs="+", type=_positive("--nfes"), default=[1, 2, 4, 8], help="default 1 2 4 8"
    )
    e.add_argument("--order", type=int, choices=(1, 2), default=2, help="order of GM solvers (default 2)")
    e.add_argument("--n", type=_positive("--n"), default=20000, help="samples per row (default 20000)")
    e.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    e.add_argument("--json", metavar="FILE", help="output file (default: CKPT/eval.json)")
    e.set_defaults(func=_cmd_eval)

    b = sub.add_parser(
        "bench",
        help="reproducible benchmarks (JSON + figures)",
        **_fmt(
            "Run a benchmark script; 'gmflow bench NAME --help' lists its options.",
            "benchmarks:\n"
            "  toy2d   FM vs GMFlow (K = 1, 8, 64) on the checkerboard, all solvers and NFEs\n"
            "  oracle  every solver with the exact posterior of a ring GMM (no training)\n"
            "  reflow  Simple ReFlow ablation ladder (checkerboard, ring GMM, digits)\n"
            "  pairs   ReFlow pair accuracy vs cost: GMFlow teacher + gm-ode vs FM teacher\n\n"
            "examples:\n"
            "  gmflow bench toy2d --preset quick --out runs/toy2d-quick\n"
            "  gmflow bench oracle --out runs/oracle",
        ),
    )
    b.add_argument("name", choices=BENCHMARKS, help="benchmark: " + ", ".join(BENCHMARKS))
    b.add_argument("args", nargs=argparse.REMAINDER, help="benchmark options")
    b.set_defaults(func=_cmd_bench)

    from .reflow.cli import add_reflow_subparser

    add_reflow_subparser(sub)  # gmflow reflow {pairs,train}
    return p


def _ckpt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="DIR", help="run directory written by 'gmflow train'")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument(
        "--batch", type=_positive("--batch"), default=8192, help="samples per solver call (default 8192)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


# ------------------------------------------------------------------------------------------ train
def _cmd_train(args: argparse.Namespace) -> int:
    from .train import PRESETS, apply_overrides, apply_sets, get_preset, load_overrides, train

    if args.list_presets:
        for name, c in PRESETS.items():
            m = c.model
            k = f"K={m.num_components}" if m.head == "gm" else "velocity head"
            print(
                f"{name:22s} loss={c.loss:10s} {k:14s} {m.depth}x{m.width}  batch={c.batch_size} "
                f"steps={c.steps} {c.optimizer} lr={c.lr:g} ema={c.ema}"
            )
        return 0
    cfg = get_preset(args.preset)
    if args.config:
        cfg = apply_overrides(cfg, load_overrides(args.config))
    cfg = apply_sets(cfg, args.sets)
    if args.out:
        cfg = apply_sets(cfg, [f"out_dir={args.out}"])
    if cfg.out_dir is None:
        cfg = apply_sets(cfg, [f"out_dir={Path('runs') / args.preset}"])
    cfg.validate()
    if args.dry_run:
        d = cfg.to_dict()
        if args.format == "json":
            print(json.dumps(d, indent=2))
        else:
            import yaml

            print(yaml.safe_dump(d, sort_keys=False), end="")
        return 0
    res = train(cfg, progress=not args.no_progress, verbose=True)
    if _is_main_rank():
        print(
            f"gmflow: trained to step {res.step} in {res.out_dir} (last loss {res.last_loss:.4f}, "
            f"median {res.median_step_ms:.1f} ms/step)",
            file=sys.stderr,
        )
    return 0


# ----------------------------------------------------------------------------------------- sample
def _load(args: argparse.Namespace):
    from .train import load_model

    return load_model(args.ckpt, use_ema=not args.raw, device=args.device)


def _check_solver(cfg: Any, solver: str, order: int, substeps: int | None) -> None:
    from .sampling import SOLVERS

    cls = SOLVERS[solver]
    if cls.needs_gm and cfg.model.head != "gm":
        others = ", ".join(n for n, c in SOLVERS.items() if not c.needs_gm)
        raise UsageError(
            f"solver {solver!r} needs a GM model; this checkpoint has a velocity head (use one of {others})"
        )
    if order not in cls.orders:
        which = "/".join(n for n, c in SOLVERS.items() if order in c.orders)
        raise UsageError(f"--order {order} applies to {which} only, not {solver!r}")
    if substeps is not None and "substeps" not in cls.options:
        raise UsageError("--substeps applies to --solver gm-ode only")


def _check_writable(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {str(path)!r}: directory {str(parent)!r} is missing or not writable")


def _draw(model, n: int, batch: int, seed: int, device: str, desc: str, **kw: Any):
    """``n`` samples in chunks of ``batch``.

    The noise is drawn up front from ``seed``, so deterministic solvers give the same samples for any
    ``batch``; stochastic ones (gm-sde, ddpm) continue the same generator chunk by chunk.
    """
    import torch
    from tqdm.auto import tqdm

    from . import sample

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, model.channels, generator=g)
    out = []
    for i in tqdm(range(0, n, batch), desc=desc, leave=False, file=sys.stderr, disable=n <= batch):
        out.append(sample(model, noise[i : i + batch].to(device), generator=g, **kw).cpu())
    return torch.cat(out)


def _save_samples(x, path: Path) -> None:
    import numpy as np
    import torch

    from .io import atomic_write_bytes

    buf = io.BytesIO()
    if path.suffix == ".npy":
        np.save(buf, x.numpy())
    else:
        torch.save(x, buf)
    atomic_write_bytes(path, buf.getvalue())


def _cmd_sample(args: argparse.Namespace) -> int:
    from .sampling import SOLVERS

    model, cfg = _load(args)
    _check_solver(cfg, args.solver, args.order, args.substeps)
    tag = (
        f"{args.solver}_o{args.order}_nfe{args.nfe}"
        if len(SOLVERS[args.solver].orders) > 1
        else f"{args.solver}_nfe{args.nfe}"
    )
    out = Path(args.out) if args.out else Path(args.ckpt) / f"samples_{tag}.pt"
    if out.suffix not in (".pt", ".npy"):
        raise UsageError(f"--out must end in .pt or .npy, got {str(out)!r}")
    png = Path(args.png) if args.png else (out.with_suffix(".png") if model.channels == 2 else None)
    for p in (out, png):
        if p is not None:
            _check_writable(p)
    kw = dict(solver=args.solver, nfe=args.nfe, order=args.order, substeps=args.substeps)
    x = _draw(model, args.n, args.batch, args.seed, args.device, f"sampling {tag}", **kw)
    _save_samples(x, out)
    msg = f"gmflow: wrote {len(x)} samples to {out}"
    if png is not None:
        from .viz import histogram_grid

        histogram_grid({tag: {args.nfe: x}}, png, nfes=[args.nfe], title=f"{cfg.data.name}: {tag}")
        msg += f" and {png}"
    print(msg, file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------- eval
def _cmd_eval(args: argparse.Namespace) -> int:
    import math

    import torch

    from .io import atomic_write_json
    from .metrics import (
        REFERENCE_SEED,
        cell_mass_kl,
        in_support_fraction,
        rbf_mmd,
        reference_set,
        sliced_w2_mean,
    )
    from .sampling import SOLVERS
    from .train import read_manifest

    model, cfg = _load(args)
    if model.channels != 2:
        raise UsageError("gmflow eval supports toy 2-D models only")
    gm = cfg.model.head == "gm"
    solvers = args.solvers or (["gm-sde", "gm-ode", "euler"] if gm else ["euler", "dpm++2m"])
    for s in solvers:
        _check_solver(cfg, s, args.order if args.order in SOLVERS[s].orders else 1, None)
    out = Path(args.json) if args.json else Path(args.ckpt) / "eval.json"
    _check_writable(out)
    reference, floor = reference_set(cfg.data.name, args.n)
    checker = cfg.data.name == "checkerboard"
    rows = []
    for solver in solvers:
        order = args.order if args.order in SOLVERS[solver].orders else 1
        for nfe in args.nfes:
            t0 = time.perf_counter()
            x = _draw(
                model,
                args.n,
                args.batch,
                args.seed,
                args.device,
                f"{solver} nfe={nfe}",
                solver=solver,
                nfe=nfe,
                order=order,
            )
            row: dict[str, Any] = {
                "solver": solver,
                "order": order,
                "nfe": nfe,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            ok = torch.isfinite(x).all(1)
            row["nonfinite"] = int((~ok).sum())
            xf = x[ok]
            sw2 = sliced_w2_mean(xf, reference) if len(xf) >= 2 else math.nan
            row.update(
                sw2=sw2, sw2_ratio=sw2 / floor, mmd=rbf_mmd(xf, reference) if len(xf) >= 2 else math.nan
            )
            if checker:
                row.update(in_support=in_support_fraction(x), cell_kl=cell_mass_kl(x))
            rows.append(row)
            _print_row(row, header=len(rows) == 1, checker=checker)
    step = read_manifest(args.ckpt)["step"]
    result = {
        "ckpt": str(args.ckpt),
        "step": step,
        "weights": "raw" if args.raw else "ema",
        "data": cfg.data.name,
        "n": args.n,
        "seed": args.seed,
        "reference_seed": REFERENCE_SEED,
        "sw2_floor": floor,
        "rows": rows,
    }
    atomic_write_json(out, result)
    print(f"gmflow: sw2 floor {floor:.4f}; wrote {out}", file=sys.stderr)
    return 0


def _print_row(row: dict[str, Any], header: bool, checker: bool) -> None:
    cols = ["solver", "order", "nfe", "sw2", "sw2_ratio", "mmd"] + (
        ["in_support", "cell_kl"] if checker else []
    )
    cols.append("seconds")
    if header:
        print("  ".join(f"{c:>10s}" for c in cols))
    cells = []
    for c in cols:
        v = row[c]
        cells.append(f"{v:>10.4g}" if isinstance(v, float) else f"{v!s:>10s}")
    print("  ".join(cells), flush=True)


# ------------------------------------------------------------------------------------------ bench
BENCHMARKS = ("toy2d", "oracle", "reflow", "pairs")


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    try:
        mod = importlib.import_module(f"gmflow.bench.{args.name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("gmflow.bench"):
            raise UsageError(
                f"benchmark {args.name!r} is not available (module gmflow.bench.{args.name} is missing)"
            ) from None
        raise
    p = _Parser(
        prog=f"gmflow bench {args.name}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None,
    )
    mod.add_arguments(p)
    return int(mod.run(p.parse_args(args.args)) or 0)


# ------------------------------------------------------------------------------------------- main
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gmflow`` console script; returns the exit code."""
    from .reflow import PairError, ReflowError
    from .train import CheckpointError, ConfigError, TrainingDivergedError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.func(args)
    except (UsageError, ConfigError, CheckpointError, PairError, ReflowError) as e:
        print(f"gmflow: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except TrainingDivergedError as e:
        print(f"gmflow: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"gmflow: {_one_line(e) if str(e) else 'interrupted'}", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
    except BrokenPipeError:  # output piped into e.g. `head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SystemExit as e:  # --help, or a benchmark calling sys.exit
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
