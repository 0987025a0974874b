"""``gmflow bench images --part guidance``: CFG vs probabilistic guidance on the class-conditional GM-DiT.

    gmflow bench images --preset quick --out runs/images-quick                   # main part (optional)
    gmflow bench images --part guidance --preset quick --out runs/images-quick   # run again to resume

The model is the main part's class-conditional GM-DiT (K = 8, ``DIR/models/gmflow``): reused when that
run exists (trained by ``gmflow bench images --preset P --out DIR``), otherwise trained here with the
same config (a run of another preset in ``DIR`` is refused). At NFE 32 with GM-SDE 2 (the paper's
Table 2 setting) it sweeps

* CFG ``w`` ("vanilla" GM CFG: every component mean shifted by the guided bias; docs/maths/guidance.md §3),
* probabilistic guidance ``w~`` (GMFlow Eq. 8; §4),

each with and without orthogonal projection (``orthogonal`` = 1 / 0), plus one unguided cell per draw
(``w = 1`` / ``w~ = 0``; the start of every sweep). Every cell scores class-balanced samples against
the **test** split: precision / recall, class accuracy and FD (clipped samples, the cached
classifier), and the saturation measures of :mod:`gmflow.metrics.saturation` on the samples before
clipping. NFE counts model calls: a guided call evaluates the conditional and the unconditional
half as one doubled batch (recorded as ``batch_factor = 2``).

Writes to ``DIR/guidance/``: ``results.json`` (one record per kind x orthogonal x scale x draw,
rewritten after each cell), ``results.md`` (Table 2 analogue and the equal-precision comparison),
``precision_vs_saturation.png`` and sample grids at the largest scale of each kind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..experiments import load_network, run_experiment
from ..io import atomic_write_json
from . import images_setup
from .common import start_run
from .images_guidance_report import figure, report_markdown

__all__ = ["GUIDANCE_PRESETS", "GuidancePreset", "cells", "run"]


@dataclass(frozen=True)
class GuidancePreset:
    """A guidance sweep on the main part's GM-DiT of the same preset name."""

    description: str
    cfg_scales: tuple[float, ...]  # CFG w (1 = none)
    pg_scales: tuple[float, ...]  # probabilistic w~ in (0, 1)
    n_eval: int  # class-balanced samples per cell
    nfe: int = 32
    solver: tuple[str, int] = ("gm-sde", 2)
    orthogonal: tuple[float, ...] = (0.0, 1.0)
    draws: int = 1  # noise draws of every cell
    grid_per_class: int = 8  # samples per class (grid row) in the sample grids


# Scales: subsets of the paper's grids (CFG 1.2-6.5, w~ 0.02-0.75). Times are estimates (not measured end
# to end): per-call costs measured on a loaded 2-core machine in units of the quick GM-DiT training step,
# scaled by that step's 161 ms on 2 threads. quick: a guided NFE-32 cell of 300 samples ~25 s, 17 cells
# + grids ~7.5 min, + 5.4 min if the model must be trained -> ~13 min. full: a cell of 400 samples
# ~70 s, 21 cells + grids ~26 min, + ~43 min training (6000 x 0.43 s) if DIR/models/gmflow is missing.
GUIDANCE_PRESETS: dict[str, GuidancePreset] = {
    "quick": GuidancePreset(
        "<= 15 min on 2 idle cores (incl. training the quick GM-DiT if DIR/models/gmflow is missing): "
        "4 scales per sweep, 300 samples per cell",
        cfg_scales=(1.5, 2.3, 3.3, 4.9), pg_scales=(0.16, 0.27, 0.39, 0.55), n_eval=300,
    ),
    "full": GuidancePreset(
        "<= 90 min on 2 idle cores (incl. training the full GM-DiT if DIR/models/gmflow is missing): "
        "5 scales per sweep, 400 samples per cell",
        cfg_scales=(1.6, 2.3, 3.3, 4.9, 6.5), pg_scales=(0.16, 0.27, 0.39, 0.55, 0.75), n_eval=400,
    ),
    # Seconds-long end-to-end run for tests (not meaningful as a benchmark).
    "smoke": GuidancePreset(
        "smoke test: the smoke GM-DiT, NFE 4, 2 scales per sweep", cfg_scales=(2.0, 4.0),
        pg_scales=(0.3, 0.6), n_eval=100, nfe=4, draws=2, grid_per_class=2,
    ),
}  # fmt: skip


def cells(gp: GuidancePreset) -> list[tuple[str, float | None, float | None, int]]:
    """``(kind, orthogonal, scale, draw)``: one unguided cell and every sweep point, for each draw."""
    out = []
    for d in range(gp.draws):
        out.append(("none", None, None, d))
        for kind, scales in (("cfg", gp.cfg_scales), ("probabilistic", gp.pg_scales)):
            out += [(kind, o, s, d) for o in gp.orthogonal for s in scales]
    return out


