"""Report of the Simple ReFlow ladder benchmark: relative changes, headline, markdown tables and figures.

Split from :mod:`gmflow.bench.reflow` (which runs the ladder); both share the rung names below.
Records carry their noise ``draw``; :func:`draw_means` averages them (mean and sample sd over draws),
and the tables and the headline report those means (± sd when a bed has several draws).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch

from ..viz import histogram_grid, image_grid, metric_curves
from .reflow_beds import BenchPreset
from .reflow_images import IMAGE_BEDS

TRAIN_RUNGS = ("2rf", "+norm", "+pow10", "+hpf", "+dropout", "+forward", "+projection")
#: rows that branch off another row instead of extending the previous one: the shipped recipe vs 2-RF
#: (the headline), the projection, and the GM-teacher variant (image beds with ``gm_teacher``): the
#: GM-DiT teacher vs the FM teacher, and the recipe's student trained on the GM teacher's pairs vs the
#: one trained on the FM teacher's (both sampled with the recipe's inference)
BRANCH_OF = {"recipe": "2rf", "+projection": "+forward", "gm-teacher": "teacher", "gm-recipe": "recipe"}
LADDER = ("teacher", *(r for r in TRAIN_RUNGS if r not in BRANCH_OF), "+sigmoid", "+dpm", "full", *BRANCH_OF)
IMAGE_ONLY = ("+hpf", "+dropout")


#: per-record numbers that :func:`draw_means` averages over noise draws
AVERAGED = ("fd", "precision", "recall", "nn_ratio", "copy_frac", "sw2", "sw2_ratio", "in_support",
            "nonfinite", "ms")  # fmt: skip


def metric_name(dataset: str) -> str:
    """The main metric of a test bed: ``fd`` on image beds, ``sw2`` on 2-D sets."""
    return "fd" if dataset in IMAGE_BEDS else "sw2"


def add_relative_changes(records: list[dict[str, Any]]) -> None:
    """``prev_variant`` and signed ``rel_change = (m - m_prev) / m_prev`` of each rung vs the previous one
    (the same noise draw: ``draw``, 0 when absent)."""
    by = {(r["dataset"], r["variant"], r["nfe"], r.get("draw", 0)): r for r in records}
    for r in records:
        metric = metric_name(r["dataset"])
        i = LADDER.index(r["variant"])
        key = (r["dataset"], r["nfe"], r.get("draw", 0))
        if r["variant"] in BRANCH_OF:
            prev = BRANCH_OF[r["variant"]] if (key[0], BRANCH_OF[r["variant"]], *key[1:]) in by else None
        else:
            chain = [v for v in LADDER[:i] if v not in BRANCH_OF]
            prev = next((v for v in reversed(chain) if (key[0], v, *key[1:]) in by), None)
        r["prev_variant"] = prev
        r["rel_change"] = None
        if prev is not None:
            p = by[(key[0], prev, *key[1:])][metric]
            r["rel_change"] = (
                (r[metric] - p) / p if p and math.isfinite(p) and math.isfinite(r[metric]) else None
            )


def draw_means(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per ``(dataset, variant, nfe)``: the :data:`AVERAGED` fields as means over the draws
    that have them, ``<field>_sd`` their sample standard deviation (0 for one draw), ``draws`` the
    number of draws, ``rel_change`` between the means (no ``draw`` key)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["variant"], r["nfe"]), []).append(r)
    out = []
    for rs in groups.values():
        m = {k: v for k, v in rs[0].items() if k not in ("draw", "rel_change", "prev_variant")}
        m["draws"] = len(rs)
        for k in AVERAGED:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                m[k] = statistics.fmean(vals)
                m[f"{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(m)
    add_relative_changes(out)
    return out


def _rel(a: float, b: float) -> str:
    return f"{100.0 * (a - b) / b:+.1f}%" if b and math.isfinite(a) and math.isfinite(b) else "n/a"


def _paired(records: list[dict[str, Any]], ds: str, a: str, b: str, k: int) -> str:
    """``"; per draw -31.0 ± 2.1%"``: the change of ``a`` vs ``b`` at NFE ``k`` draw by draw (>= 2 draws)."""
    metric = metric_name(ds)
    by = {
        (r["variant"], r.get("draw", 0)): r[metric] for r in records if r["dataset"] == ds and r["nfe"] == k
    }
    ch = [100.0 * (by[(a, d)] - by[(b, d)]) / by[(b, d)] for v, d in by if v == b and (a, d) in by]
    return f"; per draw {statistics.fmean(ch):+.1f} ± {statistics.stdev(ch):.1f}%" if len(ch) > 1 else ""


def _value(r: dict[str, Any], metric: str) -> str:
    sd = f" ± {r[metric + '_sd']:.2g}" if r.get("draws", 1) > 1 else ""
    return f"{r[metric]:.4g}{sd}"


def headline(records: list[dict[str, Any]]) -> list[str]:
    """The recipe as a user runs it (``recipe``, unguided) and ``full`` (the ladder's last rung +
    AutoGuidance, with its guide evaluations) vs 2rf at NFE 1, 2 and the largest NFE per data set
    (negative = better), on the means over noise draws (± sd, and the draw-by-draw change, when there
    are several)."""
    lines = []
    for ds in dict.fromkeys(r["dataset"] for r in records):
        metric = metric_name(ds)
        raw = [r for r in records if r["dataset"] == ds]
        get = {(r["variant"], r["nfe"]): r for r in draw_means(raw)}
        nfes = sorted({k for v, k in get if v == "2rf"})
        parts = []
        for k in dict.fromkeys([n for n in nfes if n <= 2] + nfes[-1:]):
            b = get[("2rf", k)]
            part = f"NFE {k}: 2rf {_value(b, metric)}"
            if ("recipe", k) in get:
                c = get[("recipe", k)]
                part += f" -> recipe {_value(c, metric)} ({_rel(c[metric], b[metric])}"
                part += _paired(raw, ds, "recipe", "2rf", k) + ")"
            if ("full", k) in get:
                a = get[("full", k)]
                part += f", guided full {_value(a, metric)} ({_rel(a[metric], b[metric])}; "
                part += f"NFE {k} main + {k} guide"
                if ("2rf", 2 * k) in get:
                    part += f"; vs 2rf at NFE {2 * k}: {_rel(a[metric], get[('2rf', 2 * k)][metric])}"
                part += ")"
            if ("gm-recipe", k) in get:
                c = get[("gm-recipe", k)]
                part += f", recipe on GM-teacher pairs {_value(c, metric)} ({_rel(c[metric], b[metric])})"
            parts.append(part)
        if parts:
            lines.append(f"{ds} ({metric}): " + "; ".join(parts))
    return lines


def _nfe_cell(rows: list[dict[str, Any]]) -> str:
    """``"1+1, 2+2"``: the NFE (main + guide) of a rung's cells."""
    return ", ".join(f"{r.get('nfe_main', r['nfe'])}+{r.get('nfe_guide', 0)}" for r in rows)


