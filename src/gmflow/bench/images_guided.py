"""``gmflow bench images --part guided``: the headline comparison with guidance, as the paper makes it.

    gmflow bench images --preset quick --out runs/images-quick                # main part (optional)
    gmflow bench images --part guided --preset quick --out runs/images-quick  # run again to resume

GMFlow's ImageNet comparisons are guided: flow matching with classifier-free guidance (CFG), GMFlow
with probabilistic guidance and orthogonal projection. This part makes the main part's headline
comparison (GMFlow at the preset's GM NFE vs FM at its FM NFE, ``ImagesPreset.headline``) in that
setting, on the main part's two models (``DIR/models/{fm,gmflow}``; reused when they exist, else
trained here with the same configs):

1. a sweep on noise draw 0: FM with every solver of ``fm_solvers`` x CFG scale ``w`` (1 = none),
   GMFlow with ``gm_solver`` x probabilistic scale ``w~`` (0 = none, orthogonal projection 1);
2. each model's best-FD cell of the sweep on ``draws`` fresh noise draws ``1 .. draws``: the headline
   is their mean ± sd, so choosing the best of many sweep cells does not bias it.

The unguided sweep cells the main part already scored (same noise and sample count) are copied from
``DIR/results.json`` (``from_main``). Every cell scores class-balanced samples against the **test**
split (FD, precision / recall, class accuracy). NFE counts network calls: a guided call evaluates
the conditional and the unconditional half as one doubled batch (``batch_factor = 2``). Writes to
``DIR/guided/``: ``results.json`` (one record per model x solver x scale x draw, rewritten after each
cell), ``results.md``, ``fd_vs_scale.png`` and a sample grid (a row per class) of each model's best
cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from ..config import ConfigError
from ..experiments import load_network, run_experiment
from ..io import atomic_write_json
from ..viz import save_figure
from . import images_setup
from .common import start_run
from .images_setup import UNGUIDED, mean_sd

__all__ = ["GUIDED_PRESETS", "GuidedPreset", "best_cells", "headline_rows", "run", "sweep_cells"]

KIND = {"fm": "cfg", "gmflow": "probabilistic"}  # the guidance each model is compared with
ORTHOGONAL = {"cfg": 0.0, "probabilistic": 1.0}  # the paper's settings: vanilla CFG, projected w~

Cell = tuple[str, str, int, int, float]  # (model, solver, order, nfe, scale)


@dataclass(frozen=True)
class GuidedPreset:
    """Guidance sweeps at the headline NFEs of the main part's preset of the same name."""

    description: str
    cfg_scales: tuple[float, ...]  # FM: CFG w, 1 = none
    pg_scales: tuple[float, ...]  # GMFlow: probabilistic w~ in [0, 1), 0 = none
    n_eval: int  # class-balanced samples per cell
    fm_solvers: tuple[str, ...] = ("heun", "dpm++2m")
    gm_solver: tuple[str, int] = ("gm-ode", 2)
    draws: int = 3  # fresh noise draws of each model's best cell (the headline)
    grid_per_class: int = 8


# Measured (idle 2 cores, the main part's models reused; docs/RESULTS.md §12c): quick 2.4 / 1.1 min of
# sampling on the slower / faster machine seen (18 new cells of 500 samples, 96 x 2 trunk); full 20.8 /
# 6.5 min (21 cells of 1000, 64 x 6 trunk; slower machine: FM NFE 24 ~35 s unguided, 70-95 s guided,
# GM NFE 6 ~21-28 s). Training the main part's models first,
# if DIR/models is missing, adds ~10 min (quick) / ~58 min (full).
GUIDED_PRESETS: dict[str, GuidedPreset] = {
    "quick": GuidedPreset(
        "FM heun / dpm++2m at NFE 8 with CFG vs GMFlow GM-ODE 2 at NFE 4 with probabilistic guidance, "
        "500 samples per cell (~3 min with the main part's models)",
        cfg_scales=(1.0, 2.0, 3.0, 4.0, 5.0), pg_scales=(0.0, 0.2, 0.35, 0.5, 0.65), n_eval=500,
    ),
    "full": GuidedPreset(
        "FM heun / dpm++2m at NFE 24 with CFG vs GMFlow GM-ODE 2 at NFE 6 with probabilistic guidance, "
        "1000 samples per cell (~21 min with the main part's models)",
        cfg_scales=(1.0, 1.5, 2.0, 3.0, 4.0), pg_scales=(0.0, 0.15, 0.3, 0.45, 0.6), n_eval=1000,
    ),
    # Seconds-long end-to-end run for tests (not meaningful as a benchmark).
    "smoke": GuidedPreset(
        "smoke test: the smoke models, 2 scales per sweep", cfg_scales=(1.0, 3.0), pg_scales=(0.0, 0.4),
        n_eval=100, fm_solvers=("heun",), draws=2, grid_per_class=2,
    ),
}  # fmt: skip


