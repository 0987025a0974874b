"""Seed repeats of the toy2d headline comparison: GMFlow at a few steps vs flow matching at many.

sliced-W2 on the checkerboard is dominated by how the mass splits over the 8 cells and moves by about
±0.25 x floor between noise seeds (docs/maths/evaluation.md §1), so one draw cannot decide a
comparison that close. This script reloads the trained models of a finished ``gmflow bench toy2d``
run and re-evaluates the headline rows with ``--seeds`` fresh noise draws each:

* GMFlow K = ``--K`` with every GM solver (gm-sde / gm-ode, order 1 / 2) at ``--gm-nfe``;
* FM with euler, heun, dpm++2m, dpm-solver-2 at ``--fm-nfe``.

It prints mean ± sd of sliced-W2 / floor, cell-mass KL and in-support per row and writes
``seed_repeats.json`` next to the run's ``results.json``. The reference set and floor are the
benchmark's (:func:`gmflow.metrics.reference_set` of the checkerboard, same number of samples).

    python benchmarks/toy2d_seed_repeats.py --run runs/toy2d-paper --gm-nfe 2 --fm-nfe 16 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from gmflow.experiments import load_network
from gmflow.io import atomic_write_json
from gmflow.metrics import cell_mass_kl, in_support_fraction, reference_set, sliced_w2_mean
from gmflow.sampling import sample

GM_ROWS = (("gm-sde", 1), ("gm-sde", 2), ("gm-ode", 1), ("gm-ode", 2))
FM_ROWS = (("euler", 1), ("heun", 1), ("dpm++2m", 1), ("dpm-solver-2", 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="output directory of a finished `gmflow bench toy2d` run")
    p.add_argument("--K", type=int, default=64, help="GMFlow components to compare (default 64)")
    p.add_argument("--gm-nfe", type=int, default=2)
    p.add_argument("--fm-nfe", type=int, default=16)
    p.add_argument("--seeds", type=int, default=5, help="fresh noise draws per row (default 5)")
    args = p.parse_args()
    run = Path(args.run)
    meta_path = run / "meta.json"
    if not meta_path.is_file():
        raise SystemExit(f"error: {meta_path} not found; --run must be a finished toy2d benchmark directory")
    n = json.loads(meta_path.read_text())["config"]["n_eval"]
    ref, floor = reference_set("checkerboard", n)
    rows = [("fm", s, o, args.fm_nfe) for s, o in FM_ROWS]
    rows += [(f"gmflow-k{args.K}", s, o, args.gm_nfe) for s, o in GM_ROWS]
    records = []
    print(f"{n} samples per draw, {args.seeds} draws per row, floor {floor:.4f}")
    print(f"{'model':12s} {'solver':13s} o NFE  sw2/floor (mean ± sd)   cell KL (mean)  in-support (mean)")
    for name, solver, order, nfe in rows:
        model = load_network(run / "models" / name)
        per_seed = []
        for s in range(args.seeds):
            g = torch.Generator().manual_seed(777_000 + 1000 * s + nfe)
            x = sample(
                model, torch.randn(n, 2, generator=g), solver=solver, nfe=nfe, order=order, generator=g
            )
            per_seed.append(
                {"sw2_ratio": sliced_w2_mean(x, ref) / floor, "cell_kl": cell_mass_kl(x),
                 "in_support": in_support_fraction(x)}
            )  # fmt: skip
        agg = {
            k: (statistics.mean(r[k] for r in per_seed), statistics.stdev(r[k] for r in per_seed))
            for k in per_seed[0]
        }
        records.append(dict(model=name, solver=solver, order=order, nfe=nfe, seeds=per_seed,
                            **{f"{k}_mean": v[0] for k, v in agg.items()},
                            **{f"{k}_sd": v[1] for k, v in agg.items()}))  # fmt: skip
        print(
            f"{name:12s} {solver:13s} {order} {nfe:3d}  {agg['sw2_ratio'][0]:6.2f} ± "
            f"{agg['sw2_ratio'][1]:4.2f}            {agg['cell_kl'][0]:.5f}        {agg['in_support'][0]:.4f}"
        )
    atomic_write_json(
        run / "seed_repeats.json", {"floor": floor, "n": n, "seeds": args.seeds, "records": records}
    )
    print(f"wrote {run / 'seed_repeats.json'}")


if __name__ == "__main__":
    main()
