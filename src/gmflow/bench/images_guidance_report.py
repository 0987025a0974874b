"""Report of the guidance part of ``gmflow bench images``: sweeps, Table 2 analogue, equal-level comparison.

A *sweep* is one guidance kind with one projection weight, in increasing scale, starting at the
unguided cell (``w = 1`` for CFG, ``w~ = 0`` for probabilistic guidance). "At equal precision" compares
two sweeps at a precision level both reach: along each sweep, the first segment whose end points
bracket the level is interpolated linearly in precision, and every other metric (and the scale) is
interpolated with the same weight. A measure "saturates less" when its value is lower; for the
signed differences to the test split (``d_*``) the report also says which is closer to the test
split (smaller ``|d|``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..metrics import PixelStats
from ..viz import sweep_panels
from .images_setup import UNGUIDED

__all__ = ["SATURATION", "crossing", "draw_means", "equal_level_rows", "figure", "report_markdown",
           "saturation_cells", "sweeps"]  # fmt: skip

# (record key, column title, signed difference to the test split)
SATURATION = (
    ("d_mean_abs", "Δ mean abs", True),
    ("d_contrast", "Δ contrast", True),
    ("d_frac_bounds", "Δ at bounds", True),
    ("frac_beyond", "beyond range", False),
    ("excess", "mean excess", False),
    ("pixel_w1", "pixel W1", False),
)
QUALITY = ("precision", "recall", "class_acc", "fd")
KIND_NAME = {"cfg": "CFG w", "probabilistic": "probabilistic w~"}


def draw_means(records: list[dict]) -> list[dict]:
    """One record per (kind, orthogonal, scale), every metric averaged over the noise draws."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["kind"], r["orthogonal"], r["scale"]), []).append(r)
    keys = (*QUALITY, *(k for k, _, _ in SATURATION))
    out = []
    for rs in groups.values():
        m = {k: statistics.fmean(r[k] for r in rs) for k in keys if all(k in r for r in rs)}
        out.append({**rs[0], **m, "draws": len(rs)})
    return out


def sweeps(records: list[dict]) -> dict[tuple[str, float], list[dict]]:
    """``{(kind, orthogonal): [unguided point, then increasing scale]}`` from draw means."""
    means = draw_means(records)
    base = next((m for m in means if m["kind"] == "none"), None)
    out: dict[tuple[str, float], list[dict]] = {}
    for m in sorted(
        (m for m in means if m["kind"] != "none"), key=lambda m: (m["kind"], m["orthogonal"], m["scale"])
    ):
        sw = out.setdefault((m["kind"], m["orthogonal"]), [])
        if not sw and base is not None:
            sw.append(
                {**base, "kind": m["kind"], "orthogonal": m["orthogonal"], "scale": UNGUIDED[m["kind"]]}
            )
        sw.append(m)
    return out


def crossing(sweep: Sequence[dict], key: str, level: float) -> dict[str, float] | None:
    """Metrics interpolated at the first point along ``sweep`` where ``key`` reaches ``level`` (or None)."""
    for a, b in zip(sweep, sweep[1:]):
        lo, hi = sorted((a[key], b[key]))
        if lo <= level <= hi:
            f = 0.0 if hi == lo else (level - a[key]) / (b[key] - a[key])
            names = ("scale", *QUALITY, *(k for k, _, _ in SATURATION))
            return {k: a[k] + f * (b[k] - a[k]) for k in names if k in a and k in b}
    if len(sweep) == 1 and sweep[0][key] == level:
        return dict(sweep[0])
    return None


def saturation_cells(p: dict, measures: Sequence[tuple[str, str, bool]] = SATURATION) -> list[str]:
    """Table cells of the saturation ``measures`` of record ``p`` (``n/a`` when no sample of the cell
    was finite); signed differences with their sign."""
    return ["n/a" if k not in p else f"{p[k]:+.4f}" if signed else f"{p[k]:.4f}" for k, _, signed in measures]


def table2_lines(sw: dict[tuple[str, float], list[dict]]) -> list[str]:
    """Best precision of each sweep with its scale, quality and saturation relative to the test split."""
    head = "| guidance | orth. proj. | scale | precision | recall | class acc | FD | "
    lines = [head + " | ".join(t for _, t, _ in SATURATION) + " |", "|---" * (7 + len(SATURATION)) + "|"]
    for (kind, orth), points in sw.items():
        guided = points[1:] or points
        b = max(guided, key=lambda p: p["precision"])
        lines.append(
            f"| {KIND_NAME[kind]} | {'yes' if orth else 'no'} | {b['scale']:g} | {b['precision']:.3f} | "
            f"{b['recall']:.3f} | {b['class_acc']:.3f} | {b['fd']:.2f} | "
            + " | ".join(saturation_cells(b))
            + " |"
        )
    base = next(iter(sw.values()), [None])[0]
    if base is not None:
        lines.append(
            f"| none | – | – | {base['precision']:.3f} | {base['recall']:.3f} | {base['class_acc']:.3f} | "
            f"{base['fd']:.2f} | " + " | ".join(saturation_cells(base)) + " |"
        )
    return lines


def equal_level_rows(sw: dict[tuple[str, float], list[dict]], key: str, n_levels: int = 3) -> list[dict]:
    """For each projection weight: CFG vs probabilistic at ``n_levels`` levels of ``key`` both reach.

    Levels are evenly spaced above the unguided value up to the lower of the two sweeps' maxima.
    Each row: ``orthogonal, level, cfg (interpolated point), pg (interpolated point)``.
    """
    rows = []
    for orth in sorted({o for _, o in sw}):
        c, p = sw.get(("cfg", orth)), sw.get(("probabilistic", orth))
        if not c or not p:
            continue
        start, top = c[0][key], min(max(q[key] for q in c), max(q[key] for q in p))
        if top <= start:
            rows.append({"orthogonal": orth, "level": None, "cfg": None, "pg": None})
            continue
        for i in range(1, n_levels + 1):
            level = start + (top - start) * i / n_levels
            rows.append({"orthogonal": orth, "level": level, "cfg": crossing(c, key, level),
                         "pg": crossing(p, key, level)})  # fmt: skip
    return rows


