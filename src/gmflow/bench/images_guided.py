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
2. each model's best-FD cell of the sweep repeated on draws ``1 .. draws - 1`` (the headline rows).

Every cell scores class-balanced samples against the **test** split (FD, precision / recall, class
accuracy). NFE counts network calls: a guided call evaluates the conditional and the unconditional
half as one doubled batch (``batch_factor = 2``). Writes to ``DIR/guided/``: ``results.json`` (one
record per model x solver x scale x draw, rewritten after each cell), ``results.md``,
``fd_vs_scale.png`` and a sample grid (a row per class) of each model's best cell.
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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from ..experiments import load_network, run_experiment
from ..io import atomic_write, atomic_write_json
from ..viz import image_grid
from . import images_setup
from .common import start_run

__all__ = ["GUIDED_PRESETS", "GuidedPreset", "best_cells", "run", "sweep_cells"]

KIND = {"fm": "cfg", "gmflow": "probabilistic"}  # the guidance each model is compared with
UNGUIDED = {"cfg": 1.0, "probabilistic": 0.0}  # the scale that means "no guidance"
ORTHOGONAL = {"cfg": 0.0, "probabilistic": 1.0}  # the paper's settings: vanilla CFG, projected w~


@dataclass(frozen=True)
class GuidedPreset:
    """Guidance sweeps at the headline NFEs of the main part's preset of the same name."""

    description: str
    cfg_scales: tuple[float, ...]  # FM: CFG w, 1 = none
    pg_scales: tuple[float, ...]  # GMFlow: probabilistic w~ in [0, 1), 0 = none
    n_eval: int  # class-balanced samples per cell
    fm_solvers: tuple[str, ...] = ("heun", "dpm++2m")
    gm_solver: tuple[str, int] = ("gm-ode", 2)
    draws: int = 3  # noise draws of each model's best cell
    grid_per_class: int = 8


# Cell costs (idle 2 cores, one doubled batch per step): quick FM NFE 8 / GM NFE 4 with 500 samples
# ~15 / ~10 s; full FM NFE 24 with 1000 samples ~70-100 s, GM NFE 6 ~30 s (ad-hoc runs of the same
# cells, docs/RESULTS.md §12c). quick: 16 + 4 cells ~4 min; full: 16 + 4 cells ~20 min, plus the main
# part's training if DIR/models is missing (quick ~9 min, full ~58 min).
GUIDED_PRESETS: dict[str, GuidedPreset] = {
    "quick": GuidedPreset(
        "<= 15 min on 2 idle cores with the main part's models (~4 min of sampling): FM heun / dpm++2m "
        "at NFE 8 with CFG vs GMFlow GM-ODE 2 at NFE 4 with probabilistic guidance, 500 samples per cell",
        cfg_scales=(1.0, 2.0, 3.0, 4.0, 5.0), pg_scales=(0.0, 0.2, 0.35, 0.5, 0.65), n_eval=500,
    ),
    "full": GuidedPreset(
        "<= 90 min on 2 idle cores with the main part's models (~20 min of sampling): FM heun / dpm++2m "
        "at NFE 24 with CFG vs GMFlow GM-ODE 2 at NFE 6 with probabilistic guidance, 1000 samples per cell",
        cfg_scales=(1.0, 1.5, 2.0, 3.0, 4.0), pg_scales=(0.0, 0.15, 0.3, 0.45, 0.6), n_eval=1000,
    ),
    # Seconds-long end-to-end run for tests (not meaningful as a benchmark).
    "smoke": GuidedPreset(
        "smoke test: the smoke models, 2 scales per sweep", cfg_scales=(1.0, 3.0), pg_scales=(0.0, 0.4),
        n_eval=100, fm_solvers=("heun",), draws=2, grid_per_class=2,
    ),
}  # fmt: skip


def sweep_cells(gp: GuidedPreset, headline: tuple[int, int]) -> list[tuple[str, str, int, int, float]]:
    """``(model, solver, order, nfe, scale)`` of the draw-0 sweep; ``headline = (GM NFE, FM NFE)``."""
    solver, order = gp.gm_solver
    cells = [("gmflow", solver, order, headline[0], s) for s in gp.pg_scales]
    return cells + [("fm", s, 1, headline[1], w) for s in gp.fm_solvers for w in gp.cfg_scales]