def results_markdown(
    records: list[dict[str, Any]], diags: dict[str, Any], pr: BenchPreset, preset: str, knobs: str = ""
) -> str:
    lines = [f"# gmflow bench reflow — preset `{preset}`", "", pr.description, ""]
    lines += ["## Headline: the simple recipe vs 2-rectified flow (negative = better)", ""]
    lines += [f"- {h}" for h in headline(records)] + [""]
    lines += [
        f"{knobs}Ladder extras: projection branch lambda {pr.projection_lambda:.4g} (pool {pr.pool}), "
        f"AutoGuidance w {pr.guidance} (EDM2 lerp: 1 = none), dropout {pr.teacher_dropout} -> "
        f"{pr.student_dropout} (digits; the fmnist DiT teacher has no dropout, so that bed has no +dropout "
        "rung). Each cell: metric (signed change vs the previous rung, or vs the "
        "rung a branch starts from; negative = better). Columns are solver NFE; the last column counts "
        "every network evaluation, NFE (main + guide).",
        "",
    ]
    for ds in dict.fromkeys(r["dataset"] for r in records):
        metric = metric_name(ds)
        rows = draw_means([r for r in records if r["dataset"] == ds])
        floor = rows[0].get(f"{metric}_floor")
        image = ds in IMAGE_BEDS
        ref = "held-out test split, floor with equal counts" if image else "fresh draws"
        draws = max(r["draws"] for r in rows)
        spread = f"; mean ± sd over {draws} noise draws" if draws > 1 else ""
        lines += [f"## {ds}: {metric} (reference: {ref}; floor {floor:.4g}{spread}; lower is better)", ""]
        lines += [
            "| rung | " + " | ".join(f"NFE {k}" for k in pr.nfes) + " | NFE (main + guide) |",
            "|---|" + "---|" * (len(pr.nfes) + 1),
        ]
        for v in LADDER:
            cells = {r["nfe"]: r for r in rows if r["variant"] == v}
            if not cells:
                continue
            fmt = []
            for k in pr.nfes:
                c = cells.get(k)
                ch = "" if c is None or c.get("rel_change") is None else f" ({100 * c['rel_change']:+.1f}%)"
                fmt.append("" if c is None else f"{_value(c, metric)}{ch}")
            lines.append(f"| {v} | " + " | ".join(fmt) + f" | {_nfe_cell(list(cells.values()))} |")
        if image:
            lines += ["", "Precision / recall (draw means) and memorisation (first draw; nn_ratio: median "
                      "distance of samples to their nearest training image / that of as many test images; "
                      "copy_frac: samples closer than the closest 1 % of test images):", "",
                      "| rung | NFE | precision | recall | nn_ratio | copy_frac |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            for r in rows:
                if r["nfe"] in (min(pr.nfes), max(pr.nfes)):
                    lines.append(
                        f"| {r['variant']} | {r['nfe_main']}+{r['nfe_guide']} | {r['precision']:.3f} | "
                        f"{r['recall']:.3f} | {r['nn_ratio']:.3f} | {r['copy_frac']:.3f} |"
                    )
        d = diags.get(ds)
        if d:
            s, e = d["straightness"], d["one_step_error"]
            rl = d["relative_loss"]
            lines += [
                "",
                f"Diagnostics ({ds}): straightness (Euler, 16 steps) teacher {s['teacher']:.4g}, 2rf "
                f"{s['2rf']:.4g}, full {s['full']:.4g}; one-step error vs held-out teacher pairs: teacher "
                f"{e['teacher']:.4g}, 2rf {e['2rf']:.4g}, full {e['full']:.4g}.",
                "",
                "Per-t relative loss spread (max / min of l_i / mean l; Simple ReFlow Fig. 1): teacher FM on "
                "the independent coupling vs 2rf on its pairs",
                "",
                "| t | " + " | ".join(f"{t:g}" for t in rl["reflow_2rf_pairs"]["t"]) + " |",
                "|---|" + "---|" * len(rl["reflow_2rf_pairs"]["t"]),
            ]
            for label, k in (("teacher FM", "teacher_fm_independent"), ("2rf ReFlow", "reflow_2rf_pairs")):
                mx, mn = rl[k]["max"], rl[k]["min"]
                lines.append(
                    f"| {label} max/min | "
                    + " | ".join(f"{a / max(b, 1e-30):.3g}" for a, b in zip(mx, mn))
                    + " |"
                )
            sw = d.get("sweeps")
            if sw:
                lines += ["", f"Inference sweeps on the recipe's student (eval only; {metric}):", ""]
                lines += ["| knob | NFE | values |", "|---|---|---|"]
                for knob, k in dict.fromkeys((r["knob"], r["nfe"]) for r in sw):
                    vals = ", ".join(
                        f"{r['value']:g}: {r[metric]:.4g}" for r in sw if (r["knob"], r["nfe"]) == (knob, k)
                    )
                    lines.append(f"| {knob} | {k} | {vals} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _relative_loss_figure(diag: dict[str, Any], path: Path, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for (label, k), c in zip(
        (("teacher FM (independent)", "teacher_fm_independent"), ("2rf (pairs)", "reflow_2rf_pairs")),
        ("C0", "C3"),
    ):
        d = diag["relative_loss"][k]
        ax.fill_between(d["t"], d["min"], d["max"], color=c, alpha=0.2)
        ax.plot(d["t"], d["max"], color=c, label=f"{label} max")
        ax.plot(d["t"], d["min"], color=c, linestyle="--", label=f"{label} min")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("per-sample loss / mean loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    tmp.replace(path)
    return path


def figures(name: str, records, diag, samples, pr: BenchPreset, out: Path) -> list[Path]:
    """NFE-vs-metric curves (draw means), the relative-loss spread and sample grids (image beds: one per
    variant, a row per NFE) or histograms (2-D: teacher / 2rf / full)."""
    metric = metric_name(name)
    recs = draw_means([r for r in records if r["dataset"] == name])
    figs = [
        metric_curves(recs, out / f"{name}_{metric}_vs_nfe.png", metric=metric, group_keys=("variant",),
                      floor=recs[0].get(f"{metric}_floor"), title=f"{name}: {metric} vs NFE per rung"),
        _relative_loss_figure(diag, out / f"{name}_relative_loss.png", f"{name}: per-t relative loss spread"),
    ]  # fmt: skip
    if name in IMAGE_BEDS:
        for v, by_nfe in samples.items():
            grid = torch.cat([by_nfe[k] for k in pr.nfes]).clamp(-1, 1)
            figs.append(
                image_grid(grid, out / f"{name}_samples_{v.lstrip('+')}.png", nrow=len(by_nfe[pr.nfes[0]]))
            )
    else:
        ring = name == "ring"
        figs.append(histogram_grid(
            samples, out / f"{name}_histograms.png", nfes=list(pr.nfes), range=5.5 if ring else 4.2,
            bins=120, ref_density=0.1 if ring else 1.0 / 32.0, title=f"{name}: rows {' / '.join(samples)}",
        ))  # fmt: skip
    return figs
