"""The 2-D checkerboard benchmark's evaluation and report: metric records, tables, summary, figures."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..metrics import cell_mass_kl, in_support_fraction, rbf_mmd, sliced_w2_mean
from ..sampling import sample
from ..viz import histogram_grid, metric_curves

__all__ = ["best_by_nfe", "evaluate", "figures", "results_markdown", "summary_lines"]


def evaluate(
    model: Any,
    base: dict[str, Any],
    solvers: tuple[tuple[str, int], ...],
    nfes: tuple[int, ...],
    ref: torch.Tensor,
    floor: float,
    n: int,
    seed: int,
    store: dict[str, dict[int, torch.Tensor]],
    progress: bool,
) -> list[dict[str, Any]]:
    """Sample every (solver, order, NFE) cell from fresh seeded noise; one metric record per cell.

    The samples go into ``store[row label][nfe]`` for the figures.
    """
    records = []
    items = [(s, o, k) for s, o in solvers for k in nfes]
    desc = f"eval {base['model']}{'' if base.get('K') is None else ' K=' + str(base['K'])}"
    it = tqdm(items, desc=desc, disable=None if progress else True)  # None: only on a terminal
    for ci, (solver, order, nfe) in enumerate(it):
        g = torch.Generator().manual_seed(seed * 100003 + ci)
        noise = torch.randn(n, 2, generator=g)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sample(model, noise, solver=solver, nfe=nfe, order=order, generator=g)
        ms = (time.perf_counter() - t0) * 1e3
        finite = torch.isfinite(x).all(1)
        xf = x[finite]
        sw2 = sliced_w2_mean(xf, ref) if len(xf) >= 2 else float("inf")
        rec = dict(base)
        rec.update(
            solver=solver,
            order=order,
            nfe=nfe,
            sw2=sw2,
            sw2_floor=floor,
            sw2_ratio=sw2 / floor,
            mmd=rbf_mmd(xf, ref, max_points=2000) if len(xf) >= 2 else float("inf"),
            in_support=in_support_fraction(x),
            cell_kl=cell_mass_kl(xf) if len(xf) else float("inf"),
            nonfinite=int((~finite).sum()),
            ms=ms,
        )
        records.append(rec)
        label = _row_label(rec)
        store.setdefault(label, {})[nfe] = x
    return records


def _row_label(rec: dict[str, Any]) -> str:
    if rec["model"] == "fm":
        return f"FM {rec['solver']}"
    name = rec.get("recipe") or f"K={rec['K']}"
    return f"GM {name} {rec['solver']}{'' if rec['order'] == 1 else ' o2'}"


def best_by_nfe(records: list[dict[str, Any]], model: str, metric: str, **match: Any) -> dict[int, dict]:
    """Best record (lowest ``metric``, or highest for in_support) per NFE among matching records."""
    out: dict[int, dict] = {}
    sign = -1.0 if metric == "in_support" else 1.0
    for r in records:
        if r["model"] != model or any(r.get(k) != v for k, v in match.items()):
            continue
        cur = out.get(r["nfe"])
        if cur is None or sign * r[metric] < sign * cur[metric]:
            out[r["nfe"]] = r
    return out


def summary_lines(records: list[dict[str, Any]], preset_name: str) -> list[str]:
    lines = []
    fm_nfe = 16 if preset_name == "paper" else 8
    fm_best = best_by_nfe(records, "fm", "sw2")
    gm_best = best_by_nfe(records, "gmflow", "sw2", K=64)
    if fm_best and gm_best and 2 in gm_best and fm_nfe in fm_best:
        g, f = gm_best[2], fm_best[fm_nfe]
        fkl = best_by_nfe(records, "fm", "cell_kl")[fm_nfe]
        gkl = best_by_nfe(records, "gmflow", "cell_kl", K=64)[2]
        lines.append(
            f"GMFlow K=64 at NFE 2 ({g['solver']} o{g['order']}): sw2/floor {g['sw2_ratio']:.2f} "
            "vs FM best at "
            f"NFE {fm_nfe} ({f['solver']}): {f['sw2_ratio']:.2f} -> "
            f"{'GMFlow better' if g['sw2'] < f['sw2'] else 'FM better'}"
        )
        lines.append(
            f"cell-mass KL: GMFlow K=64 NFE 2 best {gkl['cell_kl']:.4f} ({gkl['solver']} o{gkl['order']}) vs "
            f"FM NFE {fm_nfe} best {fkl['cell_kl']:.4f} ({fkl['solver']}) -> "
            f"{'GMFlow better' if gkl['cell_kl'] < fkl['cell_kl'] else 'FM better'}"
        )
    return lines


def _table_key(r: dict[str, Any]) -> tuple[str, str, int]:
    """Row of the markdown tables: (model label, solver, order)."""
    model = _row_label(r).split(" ")[0] + " " + (r.get("recipe") or ("" if r["K"] is None else f"K={r['K']}"))
    return model.strip(), r["solver"], r["order"]


def results_markdown(records: list[dict[str, Any]], nfes: tuple[int, ...], metric: str, fmt: str) -> str:
    head = "| model | solver | order | " + " | ".join(f"NFE {k}" for k in nfes) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(nfes)]
    keys = list(dict.fromkeys(_table_key(r) for r in records))
    for key in keys:
        vals = {r["nfe"]: r[metric] for r in records if _table_key(r) == key}
        cells = [format(vals[k], fmt) if k in vals else "" for k in nfes]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figures(records, store, preset, floor, out) -> list[Path]:
    """Histogram grids and NFE-vs-metric curves of a finished run; returns the PNG paths."""
    figs = []
    nfes = list(preset.nfes)
    rows = [k for k in store if k.startswith("FM ")]
    big = max(preset.components) if preset.components else None
    if big is not None:
        rows += [k for k in store if k.startswith(f"GM K={big} ")]
    rows += [k for k in store if k.startswith("GM ") and "K=" not in k]
    rows.append("data")
    path = out / "histograms.png"
    bins = 100 if preset.n_eval < 100000 else 200  # fewer samples, coarser bins (less speckle)
    histogram_grid(
        store,
        path,
        nfes=nfes,
        row_labels=rows,
        bins=bins,
        title="Checkerboard samples (rows: model/solver; columns: NFE)",
    )
    figs.append(path)
    if len(preset.components) > 1:
        krows = [k for k in store if k.startswith("GM K=") and (k.endswith("o2"))] + ["data"]
        path = out / "histograms_k_sweep.png"
        histogram_grid(
            store, path, nfes=nfes, row_labels=krows, bins=bins, title="GMFlow K sweep (second-order solvers)"
        )
        figs.append(path)
    for metric, logy in (("sw2", True), ("in_support", False), ("cell_kl", True)):
        path = out / f"{metric}_vs_nfe.png"
        metric_curves(
            records,
            path,
            metric=metric,
            group_keys=("model", "K", "solver", "order")
            if not preset.extra_runs
            else ("recipe", "solver", "order"),
            logy=logy,
            floor=floor if metric == "sw2" else None,
            title=f"Checkerboard: {metric} vs NFE" + (" (dashed: MC floor)" if metric == "sw2" else ""),
        )
        figs.append(path)
    return figs
