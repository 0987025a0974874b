"""Simple ReFlow ladder: each improvement of Simple ReFlow added cumulatively, on three CPU test beds.

    gmflow bench reflow --preset quick --out runs/reflow-quick     # run again to reuse finished work

Test beds (:mod:`gmflow.bench.reflow_beds`):

* ``checkerboard``: the teacher is an FM ToyMLP trained here with the shared trainer (OUT/teachers).
* ``ring`` (8-mode GMM): the teacher is the EXACT GMM velocity ``ring_gmm().velocity``, so the pairs
  are exact up to the pair solver. A network cannot be copied from it, so the student is first trained
  from scratch with plain FM on the ring (OUT/teachers/ring-init) and ReFlow starts from that network.
* ``digits`` (sklearn digits, 16x16): the teacher is a SmallUNet trained with FM; the metric is the
  classifier-feature Fréchet distance of ``gmflow.metrics.images`` (skipped with a note if missing).

Ladder (each rung adds one change to the previous one; every model is evaluated at each NFE with the
same noise):

=============== ===========================================================================================
teacher         the teacher itself, Euler on the uniform grid
2rf             student = copy of the teacher; uniform t, velocity MSE, teacher dropout, backward pairs
                only; Euler, uniform grid (2-rectified flow)
+norm           per-sample loss normalisation ``l / sg[l]``
+pow10          ``t ∝ 10^t``
+hpf            HPF distance with weight lambda (images only; not run on 2-D)
+dropout        smaller student dropout (images only: the toy MLP has no dropout)
+forward        forward pairs with ratio rho
+projection     minibatch-OT coupling projection of the backward pairs, ``x0 <- (1-a) x0 + a OT(x0)``
+sigmoid        sigmoid time grid (kappa); same student, inference only
+dpm            DPM-Solver-2 (r); inference only
full            + AutoGuidance: weak model = the +projection student's checkpoint after ``weak_frac`` of
                its steps; ``w`` in the EDM2 lerp convention (w = 1 is none; the paper's 0.6 is 1.6 here).
                The guide costs one extra network call per step, which NFE does not count (EDM2).
=============== ===========================================================================================

Choices that are ours (reconstructions; ``docs/maths/reflow.md``): the projection is a minibatch-OT
stand-in (exact assignment of each batch's generated x0 to ``pool`` times as many real draws); it
hurt in every setting we tried (alpha 0.05-1, pool 1-8; e.g. digits quick NFE 1 FD +9 % at alpha 0.05,
+89 % at 0.5), so the ladder uses a mild alpha = 0.1. kappa = 5, not the paper's 20: with 4 or 5
steps kappa = 20 wastes steps at t ~ 1 and t ~ 0 (t = 1, 0.993, 0.5, 0.007, 0). w = 1.6 is the
paper's 0.6. The report adds eval-only sweeps of kappa, r and w on the final student.

Outputs: ``results.json`` (records with dataset, variant, nfe, the metric: ``sw2`` + ``sw2_floor`` on 2-D,
``fd`` on digits, and ``rel_change`` vs the previous rung), ``results.md``, ``diagnostics.json``
(straightness, one-step error, per-t relative loss spread), NFE-vs-metric PNGs, histograms / digit grids.
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
    train_reflow,
)
from ..guidance import AutoGuidance
from ..io import atomic_write_json, atomic_write_text, sha256_bytes
from ..reflow import one_step_error, per_t_relative_loss, straightness, teacher_hash
from ..sampling import sample
from ..train import LoopConfig, has_checkpoint, read_manifest
from .common import add_run_arguments, start_run
from .reflow_beds import DATASETS, PRESETS, BenchPreset, bed_metrics, digits_available, make_pairs, setup_bed
from .reflow_report import (
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


# ------------------------------------------------------------------------------------------ ladder
def _rung_configs(name: str, pr: BenchPreset, out: Path, seed: int) -> list[tuple[str, Any]]:
    s = pr.digits if name == "digits" else pr.toy
    loop = LoopConfig(
        steps=s.reflow_steps, batch_size=s.reflow_batch, optimizer="adam", lr=s.reflow_lr,
        warmup_steps=max(1, s.reflow_steps // 20), seed=seed, ckpt_every=max(1, s.reflow_steps // 4),
        log_every=25,
    )  # fmt: skip
    cfg = ReflowConfig(data="digits16" if name == "digits" else name, loop=loop)
    changes = {
        "2rf": [], "+norm": ["loss.normalize=true"], "+pow10": ["loss.time_sampler=pow10"],
        "+hpf": [f"loss.hpf_lambda={pr.hpf_lambda}"], "+dropout": [f"student_dropout={pr.student_dropout}"],
        "+forward": [f"pairs.rho={pr.rho}"],
        "+projection": [f"pairs.projection_alpha={pr.alpha}", f"pairs.projection_pool={pr.pool}"],
    }  # fmt: skip
    out_cfgs = []
    for rung in TRAIN_RUNGS:
        if name != "digits" and rung in IMAGE_ONLY:
            continue
        cfg = apply_sets(cfg, changes[rung])
        safe = rung.lstrip("+")
        out_cfgs.append((rung, apply_sets(cfg, [f"loop.out_dir={out / 'students' / name / safe}"])))
    return out_cfgs


def _train_rung(rung: str, cfg: Any, bed: dict, pairs: Any, weak_frac: float | None, progress: bool):
    """Train one rung (resuming); with ``weak_frac`` also keep the early checkpoint as the weak guide."""
    run, weak = Path(cfg.loop.out_dir), None
    kw = dict(
        real_data=bed["ref"] if bed["shape"] != (2,) else bed["data"], progress=progress, verbose=progress
    )
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


def _run_items(name: str, bed: dict, model: Any, items: list[tuple[dict, dict]]) -> list[dict[str, Any]]:
    """One record per ``(record fields, gmflow.sample keywords)`` item, all from the bed's noise."""
    records = []
    for fields, kw in items:
        t0 = time.perf_counter()
        x = sample(model, bed["noise"], **kw)
        ms = (time.perf_counter() - t0) * 1e3
        g = kw.get("guidance")
        rec = {"dataset": name, **fields, "solver": kw["solver"], "grid": kw.get("grid")}
        rec.update(guidance=None if g is None else g.scale, **bed_metrics(name, bed, x), ms=ms)
        records.append(rec)
    return records


