"""``gmflow eval``: a sample-quality table of any run, against data that never fed its training.

Toy 2-D runs: sliced-W2 (and its ratio to the data-vs-data floor), MMD and, on the checkerboard,
in-support fraction and cell-mass KL, against reference draws of the evaluation protocol. Image runs:
Fréchet distance, precision / recall and classifier statistics in the data set classifier's feature
space, against the held-out test split. ``--bpd`` (GM image runs): the test split's bits/dim by
GMFlow Eq. 21 instead (:func:`gmflow.metrics.bits_per_dim`; also the spectral model's when the run
has a spectrum net).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..experiments import Run
from ..io import atomic_write_json
from ..metrics import (
    REFERENCE_SEED,
    bits_per_dim,
    cell_mass_kl,
    get_classifier,
    image_metrics,
    in_support_fraction,
    rbf_mmd,
    reference_set,
    sliced_w2_mean,
)
from ..sampling import SOLVERS, SUBSTEP_METHODS
from ..sampling.solvers.substeps import DEFAULT_SUBSTEP_METHOD
from .common import UsageError, check_writable, draw_samples, fmt, positive
from .sample import (
    add_grid_arguments,
    add_guidance_arguments,
    add_run_arguments,
    add_spectral_argument,
    check_solver,
    grid_from_args,
    guidance_from_args,
    load_run_args,
    solver_order,
)

__all__ = ["add_parser"]

EPILOG = """\
examples:
  gmflow eval --ckpt runs/k64                        # gm-sde / gm-ode (order 2) and euler at NFE 1 2 4 8
  gmflow eval --ckpt runs/k64 --solvers gm-sde --nfes 1 2 --n 50000
  gmflow eval --ckpt runs/srf-digits --solvers dpm-solver-2 --nfes 1 2 9   # FD vs the test split
  gmflow eval --ckpt runs/fmnist-gm --solvers gm-ode --nfes 4 8 --n 500  # class-balanced, + class_acc
  gmflow eval --ckpt runs/fmnist-fm --solvers heun --nfes 16 --guidance cfg --scale 2
  gmflow eval --ckpt runs/fmnist-fm --solvers ddpm --nfes 32 --grid shift --shift 0.33   # steps near t = 0
  gmflow eval --ckpt runs/fmnist-gm --bpd --num-t 4                   # test-split bits/dim (Eq. 21)"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval",
        help="sample-quality table of a trained run",
        **fmt(
            "Sample with several solvers and NFEs and print a quality table: for toy 2-D runs "
            "sliced-W2 (and its ratio to the data-vs-data floor), MMD and, for the checkerboard, "
            "in-support fraction and cell-mass KL; for image runs FD, precision and recall against the "
            "held-out test split; class-conditional runs sample every class equally (sample i gets class "
            "i mod num_classes: +-1 per class when --n is not a multiple) and add the classifier's "
            "accuracy on the requested class; --uncond samples the null class instead. Writes the table "
            "as JSON next to the checkpoint.",
            EPILOG,
        ),
    )
    add_run_arguments(e)
    e.add_argument(
        "--solvers",
        nargs="+",
        choices=SOLVERS,
        metavar="SOLVER",
        help=f"any of: {', '.join(SOLVERS)} (default: gm-sde gm-ode euler for GM models, "
        "euler dpm++2m for velocity models)",
    )
    e.add_argument("--nfes", nargs="+", type=positive("--nfes"), default=[1, 2, 4, 8], help="default 1 2 4 8")
    e.add_argument("--order", type=int, choices=(1, 2), default=2, help="order of GM solvers (default 2)")
    e.add_argument(
        "--substep-method",
        choices=SUBSTEP_METHODS,
        help="gm-ode sub-step integrator: pc3 (default), pc2 or euler (the paper's)",
    )
    add_grid_arguments(e)
    e.add_argument(
        "--n", type=positive("--n"), default=None, help="samples per row (default 20000; images 1000)"
    )
    e.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    e.add_argument(
        "--json", metavar="FILE", help="output file (default: CKPT/eval.json, with --bpd CKPT/bpd.json)"
    )
    e.add_argument(
        "--uncond",
        action="store_true",
        help="class-conditional runs: sample the null class (unconditional) instead of every class equally",
    )
    add_guidance_arguments(e)
    add_spectral_argument(e)
    e.add_argument(
        "--bpd",
        action="store_true",
        help="GM image runs: bits/dim of the test split (GMFlow Eq. 21, uniformly dequantised 8-bit levels; "
        "--n images, default all; batches of min(--batch, 256)) instead of the sample table",
    )
    e.add_argument(
        "--num-t", type=positive("--num-t"), default=4, help="--bpd: stratified t draws per image (default 4)"
    )
    e.set_defaults(func=run)


