"""Simple ReFlow ladder: each improvement of Simple ReFlow added cumulatively, on four CPU test beds.

    gmflow bench reflow --preset quick --out runs/reflow-quick     # run again to reuse finished work
    gmflow bench reflow --preset fmnist --out runs/reflow-fmnist   # Fashion-MNIST (issue 12); resumes
    gmflow bench reflow --preset fmnist --estimate                 # its measured time breakdown, then exit

Presets (:data:`PRESETS`): ``quick`` and ``full`` (checkerboard, ring, digits), ``fmnist`` (the
Fashion-MNIST bed only; its budget breakdown is the comment above ``_FMNIST`` in reflow_beds.py) and
``smoke`` (seconds; ``--datasets fmnist`` runs a tiny fmnist bed).

Test beds (:mod:`gmflow.bench.reflow_beds`):

* ``checkerboard``: the teacher is an FM ToyMLP trained here with the shared trainer (OUT/teachers).
* ``ring`` (8-mode GMM): the teacher is the EXACT GMM velocity ``ring_gmm().velocity``, so the pairs
  are exact up to the pair solver. A network cannot be copied from it, so the student is first trained
  from scratch with plain FM on the ring (OUT/teachers/ring-init) and ReFlow starts from that network.
* ``digits`` (sklearn digits, 16x16): the teacher is a SmallUNet trained with FM on the train split; the
  metric is the classifier-feature Fréchet distance against the held-out **test** split (which never
  feeds the teacher, the classifier, the pairs or the projection), with as many samples as test images
  and a floor from as many training images; precision / recall and a memorisation check are recorded.
* ``fmnist`` (Fashion-MNIST 32x32): the teacher is an unconditional flow-matching DiT of the image
  benchmark's quick trunk trained on the train split; the same protocol against the 10,000 test
  images with ``n_eval`` samples per cell and ``draws`` noise draws (mean ± sd), the image
  benchmark's cached classifier, no ``+dropout`` rung (the DiT teacher has no dropout), and the
  GM-teacher variant: rows ``gm-teacher`` (the GM-DiT twin, gm-ode order 2) and ``gm-recipe`` (the
  recipe's student trained on the GM teacher's gm-ode pairs). :mod:`gmflow.bench.reflow_images` and
  docs/maths/reflow.md §15-16.

Ladder (each rung adds the next improvement of the paper: the normaliser and ``t`` density of
``gmflow.experiments.recipe("simple", shape)``, the preset's ``hpf_lambda`` and ``rho``; every model is
evaluated at each NFE with the same noise), then the shipped recipe as its own row:

=============== ===========================================================================================
teacher         the teacher itself, Euler on the uniform grid
2rf             student = copy of the teacher; uniform t, velocity MSE, teacher dropout, backward pairs
                only; Euler, uniform grid (2-rectified flow)
+norm           the recipe's loss normaliser (``sample``: ``l / max(sg[l], floor)``; ``learned``: a side
                network for ``log E[l | x_t, t]``); left out where the recipe has none
+pow10          ``t ∝ 10^t``
+hpf            FFT-mask HPF distance, lambda ``hpf_lambda`` (images only)
+dropout        smaller student dropout (digits only: the toy MLP and the fmnist DiT teacher have none)
+forward        forward pairs with ratio ``rho``: the ladder's last student
+sigmoid        sigmoid time grid (kappa); same student, inference only
+dpm            DPM-Solver-2 (r); inference only: the paper's recipe without guidance
full            + AutoGuidance: weak model = that student's checkpoint after ``weak_frac`` of its
                steps; ``w`` in the EDM2 lerp convention (w = 1 is none; the paper's 0.6 is 1.6 here).
                The guide is a second network evaluation per solver call: the tables report NFE (main +
                guide), and the headline also compares it with 2-RF at the same total NFE.
recipe          ``recipe("simple", shape)`` **as a user runs it** (its training knobs, the bed's student
                dropout, DPM-Solver-2 on the sigmoid grid), change vs 2rf: the headline. It reuses the
                ladder rung with the same training config (fmnist: ``+pow10``, as the image recipe has
                no HPF and no forward pairs; 2-D: ``+forward``), else trains its own (digits).
+projection     branch off ``+forward``: the coupling projection computed once over the pair set,
                ``x0 <- (x0 + lambda y) / (1 + lambda)`` (a measurement; the recipe has no projection)
=============== ===========================================================================================

Outputs: ``results.json`` (records with dataset, variant, nfe, draw, nfe_main / nfe_guide / nfe_total,
the metric: ``sw2`` + ``sw2_floor`` on 2-D, ``fd`` + ``fd_floor``, precision, recall and (first draw)
``nn_ratio``, ``copy_frac`` on image beds, and ``rel_change`` vs the previous rung on the same draw),
``results.md`` (means ± sd over draws), ``diagnostics.json`` (straightness, one-step error, per-t
relative loss spread, inference sweeps), NFE-vs-metric PNGs, histograms (2-D) or one sample grid per
variant (image beds: a row per NFE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import apply_sets
from ..experiments import (
    ReflowConfig,
    load_network,
    recipe,
    train_reflow,
)
from ..guidance import AutoGuidance
from ..io import atomic_write_json, atomic_write_text
from ..reflow import NORMALIZATIONS, teacher_hash
from ..train import LoopConfig, has_checkpoint, read_manifest
from .common import add_run_arguments, start_run
from .reflow_beds import DATASETS, PRESETS, BenchPreset, bed_available, make_gm_pairs, make_pairs, setup_bed
from .reflow_eval import HISTOGRAM_ROWS, cached, diagnostics, evaluate, figure_samples, sweeps
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
def _base_config(name: str, pr: BenchPreset, seed: int) -> ReflowConfig:
    """The 2-RF student run of test bed ``name`` (every rung and the recipe row start from it)."""
    s = pr.sizes(name)
    image = IMAGE_BEDS.get(name)
    loop = LoopConfig(
        steps=s.reflow_steps, batch_size=s.reflow_batch, optimizer="adam", lr=s.reflow_lr,
        warmup_steps=max(1, s.reflow_steps // 20), seed=seed, ckpt_every=max(1, s.reflow_steps // 4),
        log_every=25,
    )  # fmt: skip
    return ReflowConfig(data=image.data if image else name, loop=loop)


def _rung_configs(name: str, pr: BenchPreset, out: Path, seed: int) -> list[tuple[str, Any]]:
    """The training rungs, each adding one improvement of the paper to the previous one.

    The normaliser and ``t`` density are those of ``recipe("simple", shape)`` (``pr.normalize``
    overrides the normaliser), the HPF lambda and forward-pair ratio the preset's ``hpf_lambda`` /
    ``rho`` (the paper's values, which the shipped image recipe turns off by measurement).
    ``+projection`` is a branch off ``+forward``; rungs that do not apply (no normaliser, the HPF
    distance on vectors, dropout without a teacher dropout) are left out.
    """
    image = IMAGE_BEDS.get(name)
    rec = recipe("simple", image.shape if image else (2,))
    cfg = _base_config(name, pr, seed)
    norm = pr.normalize if pr.normalize is not None else rec.loss.normalize
    changes = {
        "2rf": [], "+norm": [f"loss.normalize={norm}"],
        "+pow10": [f"loss.time_sampler={rec.loss.time_sampler}"],
        "+hpf": [f"loss.hpf_lambda={pr.hpf_lambda}"],
        "+dropout": [f"student_dropout={pr.student_dropout}"], "+forward": [f"pairs.rho={pr.rho}"],
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


def _recipe_config(name: str, pr: BenchPreset, out: Path, seed: int, cfgs: list[tuple[str, Any]]):
    """``(config, rung)``: the student of ``recipe("simple", shape)`` as shipped (with the bed's
    smaller student dropout where the teacher has dropout), and the ladder rung with the same training
    config whose run it reuses (``None``: it trains in ``OUT/students/<bed>/recipe``)."""
    image = IMAGE_BEDS.get(name)
    rec = recipe("simple", image.shape if image else (2,))
    sets = [f"loss.normalize={rec.loss.normalize}", f"loss.time_sampler={rec.loss.time_sampler}",
            f"loss.hpf_lambda={rec.loss.hpf_lambda}", f"pairs.rho={rec.pairs.rho}"]  # fmt: skip
    if image is not None and image.dropout_rung:
        sets.append(f"student_dropout={pr.student_dropout}")
    cfg = apply_sets(_base_config(name, pr, seed), sets)

    def training(c: ReflowConfig) -> dict:
        d = c.to_dict()
        d["loop"].pop("out_dir")
        return d

    same = next((rung for rung, c in cfgs if training(c) == training(cfg)), None)
    if same is not None:
        return dict(cfgs)[same], same
    return apply_sets(cfg, [f"loop.out_dir={out / 'students' / name / 'recipe'}"]), None


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
    records = evaluate(
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
        records += evaluate(name, bed, net, rung, pr.nfes, euler, cache, {**key, **ids})
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
        records += evaluate(name, bed, student, rung, pr.nfes, kw, cache, {**k, "v": rung})
        models[rung] = (student, kw)
    rcfg, same = _recipe_config(name, pr, out, seed, cfgs)
    if same is None:
        print(f"[bench reflow] {name}: the shipped recipe's student ({rcfg.loop.steps} steps)")
        net, _ = _train_rung("recipe", rcfg, bed, pairs, None, progress)
    else:
        net = models[same][0]
    dpm = infer[1][1]
    ids = {"cfg": rcfg.to_dict(), "weights": teacher_hash(rcfg.loop.out_dir), "kw": dpm}
    records += evaluate(name, bed, net, "recipe", pr.nfes, dpm, cache, {**key, **ids, "v": "recipe"})
    models["recipe"] = (net, dpm)
    if bed["sizes"].gm_teacher:
        records += _gm_variant(name, bed, pr, (out, seed, progress), rcfg, dpm, (cache, key), models)
    print(f"[bench reflow] {name}: diagnostics")
    dkey = {**key, "cfg": full_cfg, "diag": 1, "2rf": teacher_hash(cfgs[0][1].loop.out_dir), "teacher": tid}
    diag = cached(cache / "diagnostics.json", dkey, lambda: diagnostics(name, bed, models, test, pr))
    if name not in IMAGE_BEDS or pr.image_sweeps:
        skey = {**dkey, "kappa": sp.kappa, "r": sp.r}
        diag["sweeps"] = cached(cache / "sweeps.json", skey, lambda: sweeps(name, bed, student, weak, pr, sp))
    diag["training"] = {
        rung: json.loads((Path(c.loop.out_dir) / "checkpoint.json").read_text())["step"] for rung, c in cfgs
    }
    samples = figure_samples(name, bed, models, pr.nfes)
    return records, diag, samples


def _gm_variant(
    name: str, bed: dict, pr: BenchPreset, run: tuple, cfg: Any, dpm: dict, ck: tuple, models: dict
):
    """The GM-teacher variant: the GM-DiT teacher (gm-ode order 2) and the shipped recipe's student
    (``cfg``, initialised from the FM teacher) trained on the GM teacher's pairs, sampled as ``recipe``."""
    (out, seed, progress), (cache, key) = run, ck
    print(f"[bench reflow] {name}: GM-DiT teacher and its pairs (gm-ode order 2)")
    gm, pairs = make_gm_pairs(name, bed, pr, out, seed, progress)
    gkw = {"solver": "gm-ode", "order": 2, "grid": "uniform"}
    gid = {"v": "gm-teacher", "w": teacher_hash(out / "teachers" / f"{name}-gm")}
    records = evaluate(name, bed, gm, "gm-teacher", pr.nfes, gkw, cache, {**key, **gid})
    cfg = apply_sets(cfg, [f"loop.out_dir={out / 'students' / name / 'gm-recipe'}"])
    print(f"[bench reflow] {name}: rung gm-recipe ({cfg.loop.steps} steps, GM-teacher pairs)")
    net, _ = _train_rung("gm-recipe", cfg, bed, pairs, None, progress)
    ids = {"cfg": cfg.to_dict(), "weights": teacher_hash(cfg.loop.out_dir), "kw": dpm}
    records += evaluate(name, bed, net, "gm-recipe", pr.nfes, dpm, cache, {**key, **ids})
    models.update({"gm-teacher": (gm, gkw), "gm-recipe": (net, dpm)})
    return records


def _figure_notes(figs: list[Path], out: Path, pr: BenchPreset) -> str:
    """The figure list of results.md, saying how a sample grid reads (its PNG has no labels)."""
    if not figs:
        return ""
    nfes = ", ".join(str(k) for k in pr.nfes)
    lines = [f"\nFigures (in `{out}`):"]
    for f in figs:
        note = ""
        if "_samples_" in f.name:
            note = f": a row per NFE ({nfes} from the top), the same first-draw noise in each column"
        elif f.name.endswith("_histograms.png"):
            note = f": rows {' / '.join(HISTOGRAM_ROWS)} (those the ladder has), a column per NFE"
        lines.append(f"- `{f.name}`{note}")
    return "\n".join(lines) + "\n"


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
        cfgs = _rung_configs(name, pr, out, seed)
        rungs = [r for r, _ in cfgs]
        trained = len(rungs) + (_recipe_config(name, pr, out, seed, cfgs)[1] is None)
        est = estimate(name, pr, ["teacher", *rungs, "+sigmoid", "+dpm", "full", "recipe"], trained)
        parts = ", ".join(f"{k[:-2]} {v / 60:.1f}" for k, v in est.items() if k.endswith("_s"))
        unit = ", ".join(f"{k} {v:.3g}" for k, v in est.items() if not k.endswith("_s"))
        print(f"[bench reflow] {name} estimate (min on this machine now): {parts}\n  measured: {unit}")
    return 0


# ------------------------------------------------------------------------------------------ entry point
def run(args: argparse.Namespace) -> int:
    pr, datasets, out = start_run(args, "reflow", PRESETS, DATASETS)
    for name in datasets:
        pr.sizes(name)  # ConfigError before any work when the preset has no budget for a bed
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
    text += _figure_notes(figs, out, pr)
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