def _draw(model, gp: GuidancePreset, guidance, noise, labels, num_classes: int, generator) -> torch.Tensor:
    solver, order = gp.solver
    return images_setup.class_sample(
        model, noise, labels, num_classes, guidance=guidance, solver=solver, nfe=gp.nfe, order=order,
        generator=generator,
    )  # fmt: skip


def evaluate(model, gp, scorer, out: Path, seed: int, progress: bool, records: list[dict]) -> list[dict]:
    """Score every cell not yet in ``records`` (resumable: results.json is rewritten after each cell)."""
    done = {(r["kind"], r["orthogonal"], r["scale"], r["draw"]) for r in records}
    event = tuple(scorer.reference.shape[1:])
    labels = torch.arange(gp.n_eval) % scorer.num_classes
    todo = [c for c in cells(gp) if c not in done]
    for kind, orth, scale, draw in tqdm(todo, desc="guidance", disable=None if progress else True):
        g = torch.Generator().manual_seed(seed * 1000003 + draw)  # the same noise for every cell of a draw
        noise = torch.randn(gp.n_eval, *event, generator=g)
        guidance = images_setup.guidance_for(kind, scale, orth)
        t0 = time.perf_counter()
        x = _draw(model, gp, guidance, noise, labels, scorer.num_classes, g)
        ms = (time.perf_counter() - t0) * 1e3
        m = scorer(x, labels, saturation=True)
        records.append(dict(
            kind=kind, orthogonal=orth, scale=scale, draw=draw, solver=gp.solver[0], order=gp.solver[1],
            nfe=gp.nfe, batch_factor=1 if guidance is None else 2, **m, ms=ms,
        ))  # fmt: skip
        atomic_write_json(out / "results.json", records)
    return records


def _grids(model, gp: GuidancePreset, num_classes: int, event, out: Path, seed: int) -> list[Path]:
    """A row per class at the largest scale of each kind and projection (and unguided); drawn once."""
    labels = torch.arange(num_classes).repeat_interleave(gp.grid_per_class)
    rows = [("none", None, None)]
    rows += [
        (k, o, max(s))
        for k, s in (("cfg", gp.cfg_scales), ("probabilistic", gp.pg_scales))
        for o in gp.orthogonal
    ]
    paths = []
    for kind, orth, scale in rows:
        name = "samples_none.png" if kind == "none" else f"samples_{kind}_o{orth:g}_s{scale:g}.png"
        path = out / name
        if not path.is_file():
            noise, g = images_setup.grid_noise(len(labels), event, seed)
            x = _draw(model, gp, images_setup.guidance_for(kind, scale, orth), noise, labels, num_classes, g)
            images_setup.save_grid(x, path, nrow=gp.grid_per_class)
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    gp, _, root = start_run(args, "images", GUIDANCE_PRESETS)
    pr = images_setup.PRESETS[args.preset]
    out = root / "guidance"
    out.mkdir(exist_ok=True)
    progress = not args.no_progress
    t_start = time.perf_counter()
    print(f"[bench images guidance] preset {args.preset}: {gp.description}")
    cfg = images_setup.model_configs(pr, root, args.seed)["gmflow"]
    reused = (Path(cfg.loop.out_dir) / "checkpoint.json").is_file()
    how = "an existing run: reused, resumed if unfinished" if reused else "training it"
    where = f"GM-DiT K={pr.components} in {cfg.loop.out_dir}"
    print(f"[bench images guidance] {where} ({how}; {cfg.loop.steps} steps)")
    run_experiment(cfg, progress=progress, verbose=True)
    model = load_network(cfg.loop.out_dir)
    scorer = images_setup.make_scorer(pr.data, pr.classifier_epochs)
    prev = out / "results.json"
    records = json.loads(prev.read_text()) if prev.is_file() else []
    records = evaluate(model, gp, scorer, out, args.seed, progress, records)
    figs = [
        figure(records, out / "precision_vs_saturation.png", title=f"{pr.data}: guidance at NFE {gp.nfe}")
    ]
    figs += _grids(model, gp, scorer.num_classes, tuple(scorer.reference.shape[1:]), out, args.seed)
    text, lines = report_markdown(records, gp, args.preset, scorer.pixels, model_dir=str(cfg.loop.out_dir))
    for line in lines:
        print(f"[bench images guidance] {line}")
    text += f"\nTotal wall time of this run: {(time.perf_counter() - t_start) / 60:.1f} min.\n"
    meta = {"preset": args.preset, "seed": args.seed, "model_dir": str(cfg.loop.out_dir),
            "config": dataclasses.asdict(gp), "model_preset": dataclasses.asdict(pr)}  # fmt: skip
    images_setup.write_report(out, "bench images guidance", meta, text, figs)
    return 0