def sweep_cells(gp: GuidedPreset, headline: tuple[int, int]) -> list[Cell]:
    """The draw-0 sweep; ``headline = (GM NFE, FM NFE)``."""
    solver, order = gp.gm_solver
    cells = [("gmflow", solver, order, headline[0], float(s)) for s in gp.pg_scales]
    return cells + [("fm", s, 1, headline[1], float(w)) for s in gp.fm_solvers for w in gp.cfg_scales]


def _cell(r: dict) -> Cell:
    return r["model"], r["solver"], r["order"], r["nfe"], float(r["scale"])


def best_cells(records: list[dict]) -> dict[str, Cell]:
    """Each model's lowest-FD cell of the draw-0 sweep (non-finite FDs never win), keyed by model."""
    best: dict[str, dict] = {}
    for r in records:
        if (
            r["draw"] == 0
            and math.isfinite(r["fd"])
            and (r["model"] not in best or r["fd"] < best[r["model"]]["fd"])
        ):
            best[r["model"]] = r
    return {name: _cell(r) for name, r in best.items()}


def headline_rows(records: list[dict]) -> dict[str, dict]:
    """Per model: its best sweep cell and that cell's FD / class accuracy on the fresh draws (>= 1)."""
    rows = {}
    for name, cell in best_cells(records).items():
        fresh = [r for r in records if r["draw"] > 0 and _cell(r) == cell]
        if fresh:
            fds = [r["fd"] for r in fresh]
            rows[name] = dict(cell=cell, fds=fds, batch_factor=fresh[0]["batch_factor"],
                              class_acc=statistics.fmean(r["class_acc"] for r in fresh))  # fmt: skip
    return rows


def _guidance(cell: Cell):
    kind = KIND[cell[0]]
    return None if cell[4] == UNGUIDED[kind] else images_setup.guidance_for(kind, cell[4], ORTHOGONAL[kind])


def _sample(models, cell: Cell, guidance, noise, labels, num_classes: int, generator) -> torch.Tensor:
    name, solver, order, nfe, _ = cell
    return images_setup.class_sample(models[name], noise, labels, num_classes, guidance=guidance,
                                     solver=solver, nfe=nfe, order=order, generator=generator)  # fmt: skip


def _score(models, todo: list[tuple[Cell, int]], gp, scorer, out, seed, records, bar) -> None:
    event = tuple(scorer.reference.shape[1:])
    labels = torch.arange(gp.n_eval) % scorer.num_classes
    for cell, draw in todo:
        g = torch.Generator().manual_seed(seed * 1000003 + draw)  # the main part's noise of that draw
        noise = torch.randn(gp.n_eval, *event, generator=g)
        guidance = _guidance(cell)
        t0 = time.perf_counter()
        x = _sample(models, cell, guidance, noise, labels, scorer.num_classes, g)
        ms = (time.perf_counter() - t0) * 1e3
        m = scorer(x, labels)
        guided = guidance is not None
        kind = KIND[cell[0]] if guided else "none"
        records.append(dict(
            model=cell[0], solver=cell[1], order=cell[2], nfe=cell[3], scale=cell[4], guidance=kind,
            orthogonal=ORTHOGONAL[kind] if guided else None, draw=draw, batch_factor=2 if guided else 1,
            seed=seed, n_eval=gp.n_eval, fd=m["fd"], precision=m["precision"], recall=m["recall"],
            class_acc=m["class_acc"], nonfinite=m["nonfinite"], ms=ms,
        ))  # fmt: skip
        atomic_write_json(out / "results.json", records)
        bar.update()


