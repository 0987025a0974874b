"""Image benchmark: GMFlow (class-conditional GM-DiT, K = 8) vs flow matching on Fashion-MNIST.

    gmflow bench images --preset quick --out runs/images-quick      # run again to resume

Trains the GM-DiT and its velocity twin (identical trunk, budget and recipe: logit-normal t, label
dropout 0.1, EMA; transition loss lambda = 0.5 for GMFlow, L2 for FM) on the train split, then
samples class-balanced batches (labels cycling through the classes, no guidance) at every NFE of
the preset with

* FM: ``euler``, ``heun``, ``dpm++2m``, ``dpm-solver-2``, ``ddpm``;
* GMFlow: ``gm-sde`` / ``gm-ode``, order 1 and 2;

and scores them against the held-out **test** split in the features of a classifier trained once on
the train split (cached by hash): Fréchet distance, k-NN precision / recall and ``class_acc``, the
classifier's accuracy on the samples w.r.t. the requested class. The headline rows are repeated
with ``draws`` fresh noise draws (mean ± sd). Writes ``results.json`` (one record per model x solver
x order x NFE x draw), ``results.md``, NFE-vs-FD / NFE-vs-precision curves and sample grids (each
model's best solver at the headline NFEs, and FM's best at GMFlow's NFE).

Other parts (``--part``, same presets and ``--out``; each writes into ``DIR/<part>/``):

* ``guidance`` (:mod:`gmflow.bench.images_guidance`): CFG vs probabilistic guidance sweeps on this
  GM-DiT at NFE 32, precision vs over-saturation (GMFlow Table 2 analogue);
* ``guided`` (:mod:`gmflow.bench.images_guided`): the headline comparison with guidance (FM + CFG vs
  GMFlow + probabilistic guidance at the headline NFEs, best scale of a sweep on ``draws`` draws);
* ``ddpm`` (:mod:`gmflow.bench.images_ddpm`): unconditional GMFlow K = 2 with GM-SDE 2 vs DDPM small /
  large variance on its FM twin at NFE 10-100 (GMFlow Table 5 analogue);
* ``nll`` (:mod:`gmflow.bench.images_nll`): test bits/dim of GM-DiTs with K = 1-16, the K = 16 one
  with a spectrum net, and the FD of its spectral vs per-pixel GM-SDE 2 (GMFlow Table 3 analogue);
* ``ladder`` (:mod:`gmflow.bench.images_ladder`): the ablation ladder at K = 8, NFE 8 (spectral
  sampling, solver order, probabilistic guidance vs CFG, lambda = 1, GM-ODE sub-steps; GMFlow
  Table 4 analogue).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..experiments import load_network, run_experiment
from ..io import atomic_write_json
from ..sampling import sample
from ..viz import metric_curves
from . import images_ddpm, images_guidance, images_guided, images_ladder, images_nll
from .common import add_run_arguments, interleaved_step_ms, start_run
from .images_setup import (
    PRESETS,
    ImagesPreset,
    Scorer,
    grid_noise,
    make_scorer,
    mean_sd,
    model_configs,
    save_grid,
    step_parts,
    write_report,
)

FM_SOLVERS = (("euler", 1), ("heun", 1), ("dpm++2m", 1), ("dpm-solver-2", 1), ("ddpm", 1))
GM_SOLVERS = (("gm-sde", 1), ("gm-sde", 2), ("gm-ode", 1), ("gm-ode", 2))
# the parts besides "main" (this module)
PARTS = {
    "guidance": images_guidance.run, "guided": images_guided.run, "ddpm": images_ddpm.run,
    "nll": images_nll.run, "ladder": images_ladder.run,
}  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "images", PRESETS)
    p.add_argument(
        "--part", choices=("main", *PARTS), default="main",
        help="main: GMFlow vs FM over NFE (default); guidance: CFG vs probabilistic guidance; "
        "guided: the headline comparison with guidance; "
        "ddpm: unconditional K = 2 GM-SDE 2 vs DDPM (Table 5 analogue); nll: bits/dim vs K, "
        "K = 16 + spectral (Table 3 analogue); ladder: the K = 8 ablation ladder at NFE 8 (Table 4 analogue)",
    )  # fmt: skip


def step_time_ratio(cfgs: dict[str, Any], steps: int = 10) -> dict[str, float]:
    """Interleaved training-step medians of GMFlow and FM on the same trunk and batch."""
    ms = interleaved_step_ms(step_parts(cfgs), steps)
    return {"fm_step_ms": ms["fm"], "gmflow_step_ms": ms["gmflow"], "ratio": ms["gmflow"] / ms["fm"]}


def _cells(pr: ImagesPreset) -> list[tuple[str, str, int, int, int]]:
    """(model, solver, order, nfe, draw): every solver x NFE once, the headline rows ``draws`` times."""
    cells = []
    for model, solvers in (("fm", FM_SOLVERS), ("gmflow", GM_SOLVERS)):
        head_nfe = pr.headline[0] if model == "gmflow" else pr.headline[1]
        for solver, order in solvers:
            for nfe in pr.nfes:
                draws = pr.draws if nfe == head_nfe else 1
                cells += [(model, solver, order, nfe, d) for d in range(draws)]
    return cells


def _key(model: str, solver: str, order: int, nfe: int, draw: int) -> tuple:
    return (model, solver, order, nfe, draw)


def _class_acc_cells(pr: ImagesPreset, records: list[dict]) -> list[tuple[str, str, int, int, int]]:
    """The class-accuracy check: FM's solver with the highest class accuracy at the top NFE on the
    first draw, repeated for ``draws`` noise draws (no cells until that first draw is scored)."""
    top = max(pr.nfes)
    first = [r for r in records if r["model"] == "fm" and r["nfe"] == top and r["draw"] == 0]
    if not first:
        return []
    best = max(first, key=lambda r: r["class_acc"])
    return [("fm", best["solver"], best["order"], top, d) for d in range(pr.draws)]


def evaluate(pr, models, scorer: Scorer, out, seed, progress, records) -> list[dict[str, Any]]:
    """Score every cell not yet in ``records`` (resumable: results.json is rewritten after each cell),
    then the class-accuracy check's further draws (:func:`_class_acc_cells`)."""
    records = _score(pr, models, scorer, out, seed, progress, records, _cells(pr))
    return _score(pr, models, scorer, out, seed, progress, records, _class_acc_cells(pr, records))


