"""``gmflow bench images --part ladder``: GMFlow's Table 4 ablation ladder (K = 8, NFE 8) on Fashion-MNIST.

    gmflow bench images --part ladder --preset quick --out runs/images-quick   # run again to resume

Trains two class-conditional GM-DiTs (K = 8) with a spectrum net on the trunk (quick: the 4-layer
64-wide one it was measured on), data, budget and recipe of the ``gmflow bench images`` preset of the
same name: transition loss lambda = 0.5 (the paper's setting; its trunk trains exactly as the main
part's GM-DiT, the spectral loss never reaches it) and lambda = 1 (the transition loss with t' = 0,
i.e. the plain x0 likelihood). Every row of the ladder (:data:`ROWS`) changes one thing of its parent,
as in the paper's Table 4:

===== ======== =====================================================================================
A0    –        GM-SDE 2 + spectral sampling + probabilistic guidance (lambda = 0.5)
A1    A0       GM-SDE order 1
A2    A1       without spectral sampling (per-pixel draws)
A3    A2       CFG ("vanilla" GM CFG: the guided bias added to every component mean) instead of w~
A4    A0       DPM++ 2M on the GM's mean velocity with CFG (the paper uses DPM++ 2M *SDE*, which the
               package has not; its ODE variant stands in)
A5    A0       the lambda = 1 model
B0    –        GM-ODE 2 + probabilistic guidance (lambda = 0.5)
B1    B0       GM-ODE 2 without sub-steps (one sub-step per network step)
===== ======== =====================================================================================

Each row is a guidance sweep at NFE ``nfe``: the unguided cell (``w = 1`` / ``w~ = 0``) and every
scale of its guidance kind, with orthogonal projection ``orthogonal``, on one noise draw (the same
noise for every row). The row reports its best FD and its best precision (the paper's "best FID" and
"best precision" over guidance scales) with the saturation measures and class accuracy at the best
precision; the best-FD cell is then repeated with ``draws - 1`` fresh noise draws (mean ± sd; the
scale was picked on draw 0). Samples are class balanced and scored against the **test** split
(:class:`~gmflow.bench.images_setup.Scorer`). NFE counts model calls: a guided call evaluates the
conditional and the unconditional half as one doubled batch (``batch_factor = 2``).

Writes to ``DIR/ladder/``: ``results.json`` (one record per row x scale x draw, rewritten after
each cell), ``results.md`` (the Table 4 analogue and every sweep point), ``fd_vs_precision.png``
and one sample grid per row at its best-FD scale; the two runs live in ``DIR/ladder/models/``. A
re-run keeps only the records of the same :func:`run_key` (preset, seed, the models' weights, the
classifier), so a changed preset or retrained model is re-scored rather than mixed in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import apply_sets
from ..experiments import load_network, run_experiment
from ..io import atomic_write_json
from ..reflow import teacher_hash
from . import images_setup
from .common import key_digest, start_run
from .images_ladder_report import best_fd_scale, figure, report_markdown
from .images_setup import UNGUIDED

__all__ = ["LADDER_PRESETS", "LadderPreset", "ROWS", "Row", "model_configs", "run", "run_key", "sweep_cells"]


@dataclass(frozen=True)
class Row:
    """One ladder row: a model, a solver and a guidance kind (and what it changes of ``parent``)."""

    id: str
    label: str
    parent: str | None
    model: str  # a key of model_configs(): "lambda0.5" or "lambda1"
    solver: str
    order: int
    guidance: str  # "probabilistic" or "cfg"
    spectral: bool = False
    substeps: int | None = None  # GM-ODE sub-steps per step (None: the solver's default)


ROWS = (
    Row("A0", "GM-SDE 2 + spectral + prob. guidance", None, "lambda0.5", "gm-sde", 2, "probabilistic", True),
    Row("A1", "A0 -> GM-SDE order 1", "A0", "lambda0.5", "gm-sde", 1, "probabilistic", True),
    Row("A2", "A1 without spectral sampling", "A1", "lambda0.5", "gm-sde", 1, "probabilistic"),
    Row("A3", "A2 -> vanilla CFG", "A2", "lambda0.5", "gm-sde", 1, "cfg"),
    Row("A4", "A0 -> DPM++ 2M (ODE) + CFG", "A0", "lambda0.5", "dpm++2m", 1, "cfg"),
    Row("A5", "A0 -> lambda = 1 (plain x0 NLL)", "A0", "lambda1", "gm-sde", 2, "probabilistic", True),
    Row("B0", "GM-ODE 2 + prob. guidance", None, "lambda0.5", "gm-ode", 2, "probabilistic"),
    Row("B1", "B0 without sub-steps", "B0", "lambda0.5", "gm-ode", 2, "probabilistic", substeps=1),
)  # fmt: skip


@dataclass(frozen=True)
class LadderPreset:
    """The ladder's evaluation; models, budget and (unless ``trunk`` / ``lr`` are set) the trunk and the
    learning rate come from the main preset of the same name."""

    description: str
    cfg_scales: tuple[float, ...]  # CFG w > 1
    pg_scales: tuple[float, ...]  # probabilistic w~ in (0, 1)
    n_eval: int  # class-balanced samples per cell
    nfe: int = 8
    orthogonal: float = 1.0
    draws: int = 3  # noise draws of each row's best-FD cell
    grid_per_class: int = 6
    trunk: tuple[str, ...] | None = None  # --set overrides of the trunk; None: the main preset's
    lr: float | None = None  # None: the main preset's

    def __post_init__(self) -> None:
        if not self.cfg_scales or any(not w > 1.0 for w in self.cfg_scales):
            raise ValueError(
                f"cfg_scales: CFG scales must be > 1 (1 is the unguided cell), got {self.cfg_scales}"
            )
        if not self.pg_scales or any(not 0.0 < w < 1.0 for w in self.pg_scales):
            raise ValueError(f"pg_scales: probabilistic scales must lie in (0, 1), got {self.pg_scales}")


# quick, measured on 2 idle cores (docs/RESULTS.md §16): 19.0 min, over the 15-minute target: training
# 5.9 + 5.6 min (a step with the spectrum net is ~172 ms, 24 % above the plain GM-DiT's 139 ms),
# evaluation 7.1 min (a guided NFE-8 cell of 300 samples: ~5 s per-pixel, ~11 s with spectral
# sampling). full (estimate from those rates): 2 x 8000 steps x ~0.27 s ~72 min + cells of 500 samples
# on the 6-layer trunk (~8-25 s) ~12 min: ~85 min.
LADDER_PRESETS: dict[str, LadderPreset] = {
    "quick": LadderPreset(
        "19 min on 2 idle cores (measured): two 4-layer 64-wide GM-DiTs (lambda 0.5 / 1, with spectrum "
        "nets), 8 rows x 4 guidance scales, 300 samples per cell",
        cfg_scales=(1.5, 2.3, 3.3, 4.9), pg_scales=(0.16, 0.27, 0.39, 0.55), n_eval=300,
        trunk=images_setup.NARROW_TRUNK, lr=1e-3,  # measured with them (docs/RESULTS.md §12c, §12d)
    ),
    "full": LadderPreset(
        "<= 90 min on 2 idle cores (estimated): two full GM-DiTs (lambda 0.5 / 1, with spectrum nets), "
        "8 rows x 5 guidance scales, 500 samples per cell",
        cfg_scales=(1.6, 2.3, 3.3, 4.9, 6.5), pg_scales=(0.16, 0.27, 0.39, 0.55, 0.75), n_eval=500,
    ),
    # Seconds-long end-to-end run for tests (not meaningful as a benchmark).
    "smoke": LadderPreset(
        "smoke test: the smoke GM-DiTs, NFE 4, 2 scales per sweep", cfg_scales=(2.0, 4.0),
        pg_scales=(0.3, 0.6), n_eval=100, nfe=4, draws=2, grid_per_class=2,
    ),
}  # fmt: skip


def model_configs(pr: images_setup.ImagesPreset, out: Path, seed: int) -> dict[str, Any]:
    """``{"lambda0.5", "lambda1"}`` -> the GM-DiT configs (main preset ``pr``, spectrum net on)."""
    gm = apply_sets(images_setup.model_configs(pr, out, seed)["gmflow"], ["model.spectral=true"])
    sets = {f"lambda{lam:g}": [f"loss.trans_ratio={lam}", f"loop.out_dir={out / f'lambda{lam:g}'}"]
            for lam in (0.5, 1.0)}  # fmt: skip
    return {name: apply_sets(gm, s) for name, s in sets.items()}


def scales(row: Row, lp: LadderPreset) -> tuple[float, ...]:
    """The unguided scale of the row's kind, then its sweep."""
    return (UNGUIDED[row.guidance], *(lp.cfg_scales if row.guidance == "cfg" else lp.pg_scales))


