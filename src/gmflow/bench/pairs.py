"""Teachers for ReFlow pairs: a GMFlow teacher sampled with gm-ode vs an FM teacher, accuracy against cost.

    gmflow bench pairs --preset quick --out runs/pairs-quick
    gmflow bench pairs --preset paper --teachers runs/toy2d-paper    # reuse the toy2d paper models

ReFlow trains a student on backward pairs ``(x0, x1)``: ``x1 ~ N(0, I)`` integrated by the teacher's
probability-flow ODE down to ``x0``. The pairs are only as good as that integration, and generating
them is the dominant cost of one ReFlow round. A GMFlow teacher predicts a Gaussian mixture over the
velocity, so ``gm-ode`` can take many analytic sub-steps per network evaluation; an FM teacher gets one
velocity per evaluation (``euler``, ``dpm++2m``). This benchmark measures, at the same NFE:

* ``pair_rmse``: ``sqrt(mean_i |x0_i - x0_i^ref|^2)``, where ``x0^ref`` integrates the *same* teacher's
  ODE from the *same* noise with ``dpm++2m`` at ``ref_nfe`` evaluations on its mean velocity (a GM
  teacher's ODE is that of its mean velocity: ``gm-ode`` converges to it as the step shrinks). The
  reference's own error is estimated by ``dpm++2m`` at ``ref_nfe / 2`` against it (``ref_err``).
* ``sw2`` / ``sw2_floor``: sliced-W2 of the ``x0`` to held-out data (the pair *distribution*), next to
  the reference's.
* ``ms_per_1k``: wall time per 1000 pairs (median of ``repeats`` timed runs, one process).

Test beds:

* ``checkerboard``: an FM teacher and a GMFlow K = 64 teacher (smoke: 4) trained with the same trunk, budget
  and recipe by the toy2d benchmark's configuration (``--teachers DIR`` reuses ``DIR/models/{fm,gmflow-k64}``
  of a finished ``gmflow bench toy2d`` run with the same preset; otherwise they are trained in OUT).
  ``dpm++2m`` / ``euler`` rows of the GMFlow teacher use its mean velocity and separate the teacher
  from the solver.
* ``ring`` (8-mode GMM): one *exact* teacher, as a GM (``gm-ode``) and as its mean velocity
  (``euler``, ``dpm++2m``): identical ODE, so rows differ only by the solver.

Forward pairs (data -> noise) are not compared: ``gm-ode`` integrates downwards only.
Outputs: ``results.json`` (one record per dataset x teacher x solver x order x NFE), ``results.md``,
``pair_error_<dataset>.png`` (pair RMSE vs NFE) and ``pair_cost_<dataset>.png`` (pair RMSE vs ms per
1000 pairs).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import make_toy2d, ring_gmm
from ..experiments import load_network, run_experiment
from ..io import atomic_write_json, atomic_write_text
from ..metrics import reference_set, sliced_w2_mean
from ..sampling import SOLVERS, sample
from ..viz import metric_curves
from .common import add_run_arguments, start_run
from .toy2d import PRESETS as TOY_PRESETS
from .toy2d import train_configs

DATASETS = ("checkerboard", "ring")
TEACHER_NAMES = ({"fm": "fm", "gm": "gmflow"}, {"fm": "exact-mean", "gm": "exact-gm"})  # [is ring][kind]

# (teacher kind, solver, order): "gm" rows hand the solver the GaussianMixture, "mean" rows its mean
ROWS: tuple[tuple[str, str, int], ...] = (
    ("fm", "euler", 1),
    ("fm", "dpm++2m", 1),
    ("gm", "gm-ode", 1),
    ("gm", "gm-ode", 2),
    ("gm", "euler", 1),
    ("gm", "dpm++2m", 1),
)


@dataclass(frozen=True)
class PairsPreset:
    description: str
    toy2d_preset: str  # the toy2d benchmark preset whose FM / GMFlow configuration trains the teachers
    n_pairs: int
    nfes: tuple[int, ...]
    components: int = 64  # K of the GMFlow teacher
    ref_nfe: int = 512
    repeats: int = 3
    datasets: tuple[str, ...] = ("checkerboard", "ring")


PRESETS: dict[str, PairsPreset] = {
    # Measured (docs/RESULTS.md §6): gm-ode NFE 4 pair RMSE 0.17 vs FM dpm++2m 0.71 (cost ratio 4.3x).
    "quick": PairsPreset(
        "<= 5 min on 2 idle cores: toy2d-quick teachers, 4096 pairs", "quick", 4096, (1, 2, 4, 8, 16, 32)
    ),  # fmt: skip
    # Measured (§6, 10.5 min): GMFlow + gm-ode o2 pairs 17x (NFE 1) to 2.5x (NFE 8) closer to the teacher's
    # converged ODE than FM + dpm++2m at the same NFE; equal accuracy at ~0.5x the time (NFE 4 vs 16).
    "paper": PairsPreset(
        "toy2d-paper teachers (5x512; ~20 min to train if not reused), 8192 pairs",
        "paper",
        8192,
        (1, 2, 4, 8, 16, 32),
    ),  # fmt: skip
    # Seconds-long end-to-end run for tests (not meaningful as a benchmark).
    "smoke": PairsPreset(
        "smoke test (seconds; not meaningful)", "smoke", 256, (1, 2), components=4, ref_nfe=16, repeats=1
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "pairs", PRESETS, DATASETS)
    p.add_argument(
        "--teachers",
        default=None,
        metavar="DIR",
        help="a `gmflow bench toy2d` output directory with the same preset whose models/fm and "
        "models/gmflow-k<K> are reused (trained there if missing; default: OUT)",
    )


def _checkerboard_teachers(pr: PairsPreset, root: Path, seed: int, progress: bool) -> dict[str, Any]:
    """FM and GMFlow (K = ``pr.components``) teachers trained by the toy2d benchmark's configuration."""

    toy = dataclasses.replace(TOY_PRESETS[pr.toy2d_preset], components=(pr.components,), extra_runs=())
    teachers = {}
    for name, base, cfg in train_configs(toy, root, seed):
        lp = cfg.loop
        print(f"[bench pairs] teacher {name}: {lp.out_dir} ({lp.steps} steps, batch {lp.batch_size})")
        run_experiment(cfg, progress=progress, verbose=progress)
        teachers["fm" if base["model"] == "fm" else "gm"] = load_network(lp.out_dir)
    return teachers


