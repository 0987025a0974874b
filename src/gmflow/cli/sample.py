"""``gmflow sample``: draw samples from any trained run (toy 2-D, image or ReFlow)."""

from __future__ import annotations

import argparse
import inspect
import io
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..experiments import Run, load_run
from ..flow import GRID_KINDS, time_grid
from ..guidance import CFG, ProbabilisticGuidance
from ..io import atomic_write_bytes
from ..sampling import SOLVERS, SUBSTEP_METHODS
from ..viz import histogram_grid, image_grid
from .common import UsageError, check_writable, draw_samples, fmt, one_line, positive, positive_float

__all__ = [
    "add_grid_arguments",
    "add_parser",
    "add_run_arguments",
    "add_spectral_argument",
    "check_solver",
    "grid_from_args",
    "load_run_args",
    "solver_order",
]

# The sampler a run gets when --solver is not given: the best few-step solver of its head in the image and
# toy benchmarks (docs/RESULTS.md §3, §12), second order for the GM solvers.
DEFAULT_SOLVER = {"gm": "gm-ode", "velocity": "dpm++2m"}

EPILOG = """\
examples:
  gmflow sample --ckpt runs/fmnist --classes 0-9 --per-class 8 --png grid.png  # default solver, NFE 8
  gmflow sample --ckpt runs/k64 --solver gm-sde --order 2 --nfe 4 --n 100000 --png k64.png
  gmflow sample --ckpt runs/fm --solver euler --nfe 8 --out fm.npy --raw
  gmflow sample --ckpt runs/fmnist-spec --solver gm-sde --order 2 --nfe 8 --no-spectral   # per-pixel draws
  gmflow sample --ckpt runs/srf-digits --solver dpm-solver-2 --nfe 9 --n 64   # image grid PNG
  gmflow sample --ckpt runs/fmnist-fm --solver ddpm --nfe 32 --grid shift --shift 0.33  # steps near t = 0
  gmflow sample --ckpt runs/fmnist --solver gm-sde --order 2 --nfe 8 --classes 0-9 --per-class 8 \\
      --guidance probabilistic --scale 0.3 --orthogonal 1 --png grid.png     # a row per class"""


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="DIR", help="run directory written by 'gmflow train'")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument(
        "--batch", type=positive("--batch"), default=8192, help="samples per solver call (default 8192)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "sample",
        help="draw samples from a trained model",
        **fmt(
            "Draw samples from a run directory (EMA weights by default) with any solver; save them as "
            ".pt/.npy and a PNG (a histogram for 2-D data, an image grid for images).",
            EPILOG,
        ),
    )
    add_run_arguments(s)
    s.add_argument(
        "--solver",
        choices=SOLVERS,
        metavar="SOLVER",
        help=f"one of: {', '.join(SOLVERS)} (default: {DEFAULT_SOLVER['gm']} for GM runs, "
        f"{DEFAULT_SOLVER['velocity']} for velocity runs)",
    )
    s.add_argument(
        "--nfe", type=positive("--nfe"), default=8, help="network evaluations per sample (default 8)"
    )
    s.add_argument(
        "--order", type=int, choices=(1, 2), default=None, help="GM solvers: 1st or 2nd order (default 2)"
    )
    add_substep_arguments(s)
    add_grid_arguments(s)
    s.add_argument("--n", type=positive("--n"), default=10000, help="number of samples (default 10000)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    s.add_argument("--out", metavar="FILE", help="samples file, .pt or .npy (default: in the run directory)")
    s.add_argument("--png", metavar="FILE", help="figure (default: next to --out)")
    s.add_argument(
        "--classes",
        metavar="SPEC",
        help="class-conditional runs: class ids, e.g. 0-9 or 1,3,5 (one grid row per class)",
    )
    s.add_argument(
        "--per-class", type=positive("--per-class"), default=8, help="samples per class (default 8)"
    )
    add_guidance_arguments(s)
    add_spectral_argument(s)
    s.set_defaults(func=run)


def add_spectral_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-spectral",
        action="store_true",
        help="gm-sde: draw every pixel independently even if the run has a spectrum net "
        "(default: spectral sampling with the run's spectrum net, model.spectral=true runs)",
    )


def add_guidance_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--guidance",
        choices=("cfg", "probabilistic"),
        help="class-conditional runs: classifier-free (--scale w, 1 = none) or probabilistic (0 <= w~ < 1)",
    )
    p.add_argument("--scale", type=float, default=None, help="guidance scale (required with --guidance)")
    p.add_argument(
        "--orthogonal", type=float, default=0.0, help="orthogonal projection in [0, 1] (default 0)"
    )


