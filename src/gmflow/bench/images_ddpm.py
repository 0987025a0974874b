"""``gmflow bench images --part ddpm``: unconditional GMFlow K = 2 + GM-SDE 2 vs DDPM (Table 5 analogue).

    gmflow bench images --part ddpm --preset quick --out runs/images-quick      # run again to resume

Trains an **unconditional** GM-DiT (K = 2, transition loss lambda = 0.5) and its flow-matching twin
(velocity head, L2) with the identical trunk, budget and recipe (logit-normal t, EMA) of the main part,
without labels: ``model.conditional=false`` builds a GM-DiT whose class table holds only the null row
(a learned constant), so no label ever reaches the network. (The paper's CIFAR-10 model is a U-Net;
here the DiT trunk is kept because it is the main part's trunk and, at 32x32 on CPU, a forward pass
of the ``SmallUNet`` costs about 5x as much, which would not fit NFE 100 into the time budget.)

Samples at NFE 10 / 25 / 50 / 100 with

* GMFlow: ``gm-sde`` order 2;
* FM: ``ddpm`` with ``variance="small"`` and ``variance="large"`` (docs/maths/solvers.md),

and scores them against the **test** split with the cached classifier: FD (``draws`` noise draws at the
smallest NFE, one elsewhere), precision and recall. Writes to ``DIR/ddpm/``: ``results.json`` (one
record per method x NFE x draw, rewritten after each cell), ``results.md``, ``fd_vs_nfe.png`` and
sample grids at the smallest NFE; the two runs live in ``DIR/ddpm/models/{gmflow,fm}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..experiments import load_network, run_experiment
from ..io import atomic_write_json
from ..sampling import sample
from ..viz import metric_curves
from . import images_setup
from .common import start_run

__all__ = ["DDPM_PRESETS", "DDPMPreset", "METHODS", "cells", "run"]

# (method label, model, solver, order, DDPM variance)
METHODS = (
    ("gm-sde 2", "gmflow", "gm-sde", 2, None),
    ("ddpm small", "fm", "ddpm", 1, "small"),
    ("ddpm large", "fm", "ddpm", 1, "large"),
)
UNCONDITIONAL = ("model.conditional=false", "loss.label_dropout=0")


@dataclass(frozen=True)
class DDPMPreset:
    """Data, trunk and budget of the two unconditional runs, and the evaluation grid."""

    description: str
    data: str
    steps: int
    batch_size: int
    trunk: tuple[str, ...]  # --set overrides of the GM-DiT trunk (shared by both models)
    n_eval: int  # samples per cell
    nfes: tuple[int, ...] = (10, 25, 50, 100)
    draws: int = 3  # noise draws at the smallest NFE
    components: int = 2
    lr: float = 1e-3  # measured with it (the main part has moved on to 5e-3: docs/RESULTS.md §12d)
    warmup_steps: int = 200
    classifier_epochs: int | None = None  # None: the classifier's default
    ema_rampup: float | None = None  # None: the experiment's (0.05), which its numbers were measured with


# Times are estimates (not measured end to end): per-call costs measured on a loaded 2-core machine in
# units of the quick GM-DiT training step, scaled by that step's 161 ms on 2 threads (bench images log).
# quick: training 1500 x (161 + 139) ms = 7.5 min, 615 sampling calls of 300 samples ~3 min, scoring
# 0.5 min -> ~11 min. full (estimated for a 96-wide trunk; the 64-wide trunk it now uses is cheaper):
# training 4000 x (0.43 + 0.40) s = 55 min, 615 calls of 500 ~13 min -> ~69 min.
DDPM_PRESETS: dict[str, DDPMPreset] = {
    "quick": DDPMPreset(
        "<= 15 min on 2 idle cores: two unconditional 4-layer 64-wide GM-DiTs (K = 2 / FM), 1500 steps",
        data="fmnist32", steps=1500, batch_size=64, trunk=images_setup.NARROW_TRUNK, n_eval=300,
    ),
    "full": DDPMPreset(
        "<= 90 min on 2 idle cores: two unconditional 6-layer 64-wide GM-DiTs (K = 2 / FM), 4000 steps",
        data="fmnist32", steps=4000, batch_size=64, trunk=images_setup.FULL_TRUNK, n_eval=500,
        warmup_steps=500,
    ),
    # Seconds-long end-to-end run for tests (not meaningful as a benchmark).
    "smoke": DDPMPreset(
        "smoke test: one-layer unconditional GM-DiTs on 8x8 digits, a few steps",
        data="digits8", steps=4, batch_size=16, trunk=images_setup.SMOKE_TRUNK, n_eval=100, nfes=(2, 4),
        draws=2, warmup_steps=1, classifier_epochs=1,
    ),
}  # fmt: skip


def cells(pr: DDPMPreset) -> list[tuple[str, int, int]]:
    """``(method, nfe, draw)``: every method x NFE once, the smallest NFE ``draws`` times."""
    lo = min(pr.nfes)
    return [(m[0], k, d) for m in METHODS for k in pr.nfes for d in range(pr.draws if k == lo else 1)]


def _draw(models, method: str, noise, nfe: int, generator) -> torch.Tensor:
    _, model, solver, order, variance = next(m for m in METHODS if m[0] == method)
    kw = {} if variance is None else {"variance": variance}
    return sample(models[model], noise, solver=solver, nfe=nfe, order=order, generator=generator, **kw)


def evaluate(pr, models, scorer, out: Path, seed: int, progress: bool, records: list[dict]) -> list[dict]:
    """Score every cell not yet in ``records`` (resumable: results.json is rewritten after each cell)."""
    done = {(r["method"], r["nfe"], r["draw"]) for r in records}
    event = tuple(scorer.reference.shape[1:])
    for method, nfe, draw in tqdm(
        [c for c in cells(pr) if c not in done], desc="ddpm", disable=None if progress else True
    ):
        g = torch.Generator().manual_seed(seed * 1000003 + draw)  # the same noise for every cell of a draw
        noise = torch.randn(pr.n_eval, *event, generator=g)
        t0 = time.perf_counter()
        x = _draw(models, method, noise, nfe, g)
        ms = (time.perf_counter() - t0) * 1e3
        _, model, solver, order, variance = next(m for m in METHODS if m[0] == method)
        records.append(dict(
            method=method, model=model, K=pr.components if model == "gmflow" else None, solver=solver,
            order=order, variance=variance, nfe=nfe, draw=draw, **scorer(x), ms=ms,
        ))  # fmt: skip
        atomic_write_json(out / "results.json", records)
    return records


def _values(records: list[dict], method: str, nfe: int, metric: str) -> list[float]:
    return [r[metric] for r in records if r["method"] == method and r["nfe"] == nfe]


def _cell(v: list[float]) -> str:
    if not v:
        return ""
    return f"{statistics.fmean(v):.3g} ± {statistics.stdev(v):.2g}" if len(v) > 1 else f"{v[0]:.3g}"


def table(records: list[dict], nfes: tuple[int, ...], metric: str) -> list[str]:
    lines = ["| method | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---" * (1 + len(nfes)) + "|"]
    for m in METHODS:
        lines.append(
            f"| {m[0]} | " + " | ".join(_cell(_values(records, m[0], k, metric)) for k in nfes) + " |"
        )
    return lines


def summary_lines(records: list[dict], pr: DDPMPreset) -> list[str]:
    """GM-SDE 2 vs DDPM small / large at the smallest NFE (FD, draw means)."""
    lo = min(pr.nfes)
    gm = _values(records, "gm-sde 2", lo, "fd")
    lines = []
    for other in ("ddpm small", "ddpm large"):
        o = _values(records, other, lo, "fd")
        if gm and o:
            gain = 1.0 - statistics.fmean(gm) / statistics.fmean(o)
            word = "lower" if gain >= 0 else "higher"
            lines.append(
                f"FD at NFE {lo} ({len(gm)} draws): GM-SDE 2 (K={pr.components}) {_cell(gm)} vs {other} "
                f"{_cell(o)} -> GM-SDE 2 {word} by {abs(gain):.0%}"
            )
    return lines


def draw_means(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["nfe"]), []).append(r)
    keys = ("fd", "precision", "recall")
    return [{**rs[0], **{k: statistics.fmean(r[k] for r in rs) for k in keys}} for rs in groups.values()]


def _grids(models, pr: DDPMPreset, event, out: Path, seed: int) -> list[Path]:
    """64 samples of each method at the smallest NFE (the same noise); drawn once."""
    paths = []
    for method, *_ in METHODS:
        path = out / f"samples_{method.replace(' ', '_')}_nfe{min(pr.nfes)}.png"
        if not path.is_file():
            noise, g = images_setup.grid_noise(64, event, seed)
            images_setup.save_grid(_draw(models, method, noise, min(pr.nfes), g), path, nrow=8)
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    pr, _, root = start_run(args, "images", DDPM_PRESETS)
    out = root / "ddpm"
    out.mkdir(exist_ok=True)
    progress = not args.no_progress
    t_start = time.perf_counter()
    print(f"[bench images ddpm] preset {args.preset}: {pr.description}")
    cfgs = images_setup.model_configs(pr, out, args.seed, sets=UNCONDITIONAL)
    models = {}
    for name, cfg in cfgs.items():
        steps, batch = cfg.loop.steps, cfg.loop.batch_size
        print(f"[bench images ddpm] training {name} (unconditional): {steps} steps, batch {batch}")
        run_experiment(cfg, progress=progress, verbose=True)
        models[name] = load_network(cfg.loop.out_dir)
    scorer = images_setup.make_scorer(pr.data, pr.classifier_epochs)
    prev = out / "results.json"
    records = json.loads(prev.read_text()) if prev.is_file() else []
    records = evaluate(pr, models, scorer, out, args.seed, progress, records)
    lines = summary_lines(records, pr)
    for line in lines:
        print(f"[bench images ddpm] {line}")
    means = draw_means(records)
    figs = [metric_curves(means, out / "fd_vs_nfe.png", metric="fd", group_keys=("method",), logy=True,
                          title=f"{pr.data} unconditional: FD vs NFE (test split)")]  # fmt: skip
    figs += _grids(models, pr, tuple(scorer.reference.shape[1:]), out, args.seed)
    text = "\n".join([
        f"# gmflow bench images --part ddpm — preset `{args.preset}`", "", pr.description, "",
        f"Unconditional GM-DiT K = {pr.components} (GM-SDE 2) vs its FM twin (DDPM small / large variance), "
        f"identical trunk, budget and recipe; {pr.n_eval} samples per cell scored against the test split; "
        f"{pr.draws} noise draws at NFE {min(pr.nfes)} (mean ± sd), one elsewhere. NFE = model calls "
        "(every call one batch, no guidance).", "", *lines, "",
        "## FD vs the test split (lower is better)", "", *table(records, pr.nfes, "fd"), "",
        "## Precision", "", *table(records, pr.nfes, "precision"), "",
        "## Recall", "", *table(records, pr.nfes, "recall"), "",
        f"Total wall time of this run: {(time.perf_counter() - t_start) / 60:.1f} min.",
    ]) + "\n"  # fmt: skip
    meta = {"preset": args.preset, "seed": args.seed, "config": dataclasses.asdict(pr)}
    images_setup.write_report(out, "bench images ddpm", meta, text, figs)
    return 0