def _timed_sample(model: Any, noise: torch.Tensor, repeats: int, **kw: Any) -> tuple[torch.Tensor, float]:
    """``sample(model, noise, **kw)`` and the median of ``repeats`` wall times in seconds."""
    times, x = [], noise
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = sample(model, noise, **kw)
        times.append(time.perf_counter() - t0)
    return x, statistics.median(times)


def pair_records(
    dataset: str,
    teachers: dict[str, Any],
    data: Any,
    pr: PairsPreset,
    seed: int,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every row of :data:`ROWS` at every NFE of ``pr`` for one test bed; returns (records, references)."""
    held_out, floor = reference_set(data, pr.n_pairs)
    noise = torch.randn(pr.n_pairs, 2, generator=torch.Generator().manual_seed(seed + 11))
    refs: dict[str, Any] = {}
    by_model: dict[int, dict[str, Any]] = {}  # one exact teacher in two roles gets one reference
    for kind, model in teachers.items():
        if id(model) not in by_model:
            x_ref = sample(model, noise, solver="dpm++2m", nfe=pr.ref_nfe)
            x_half = sample(model, noise, solver="dpm++2m", nfe=pr.ref_nfe // 2)
            by_model[id(model)] = {
                "x0": x_ref,
                "ref_err": float((x_half - x_ref).square().sum(1).mean().sqrt()),
                "sw2": sliced_w2_mean(x_ref, held_out),
            }
        refs[kind] = by_model[id(model)]
    rows = [
        r
        for r in ROWS
        if r[0] in teachers
        and not (teachers.get("fm") is teachers.get("gm") and r in (("gm", "euler", 1), ("gm", "dpm++2m", 1)))
    ]  # one exact teacher: its mean rows appear once
    items = [(k, s, o, n) for k, s, o in rows for n in pr.nfes]
    it = items
    if progress:
        it = tqdm(items, desc=f"pairs {dataset}", disable=None)  # None: only on a terminal
    records = []
    for kind, solver, order, nfe in it:
        # euler / dpm++2m use a GaussianMixture's mean velocity
        x0, sec = _timed_sample(teachers[kind], noise, pr.repeats, solver=solver, nfe=nfe, order=order)
        finite = torch.isfinite(x0).all(1)
        err = (x0 - refs[kind]["x0"]).square().sum(1)
        sw2 = sliced_w2_mean(x0[finite], held_out) if int(finite.sum()) >= 2 else math.inf
        records.append({
            "dataset": dataset, "teacher": TEACHER_NAMES[dataset == "ring"][kind],
            "kind": kind, "solver": solver, "order": order, "nfe": nfe,
            "pair_rmse": float(err[finite].mean().sqrt()) if bool(finite.any()) else math.inf,
            "pair_rmse_ref": refs[kind]["ref_err"], "sw2": sw2, "sw2_ref": refs[kind]["sw2"],
            "sw2_floor": floor, "ms_per_1k": sec * 1e3 * 1000 / pr.n_pairs, "n_pairs": pr.n_pairs,
            "nonfinite": int((~finite).sum()),
        })  # fmt: skip
    return records, {k: {a: b for a, b in v.items() if a != "x0"} for k, v in refs.items()}


def _label(r: dict[str, Any]) -> str:
    who = {"fm": "FM teacher", "gm": "GMFlow teacher"}[r["kind"]]
    if r["dataset"] == "ring":
        who = {"fm": "exact mean", "gm": "exact GM"}[r["kind"]]
    return f"{who} {r['solver']}" + (f" o{r['order']}" if len(SOLVERS[r["solver"]].orders) > 1 else "")


def results_markdown(records: list[dict[str, Any]], refs: dict[str, Any], nfes: tuple[int, ...]) -> str:
    lines = []
    for ds in dict.fromkeys(r["dataset"] for r in records):
        rows = [r for r in records if r["dataset"] == ds]
        lines += [f"## {ds}", ""]
        for kind, ref in refs[ds].items():
            lines.append(
                f"- reference ({'GM' if kind == 'gm' else 'FM'} teacher's ODE, dpm++2m): self-error "
                f"{ref['ref_err']:.2e}, sw2 {ref['sw2']:.4f} (floor {rows[0]['sw2_floor']:.4f})"
            )
        head = "| teacher / solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
        sep = "|---|" + "---|" * len(nfes)
        for metric, title, fmt in (
            ("pair_rmse", "pair RMSE to the teacher's converged ODE (lower is better)", ".4f"),
            ("sw2", "sliced-W2 of the pairs' x0 to data", ".4f"),
            ("ms_per_1k", "ms per 1000 pairs (median of repeats)", ".1f"),
        ):
            lines += ["", f"### {title}", "", head, sep]
            for label in dict.fromkeys(_label(r) for r in rows):
                by = {r["nfe"]: r for r in rows if _label(r) == label}
                cells = [format(by[n][metric], fmt) if n in by else "" for n in nfes]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def summary_lines(records: list[dict[str, Any]]) -> list[str]:
    """For each dataset and NFE: the best GM-teacher gm-ode row against the best FM-teacher row."""
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in records):
        for nfe in sorted({r["nfe"] for r in records if r["dataset"] == ds}):
            gm = [r for r in records if r["dataset"] == ds and r["nfe"] == nfe and r["solver"] == "gm-ode"]
            fm = [r for r in records if r["dataset"] == ds and r["nfe"] == nfe and r["kind"] == "fm"]
            if not gm or not fm:
                continue
            g = min(gm, key=lambda r: r["pair_rmse"])
            f = min(fm, key=lambda r: r["pair_rmse"])
            out.append(
                f"- {ds} NFE {nfe}: {_label(g)} RMSE {g['pair_rmse']:.4f} at {g['ms_per_1k']:.1f} ms/1k "
                f"vs {_label(f)} {f['pair_rmse']:.4f} at {f['ms_per_1k']:.1f} ms/1k "
                f"(error x{g['pair_rmse'] / max(f['pair_rmse'], 1e-12):.2f}, "
                f"cost x{g['ms_per_1k'] / max(f['ms_per_1k'], 1e-12):.2f})"
            )
    return out


def run(args: argparse.Namespace) -> int:
    pr, datasets, out = start_run(args, "pairs", PRESETS, DATASETS)
    progress = not args.no_progress
    t_start = time.perf_counter()
    print(f"[bench pairs] preset {args.preset}: {pr.description}")
    records: list[dict[str, Any]] = []
    refs: dict[str, Any] = {}
    for ds in datasets:
        if ds == "checkerboard":
            root = Path(args.teachers) if args.teachers else out
            teachers, data = _checkerboard_teachers(pr, root, args.seed, progress), make_toy2d("checkerboard")
        else:
            ring = ring_gmm()
            teachers, data = {"fm": ring, "gm": ring}, ring
        with torch.no_grad():
            recs, refs[ds] = pair_records(ds, teachers, data, pr, args.seed, progress)
        records += recs
        atomic_write_json(out / "results.json", records)
    text = "\n".join([
        f"# gmflow bench pairs — preset `{args.preset}`", "", pr.description, "",
        f"{pr.n_pairs} backward pairs per row, same noise for every row; reference: dpm++2m at NFE "
        f"{pr.ref_nfe} on the teacher's mean velocity. gm-ode: default sub-steps (pc3, ceil(16/NFE)).", "",
        "## Headline: best GM-teacher gm-ode row vs best FM-teacher row (pair RMSE, cost)", "",
        *summary_lines(records), "", results_markdown(records, refs, pr.nfes),
        f"Total wall time: {(time.perf_counter() - t_start) / 60:.1f} min.",
    ]) + "\n"  # fmt: skip
    atomic_write_json(out / "meta.json", {"preset": args.preset, "seed": args.seed, "references": refs,
                       "config": dataclasses.asdict(pr)})  # fmt: skip
    atomic_write_text(out / "results.md", text)
    figs = []
    for ds in datasets:
        rows = [{**r, "row": _label(r)} for r in records if r["dataset"] == ds]
        kw: dict[str, Any] = dict(metric="pair_rmse", group_keys=("row",))
        figs.append(metric_curves(rows, out / f"pair_error_{ds}.png", title=f"{ds}: pair RMSE vs NFE", **kw))
        figs.append(
            metric_curves(rows, out / f"pair_cost_{ds}.png", x="ms_per_1k", **kw,
                          title=f"{ds}: pair RMSE vs ms per 1000 pairs")
        )  # fmt: skip
    print(text)
    print("[bench pairs] figures:")
    for f in figs:
        print(f"  {f}")
    return 0