def guidance_from_args(args: argparse.Namespace, run: Run) -> CFG | ProbabilisticGuidance | None:
    """The guidance object of ``--guidance/--scale/--orthogonal`` (one-line usage errors)."""
    if args.guidance is None:
        if args.scale is not None or args.orthogonal:
            raise UsageError("--scale / --orthogonal need --guidance cfg or --guidance probabilistic")
        return None
    if run.num_classes == 0:
        raise UsageError(
            "--guidance: this run is not class-conditional (no unconditional input to guide with)"
        )
    if args.scale is None:
        raise UsageError(f"--guidance {args.guidance} needs --scale")
    if args.guidance == "probabilistic" and run.head != "gm":
        raise UsageError("--guidance probabilistic needs a GM model; use --guidance cfg")
    try:
        if args.guidance == "cfg":
            return CFG(args.scale, orthogonal=args.orthogonal)
        return ProbabilisticGuidance(args.scale, orthogonal=args.orthogonal)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--scale/--orthogonal: {one_line(e)}") from None


def parse_classes(spec: str, num_classes: int) -> list[int]:
    """``"0-9"`` / ``"1,3,5"`` / ``"2"`` -> class ids, each in ``[0, num_classes)``."""
    ids: list[int] = []
    try:
        for part in spec.split(","):
            lo, sep, hi = part.strip().partition("-")
            ids += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise UsageError(f"--classes: expected ids like 0-9 or 1,3,5, got {spec!r}") from None
    bad = [c for c in ids if not 0 <= c < num_classes]
    if not ids or bad:
        raise UsageError(f"--classes: ids must lie in [0, {num_classes - 1}], got {spec!r}")
    return ids


def load_run_args(args: argparse.Namespace) -> Run:
    return load_run(args.ckpt, use_ema=not args.raw, device=args.device)


def add_substep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--substeps",
        type=positive("--substeps"),
        help="gm-ode sub-steps per network step (default: ceil(16 (t - t')) for pc2/pc3, i.e. ceil(16/nfe) "
        "on the uniform grid; ceil(128/nfe) for euler)",
    )
    p.add_argument(
        "--substep-method",
        choices=SUBSTEP_METHODS,
        help="gm-ode sub-step integrator: pc3 (default), pc2 or euler (the paper's)",
    )


def add_grid_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grid",
        choices=GRID_KINDS,
        default="uniform",
        help="time grid of the solver: uniform (default); shift: the SD3 warp t' = s t / (1 + (s - 1) t) "
        "of the uniform grid (--shift s; s < 1 packs the steps near the data t = 0, s > 1 near the noise); "
        "sigmoid: the Simple ReFlow grid, steps packed at both ends (--kappa, default 20)",
    )
    p.add_argument("--shift", type=positive_float("--shift"), help="--grid shift: the warp s > 0")
    p.add_argument("--kappa", type=positive_float("--kappa"), help="--grid sigmoid: the steepness > 0")