def best_cells(records: list[dict]) -> dict[str, dict]:
    """Each model's lowest-FD record of draw 0 (the sweep), keyed by model."""
    best: dict[str, dict] = {}
    for r in records:
        if r["draw"] == 0 and (r["model"] not in best or r["fd"] < best[r["model"]]["fd"]):
            best[r["model"]] = r
    return best


def _cell_key(model: str, solver: str, order: int, nfe: int, scale: float, draw: int) -> tuple:
    return model, solver, order, nfe, float(scale), draw


def _sample(model, name: str, cell: tuple, noise, labels, num_classes: int, generator) -> torch.Tensor:
    _, solver, order, nfe, scale = cell
    kind = KIND[name]
    guidance = None if scale == UNGUIDED[kind] else images_setup.guidance_for(kind, scale, ORTHOGONAL[kind])
    return images_setup.class_sample(
        model, noise, labels, num_classes, guidance=guidance, solver=solver, nfe=nfe, order=order,
        generator=generator,
    )  # fmt: skip


def _score(models, cells, draw: int, gp, scorer, out, seed, records, bar) -> None:
    done = {_cell_key(r["model"], r["solver"], r["order"], r["nfe"], r["scale"], r["draw"]) for r in records}
    event = tuple(scorer.reference.shape[1:])
    labels = torch.arange(gp.n_eval) % scorer.num_classes
    for cell in cells:
        if _cell_key(*cell, draw) in done:
            continue
        name = cell[0]
        g = torch.Generator().manual_seed(seed * 1000003 + draw)  # the same noise for every cell of a draw
        noise = torch.randn(gp.n_eval, *event, generator=g)
        t0 = time.perf_counter()
        x = _sample(models[name], name, cell, noise, labels, scorer.num_classes, g)
        ms = (time.perf_counter() - t0) * 1e3
        m = scorer(x, labels)
        kind = KIND[name]
        records.append(dict(
            model=name, solver=cell[1], order=cell[2], nfe=cell[3], guidance=kind, scale=float(cell[4]),
            orthogonal=ORTHOGONAL[kind], draw=draw, batch_factor=1 if cell[4] == UNGUIDED[kind] else 2,
            fd=m["fd"], precision=m["precision"], recall=m["recall"], class_acc=m["class_acc"],
            nonfinite=m["nonfinite"], ms=ms,
        ))  # fmt: skip
        atomic_write_json(out / "results.json", records)
        bar.update()


def headline_rows(records: list[dict]) -> dict[str, dict]:
    """Per model: the best sweep cell and its FD / class accuracy over every draw of that cell."""
    rows = {}
    for name, b in best_cells(records).items():
        same = [
            r for r in records
            if (r["model"], r["solver"], r["nfe"], r["scale"]) == (name, b["solver"], b["nfe"], b["scale"])
        ]  # fmt: skip
        fds = [r["fd"] for r in same]
        rows[name] = dict(
            best=b, draws=len(fds), fd_mean=statistics.fmean(fds),
            fd_sd=statistics.stdev(fds) if len(fds) > 1 else 0.0,
            class_acc=statistics.fmean(r["class_acc"] for r in same),
        )  # fmt: skip
    return rows


def _figure(records: list[dict], path: Path, title: str) -> Path:
    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, name in zip(axes, ("gmflow", "fm")):
        sweep = [r for r in records if r["model"] == name and r["draw"] == 0]
        for solver in sorted({r["solver"] for r in sweep}):
            pts = sorted((r["scale"], r["fd"]) for r in sweep if r["solver"] == solver)
            nfe = next(r["nfe"] for r in sweep if r["solver"] == solver)
            ax.plot(*zip(*pts), marker="o", label=f"{solver} NFE {nfe}")
        ax.set_xlabel("probabilistic w~ (orthogonal 1)" if name == "gmflow" else "CFG w")
        ax.set_title("GMFlow" if name == "gmflow" else "flow matching")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("FD vs test split (draw 0)")
    fig.suptitle(title)
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=150, bbox_inches="tight"))