def reuse_main_cells(records: list[dict], root: Path, pr, gp: GuidedPreset, seed: int) -> int:
    """Copy the unguided sweep cells the main part already scored (``root/results.json``: same models,
    solver, NFE, noise of draw 0 and sample count) into ``records``; returns how many were copied."""
    meta, main = root / "meta.json", root / "results.json"
    if pr.n_eval != gp.n_eval or not (meta.is_file() and main.is_file()):
        return 0
    if json.loads(meta.read_text()).get("seed") != seed:
        return 0
    have = {(_cell(r), r["draw"]) for r in records}
    unguided = {c for c in sweep_cells(gp, pr.headline) if _guidance(c) is None and (c, 0) not in have}
    copied = 0
    for r in json.loads(main.read_text()):
        cell = (r["model"], r["solver"], r["order"], r["nfe"], UNGUIDED[KIND[r["model"]]])
        if r["draw"] == 0 and cell in unguided:
            unguided.discard(cell)
            records.append(dict(
                model=cell[0], solver=cell[1], order=cell[2], nfe=cell[3], scale=cell[4], guidance="none",
                orthogonal=None, draw=0, batch_factor=1, seed=seed, n_eval=gp.n_eval, fd=r["fd"],
                precision=r["precision"], recall=r["recall"], class_acc=r["class_acc"],
                nonfinite=r["nonfinite"], ms=r["ms"], from_main=True,
            ))  # fmt: skip
            copied += 1
    return copied


