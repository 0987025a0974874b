"""What bounds a ReFlow student: its teacher sampled the way the pairs were made, and any trained rung
sampled with the recipe's inference.

A ReFlow student learns the teacher's coupling as the pair solver computed it, so the teacher sampled
with that solver at the pair NFE is the quality the students can approach, not exceed. This script
reloads a finished (or partly finished) ``gmflow bench reflow`` run and scores, on the benchmark's own
noise draws, reference and metrics (``bed_metrics``: FD against the held-out test split on image beds):

* ``teacher@pairs``: the teacher with the backward pairs' solver and NFE (read from their manifest);
* ``teacher@dpm``: the teacher with the recipe's inference (DPM-Solver-2, sigmoid grid) at each NFE;
* ``<rung>@dpm`` for each ``--rungs`` student directory (``OUT/students/<bed>/<rung>``), recipe inference.

It prints mean ± sd over the draws and writes ``ceiling.json`` into the run directory.

    python benchmarks/reflow_ceiling.py --run runs/reflow-fmnist --preset fmnist --bed fmnist \\
        --rungs pow10 hpf forward
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from gmflow.bench.reflow_beds import PRESETS, setup_bed
from gmflow.bench.reflow_eval import score_items
from gmflow.bench.reflow_report import metric_name
from gmflow.experiments import load_network, recipe
from gmflow.io import atomic_write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="output directory of `gmflow bench reflow`")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the run's preset")
    p.add_argument("--bed", required=True, help="test bed of the run, e.g. fmnist or digits")
    p.add_argument(
        "--rungs", nargs="*", default=[], help="student directories to score with recipe inference"
    )
    p.add_argument("--seed", type=int, default=0, help="the run's --seed (default 0)")
    args = p.parse_args()
    pr = PRESETS[args.preset]
    if args.bed not in pr.datasets and args.preset != "smoke":
        p.error(f"--bed: preset {args.preset!r} runs {', '.join(pr.datasets)}, not {args.bed!r}")
    bed = setup_bed(args.bed, pr, args.run, args.seed, progress=False)  # reuses the run's teacher
    manifest = json.loads((args.run / "pairs" / args.bed / "backward" / "manifest.json").read_text())
    sp = recipe("simple", bed["shape"]).sampling
    dpm = {"solver": "dpm-solver-2", "grid": "sigmoid", "kappa": sp.kappa, "r": sp.r}
    pair_kw = {"solver": manifest["solver"], "nfe": manifest["nfe"], "order": manifest["order"],
               "grid": manifest["grid"]}  # fmt: skip
    rows = score_items(
        args.bed, bed, bed["teacher"], [({"variant": "teacher@pairs", "nfe": pair_kw["nfe"]}, pair_kw)]
    )
    models = [("teacher", bed["teacher"])]
    for rung in args.rungs:
        run = args.run / "students" / args.bed / rung
        if not (run / "checkpoint.json").is_file():
            p.error(f"--rungs: {run} has no checkpoint")
        models.append((rung, load_network(run)))
    for label, net in models:
        items = [({"variant": f"{label}@dpm", "nfe": k}, {**dpm, "nfe": k}) for k in pr.nfes]
        rows += score_items(args.bed, bed, net, items)
    summary: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        summary.setdefault(r["variant"], {}).setdefault(r["nfe"], []).append(r[metric_name(args.bed)])
    for variant, by_nfe in summary.items():
        cells = [
            f"NFE {k}: {statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}"
            for k, v in sorted(by_nfe.items())
        ]
        print(f"{variant:>16}  " + "  ".join(cells))
    atomic_write_json(args.run / "ceiling.json", {"pair_solver": pair_kw, "sampling": dpm, "records": rows})


if __name__ == "__main__":
    main()