def report(records: list[dict], gp: GuidedPreset, preset: str) -> tuple[str, list[str]]:
    """``results.md`` text and the console summary lines."""
    rows = headline_rows(records)
    lines = []
    if {"gmflow", "fm"} <= rows.keys():
        g, f = rows["gmflow"], rows["fm"]
        verdict = "GMFlow better" if g["fd_mean"] < f["fd_mean"] else "FM better"
        gb, fb = g["best"], f["best"]
        lines.append(
            f"guided FD (test split, {g['draws']} / {f['draws']} noise draws): GMFlow at NFE {gb['nfe']} "
            f"({gb['solver']} o{gb['order']}, w~ {gb['scale']:g}) {g['fd_mean']:.2f} ± {g['fd_sd']:.2f} "
            f"vs FM at NFE {fb['nfe']} ({fb['solver']}, w {fb['scale']:g}) {f['fd_mean']:.2f} ± "
            f"{f['fd_sd']:.2f} -> {verdict}"
        )
        lines.append(f"class accuracy of those cells: GMFlow {g['class_acc']:.3f}, FM {f['class_acc']:.3f}")
    table = ["| model | solver | NFE (x2 batch when guided) | scale | FD | precision | recall | class acc |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(
        (r for r in records if r["draw"] == 0), key=lambda r: (r["model"], r["solver"], r["scale"])
    ):
        table.append(
            f"| {r['model']} | {r['solver']} | {r['nfe']} | {r['guidance']} {r['scale']:g} | {r['fd']:.1f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {r['class_acc']:.3f} |"
        )
    text = "\n".join([
        f"# gmflow bench images --part guided — preset `{preset}`", "", gp.description, "", *lines, "",
        "FM: CFG w (1 = unguided, no projection); GMFlow: probabilistic guidance w~ (0 = unguided) with "
        "orthogonal projection 1. A guided step evaluates the conditional and the unconditional half in "
        "one doubled batch. Each model's best-FD cell of the sweep (draw 0) is repeated on the other draws.",
        "", "## Sweep (draw 0)", "", *table, "",
        "Figures: fd_vs_scale.png (the sweeps), samples_gmflow_best.png / samples_fm_best.png (a row per "
        "class, each model's best cell).",
    ]) + "\n"  # fmt: skip
    return text, lines


def run(args: argparse.Namespace) -> int:
    gp, _, root = start_run(args, "images", GUIDED_PRESETS)
    pr = images_setup.PRESETS[args.preset]
    out = root / "guided"
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
    prev = out / "results.json"
    records = json.loads(prev.read_text()) if prev.is_file() else []
    sweep = sweep_cells(gp, pr.headline)
    with tqdm(
        total=len(sweep) + 2 * (gp.draws - 1), desc="guided", disable=None if progress else True
    ) as bar:
        _score(models, sweep, 0, gp, scorer, out, args.seed, records, bar)
        best = [
            tuple(b[k] for k in ("model", "solver", "order", "nfe", "scale"))
            for b in best_cells(records).values()
        ]
        for draw in range(1, gp.draws):
            _score(models, best, draw, gp, scorer, out, args.seed, records, bar)
    figs = [_figure(records, out / "fd_vs_scale.png", f"{pr.data}: guided FD at the headline NFEs")]
    labels = torch.arange(scorer.num_classes).repeat_interleave(gp.grid_per_class)
    for cell in best:
        path = out / f"samples_{cell[0]}_best.png"
        if not path.is_file():
            noise = torch.randn(
                len(labels),
                *scorer.reference.shape[1:],
                generator=torch.Generator().manual_seed(args.seed + 11),
            )
            x = _sample(
                models[cell[0]],
                cell[0],
                cell,
                noise,
                labels,
                scorer.num_classes,
                torch.Generator().manual_seed(args.seed + 12),
            )
            image_grid(torch.nan_to_num(x, 0.0).clamp(-1, 1), path, nrow=gp.grid_per_class)
        figs.append(path)
    text, lines = report(records, gp, args.preset)
    for line in lines:
        print(f"[bench images guided] {line}")
    text += f"\nWall time of this invocation: {(time.perf_counter() - t_start) / 60:.1f} min.\n"
    meta = {"preset": args.preset, "seed": args.seed, "config": dataclasses.asdict(gp),
            "model_preset": dataclasses.asdict(pr)}  # fmt: skip
    images_setup.write_report(out, "bench images guided", meta, text, figs)
    return 0
