"""Report of the ladder part of ``gmflow bench images``: the GMFlow Table 4 analogue.

Per row (a guidance sweep on draw 0, see :mod:`gmflow.bench.images_ladder`): the best FD and its
scale (mean ± sd over the draws of that cell), the best precision and its scale, and at the best
precision the class accuracy and saturation relative to the test split; each change is also given
against the row's parent (``Δ``: this row minus its parent; lower FD is better).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..metrics import PixelStats
from ..viz import sweep_panels
from .images_guidance_report import SATURATION, saturation_cells

__all__ = ["best_fd_scale", "figure", "report_markdown", "row_summary"]

KIND = {"cfg": "CFG w", "probabilistic": "w~"}
MEASURES = tuple(m for m in SATURATION if m[0] in ("d_mean_abs", "d_contrast", "pixel_w1"))  # table columns


def _sweep(records: list[dict], rid: str) -> list[dict]:
    """Draw-0 records of row ``rid`` in increasing scale."""
    return sorted((r for r in records if r["row"] == rid and r["draw"] == 0), key=lambda r: r["scale"])


def best_fd_scale(records: list[dict], rid: str) -> float:
    """The scale of row ``rid``'s lowest draw-0 FD (ValueError if the row has no scored cell)."""
    sw = _sweep(records, rid)
    if not sw:
        raise ValueError(f"row {rid!r} has no scored sweep cell")
    return min(sw, key=lambda r: r["fd"])["scale"]


def row_summary(records: list[dict], rid: str) -> dict[str, Any]:
    """``best_fd`` (mean over draws at the best-FD scale), ``fd_sd``, ``fd_draws``, ``fd_scale``, and
    ``best_prec`` with its ``prec_scale`` and the draw-0 record ``at_prec`` of that cell."""
    scale = best_fd_scale(records, rid)
    fds = [r["fd"] for r in records if r["row"] == rid and r["scale"] == scale]
    at_prec = max(_sweep(records, rid), key=lambda r: r["precision"])
    return {
        "best_fd": statistics.fmean(fds), "fd_sd": statistics.stdev(fds) if len(fds) > 1 else None,
        "fd_draws": len(fds), "fd_scale": scale, "best_prec": at_prec["precision"],
        "prec_scale": at_prec["scale"], "at_prec": at_prec,
    }  # fmt: skip


def _summaries(records: list[dict], rows) -> dict[str, dict[str, Any]]:
    """:func:`row_summary` of every row that has scored cells."""
    done = {r["row"] for r in records}
    return {row.id: row_summary(records, row.id) for row in rows if row.id in done}


def _delta(v: float, parent: float | None, fmt: str) -> str:
    return "" if parent is None else f" ({v - parent:+{fmt}})"


def table4_lines(records: list[dict], rows) -> list[str]:
    """The Table 4 analogue: one line per ladder row that has scored cells."""
    lines = [
        "| ID | method | best FD (draws) | scale | best precision | scale | class acc | Δ mean abs "
        "| Δ contrast | pixel W1 |",
        "|---" * 10 + "|",
    ]
    summaries = _summaries(records, rows)
    for row in rows:
        if row.id not in summaries:
            continue
        s, p = summaries[row.id], summaries.get(row.parent) if row.parent else None
        fd = f"{s['best_fd']:.1f}" + (f" ± {s['fd_sd']:.1f}" if s["fd_sd"] is not None else "")
        fd += f" ({s['fd_draws']})" + _delta(s["best_fd"], p and p["best_fd"], ".1f")
        prec = f"{s['best_prec']:.3f}" + _delta(s["best_prec"], p and p["best_prec"], ".3f")
        a = s["at_prec"]
        lines.append(
            f"| {row.id} | {row.label} | {fd} | {KIND[row.guidance]} {s['fd_scale']:g} | {prec} | "
            f"{KIND[row.guidance]} {s['prec_scale']:g} | {a['class_acc']:.3f} | "
            + " | ".join(saturation_cells(a, MEASURES))
            + " |"
        )
    return lines


def sweep_lines(records: list[dict], rows) -> list[str]:
    lines = [
        "| ID | scale | FD | precision | recall | class acc | Δ mean abs | Δ contrast | pixel W1 | ms |",
        "|---" * 10 + "|",
    ]
    for row in rows:
        for r in _sweep(records, row.id):
            lines.append(
                f"| {row.id} | {KIND[row.guidance]} {r['scale']:g} | {r['fd']:.1f} | {r['precision']:.3f} | "
                f"{r['recall']:.3f} | {r['class_acc']:.3f} | "
                + " | ".join(saturation_cells(r, MEASURES))
                + f" | {r['ms']:.0f} |"
            )
    return lines


def summary_lines(records: list[dict], rows) -> list[str]:
    """One line per row with a parent: the sign of its change in best FD."""
    s = _summaries(records, rows)
    out = []
    for row in rows:
        if row.parent and row.id in s and row.parent in s:
            d = s[row.id]["best_fd"] - s[row.parent]["best_fd"]
            word = "worse" if d > 0 else "better"
            out.append(f"{row.id} ({row.label}): best FD {s[row.id]['best_fd']:.1f} vs {row.parent} "
                       f"{s[row.parent]['best_fd']:.1f} ({d:+.1f}, {word})")  # fmt: skip
    return out


def figure(records: list[dict], rows, path: Path, *, title: str) -> Path:
    """FD against precision along every row's sweep (the scale next to each point)."""
    named = {f"{row.id} {row.label}": _sweep(records, row.id) for row in rows}
    named = {k: v for k, v in named.items() if v}
    return sweep_panels(named, path, xs=("precision",), y="fd", label_key="scale", title=title)


def report_markdown(
    records: list[dict], rows, lp: Any, preset: str, ref: PixelStats
) -> tuple[str, list[str]]:
    """``(results.md text, summary lines)`` for the ladder ``rows``."""
    lines = summary_lines(records, rows)
    text = "\n".join([
        f"# gmflow bench images --part ladder — preset `{preset}`", "", lp.description, "",
        f"GMFlow Table 4 analogue: class-conditional GM-DiTs (K = 8) with spectrum nets, NFE {lp.nfe}, "
        f"{lp.n_eval} class-balanced samples per cell scored against the test split ({ref.num_images} "
        f"images). Every row sweeps its guidance (orthogonal projection {lp.orthogonal:g}) on one noise "
        f"draw; the best-FD cell is repeated on {lp.draws - 1} more draws (FD mean ± sd over the draws; "
        "the scale was picked on draw 0). Best precision and the columns after it are the draw-0 cell of "
        "highest precision. **NFE counts model calls**; a guided call evaluates the conditional and the "
        f"unconditional half as one doubled batch ({2 * lp.nfe} network passes per sample). Δ in "
        "brackets: this row minus its parent. Saturation columns on the samples before clipping "
        "(Δ = samples − test split; docs/maths/evaluation.md §9).", "",
        "A4 uses DPM++ 2M (ODE) on the GM mean velocity: the paper's A4 is DPM++ 2M SDE, which the "
        "package does not implement.", "",
        "## Table 4 analogue", "", *table4_lines(records, rows), "", *lines, "",
        "## Every sweep point (draw 0)", "", *sweep_lines(records, rows), "",
        f"Precision of {lp.n_eval} samples has a binomial sd of at most {(0.25 / lp.n_eval) ** 0.5:.3f}.",
    ]) + "\n"  # fmt: skip
    return text, lines
