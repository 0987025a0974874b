"""Benchmark (issue #13): GM solver maths next to one network forward, and GM-ODE sub-step accuracy.

Two models: the paper's toy MLP (``ToyMLP`` 5x512, K = 64, 4096 samples; ``--toy-ckpt`` a trained run,
else untrained) and a small image GM-DiT (4 layers, hidden 128, patch 4, 32x32x1, K = 8, batch 256;
random init with its zero-initialised layers drawn at std 0.02, so its GMs depend on x, t and vary
in std). Plus the exact ring-GMM oracle in the accuracy study. "legacy" rows are the solvers as they
were before #13 (``benchmarks/gm_legacy.py``, today's Euler sub-steps and second-order update).

* ``timing``: one interleaved loop over every timed call (``--repeats`` rounds), medians of wall
  time and of thread CPU time (the machine may be shared; ratios are from the same run):
  - ``forward``: one ``model(x_t, t)``;
  - ``replay``: ``sample()`` at NFE 8 on a model that returns a cached GM (no network cost), per
    network step: the GM maths of each solver / order / sub-step method (``euler`` is the
    network-only reference: Euler on the GM mean);
  - ``e2e``: the same configurations with the real network at NFE 8 (the GM-DiT: the main ones),
    against Euler on the same model (network only) as the ratio of medians, the median of the
    same-round ratios (``paired``), and ``network + GM maths`` = 1 + 8 (replay - replay of Euler) /
    Euler's end-to-end CPU time, the least noisy of the three on a shared machine;
  - ``substeps``: one GM-ODE network step's sub-step integration (field set-up + sub-steps) at the
    default sub-step count of NFE 1, 2, 4, 8, per method (``legacy`` = today's).
* ``error``: GM-ODE order 2 at NFE 1, 2, 4, 8 in float64, RMS distance per sample (per element for
  images) to the converged ODE (``pc3`` with 2048/NFE sub-steps, checked against twice as many), for
  each method and sub-step count; with the sub-step time per network step of each count (toy).

Writes ``results.json``, ``results.md`` and ``error_vs_substeps.png`` to ``--out``.

    python benchmarks/gm_cost.py --toy-ckpt runs/toy512 --out runs/bench_gm_cost
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import gm_legacy
import torch

import gmflow
from gmflow.experiments import load_network
from gmflow.io import atomic_write_json, atomic_write_text
from gmflow.nn import GMDiT, ToyMLP
from gmflow.sampling.solvers.gm_field import GMField, PreparedGM
from gmflow.sampling.solvers.substeps import default_substeps, integrate

NFES = (1, 2, 4, 8)
COUNTS = {
    "euler": (2, 4, 8, 16, 32, 64, 128, 256),
    "pc2": (1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
    "pc3": (1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
}
SOLVERS = [
    ("euler", 1, None),
    ("gm-sde", 1, None),
    ("gm-sde", 2, None),
    ("gm-ode", 1, "pc3"),
    ("gm-ode", 2, "pc3"),
    ("gm-ode", 2, "euler"),
    ("legacy gm-sde", 2, None),
    ("legacy gm-ode", 2, "euler"),
]


def _tag(name: str, order: int, method: str | None) -> str:
    return f"{name} o{order}" + (f" {method}" if method else "")


ALL_TAGS = tuple(_tag(*s) for s in SOLVERS)
DIT_E2E = ("euler o1", "gm-sde o2", "gm-ode o2 pc3", "legacy gm-sde o2", "legacy gm-ode o2 euler")


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Round-robin timing: medians of wall and thread CPU time, and the per-round times (ms)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            f()
            wall[k].append((time.perf_counter() - t0) * 1e3)
            cpu[k].append((time.thread_time() - c0) * 1e3)
    return {
        k: {"ms": statistics.median(wall[k]), "cpu_ms": statistics.median(cpu[k]), "rounds_ms": wall[k]}
        for k in fns
    }


def build_models(toy_ckpt: str | None) -> dict[str, dict]:
    torch.manual_seed(0)
    toy = load_network(toy_ckpt) if toy_ckpt else ToyMLP(num_components=64)
    dit = GMDiT(
        in_channels=1,
        sample_size=32,
        patch_size=4,
        num_layers=4,
        num_attention_heads=4,
        attention_head_dim=32,
        num_gaussians=8,
        logstd_inner_dim=256,
        num_embeds_ada_norm=10,
    )
    with torch.no_grad():  # the zero-initialised layers (adaLN, proj_out_1, last log-std) at std 0.02
        for m in [blk.norm1.linear for blk in dit.transformer_blocks] + [dit.proj_out_1]:
            m.weight.normal_(0, 0.02)
        dit.gm_out.logstd_layers[-1].weight.normal_(0, 0.02)
        dit.gm_out.logstd_layers[-1].bias.fill_(-1.0)
    return {
        "toy": {
            "model": toy.eval(),
            "shape": (2,),
            "batch": 4096,
            "trained": bool(toy_ckpt),
            "e2e": ALL_TAGS,
            "desc": f"ToyMLP 5x512, K=64 ({'trained: ' + toy_ckpt if toy_ckpt else 'untrained'})",
        },
        "dit": {
            "model": dit.eval(),
            "shape": (1, 32, 32),
            "batch": 256,
            "trained": False,
            "e2e": DIT_E2E,
            "desc": "GMDiT 4 layers, hidden 128, patch 4, 32x32x1, K=8 (random init)",
        },
    }


def run_solver(name: str, model, noise, nfe: int, order: int, method: str | None):
    g = torch.Generator().manual_seed(0)
    if name.startswith("legacy"):
        return gm_legacy.sample(model, noise, name.split()[1], nfe, order, generator=g)
    kw = {"substep_method": method} if name == "gm-ode" else {}
    return gmflow.sample(model, noise, solver=name, nfe=nfe, order=order, generator=g, **kw)


def substep_call(method: str, gm_x0, x, t: float, t_next: float, n: int):
    if method == "legacy":
        return lambda: gm_legacy.euler_substeps(gm_x0, x, t, t_next, n)

    def call():
        prep = PreparedGM(gm_x0)
        return integrate(GMField(prep, prep.flat(x), t), prep.flat(x), t, t_next, n, method)

    return call


def timing(spec: dict, repeats: int) -> dict:
    """The timed calls of the module docstring in one interleaved loop (end to end: ``spec["e2e"]``)."""
    model, b = spec["model"], spec["batch"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, *spec["shape"], generator=g)
    t = torch.full((b,), 0.5)
    with torch.no_grad():
        cached = model(x, t)
    gm_x0 = cached.u_to_x0(x, t)
    fns = {"forward": lambda: model(x, t)}
    for name, order, method in SOLVERS:
        tag = _tag(name, order, method)
        fns[f"replay {tag}"] = lambda a=(name, order, method): run_solver(
            a[0], lambda *_: cached, x, 8, a[1], a[2]
        )
        if tag in spec["e2e"]:
            fns[f"e2e {tag}"] = lambda a=(name, order, method): run_solver(a[0], model, x, 8, a[1], a[2])
    for nfe in NFES:  # one step of length 1/(2 nfe) from the GM at t = 0.5 (the cost does not depend on t)
        for method in ("legacy", "euler", "pc3"):
            n = default_substeps(nfe, "euler" if method == "legacy" else method)
            fns[f"substeps nfe{nfe} {method} n{n}"] = substep_call(method, gm_x0, x, 0.5, 0.5 - 0.5 / nfe, n)
    with torch.no_grad():
        res = interleaved(fns, repeats)
    fwd = res["forward"]
    rows = {"forward": fwd, "replay": {}, "e2e": {}, "substeps": {}}
    for k, v in res.items():
        kind, _, tag = k.partition(" ")
        if kind == "replay":
            rows["replay"][tag] = {
                "ms": v["ms"] / 8,
                "cpu_ms": v["cpu_ms"] / 8,
                "vs_forward": v["ms"] / 8 / fwd["ms"],
                "cpu_vs_forward": v["cpu_ms"] / 8 / fwd["cpu_ms"],
            }
        elif kind == "e2e":
            rows["e2e"][tag] = v
        elif kind == "substeps":
            rows["substeps"][tag] = v
    ref, gm_ref = rows["e2e"]["euler o1"], rows["replay"]["euler o1"]
    for tag, v in rows["e2e"].items():  # ratios of medians, and the median of same-round ratios
        v["vs_network"], v["cpu_vs_network"] = v["ms"] / ref["ms"], v["cpu_ms"] / ref["cpu_ms"]
        v["paired_vs_network"] = statistics.median(a / b for a, b in zip(v["rounds_ms"], ref["rounds_ms"]))
        # network-only time plus the GM maths measured without the network (the least noisy estimate)
        v["replay_estimate"] = 1.0 + 8 * (rows["replay"][tag]["cpu_ms"] - gm_ref["cpu_ms"]) / ref["cpu_ms"]
    return rows


def error_study(name: str, model, noise, count_time: bool) -> list[dict]:
    """GM-ODE order 2 in float64 against the converged ODE, for every method and sub-step count."""

    def run(nfe, method, n):
        with torch.no_grad():
            return gmflow.sample(
                model, noise, solver="gm-ode", nfe=nfe, order=2, substeps=n, substep_method=method
            )

    def err(a, b):
        return float((a - b).flatten(1).square().mean(1).mean().sqrt())

    recs = []
    for nfe in NFES:
        n_ref = 2048 // nfe
        ref = run(nfe, "pc3", n_ref)
        check = err(run(nfe, "pc3", 2 * n_ref), ref)
        for method, counts in COUNTS.items():
            for n in counts:
                if method == "euler" and n > 4 * math.ceil(128 / nfe):
                    continue
                recs.append(
                    {
                        "model": name,
                        "nfe": nfe,
                        "method": method,
                        "substeps": n,
                        "rms": err(run(nfe, method, n), ref),
                        "ref_substeps": n_ref,
                        "ref_check": check,
                        "default": n == default_substeps(nfe, method),
                    }
                )
        print(f"[error] {name} NFE {nfe}: reference pc3 x{n_ref} (vs x{2 * n_ref}: {check:.1e})", flush=True)
    if count_time:  # sub-step time per network step, float32, toy shapes
        b = noise.shape[0]
        x = torch.randn(b, *noise.shape[1:])
        with torch.no_grad():
            gm = model.float()(x, torch.full((b,), 0.5)).u_to_x0(x, torch.full((b,), 0.5))
        model.double()
        fns = {
            (r["method"], r["substeps"]): substep_call(r["method"], gm, x, 0.5, 0.25, r["substeps"])
            for r in recs
        }
        res = interleaved({f"{m} {n}": f for (m, n), f in fns.items()}, repeats=5)
        for r in recs:
            r["substep_ms"] = res[f"{r['method']} {r['substeps']}"]["ms"]
    return recs


def markdown(result: dict) -> str:
    out = ["# GM solver cost and GM-ODE sub-step accuracy (benchmarks/gm_cost.py)", ""]
    for key, tm in result["timing"].items():
        spec = result["models"][key]
        f = tm["forward"]
        out += [
            f"## {spec} — batch {result['batch'][key]}",
            "",
            f"One forward: median {f['ms']:.1f} ms wall, {f['cpu_ms']:.1f} ms CPU.",
            "",
            "| solver (NFE 8) | GM maths ms / step | / forward | CPU / forward | end-to-end ms "
            "| / network only | CPU / network only | paired | network + GM maths |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for tag, r in tm["replay"].items():
            e = tm["e2e"].get(tag)
            e2e = (
                "| — | — | — | — | —"
                if e is None
                else (
                    f"| {e['ms']:.0f} | {e['vs_network']:.3f} | {e['cpu_vs_network']:.3f} | "
                    f"{e['paired_vs_network']:.3f} | {e['replay_estimate']:.3f}"
                )
            )
            share, cpu_share = 100 * r["vs_forward"], 100 * r["cpu_vs_forward"]
            gm = f"| {tag} | {r['ms']:.2f} | {share:.1f} % | {cpu_share:.1f} % "
            out.append(f"{gm}{e2e} |")
        out += ["", "| sub-step integration of one network step | ms | CPU ms |", "|---|---|---|"]
        out += [f"| {tag} | {v['ms']:.2f} | {v['cpu_ms']:.2f} |" for tag, v in tm["substeps"].items()]
        out.append("")
    out += ["## GM-ODE order 2: RMS error vs the converged ODE", ""]
    for model in dict.fromkeys(r["model"] for r in result["error"]):
        recs = [r for r in result["error"] if r["model"] == model]
        out += [
            f"### {model}",
            "",
            "| NFE | method | " + " | ".join(f"n={n}" for n in COUNTS["euler"]) + " |",
        ]
        for nfe in NFES:
            for method in COUNTS:
                cells = {r["substeps"]: r for r in recs if r["nfe"] == nfe and r["method"] == method}
                ns = sorted(cells)
                line = " | ".join(
                    f"{n}: {cells[n]['rms']:.1e}{'*' if cells[n]['default'] else ''}" for n in ns
                )
                out.append(f"| {nfe} | {method} | {line} |")
        out += ["", "(`*`: the default sub-step count; reference: pc3 with 2048/NFE sub-steps)", ""]
    return "\n".join(out) + "\n"


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in result["error"]))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    colors = {"euler": "tab:red", "pc2": "tab:orange", "pc3": "tab:blue"}
    for row, model in zip(axes, models):
        for nfe, ls in zip(NFES, ("-", "--", "-.", ":")):
            for method, col in colors.items():
                recs = [
                    r
                    for r in result["error"]
                    if r["model"] == model and r["nfe"] == nfe and r["method"] == method
                ]
                row[0].loglog(
                    [r["substeps"] for r in recs],
                    [r["rms"] for r in recs],
                    ls,
                    color=col,
                    label=f"{method} NFE {nfe}",
                )
                if "substep_ms" in recs[0]:
                    row[1].loglog([r["substep_ms"] for r in recs], [r["rms"] for r in recs], ls, color=col)
                for r in recs:
                    if r["default"]:
                        row[0].plot(r["substeps"], r["rms"], "o", color=col)
        row[0].set(xlabel="sub-steps per network step", ylabel="RMS error vs converged ODE", title=model)
        row[0].legend(fontsize=6, ncol=2)
        if row[1].lines:
            row[1].set(xlabel="sub-step time per network step (ms)", title=f"{model}: error vs cost")
        else:  # the sub-step time is measured on the timed models only
            row[1].axis("off")
            row[1].text(0.5, 0.5, f"{model}: sub-step time not measured", ha="center", va="center")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_gm_cost")
    ap.add_argument("--toy-ckpt", default=None, help="a trained ToyMLP run directory (default: untrained)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-error", action="store_true", help="timing only")
    ap.add_argument("--skip-timing", action="store_true", help="accuracy study only")
    ap.add_argument("--models", default="toy,dit", help="timed models, comma-separated (default: toy,dit)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = build_models(args.toy_ckpt)
    result = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "models": {k: s["desc"] for k, s in specs.items()},
        "batch": {k: s["batch"] for k, s in specs.items()},
        "timing": {},
        "error": [],
    }
    for key, spec in specs.items():
        if args.skip_timing or key not in args.models.split(","):
            continue
        print(f"[timing] {spec['desc']}", flush=True)
        result["timing"][key] = timing(spec, args.repeats)
        atomic_write_json(out / "results.json", result)
    if not args.skip_error:
        g = torch.Generator().manual_seed(2)
        ring = gmflow.ring_gmm()
        studies = [
            ("toy", specs["toy"]["model"].double(), torch.randn(2048, 2, generator=g, dtype=torch.float64)),
            ("ring oracle", ring, torch.randn(4096, 2, generator=g, dtype=torch.float64)),
            (
                "dit",
                specs["dit"]["model"].double(),
                torch.randn(16, 1, 32, 32, generator=g, dtype=torch.float64),
            ),
        ]
        for name, model, noise in studies:
            result["error"] += error_study(name, model, noise, count_time=name == "toy")
            atomic_write_json(out / "results.json", result)
        figure(result, out / "error_vs_substeps.png")
    atomic_write_json(out / "results.json", result)
    text = markdown(result)
    atomic_write_text(out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
