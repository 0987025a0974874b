"""Evaluation of the Simple ReFlow ladder (:mod:`gmflow.bench.reflow`): cached records, noise draws,
inference sweeps, diagnostics and the samples of the figures.

Every model of a test bed is sampled from the bed's noise draws (``bed["noise"]``: one tensor per
draw, the same for every model) and scored by :func:`~gmflow.bench.reflow_beds.bed_metrics`; a
record carries its ``draw``. Each variant's records are cached in ``OUT/cache/<bed>/<variant>.json``
under a digest of everything they depend on (preset, seed, NFEs, draws, the model's config and weights).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..guidance import AutoGuidance
from ..io import atomic_write_json
from ..reflow import one_step_error, per_t_relative_loss, straightness
from ..sampling import network_evaluations, sample
from .common import key_digest
from .reflow_beds import BenchPreset, bed_metrics
from .reflow_images import IMAGE_BEDS

__all__ = ["HISTOGRAM_ROWS", "cached", "diagnostics", "evaluate", "figure_samples", "score_items", "sweeps"]


def cached(path: Path, key: dict, compute):
    """``compute()`` once per ``key`` (a JSON-able dict): the result is kept in ``path``."""
    digest = key_digest(key)
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == digest:
            return old["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": digest, "value": value})
    return value


def score_items(
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


def evaluate(name: str, bed: dict, model: Any, variant: str, nfes, kw: dict, cache: Path, key: dict):
    """The records of ``model`` at every NFE of ``nfes`` (sampling keywords ``kw``), cached in ``cache``
    under ``key`` plus the bed's draws, sample count and (image beds) the classifier's cache entry."""
    items = [({"variant": variant, "nfe": k}, {**kw, "nfe": k}) for k in nfes]
    scorer = bed.get("scorer")
    key = {**key, "draws": len(bed["noise"]), "n_eval": bed["n_eval"],
           "classifier": None if scorer is None else scorer.classifier_id}  # fmt: skip
    return cached(cache / f"{variant.lstrip('+')}.json", key, lambda: score_items(name, bed, model, items))


def sweeps(name: str, bed: dict, student: Any, weak: Any, pr: BenchPreset, sp: Any) -> list[dict[str, Any]]:
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
    return score_items(name, bed, student, items, draws=1)


def diagnostics(name: str, bed: dict, models: dict, test: tuple, pr: BenchPreset) -> dict[str, Any]:
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


HISTOGRAM_ROWS = ("teacher", "2rf", "recipe", "full")  # the 2-D beds' histogram rows, top to bottom


def figure_samples(name: str, bed: dict, models: dict, nfes) -> dict[str, dict[int, torch.Tensor]]:
    """Samples of the first noise draw per variant and NFE: 10 per variant on image beds, the whole
    draw of teacher / 2rf / recipe / full on 2-D (those of them the ladder has)."""
    image = name in IMAGE_BEDS
    noise = bed["noise"][0][:10] if image else bed["noise"][0]
    out: dict[str, dict[int, torch.Tensor]] = {}
    for v in models if image else [v for v in HISTOGRAM_ROWS if v in models]:
        model, kw = models[v]
        out[v] = {k: sample(model, noise, nfe=k, **kw) for k in nfes}
    return out