class _ToyScorer:
    """Toy 2-D metrics against reference draws of the evaluation protocol (seed, floor)."""

    def __init__(self, run: Run, n: int) -> None:
        self.name = run.config.data_name
        self.reference, self.floor = reference_set(run.config.dataset("test"), n)
        self.columns = ["sw2", "sw2_ratio", "mmd"] + (
            ["in_support", "cell_kl"] if self.name == "checkerboard" else []
        )
        self.info = {"reference_seed": REFERENCE_SEED, "sw2_floor": self.floor}
        self.summary = f"sw2 floor {self.floor:.4f}; "

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        ok = torch.isfinite(x).all(1)
        xf = x[ok]
        sw2 = sliced_w2_mean(xf, self.reference) if len(xf) >= 2 else math.nan
        row = dict(nonfinite=int((~ok).sum()), sw2=sw2, sw2_ratio=sw2 / self.floor)
        row["mmd"] = rbf_mmd(xf, self.reference) if len(xf) >= 2 else math.nan
        if self.name == "checkerboard":
            row.update(in_support=in_support_fraction(x), cell_kl=cell_mass_kl(x))
        return row


class _ImageScorer:
    """FD / precision / recall in the data set classifier's features, against the test split."""

    def __init__(self, run: Run, n: int, conditional: bool) -> None:
        test = run.config.dataset("test")
        self.reference = test.tensor()
        self.classifier = get_classifier(run.config.data_name)
        dim = self.classifier.feature_dim
        if n <= dim:
            raise UsageError(f"--n: FD in {dim}-d classifier features needs more than {dim} samples, got {n}")
        self.columns = ["fd", "precision", "recall", "confidence"] + (["class_acc"] if conditional else [])
        self.info = {"reference": f"{run.config.data_name} test split ({len(self.reference)} images)"}
        self.summary = f"reference: {self.info['reference']}; "

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        ok = torch.isfinite(x.flatten(1)).all(1)
        x = torch.nan_to_num(x, 0.0, 1.0, -1.0)
        m = image_metrics(x, self.reference, self.classifier, labels=labels)
        return dict(nonfinite=int((~ok).sum()), **{k: m[k] for k in self.columns})