def _evaluate(name: str, bed: dict, model: Any, variant: str, nfes, kw: dict, cache: Path, key: dict):
    items = [({"variant": variant, "nfe": k}, {**kw, "nfe": k}) for k in nfes]
    return _cached(cache / f"{variant.lstrip('+')}.json", key, lambda: _run_items(name, bed, model, items))


def _sweeps(name: str, bed: dict, student: Any, weak: Any, pr: BenchPreset) -> list[dict[str, Any]]:
    """Inference-only sweeps on the final student: sigmoid kappa, DPM-Solver-2 r, AutoGuidance w."""
    nfes = [k for k in pr.nfes if k >= 4] or [max(pr.nfes)]
    dpm = {"solver": "dpm-solver-2", "grid": "sigmoid", "kappa": pr.kappa}
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
        ({"knob": "w", "value": v, "nfe": k}, {**dpm, "r": pr.r, "nfe": k, "guidance": AutoGuidance(weak, v)})
        for v in (1.0, 1.2, 1.4, 1.6, 2.0)
        for k in (min(pr.nfes), max(nfes))
    ]
    return _run_items(name, bed, student, items)


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
    weak = student = None
    for i, (rung, cfg) in enumerate(cfgs):
        print(f"[bench reflow] {name}: rung {rung} ({cfg.loop.steps} steps)")
        last = i == len(cfgs) - 1
        student, w = _train_rung(rung, cfg, bed, pairs, pr.weak_frac if last else None, progress)
        weak = w if last else weak
        models[rung] = (student, euler)
        ids = {"cfg": cfg.to_dict(), "weights": teacher_hash(cfg.loop.out_dir)}
        records += _evaluate(name, bed, student, rung, pr.nfes, euler, cache, {**key, **ids})
    full_cfg = {**ids, "weak": teacher_hash(Path(cfgs[-1][1].loop.out_dir + "-weak"))}
    infer = [
        ("+sigmoid", {"solver": "euler", "grid": "sigmoid", "kappa": pr.kappa}),
        ("+dpm", {"solver": "dpm-solver-2", "grid": "sigmoid", "kappa": pr.kappa, "r": pr.r}),
    ]
    infer.append(("full", {**infer[-1][1], "guidance": AutoGuidance(weak, pr.guidance)}))
    for rung, kw in infer:
        k = {**key, "cfg": full_cfg, "kw": {a: b for a, b in kw.items() if a != "guidance"}, "w": pr.guidance}
        records += _evaluate(name, bed, student, rung, pr.nfes, kw, cache, {**k, "v": rung})
        models[rung] = (student, kw)
    print(f"[bench reflow] {name}: diagnostics")
    dkey = {**key, "cfg": full_cfg, "diag": 1, "2rf": teacher_hash(cfgs[0][1].loop.out_dir), "teacher": tid}
    diag = _cached(cache / "diagnostics.json", dkey, lambda: _diagnostics(name, bed, models, test, pr))
    if name != "digits" or pr.image_sweeps:
        skey = {**dkey, "kappa": pr.kappa, "r": pr.r}
        diag["sweeps"] = _cached(cache / "sweeps.json", skey, lambda: _sweeps(name, bed, student, weak, pr))
    diag["training"] = {
        rung: json.loads((Path(c.loop.out_dir) / "checkpoint.json").read_text())["step"] for rung, c in cfgs
    }
    samples = _figure_samples(name, bed, models, pr.nfes)
    return records, diag, samples


def _figure_samples(name: str, bed: dict, models: dict, nfes) -> dict[str, dict[int, torch.Tensor]]:
    n = 10 if name == "digits" else len(bed["noise"])
    out: dict[str, dict[int, torch.Tensor]] = {}
    for v in ("teacher", "2rf", "full"):
        model, kw = models[v]
        out[v] = {k: sample(model, bed["noise"][:n], nfe=k, **kw) for k in nfes}
    return out


# ------------------------------------------------------------------------------------------ entry point
def run(args: argparse.Namespace) -> int:
    pr, datasets, out = start_run(args, "reflow", PRESETS, DATASETS)
    progress = not args.no_progress
    t0 = time.perf_counter()
    print(f"[bench reflow] preset {args.preset}: {pr.description}\n[bench reflow] output: {out.resolve()}")
    records: list[dict[str, Any]] = []
    diags: dict[str, Any] = {}
    figs: list[Path] = []
    timing: dict[str, float] = {}
    for name in datasets:
        if name == "digits" and (why := digits_available()) is not None:
            print(f"[bench reflow] note: skipping digits (its modules are missing: {why})")
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
    text = results_markdown(records, diags, pr, args.preset)
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
    print("[bench reflow] headline (full recipe vs 2rf; negative = better):")
    for h in headline(records):
        print(f"  {h}")
    print("[bench reflow] figures:\n" + "\n".join(f"  {f}" for f in figs))
    return 0