def _figure(records: list[dict], path: Path, title: str) -> Path:
    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, name in zip(axes, ("gmflow", "fm")):
        sweep = [r for r in records if r["model"] == name and r["draw"] == 0 and math.isfinite(r["fd"])]
        for solver in sorted({r["solver"] for r in sweep}):
            pts = sorted((r["scale"], r["fd"], r["nfe"]) for r in sweep if r["solver"] == solver)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{solver} NFE {pts[0][2]}")
        ax.set_xlabel("probabilistic w~ (orthogonal 1; 0 = none)" if name == "gmflow" else "CFG w (1 = none)")
        ax.set_title("GMFlow" if name == "gmflow" else "flow matching", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    axes[0].set_ylabel("FD vs test split (draw 0)")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _grid_name(cell: Cell) -> str:
    return f"samples_{cell[0]}_{cell[1]}_nfe{cell[3]}_s{cell[4]:g}.png"


def report(records: list[dict], gp: GuidedPreset, preset: str) -> tuple[str, list[str]]:
    """``results.md`` text and the console summary lines."""
    rows = headline_rows(records)
    lines = []
    if {"gmflow", "fm"} <= rows.keys():
        g, f = rows["gmflow"], rows["fm"]
        gm, fm = statistics.fmean(g["fds"]), statistics.fmean(f["fds"])
        spread = math.hypot(*(statistics.stdev(r["fds"]) if len(r["fds"]) > 1 else 0.0 for r in (g, f)))
        verdict = (
            "within the draws' spread"
            if abs(gm - fm) <= spread
            else ("GMFlow better" if gm < fm else "FM better")
        )
        batch = {1: "", 2: ", x2 batch"}
        gc, fc = g["cell"], f["cell"]
        gm_how = f"{gc[1]} o{gc[2]}, w~ {gc[4]:g}{batch[g['batch_factor']]}"
        fm_how = f"{fc[1]}, w {fc[4]:g}{batch[f['batch_factor']]}"
        lines.append(
            f"guided FD (test split, {len(g['fds'])} fresh noise draws): GMFlow at NFE {gc[3]} ({gm_how}) "
            f"{mean_sd(g['fds'])} vs FM at NFE {fc[3]} ({fm_how}) {mean_sd(f['fds'])} -> {verdict}"
        )
        lines.append(f"class accuracy of those cells: GMFlow {g['class_acc']:.3f}, FM {f['class_acc']:.3f}")
    table = ["| model | solver | NFE | batch | guidance | FD | precision | recall | class acc |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(
        (r for r in records if r["draw"] == 0), key=lambda r: (r["model"], r["solver"], r["scale"])
    ):
        how = "none" if r["guidance"] == "none" else f"{r['guidance']} {r['scale']:g}"
        table.append(
            f"| {r['model']} | {r['solver']} | {r['nfe']} | x{r['batch_factor']} | {how} | {r['fd']:.1f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {r['class_acc']:.3f} |"
        )
    text = "\n".join([
        f"# gmflow bench images --part guided — preset `{preset}`", "", gp.description, "", *lines, "",
        "FM: CFG w (1 = unguided, no projection); GMFlow: probabilistic guidance w~ (0 = unguided) with "
        "orthogonal projection 1. A guided step evaluates the conditional and the unconditional half in "
        "one doubled batch (batch x2, one NFE). Each model's best-FD cell of the draw-0 sweep is scored "
        "again on fresh noise draws; the headline is their mean ± sd.",
        "", "## Sweep (draw 0)", "", *table, "",
        "Figures: fd_vs_scale.png (the sweeps), samples_<model>_<solver>_nfe<N>_s<scale>.png (a row per "
        "class, each model's best cell).",
    ]) + "\n"  # fmt: skip
    return text, lines


def _load(path: Path, seed: int, n_eval: int) -> list[dict]:
    records = json.loads(path.read_text()) if path.is_file() else []
    other = {(r.get("seed"), r.get("n_eval")) for r in records} - {(seed, n_eval)}
    if other:
        raise ConfigError(f"{path} holds results of another --seed / sample count {sorted(other, key=str)}; "
                          f"use another --out or remove it")  # fmt: skip
    return records


def run(args: argparse.Namespace) -> int:
    gp, _, root = start_run(args, "images", GUIDED_PRESETS)
    pr = images_setup.PRESETS[args.preset]
    out = root / "guided"
    records = _load(out / "results.json", args.seed, gp.n_eval)
    out.mkdir(exist_ok=True)
    progress = not args.no_progress
    t_start = time.perf_counter()
    print(f"[bench images guided] preset {args.preset}: {gp.description}")
    models = {}
    for name, cfg in images_setup.model_configs(pr, root, args.seed).items():
        reused = (Path(cfg.loop.out_dir) / "checkpoint.json").is_file()
        how = "reused, resumed if unfinished" if reused else "training it"
        print(f"[bench images guided] {name}: {cfg.loop.out_dir} ({how}; {cfg.loop.steps} steps)")
        run_experiment(cfg, progress=progress, verbose=True)
        models[name] = load_network(cfg.loop.out_dir)
    scorer = images_setup.make_scorer(pr.data, pr.classifier_epochs)
    if reuse_main_cells(records, root, pr, gp, args.seed):
        atomic_write_json(out / "results.json", records)
    done = {(_cell(r), r["draw"]) for r in records}
    sweep = [(c, 0) for c in sweep_cells(gp, pr.headline) if (c, 0) not in done]
    total = len(sweep_cells(gp, pr.headline)) + 2 * gp.draws
    with tqdm(total=total, initial=len(done), desc="guided", disable=None if progress else True) as bar:
        _score(models, sweep, gp, scorer, out, args.seed, records, bar)
        best = best_cells(records)
        fresh = [(c, d) for c in best.values() for d in range(1, gp.draws + 1) if (c, d) not in done]
        _score(models, fresh, gp, scorer, out, args.seed, records, bar)
    figs = [_figure(records, out / "fd_vs_scale.png", f"{pr.data}: guided FD at the headline NFEs")]
    labels = torch.arange(scorer.num_classes).repeat_interleave(gp.grid_per_class)
    event = tuple(scorer.reference.shape[1:])
    for cell in best.values():
        path = out / _grid_name(cell)
        if not path.is_file():
            noise, g = images_setup.grid_noise(len(labels), event, args.seed)
            x = _sample(models, cell, _guidance(cell), noise, labels, scorer.num_classes, g)
            images_setup.save_grid(x, path, nrow=gp.grid_per_class)
        figs.append(path)
    text, lines = report(records, gp, args.preset)
    for line in lines:
        print(f"[bench images guided] {line}")
    text += f"\nWall time of this invocation: {(time.perf_counter() - t_start) / 60:.1f} min.\n"
    meta = {"preset": args.preset, "seed": args.seed, "config": dataclasses.asdict(gp),
            "model_preset": dataclasses.asdict(pr)}  # fmt: skip
    images_setup.write_report(out, "bench images guided", meta, text, figs)
    return 0