def _score(pr, models, scorer, out, seed, progress, records, cells) -> list[dict[str, Any]]:
    done = {_key(r["model"], r["solver"], r["order"], r["nfe"], r["draw"]) for r in records}
    event = tuple(scorer.reference.shape[1:])
    labels = torch.arange(pr.n_eval) % scorer.num_classes
    todo = [c for c in cells if _key(*c) not in done]
    if not todo:
        return records
    for model_name, solver, order, nfe, draw in tqdm(todo, desc="eval", disable=None if progress else True):
        g = torch.Generator().manual_seed(seed * 1000003 + draw)  # the same noise for every cell of a draw
        noise = torch.randn(pr.n_eval, *event, generator=g)
        t0 = time.perf_counter()
        x = sample(models[model_name], noise, solver=solver, nfe=nfe, order=order, generator=g,
                   cond={"class_labels": labels})  # fmt: skip
        ms = (time.perf_counter() - t0) * 1e3
        m = scorer(x, labels)
        records.append(dict(
            model=model_name, K=pr.components if model_name == "gmflow" else None, solver=solver, order=order,
            nfe=nfe, draw=draw, fd=m["fd"], precision=m["precision"], recall=m["recall"],
            class_acc=m["class_acc"], nonfinite=m["nonfinite"], ms=ms,
        ))  # fmt: skip
        atomic_write_json(out / "results.json", records)
    return records


