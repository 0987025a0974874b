"""Benchmark: GM solver overhead per step relative to one forward of the paper's toy MLP.

Setup (issue #2): ToyMLP 5x512 SiLU trunk, K = 64 GM head, batch 4096, fp32, CPU threads as given.

* ``forward``: median wall time of one ``model(x_t, t)`` call under ``torch.no_grad``.
* ``overhead``: for each GM solver, ``sample()`` driven by a *replay* model that returns a
  precomputed GM output (no network cost), divided by the number of network steps -> GM maths
  per step; reported as a ratio to ``forward``.
* ``end-to-end``: ``gm-sde`` order 2 at NFE 8 on 4096 samples with the real network, next to the
  official code's 749 ms on the same CPU (docs/maths/evaluation.md §8).

Prints a table and writes ``results.json`` and ``overhead.png`` to ``--out``. Quote medians and
ratios from one run only; the machines are noisy.

    python benchmarks/gm_overhead.py --out runs/bench_overhead
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import gmflow
from gmflow.nn import ToyMLP

OFFICIAL_GM_SDE2_NFE8_MS = 749.0


def median_ms(fn, repeats: int, warmup: int = 2) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_overhead", help="output directory")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--components", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = ToyMLP(num_components=args.components).eval()
    b = args.batch
    x = torch.randn(b, 2)
    t = torch.full((b,), 0.5)
    with torch.no_grad():
        fwd_ms, _ = median_ms(lambda: model(x, t), args.repeats)
        cached = model(x, t)

    def replay(x_t, t_):  # the GM maths of the solver without the network
        return cached

    rows = []
    configs = [("gm-sde", 1, 8), ("gm-sde", 2, 8), ("gm-ode", 1, 8), ("gm-ode", 2, 8), ("euler", 1, 8)]
    for solver, order, nfe in configs:
        noise = torch.randn(b, 2)
        gen = torch.Generator().manual_seed(0)

        def run(solver=solver, order=order, nfe=nfe, noise=noise, gen=gen):
            gmflow.sample(replay, noise, solver=solver, nfe=nfe, order=order, generator=gen)

        ms, _ = median_ms(run, args.repeats)
        per_step = ms / nfe
        sub = gmflow.sampling.solvers.gm.default_substeps(nfe) if solver == "gm-ode" else 1
        rows.append(
            {
                "solver": solver,
                "order": order,
                "nfe": nfe,
                "substeps": sub,
                "gm_ms_per_step": per_step,
                "overhead_vs_forward": per_step / fwd_ms,
            }
        )

    noise = torch.randn(b, 2)
    gen = torch.Generator().manual_seed(0)
    e2e_ms, e2e_all = median_ms(
        lambda: gmflow.sample(model, noise, solver="gm-sde", nfe=8, order=2, generator=gen), args.repeats
    )
    result = {
        "batch": b,
        "components": args.components,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "forward_ms_median": fwd_ms,
        "overhead": rows,
        "gm_sde2_nfe8_ms_median": e2e_ms,
        "gm_sde2_nfe8_ms_all": e2e_all,
        "official_gm_sde2_nfe8_ms": OFFICIAL_GM_SDE2_NFE8_MS,
        "ratio_to_official": e2e_ms / OFFICIAL_GM_SDE2_NFE8_MS,
    }

    print(f"toy MLP forward (batch {b}, K={args.components}): median {fwd_ms:.1f} ms")
    print(f"{'solver':8} {'order':>5} {'nfe':>4} {'substeps':>8} {'GM ms/step':>11} {'/forward':>9}")
    for r in rows:
        print(
            f"{r['solver']:8} {r['order']:5d} {r['nfe']:4d} {r['substeps']:8d} "
            f"{r['gm_ms_per_step']:11.2f} {100 * r['overhead_vs_forward']:8.1f}%"
        )
    print(
        f"gm-sde order 2, NFE 8, {b} samples: median {e2e_ms:.0f} ms "
        f"(official {OFFICIAL_GM_SDE2_NFE8_MS:.0f} ms -> {e2e_ms / OFFICIAL_GM_SDE2_NFE8_MS:.2f}x)"
    )

    tmp = tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp")
    with tmp:
        json.dump(result, tmp, indent=2)
    os.replace(tmp.name, out / "results.json")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    labels = [f"{r['solver']} o{r['order']}" for r in rows]
    ax.bar(labels, [100 * r["overhead_vs_forward"] for r in rows], color="tab:blue")
    ax.axhline(10, color="k", ls="--", lw=1, label="10 % target")
    ax.set_ylabel("GM maths per step / forward (%)")
    ax.set_title(f"Solver overhead, toy MLP K={args.components}, batch {b} (forward {fwd_ms:.0f} ms)")
    ax.legend()
    fig.tight_layout()
    png_tmp = out / "overhead.png.tmp.png"
    fig.savefig(png_tmp, dpi=120)
    os.replace(png_tmp, out / "overhead.png")
    print(f"wrote {out / 'results.json'} and {out / 'overhead.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