def run(args: argparse.Namespace) -> int:
    r = load_run_args(args)
    shape = r.event_shape
    if r.config.data_name is None:
        raise UsageError(f"run {args.ckpt!r} records no data set to evaluate against")
    if args.bpd:
        return _run_bpd(args, r)
    if shape != (2,) and len(shape) != 3:
        raise UsageError(f"gmflow eval supports 2-D points and images, not samples of shape {shape}")
    solvers = args.solvers or (["gm-sde", "gm-ode", "euler"] if r.head == "gm" else ["euler", "dpm++2m"])
    for s in solvers:
        check_solver(r, s, solver_order(s, args.order), None)
    if args.substep_method is not None and not any("substep_method" in SOLVERS[s].options for s in solvers):
        which = "/".join(n for n, c in SOLVERS.items() if "substep_method" in c.options)
        raise UsageError(f"--substep-method applies to --solvers {which} only")
    if args.uncond and r.num_classes == 0:
        raise UsageError("--uncond: this run is not class-conditional")
    guidance = guidance_from_args(args, r)
    grid = grid_from_args(args)
    if guidance is not None and args.uncond:
        raise UsageError("--guidance needs class-conditional samples; drop --uncond")
    out = Path(args.json) if args.json else Path(args.ckpt) / "eval.json"
    check_writable(out)
    n = args.n or (20000 if shape == (2,) else 1000)
    if r.num_classes > 0:  # every class equally, or the null class
        labels = torch.full((n,), r.num_classes) if args.uncond else torch.arange(n) % r.num_classes
    else:
        labels = None
    conditional = labels is not None and not args.uncond
    scorer = _ToyScorer(r, n) if shape == (2,) else _ImageScorer(r, n, conditional)
    no_spectral = {"spectral": False} if args.no_spectral else {}
    rows = []
    for solver in solvers:
        order = solver_order(solver, args.order)
        extra = {"substep_method": args.substep_method} if "substep_method" in SOLVERS[solver].options else {}
        for nfe in args.nfes:
            t0 = time.perf_counter()
            x = draw_samples(
                r.model, shape, n, args.batch, args.seed, args.device, f"{solver} nfe={nfe}",
                labels=labels, null_label=r.num_classes, solver=solver, nfe=nfe, order=order,
                guidance=guidance, **extra, **grid, **no_spectral,
            )  # fmt: skip
            row: dict[str, Any] = {"solver": solver, "order": order, "nfe": nfe}
            if guidance is not None:  # each guided call is one doubled batch (cond + uncond), one NFE
                row["batch_factor"] = 2
            if extra:
                row["substep_method"] = extra["substep_method"] or DEFAULT_SUBSTEP_METHOD
            row.update(scorer(x, labels if conditional else None), seconds=round(time.perf_counter() - t0, 3))
            rows.append(row)
            cols = [
                "solver",
                "order",
                "nfe",
                *(["batch_factor"] if guidance is not None else []),
                *scorer.columns,
            ]
            _print_row(row, [*cols, "seconds"], header=len(rows) == 1)
    result = {
        "ckpt": str(args.ckpt),
        "step": r.step,
        "weights": "raw" if args.raw else "ema",
        "experiment": r.config.kind,
        "data": r.config.data_name,
        "n": n,
        "seed": args.seed,
        "classes": "none" if labels is None else ("null class" if args.uncond else "balanced"),
        "guidance": None
        if guidance is None
        else {"kind": args.guidance, "scale": args.scale, "orthogonal": args.orthogonal},
        "grid": {"kind": args.grid, **{k: v for k, v in grid.items() if k != "grid"}},
        **scorer.info,
        "rows": rows,
    }
    atomic_write_json(out, result)
    print(f"gmflow: {scorer.summary}wrote {out}", file=sys.stderr)
    return 0


def _run_bpd(args: argparse.Namespace, r: Run) -> int:
    """``--bpd``: bits/dim of the test split (with the true labels for class-conditional runs)."""
    if len(r.event_shape) != 3 or r.head != "gm":
        raise UsageError("--bpd needs a GM image run (bits/dim is the GM's log-likelihood, GMFlow Eq. 21)")
    out = Path(args.json) if args.json else Path(args.ckpt) / "bpd.json"
    check_writable(out)
    test = r.config.dataset("test")
    n = min(args.n or len(test), len(test))
    x0 = test.tensor()[:n].to(args.device)
    cond = {"class_labels": test.labels()[:n].to(args.device)} if r.num_classes > 0 else None
    t0 = time.perf_counter()
    res = bits_per_dim(
        r.model, x0, cond=cond, num_t=args.num_t, batch_size=min(args.batch, 256), bin_width=test.bin_width,
        dequantize=True, spectral=False if args.no_spectral else None,
        generator=torch.Generator(args.device).manual_seed(args.seed),
    )  # fmt: skip
    row: dict[str, Any] = {"bpd": res.bpd, "stderr": res.stderr}
    if res.bpd_spectral is not None:
        row.update(bpd_spectral=res.bpd_spectral, stderr_spectral=res.stderr_spectral)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    _print_row(row, list(row), header=True)
    result = {
        "ckpt": str(args.ckpt), "step": r.step, "weights": "raw" if args.raw else "ema",
        "experiment": r.config.kind, "data": r.config.data_name, "split": "test", "seed": args.seed,
        **res.to_dict(), "seconds": row["seconds"],
    }  # fmt: skip
    atomic_write_json(out, result)
    print(f"gmflow: bits/dim of {n} {r.config.data_name} test images; wrote {out}", file=sys.stderr)
    return 0


def _print_row(row: dict[str, Any], cols: list[str], header: bool) -> None:
    if header:
        print("  ".join(f"{c:>10s}" for c in cols))
    cells = []
    for c in cols:
        v = row[c]
        cells.append(f"{v:>10.4g}" if isinstance(v, float) else f"{v!s:>10s}")
    print("  ".join(cells), flush=True)