def _comparison(rows: list[dict], key: str) -> tuple[list[str], str]:
    lines = [
        f"| orth. proj. | {key} | CFG w | w~ | "
        + " | ".join(f"{t} (CFG / prob.)" for _, t, _ in SATURATION)
        + " |"
    ]
    lines.append("|---" * (4 + len(SATURATION)) + "|")
    less = closer = total = signed_total = 0
    for r in rows:
        orth = "yes" if r["orthogonal"] else "no"
        if r["level"] is None:
            lines.append(
                f"| {orth} | guidance does not raise {key} above the unguided value in both sweeps |"
            )
            continue
        c, p = r["cfg"], r["pg"]
        cells = []
        for k, _, signed in SATURATION:
            if k not in c or k not in p:
                cells.append("n/a")
                continue
            mark = "prob." if p[k] < c[k] else "CFG" if c[k] < p[k] else "tie"
            less += p[k] < c[k]
            total += 1
            if signed:
                closer += abs(p[k]) < abs(c[k])
                signed_total += 1
            cells.append(f"{c[k]:+.4f} / {p[k]:+.4f} ({mark})")
        lines.append(
            f"| {orth} | {r['level']:.3f} | {c['scale']:.2f} | {p['scale']:.3f} | " + " | ".join(cells) + " |"
        )
    summary = (
        f"at equal {key}: probabilistic guidance saturates less on {less} of {total} (measure, level) pairs; "
        f"its signed differences are closer to the test split on {closer} of {signed_total}"
        if total
        else f"at equal {key}: no common level above the unguided value"
    )
    return lines, summary


def figure(records: list[dict], path: Path, *, title: str) -> Path:
    """Precision against three saturation measures along every sweep (the scale next to each point)."""
    named = {f"{KIND_NAME[k]}{', orth.' if o else ''}": pts for (k, o), pts in sweeps(records).items()}
    xs = ("d_mean_abs", "d_contrast", "pixel_w1")
    vlines = {"d_mean_abs": 0.0, "d_contrast": 0.0}  # the test split
    return sweep_panels(named, path, xs=xs, y="precision", label_key="scale", vlines=vlines, title=title)


def _sweep_table(sw: dict[tuple[str, float], list[dict]]) -> list[str]:
    head = "| guidance | orth. | scale | draws | precision | recall | class acc | FD | "
    lines = [head + " | ".join(t for _, t, _ in SATURATION) + " |", "|---" * (8 + len(SATURATION)) + "|"]
    for (kind, orth), points in sw.items():
        for q in points:
            lines.append(
                f"| {KIND_NAME[kind]} | {orth:g} | {q['scale']:g} | {q['draws']} | {q['precision']:.3f} | "
                f"{q['recall']:.3f} | {q['class_acc']:.3f} | {q['fd']:.2f} | "
                + " | ".join(saturation_cells(q))
                + " |"
            )
    return lines


def report_markdown(
    records: list[dict], gp: Any, preset: str, ref: PixelStats, *, model_dir: str
) -> tuple[str, list[str]]:
    """``(results.md text, summary lines)``."""
    sw = sweeps(records)
    prec_rows, prec_sum = _comparison(equal_level_rows(sw, "precision"), "precision")
    acc_rows, acc_sum = _comparison(equal_level_rows(sw, "class_acc"), "class_acc")
    solver, order = gp.solver
    n_ref = ref.num_images
    text = "\n".join([
        f"# gmflow bench images --part guidance — preset `{preset}`", "", gp.description, "",
        f"Model: the class-conditional GM-DiT of the main part ({model_dir}). Solver {solver} order "
        f"{order} at NFE {gp.nfe}; {gp.n_eval} class-balanced samples per cell, {gp.draws} noise draw(s) "
        "(the same noise for every cell of a draw). **NFE counts model calls**: every guided call "
        "evaluates the conditional and the unconditional half as one doubled batch, i.e. "
        f"{2 * gp.nfe} network passes per sample (unguided: {gp.nfe}).", "",
        f"Test split ({n_ref} images): mean abs {ref.mean_abs:.4f}, contrast (per-image std) "
        f"{ref.contrast:.4f}, fraction at the bounds {ref.frac_bounds:.4f}, beyond the range "
        f"{ref.frac_beyond:.4f}. Saturation columns are computed on the samples before clipping "
        "(Δ = samples − test split; docs/maths/evaluation.md §9); precision, recall, class accuracy "
        "and FD on the clipped samples.", "",
        "## Table 2 analogue: best precision of each sweep", "", *table2_lines(sw), "",
        "## At equal precision, which saturates less", "",
        "Interpolated linearly along each sweep at precision levels both sweeps reach (marked: the lower "
        "value).", "", *prec_rows, "", prec_sum, "",
        "## At equal class accuracy", "", *acc_rows, "", acc_sum, "",
        "## Every sweep point (draw means)", "", *_sweep_table(sw), "",
        f"Precision of {gp.n_eval} samples has a binomial sd of at most {(0.25 / gp.n_eval) ** 0.5:.3f}; "
        "the saturation measures average over every pixel and are far less noisy.",
    ]) + "\n"  # fmt: skip
    return text, [prec_sum, acc_sum]