def _best(records: list[dict], model: str, nfe: int) -> tuple[str, int, list[float]] | None:
    """The solver (and order) with the lowest mean FD at ``nfe`` and its per-draw FDs."""
    rows: dict[tuple[str, int], list[float]] = {}
    for r in records:
        if r["model"] == model and r["nfe"] == nfe:
            rows.setdefault((r["solver"], r["order"]), []).append(r["fd"])
    if not rows:
        return None
    (solver, order), fds = min(rows.items(), key=lambda kv: statistics.fmean(kv[1]))
    return solver, order, fds


def draw_means(records: list[dict]) -> list[dict]:
    """One record per (model, solver, order, NFE) with every metric averaged over the noise draws."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["solver"], r["order"], r["nfe"]), []).append(r)
    metrics = ("fd", "precision", "recall", "class_acc")
    return [{**rs[0], **{m: statistics.fmean(r[m] for r in rs) for m in metrics}} for rs in groups.values()]


def summary_lines(records: list[dict], pr: ImagesPreset) -> list[str]:
    gm_nfe, fm_nfe = pr.headline
    g, f = _best(records, "gmflow", gm_nfe), _best(records, "fm", fm_nfe)
    if g is None or f is None:
        return []
    verdict = "GMFlow better" if statistics.fmean(g[2]) < statistics.fmean(f[2]) else "FM better"
    lines = [
        f"FD (test split, {len(g[2])} noise draws): GMFlow K={pr.components} at NFE {gm_nfe} "
        f"({g[0]} o{g[1]}) {mean_sd(g[2])} vs FM best at NFE {fm_nfe} ({f[0]}) {mean_sd(f[2])} -> {verdict}"
    ]
    check = _class_acc_cells(pr, records)
    if check:
        _, solver, order, top, _ = check[0]
        acc = [r["class_acc"] for r in records
               if (r["model"], r["solver"], r["order"], r["nfe"]) == ("fm", solver, order, top)]  # fmt: skip
        per_draw = " / ".join(f"{a:.1%}" for a in acc)
        lines.append(
            f"FM at NFE {top}: requested class generated {mean_sd([100 * a for a in acc])} % of the time "
            f"over {len(acc)} noise draws ({per_draw}; {solver}, the best solver on the first draw)"
        )
    return lines


def results_markdown(records: list[dict], nfes: tuple[int, ...], metric: str) -> str:
    """One table row per (model, solver, order); cells are draw means."""
    lines = ["| model | solver | order | " + " | ".join(f"NFE {k}" for k in nfes) + " |"]
    lines.append("|---|---|---|" + "---|" * len(nfes))
    rows: dict[tuple, dict[int, list[float]]] = {}
    for r in records:
        rows.setdefault((r["model"], r["solver"], r["order"]), {}).setdefault(r["nfe"], []).append(r[metric])
    for (model, solver, order), vals in rows.items():
        cells = [f"{statistics.fmean(vals[k]):.3g}" if k in vals else "" for k in nfes]
        lines.append(f"| {model} | {solver} | {order} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_cells(records: list[dict], pr: ImagesPreset) -> list[tuple[str, str, int, int]]:
    """``(model, solver, order, nfe)`` of the sample grids: each model's best solver at its headline NFE,
    and FM's best at GMFlow's NFE (FM on GMFlow's budget)."""
    gm_nfe, fm_nfe = pr.headline
    cells = []
    for model, nfe in (("gmflow", gm_nfe), ("fm", fm_nfe), ("fm", gm_nfe)):
        best = _best(records, model, nfe)
        if best is not None:
            cells.append((model, best[0], best[1], nfe))
    return cells


def _grids(models, cells, event: tuple[int, ...], num_classes: int, out: Path, seed: int) -> list[Path]:
    """A row per class, 8 samples each, for every ``(model, solver, order, nfe)`` of ``cells``."""
    labels = torch.arange(num_classes).repeat_interleave(8)
    paths = []
    for name, solver, order, nfe in cells:
        noise, g = grid_noise(len(labels), event, seed)
        x = sample(models[name], noise, solver=solver, nfe=nfe, order=order, cond={"class_labels": labels},
                   generator=g)  # fmt: skip
        paths.append(save_grid(x, out / f"samples_{name}_{solver}_o{order}_nfe{nfe}.png", nrow=8))
    return paths


def run(args: argparse.Namespace) -> int:
    if args.part != "main":
        return PARTS[args.part](args)
    pr, _, out = start_run(args, "images", PRESETS)
    progress = not args.no_progress
    t_start = time.perf_counter()
    print(f"[bench images] preset {args.preset}: {pr.description}")
    cfgs = model_configs(pr, out, args.seed)
    timing = step_time_ratio(cfgs, steps=10 if args.preset != "smoke" else 2)
    fm_ms, gm_ms = timing["fm_step_ms"], timing["gmflow_step_ms"]
    print(
        f"[bench images] training step: FM {fm_ms:.1f} ms, GMFlow {gm_ms:.1f} ms, ratio {timing['ratio']:.3f}"
    )
    models, phases = {}, {}
    for name, cfg in cfgs.items():
        print(f"[bench images] training {name}: {cfg.loop.steps} steps, batch {cfg.loop.batch_size}")
        t0 = time.perf_counter()
        run_experiment(cfg, progress=progress, verbose=True)
        phases[f"train_{name}_min"] = (time.perf_counter() - t0) / 60
        models[name] = load_network(cfg.loop.out_dir)
    t0 = time.perf_counter()
    scorer = make_scorer(pr.data, pr.classifier_epochs)  # classifier trained once, cached by hash
    phases["classifier_min"] = (time.perf_counter() - t0) / 60
    prev = out / "results.json"
    records = json.loads(prev.read_text()) if prev.is_file() else []
    t0 = time.perf_counter()
    records = evaluate(pr, models, scorer, out, args.seed, progress, records)
    phases["eval_min"] = (time.perf_counter() - t0) / 60
    print("[bench images] this invocation: " + ", ".join(f"{k[:-4]} {v:.1f} min" for k, v in phases.items()))
    lines = summary_lines(records, pr)
    for line in lines:
        print(f"[bench images] {line}")
    figs = [
        metric_curves(
            draw_means(records),
            out / f"{m}_vs_nfe.png",
            metric=m,
            group_keys=("model", "solver", "order"),
            logy=m == "fd",
            title=f"{pr.data}: {m} vs NFE (test split)",
        )  # fmt: skip
        for m in ("fd", "precision", "class_acc")
    ]
    event = tuple(scorer.reference.shape[1:])
    figs += _grids(models, grid_cells(records, pr), event, scorer.num_classes, out, args.seed)
    text = "\n".join([
        f"# gmflow bench images — preset `{args.preset}`", "", pr.description, "", *lines, "",
        f"Training step (interleaved medians): FM {timing['fm_step_ms']:.1f} ms, GMFlow "
        f"{timing['gmflow_step_ms']:.1f} ms, ratio {timing['ratio']:.3f}.", "",
        "## FD vs the test split (lower is better; draw means)", "",
        results_markdown(records, pr.nfes, "fd"), "",
        "## Precision", "", results_markdown(records, pr.nfes, "precision"), "",
        "## Recall", "", results_markdown(records, pr.nfes, "recall"), "",
        "## Class accuracy (requested class)", "", results_markdown(records, pr.nfes, "class_acc"), "",
        f"Wall time of this invocation: {(time.perf_counter() - t_start) / 60:.1f} min ("
        + ", ".join(f"{k[:-4]} {v:.1f}" for k, v in phases.items())
        + "); a resumed run counts only its own work.",
    ]) + "\n"  # fmt: skip
    meta = {"preset": args.preset, "seed": args.seed, "step_time": timing, "phases_min": phases,
            "config": dataclasses.asdict(pr)}  # fmt: skip
    write_report(out, "bench images", meta, text, figs)
    return 0
