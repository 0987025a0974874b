"""Simple ReFlow ladder: each improvement of Simple ReFlow added cumulatively, on three CPU test beds.

    gmflow bench reflow --preset quick --out runs/reflow-quick     # run again to reuse finished work

Test beds (:mod:`gmflow.bench.reflow_beds`):

* ``checkerboard``: the teacher is an FM ToyMLP trained here with the shared trainer (OUT/teachers).
* ``ring`` (8-mode GMM): the teacher is the EXACT GMM velocity ``ring_gmm().velocity``, so the pairs
  are exact up to the pair solver. A network cannot be copied from it, so the student is first trained
  from scratch with plain FM on the ring (OUT/teachers/ring-init) and ReFlow starts from that network.
* ``digits`` (sklearn digits, 16x16): the teacher is a SmallUNet trained with FM on the train split; the
  metric is the classifier-feature Fréchet distance against the held-out **test** split (which never
  feeds the teacher, the classifier, the pairs or the projection), with as many samples as test images
  and a floor from as many training images; precision / recall and a memorisation check are recorded.

Ladder (each rung adds the next knob of ``gmflow.experiments.recipe("simple", shape)``; every model is
evaluated at each NFE with the same noise):

=============== ===========================================================================================
teacher         the teacher itself, Euler on the uniform grid
2rf             student = copy of the teacher; uniform t, velocity MSE, teacher dropout, backward pairs
                only; Euler, uniform grid (2-rectified flow)
+norm           the recipe's loss normaliser (``sample``: ``l / max(sg[l], floor)``; ``learned``: a side
                network for ``log E[l | x_t, t]``); left out where the recipe has none
+pow10          ``t ∝ 10^t``
+hpf            FFT-mask HPF distance (images only)
+dropout        smaller student dropout (images only: the toy MLP has no dropout)
+forward        forward pairs with ratio rho: the recipe's student
+sigmoid        sigmoid time grid (kappa); same student, inference only
+dpm            DPM-Solver-2 (r); inference only: **the recipe as a user runs it**
full            + AutoGuidance: weak model = the recipe student's checkpoint after ``weak_frac`` of its
                steps; ``w`` in the EDM2 lerp convention (w = 1 is none; the paper's 0.6 is 1.6 here).
                The guide is a second network evaluation per solver call: the tables report NFE (main +
                guide), and the headline also compares it with 2-RF at the same total NFE.
+projection     branch off ``+forward``: the coupling projection computed once over the pair set,
                ``x0 <- (x0 + lambda y) / (1 + lambda)`` (a measurement; the recipe has no projection)
=============== ===========================================================================================

Outputs: ``results.json`` (records with dataset, variant, nfe, nfe_main / nfe_guide / nfe_total, the
metric: ``sw2`` + ``sw2_floor`` on 2-D, ``fd`` + ``fd_floor``, precision, recall, ``nn_ratio``,
``copy_frac`` on digits, and ``rel_change`` vs the previous rung), ``results.md``, ``diagnostics.json``
(straightness, one-step error, per-t relative loss spread, inference sweeps), NFE-vs-metric PNGs,
histograms / digit grids.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..config import apply_sets
from ..experiments import (
    ReflowConfig,
    load_network,
    recipe,
    train_reflow,
)
from ..guidance import AutoGuidance
from ..io import atomic_write_json, atomic_write_text, sha256_bytes
from ..reflow import NORMALIZATIONS, one_step_error, per_t_relative_loss, straightness, teacher_hash
from ..sampling import network_evaluations, sample
from ..train import LoopConfig, has_checkpoint, read_manifest
from .common import add_run_arguments, start_run
from .reflow_beds import DATASETS, PRESETS, BenchPreset, bed_available, bed_metrics, make_pairs, setup_bed
from .reflow_images import IMAGE_BEDS, estimate
from .reflow_report import (
    BRANCH_OF,
    IMAGE_ONLY,
    LADDER,
    TRAIN_RUNGS,
    add_relative_changes,
    figures,
    headline,
    results_markdown,
)

__all__ = ["PRESETS", "LADDER", "TRAIN_RUNGS", "IMAGE_ONLY", "add_arguments", "run", "run_dataset",
           "add_relative_changes", "headline", "results_markdown"]  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "reflow", PRESETS, DATASETS)
    p.add_argument(
        "--normalize", choices=NORMALIZATIONS, default=None,
        help="loss normaliser of the +norm rung instead of the recipe's (none drops the rung); use a "
        "fresh --out per choice (teachers/ and pairs/ may be shared by symlinks)",
    )  # fmt: skip
    p.add_argument(
        "--estimate", action="store_true",
        help="print the time the image beds of the preset need on this machine now (a few measured "
        "training steps, teacher calls and scorings; minutes per phase) and exit",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ ladder
def _rung_configs(name: str, pr: BenchPreset, out: Path, seed: int) -> list[tuple[str, Any]]:
    """The training rungs, each adding one knob of ``recipe("simple", shape)`` to the previous one.

    ``+projection`` is a branch off ``+forward`` (the recipe has no projection); rungs whose knob is
    off in the recipe (the normaliser, the HPF distance on vectors) are left out.
    """
    s = pr.sizes(name)
    image = IMAGE_BEDS.get(name)
    rec = recipe("simple", image.shape if image else (2,))
    loop = LoopConfig(
        steps=s.reflow_steps, batch_size=s.reflow_batch, optimizer="adam", lr=s.reflow_lr,
        warmup_steps=max(1, s.reflow_steps // 20), seed=seed, ckpt_every=max(1, s.reflow_steps // 4),
        log_every=25,
    )  # fmt: skip
    cfg = ReflowConfig(data=image.data if image else name, loop=loop)
    norm = pr.normalize if pr.normalize is not None else rec.loss.normalize
    changes = {
        "2rf": [], "+norm": [f"loss.normalize={norm}"],
        "+pow10": [f"loss.time_sampler={rec.loss.time_sampler}"],
        "+hpf": [f"loss.hpf_lambda={rec.loss.hpf_lambda}"],
        "+dropout": [f"student_dropout={pr.student_dropout}"], "+forward": [f"pairs.rho={rec.pairs.rho}"],
        "+projection": [f"pairs.projection_lambda={pr.projection_lambda}",
                        f"pairs.projection_pool={pr.pool}"],
    }  # fmt: skip
    skip = {"+norm"} if norm == "none" else set()
    if image is None:
        skip |= set(IMAGE_ONLY)
    elif not image.dropout_rung:
        skip.add("+dropout")  # a teacher without dropout: no smaller student rate (reflow_images)
    out_cfgs = []
    for rung in TRAIN_RUNGS:
        if rung in skip:
            continue
        base = dict(out_cfgs)[BRANCH_OF[rung]] if rung in BRANCH_OF else cfg
        new = apply_sets(base, changes[rung])
        if rung not in BRANCH_OF:
            cfg = new
        out_cfgs.append(
            (rung, apply_sets(new, [f"loop.out_dir={out / 'students' / name / rung.lstrip('+')}"]))
        )
    return out_cfgs


def _train_rung(rung: str, cfg: Any, bed: dict, pairs: Any, weak_frac: float | None, progress: bool):
    """Train one rung (resuming); with ``weak_frac`` also keep the early checkpoint as the weak guide."""
    run, weak = Path(cfg.loop.out_dir), None
    kw = dict(real_data=bed["real"], progress=progress, verbose=progress)
    if weak_frac is not None:
        wdir = run.with_name(run.name + "-weak")
        wsteps = max(1, int(cfg.loop.steps * weak_frac))
        if not has_checkpoint(wdir):
            if has_checkpoint(run) and int(read_manifest(run)["step"]) > wsteps:
                shutil.rmtree(run)  # the early checkpoint was lost: retrain this rung
            train_reflow(apply_sets(cfg, [f"loop.steps={wsteps}"]), bed["init"], pairs, **kw)
            shutil.rmtree(wdir, ignore_errors=True)
            shutil.copytree(run, wdir)
        weak = load_network(wdir)
    train_reflow(cfg, bed["init"], pairs, **kw)
    return load_network(run), weak


def _cached(path: Path, key: dict, compute):
    """``compute()`` once per ``key`` (a JSON-able dict): the result is kept in ``path``."""
    digest = sha256_bytes(json.dumps(key, sort_keys=True, default=str).encode())[:16]
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == digest:
            return old["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": digest, "value": value})
    return value


def _run_items(
    name: str, bed: dict, model: Any, items: list[tuple[dict, dict]], draws: int | None = None
) -> list[dict[str, Any]]:
    """One record per ``(record fields, gmflow.sample keywords)`` item and noise draw (the first
    ``draws`` of the bed's draws; all by default); the same noise for every model of a draw."""
    records = []
    for draw, noise in enumerate(bed["noise"][:draws]):
        for fields, kw in items:
            t0 = time.perf_counter()
            x = sample(model, noise, **kw)
            ms = (time.perf_counter() - t0) * 1e3
            g = kw.get("guidance")
            rec = {"dataset": name, **fields, "draw": draw, "solver": kw["solver"], "grid": kw.get("grid")}
            count = network_evaluations(kw["nfe"], g)  # NFE (main + guide): every network evaluation
            rec.update(nfe_main=count["main"], nfe_guide=count["guide"], nfe_total=count["total"])
            rec.update(guidance=None if g is None else g.scale, **bed_metrics(name, bed, x, draw), ms=ms)
            records.append(rec)
    return records


def _evaluate(name: str, bed: dict, model: Any, variant: str, nfes, kw: dict, cache: Path, key: dict):
    items = [({"variant": variant, "nfe": k}, {**kw, "nfe": k}) for k in nfes]
    key = {**key, "draws": len(bed["noise"]), "n_eval": bed["n_eval"]}
    return _cached(cache / f"{variant.lstrip('+')}.json", key, lambda: _run_items(name, bed, model, items))


def _sweeps(name: str, bed: dict, student: Any, weak: Any, pr: BenchPreset, sp: Any) -> list[dict[str, Any]]:
    """Inference-only sweeps on the recipe's student: sigmoid kappa, DPM-Solver-2 r, AutoGuidance w."""
    nfes = [k for k in pr.nfes if k >= 4] or [max(pr.nfes)]
    dpm = {"solver": "dpm-solver-2", "grid": "sigmoid", "kappa": sp.kappa}
    items = [
        (
            {"knob": "kappa", "value": v, "nfe": k},
            {"solver": "euler", "grid": "sigmoid", "kappa": v, "nfe": k},
        )
        for v in (1.0, 2.0, 5.0, 10.0, 20.0)
        for k in nfes
    ]
    items += [
        ({"knob": "r", "value": v, "nfe": max(nfes)}, {**dpm, "r": v, "nfe": max(nfes)})
        for v in (0.3, 0.4, 0.5, 0.7, 1.0)
    ]
    items += [
        ({"knob": "w", "value": v, "nfe": k}, {**dpm, "r": sp.r, "nfe": k, "guidance": AutoGuidance(weak, v)})
        for v in (1.0, 1.2, 1.4, 1.6, 2.0)
        for k in (min(pr.nfes), max(nfes))
    ]
    return _run_items(name, bed, student, items, draws=1)


def _diagnostics(name: str, bed: dict, models: dict, test: tuple, pr: BenchPreset) -> dict[str, Any]:
    g = torch.Generator().manual_seed(123)
    n = min(bed["sizes"].n_diag, len(test[0]))
    noise = torch.randn(n, *bed["shape"], generator=g)
    teacher = bed["teacher"].velocity if name == "ring" else bed["teacher"]
    out: dict[str, Any] = {"straightness": {}, "one_step_error": {}}
    for k, m in (("teacher", teacher), ("2rf", models["2rf"][0]), ("full", models["full"][0])):
        out["straightness"][k] = straightness(m, noise, nfe=16)
        out["one_step_error"][k] = one_step_error(m, test[0][:n], test[1][:n])
    ts = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    x0_real = bed["data"].sample(n, generator=g)
    indep = per_t_relative_loss(bed["init"], x0_real, torch.randn(x0_real.shape, generator=g), ts=ts)
    rf = per_t_relative_loss(models["2rf"][0], test[0][:n], test[1][:n], ts=ts)
    out["relative_loss"] = {
        "teacher_fm_independent": {k: v.tolist() for k, v in indep.items()},
        "reflow_2rf_pairs": {k: v.tolist() for k, v in rf.items()},
    }
    return out


def run_dataset(name: str, pr: BenchPreset, preset: str, out: Path, seed: int, progress: bool):
    """Train, evaluate and diagnose the ladder on one test bed; returns (records, diagnostics, samples)."""
    print(f"[bench reflow] {name}: teacher / init network")
    bed = setup_bed(name, pr, out, seed, progress)
    print(f"[bench reflow] {name}: pairs")
    pairs, test = make_pairs(name, bed, out, seed, progress)
    cache = out / "cache" / name
    euler = {"solver": "euler", "grid": "uniform"}
    key = {"preset": preset, "seed": seed, "nfes": pr.nfes, "dataset": name}
    teacher = bed["teacher"].velocity if name == "ring" else bed["teacher"]
    tid = "exact" if name == "ring" else teacher_hash(out / "teachers" / name)
    records = _evaluate(
        name, bed, teacher, "teacher", pr.nfes, euler, cache, {**key, "v": "teacher", "w": tid}
    )
    models: dict[str, Any] = {"teacher": (teacher, euler)}
    cfgs = _rung_configs(name, pr, out, seed)
    main = [rung for rung, _ in cfgs if rung not in BRANCH_OF][-1]  # the recipe's student
    weak = student = None
    for rung, cfg in cfgs:
        print(f"[bench reflow] {name}: rung {rung} ({cfg.loop.steps} steps)")
        net, w = _train_rung(rung, cfg, bed, pairs, pr.weak_frac if rung == main else None, progress)
        if rung == main:
            student, weak, main_cfg = net, w, cfg
        models[rung] = (net, euler)
        ids = {"cfg": cfg.to_dict(), "weights": teacher_hash(cfg.loop.out_dir)}
        records += _evaluate(name, bed, net, rung, pr.nfes, euler, cache, {**key, **ids})
    sp = recipe("simple", bed["shape"]).sampling
    full_cfg = {
        "cfg": main_cfg.to_dict(), "weights": teacher_hash(main_cfg.loop.out_dir),
        "weak": teacher_hash(Path(main_cfg.loop.out_dir + "-weak")),
    }  # fmt: skip
    infer = [
        ("+sigmoid", {"solver": "euler", "grid": "sigmoid", "kappa": sp.kappa}),
        ("+dpm", {"solver": "dpm-solver-2", "grid": "sigmoid", "kappa": sp.kappa, "r": sp.r}),
    ]
    infer.append(("full", {**infer[-1][1], "guidance": AutoGuidance(weak, pr.guidance)}))
    for rung, kw in infer:
        k = {**key, "cfg": full_cfg, "kw": {a: b for a, b in kw.items() if a != "guidance"}, "w": pr.guidance}
        records += _evaluate(name, bed, student, rung, pr.nfes, kw, cache, {**k, "v": rung})
        models[rung] = (student, kw)
    print(f"[bench reflow] {name}: diagnostics")
    dkey = {**key, "cfg": full_cfg, "diag": 1, "2rf": teacher_hash(cfgs[0][1].loop.out_dir), "teacher": tid}
    diag = _cached(cache / "diagnostics.json", dkey, lambda: _diagnostics(name, bed, models, test, pr))
    if name not in IMAGE_BEDS or pr.image_sweeps:
        skey = {**dkey, "kappa": sp.kappa, "r": sp.r}
        diag["sweeps"] = _cached(
            cache / "sweeps.json", skey, lambda: _sweeps(name, bed, student, weak, pr, sp)
        )
    diag["training"] = {
        rung: json.loads((Path(c.loop.out_dir) / "checkpoint.json").read_text())["step"] for rung, c in cfgs
    }
    samples = _figure_samples(name, bed, models, pr.nfes)
    return records, diag, samples


def _figure_samples(name: str, bed: dict, models: dict, nfes) -> dict[str, dict[int, torch.Tensor]]:
    """Samples of the first noise draw per variant and NFE: 10 per variant on image beds, the whole
    draw of teacher / 2rf / full on 2-D."""
    image = name in IMAGE_BEDS
    noise = bed["noise"][0][:10] if image else bed["noise"][0]
    out: dict[str, dict[int, torch.Tensor]] = {}
    for v in models if image else ("teacher", "2rf", "full"):
        model, kw = models[v]
        out[v] = {k: sample(model, noise, nfe=k, **kw) for k in nfes}
    return out


def _knobs(pr: BenchPreset) -> str:
    parts = []
    for label, shape in (("images", (1, 32, 32)), ("2-D", (2,))):
        c = recipe("simple", shape)
        norm = pr.normalize if pr.normalize is not None else c.loss.normalize
        parts.append(
            f"{label}: normalize {norm}, t {c.loss.time_sampler}, HPF lambda {c.loss.hpf_lambda:g}, rho "
            f"{c.pairs.rho:g}, sigmoid kappa {c.sampling.kappa:g}, DPM-Solver-2 r {c.sampling.r:g}"
        )
    return "Recipe knobs (`recipe('simple', shape)`): " + "; ".join(parts) + ". "


def _print_estimates(pr: BenchPreset, datasets, out: Path, seed: int) -> int:
    """``--estimate``: the measured time breakdown of each image bed (:func:`reflow_images.estimate`)."""
    for name in (d for d in datasets if d in IMAGE_BEDS):
        rungs = [r for r, _ in _rung_configs(name, pr, out, seed)]
        est = estimate(name, pr, ["teacher", *rungs, "+sigmoid", "+dpm", "full"], len(rungs))
        parts = ", ".join(f"{k[:-2]} {v / 60:.1f}" for k, v in est.items() if k.endswith("_s"))
        unit = ", ".join(f"{k} {v:.3g}" for k, v in est.items() if not k.endswith("_s"))
        print(f"[bench reflow] {name} estimate (min on this machine now): {parts}\n  measured: {unit}")
    return 0


# ------------------------------------------------------------------------------------------ entry point
def run(args: argparse.Namespace) -> int:
    pr, datasets, out = start_run(args, "reflow", PRESETS, DATASETS)
    if getattr(args, "normalize", None) is not None:
        pr = dataclasses.replace(pr, normalize=args.normalize)
    progress = not args.no_progress
    if getattr(args, "estimate", False):
        return _print_estimates(pr, datasets, out, args.seed)
    t0 = time.perf_counter()
    print(f"[bench reflow] preset {args.preset}: {pr.description}\n[bench reflow] output: {out.resolve()}")
    records: list[dict[str, Any]] = []
    diags: dict[str, Any] = {}
    figs: list[Path] = []
    timing: dict[str, float] = {}
    for name in datasets:
        if (why := bed_available(name)) is not None:
            print(f"[bench reflow] note: skipping {name} ({why})")
            continue
        t1 = time.perf_counter()
        recs, diag, samples = run_dataset(name, pr, args.preset, out, args.seed, progress)
        timing[name] = time.perf_counter() - t1
        records += recs
        diags[name] = diag
        add_relative_changes(records)
        atomic_write_json(out / "results.json", records)  # partial results survive an interruption
        figs += figures(name, records, diag, samples, pr, out)
    add_relative_changes(records)
    text = results_markdown(records, diags, pr, args.preset, _knobs(pr))
    text += (
        f"\nWall time: {(time.perf_counter() - t0) / 60:.1f} min ("
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in timing.items())
        + ").\n"
    )
    atomic_write_json(out / "results.json", records)
    atomic_write_json(out / "diagnostics.json", diags)
    meta = {"preset": args.preset, "seed": args.seed, "config": dataclasses.asdict(pr), "seconds": timing}
    atomic_write_json(out / "meta.json", meta)
    atomic_write_text(out / "results.md", text)
    print(text)
    print("[bench reflow] headline (the simple recipe, unguided and guided, vs 2rf; negative = better):")
    for h in headline(records):
        print(f"  {h}")
    print("[bench reflow] figures:\n" + "\n".join(f"  {f}" for f in figs))
    return 0