def grid_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`gmflow.sample` keywords of ``--grid/--shift/--kappa`` (``{}`` for the uniform grid)."""
    for opt, kind in (("shift", "shift"), ("kappa", "sigmoid")):
        if getattr(args, opt) is not None and args.grid != kind:
            raise UsageError(f"--{opt} applies to --grid {kind} only")
    if args.grid == "shift":
        if args.shift is None:
            raise UsageError("--grid shift needs --shift S (S > 0; S < 1 packs the steps near t = 0)")
        return {"grid": "shift", "shift": args.shift}
    if args.grid == "sigmoid":
        default = inspect.signature(time_grid).parameters["kappa"].default
        return {"grid": "sigmoid", "kappa": default if args.kappa is None else args.kappa}
    return {}


def grid_tag(grid: dict[str, Any]) -> str:
    """``""`` for the uniform grid, else e.g. ``"_shift0.33"`` / ``"_sigmoid20"`` (file names, titles)."""
    if not grid:
        return ""
    return f"_{grid['grid']}{grid.get('shift', grid.get('kappa')):g}"


def check_solver(
    run: Run, solver: str, order: int, substeps: int | None, substep_method: str | None = None
) -> None:
    """One-line usage errors for a solver that does not fit the run or the options (asks traits)."""
    cls = SOLVERS[solver]
    if cls.needs_gm and run.head != "gm":
        others = ", ".join(n for n, c in SOLVERS.items() if not c.needs_gm)
        raise UsageError(
            f"solver {solver!r} needs a GM model; this run has a velocity head (use one of {others})"
        )
    if order not in cls.orders:
        which = "/".join(n for n, c in SOLVERS.items() if order in c.orders)
        raise UsageError(f"--order {order} applies to {which} only, not {solver!r}")
    for opt, val in (("substeps", substeps), ("substep_method", substep_method)):
        if val is not None and opt not in cls.options:
            which = "/".join(n for n, c in SOLVERS.items() if opt in c.options)
            raise UsageError(f"--{opt.replace('_', '-')} applies to --solver {which} only")


def solver_order(solver: str, order: int) -> int:
    """``order`` if the solver has it, else its only order (GM solvers have 1 and 2)."""
    return order if order in SOLVERS[solver].orders else SOLVERS[solver].orders[0]


def _save_samples(x: torch.Tensor, path: Path, labels: torch.Tensor | None) -> None:
    """``.pt``: the samples tensor, or ``{"samples", "labels"}`` for class-conditional runs;
    ``.npy``: the samples (labels, if any, in ``<name>.labels.npy`` next to it)."""
    if path.suffix == ".npy":
        for p, arr in ((path, x), (path.with_suffix(".labels.npy"), labels)):
            if arr is not None:
                buf = io.BytesIO()
                np.save(buf, arr.numpy())
                atomic_write_bytes(p, buf.getvalue())
        return
    buf = io.BytesIO()
    torch.save(x if labels is None else {"samples": x, "labels": labels}, buf)
    atomic_write_bytes(path, buf.getvalue())


def run(args: argparse.Namespace) -> int:
    r = load_run_args(args)
    solver = args.solver or DEFAULT_SOLVER[r.head]
    order = args.order if args.order is not None else solver_order(solver, 2)
    check_solver(r, solver, order, args.substeps, args.substep_method)
    several_orders = len(SOLVERS[solver].orders) > 1
    tag = f"{solver}_o{order}_nfe{args.nfe}" if several_orders else f"{solver}_nfe{args.nfe}"
    grid = grid_from_args(args)
    tag += grid_tag(grid)
    if args.no_spectral:
        tag += "_nospectral"
    out = Path(args.out) if args.out else Path(args.ckpt) / f"samples_{tag}.pt"
    if out.suffix not in (".pt", ".npy"):
        raise UsageError(f"--out must end in .pt or .npy, got {str(out)!r}")
    shape = r.event_shape
    figure = shape == (2,) or len(shape) == 3
    png = Path(args.png) if args.png else (out.with_suffix(".png") if figure else None)
    if png is not None and not figure:
        raise UsageError(f"--png: no figure for samples of shape {shape} (2-D points or images only)")
    for p in (out, png):
        if p is not None:
            check_writable(p)
    guidance = guidance_from_args(args, r)
    labels = None
    n = args.n
    if args.classes is not None:
        if r.num_classes == 0:
            raise UsageError("--classes: this run is not class-conditional")
        ids = parse_classes(args.classes, r.num_classes)
        labels = torch.tensor(ids).repeat_interleave(args.per_class)
        n = len(labels)
    elif r.num_classes > 0:  # class-conditional run without --classes: cycle through every class
        labels = torch.arange(n) % r.num_classes
    kw = dict(
        solver=solver, nfe=args.nfe, order=order, substeps=args.substeps,
        substep_method=args.substep_method, guidance=guidance, **grid,
    )  # fmt: skip
    if args.no_spectral:
        kw["spectral"] = False
    x = draw_samples(
        r.model, shape, n, args.batch, args.seed, args.device, f"sampling {tag}",
        labels=labels, null_label=r.num_classes, **kw,
    )  # fmt: skip
    _save_samples(x, out, labels)
    msg = f"gmflow: wrote {len(x)} samples to {out}"
    if png is not None:
        title = f"{r.config.data_name or 'samples'}: {tag}"
        if shape == (2,):
            histogram_grid({tag: {args.nfe: x}}, png, nfes=[args.nfe], title=title)
        else:
            if args.classes is not None:  # one row per class
                image_grid(torch.nan_to_num(x, 0.0).clamp(-1.0, 1.0), png, nrow=args.per_class)
            else:
                shown = torch.nan_to_num(x[:64], 0.0).clamp(-1.0, 1.0)
                image_grid(shown, png, nrow=math.ceil(math.sqrt(len(shown))))
        msg += f" and {png}"
    print(msg, file=sys.stderr)
    return 0