def sweep_cells(lp: LadderPreset) -> list[tuple[str, float, int]]:
    """``(row id, scale, draw 0)`` of every sweep point."""
    return [(row.id, s, 0) for row in ROWS for s in scales(row, lp)]


def _draw(models, row: Row, scale: float, lp: LadderPreset, noise, labels, num_classes: int, generator):
    kind = "none" if scale == UNGUIDED[row.guidance] else row.guidance
    guidance = images_setup.guidance_for(kind, scale, lp.orthogonal)
    return images_setup.class_sample(
        models[row.model], noise, labels, num_classes, guidance=guidance,
        solver=row.solver, nfe=lp.nfe, order=row.order, substeps=row.substeps, spectral=row.spectral,
        generator=generator,
    )  # fmt: skip


def run_key(lp: LadderPreset, seed: int, model_dirs: dict[str, str], classifier: str | None) -> str:
    """Digest of what every scored cell depends on: the ladder preset, seed, the models' weights and
    the classifier (records of another key are dropped when a run resumes)."""
    weights = {name: teacher_hash(d) for name, d in model_dirs.items()}
    return key_digest(
        {"ladder": dataclasses.asdict(lp), "seed": seed, "weights": weights, "classifier": classifier}
    )


def _score_cells(
    models, lp, scorer, todo, out: Path, seed: int, key: str, progress: bool, records: list[dict]
):
    """Score ``todo`` cells ``(row id, scale, draw)``; results.json is rewritten after each one."""
    event = tuple(scorer.reference.shape[1:])
    labels = torch.arange(lp.n_eval) % scorer.num_classes
    by_id = {row.id: row for row in ROWS}
    for rid, scale, draw in tqdm(todo, desc="ladder", disable=None if progress else True):
        row = by_id[rid]
        g = torch.Generator().manual_seed(seed * 1000003 + draw)  # the same noise for every cell of a draw
        noise = torch.randn(lp.n_eval, *event, generator=g)
        t0 = time.perf_counter()
        x = _draw(models, row, scale, lp, noise, labels, scorer.num_classes, g)
        ms = (time.perf_counter() - t0) * 1e3
        guided = scale != UNGUIDED[row.guidance]
        records.append(dict(
            key=key, row=rid, model=row.model, solver=row.solver, order=row.order, spectral=row.spectral,
            substeps=row.substeps, guidance=row.guidance, orthogonal=lp.orthogonal, scale=scale, draw=draw,
            nfe=lp.nfe, batch_factor=2 if guided else 1, **scorer(x, labels, saturation=True), ms=ms,
        ))  # fmt: skip
        atomic_write_json(out / "results.json", records)
    return records


def evaluate(
    models, lp: LadderPreset, scorer, out: Path, seed: int, key: str, progress: bool, records: list[dict]
):
    """The sweeps on draw 0, then ``draws - 1`` more draws of each row's best-FD cell (resumable: the
    records of ``key`` that belong to this preset's cells are kept, every other record is dropped)."""
    cells = {(row.id, s, d) for row in ROWS for s in scales(row, lp) for d in range(lp.draws)}
    records = [r for r in records if r.get("key") == key and (r["row"], r["scale"], r["draw"]) in cells]
    done = {(r["row"], r["scale"], r["draw"]) for r in records}
    todo = [c for c in sweep_cells(lp) if c not in done]
    records = _score_cells(models, lp, scorer, todo, out, seed, key, progress, records)
    repeats = [(row.id, best_fd_scale(records, row.id), d) for row in ROWS for d in range(1, lp.draws)]
    done = {(r["row"], r["scale"], r["draw"]) for r in records}
    keep = set(sweep_cells(lp)) | set(repeats)
    records = [r for r in records if (r["row"], r["scale"], r["draw"]) in keep]  # repeats of an old best
    todo = [c for c in repeats if c not in done]
    return _score_cells(models, lp, scorer, todo, out, seed, key, progress, records)


def _grids(models, lp: LadderPreset, records, num_classes: int, event, out: Path, seed: int, key: str):
    """A row of samples per class for every ladder row at its best-FD scale (the same noise); the file
    name carries the run key, grids of other keys are removed."""
    for old in out.glob("samples_*.png"):
        if not old.stem.endswith(key):
            old.unlink()
    labels = torch.arange(num_classes).repeat_interleave(lp.grid_per_class)
    paths = []
    for row in ROWS:
        scale = best_fd_scale(records, row.id)
        path = out / f"samples_{row.id}_s{scale:g}_{key}.png"
        if not path.is_file():
            noise, g = images_setup.grid_noise(len(labels), event, seed)
            x = _draw(models, row, scale, lp, noise, labels, num_classes, g)
            images_setup.save_grid(x, path, nrow=lp.grid_per_class)
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    lp, _, root = start_run(args, "images", LADDER_PRESETS)
    pr = images_setup.PRESETS[args.preset]
    pr = images_setup.pinned(pr, lp.trunk, lp.lr)
    out = root / "ladder"
    out.mkdir(exist_ok=True)
    progress = not args.no_progress
    t_start = time.perf_counter()
    print(f"[bench images ladder] preset {args.preset}: {lp.description}")
    models, train_s = {}, {}
    cfgs = model_configs(pr, out / "models", args.seed)
    for name, cfg in cfgs.items():
        print(f"[bench images ladder] training GM-DiT {name} + spectrum net: {cfg.loop.steps} steps")
        t0 = time.perf_counter()
        run_experiment(cfg, progress=progress, verbose=True)
        train_s[name] = time.perf_counter() - t0
        models[name] = load_network(cfg.loop.out_dir)
    scorer = images_setup.make_scorer(pr.data, pr.classifier_epochs)
    prev = out / "results.json"
    records = json.loads(prev.read_text()) if prev.is_file() else []
    t0 = time.perf_counter()
    key = run_key(lp, args.seed, {n: c.loop.out_dir for n, c in cfgs.items()}, scorer.classifier_id)
    records = evaluate(models, lp, scorer, out, args.seed, key, progress, records)
    eval_s = time.perf_counter() - t0
    title = f"{pr.data}: Table 4 ladder at NFE {lp.nfe}"
    figs = [figure(records, ROWS, out / "fd_vs_precision.png", title=title)]
    figs += _grids(
        models, lp, records, scorer.num_classes, tuple(scorer.reference.shape[1:]), out, args.seed, key
    )
    text, lines = report_markdown(records, ROWS, lp, args.preset, scorer.pixels)
    for line in lines:
        print(f"[bench images ladder] {line}")
    total = time.perf_counter() - t_start
    text += (
        f"\nWall time of this run: {total / 60:.1f} min (training "
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in train_s.items())
        + f"; evaluation {eval_s / 60:.1f}; a resumed run counts only its own part).\n"
    )
    meta = {"preset": args.preset, "seed": args.seed, "config": dataclasses.asdict(lp),
            "model_preset": dataclasses.asdict(pr), "rows": [dataclasses.asdict(r) for r in ROWS],
            "seconds": {"train": train_s, "eval": eval_s, "total": total}}  # fmt: skip
    images_setup.write_report(out, "bench images ladder", meta, text, figs)
    return 0
