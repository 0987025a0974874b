"""Figures: paper-style 2-D sample histograms, metric-vs-NFE curves, parameter sweeps and image grids.

Uses matplotlib's object API with the Agg canvas directly (no ``pyplot``, no global backend switch,
no display). Every PNG is written atomically: to a temporary file in the target directory, then
``os.replace``-d onto ``path`` (parent directories are created). Functions return the ``Path``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator
from torch import Tensor

from .io import atomic_write

__all__ = [
    "CHECKERBOARD_DENSITY", "histogram_grid", "image_grid", "metric_curves", "save_figure", "sweep_panels",
]  # fmt: skip

CHECKERBOARD_DENSITY = 1.0 / 32.0  # uniform density of the scale-4 checkerboard on its support (area 32)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Render ``fig`` (a matplotlib ``Figure``) to a PNG at ``path`` atomically, tight bounding box."""
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))


def _to_numpy_points(x: Any) -> np.ndarray:
    a = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64).numpy()
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"samples must have shape (n, 2), got {a.shape}")
    return a


def _nfe_title(nfe: Any) -> str:
    return f"NFE={nfe}" if isinstance(nfe, (int, np.integer)) and not isinstance(nfe, bool) else str(nfe)


def _blank(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def histogram_grid(
    samples: Mapping[Any, Mapping[Any, Tensor]],
    path: str | os.PathLike,
    *,
    nfes: Sequence[Any],
    row_labels: Sequence[Any] | None = None,
    range: float = 4.2,  # noqa: A002 - the name of numpy's histogram argument
    bins: int = 200,
    title: str | None = None,
    vmax: float = 2.9,
    ref_density: float = CHECKERBOARD_DENSITY,
    panel_size: float = 1.6,
    dpi: int = 150,
) -> Path:
    """Grid of 2-D sample histograms, rows = method/K/solver, columns = NFE (GMFlow paper Figs. 2-3).

    ``samples[row][nfe]`` is an ``(n, 2)`` tensor; rows are ``row_labels`` (default: the dict's
    keys, in order) and columns are ``nfes`` (an ``int`` is titled ``NFE=k``, anything else, e.g.
    ``"data"``, by its ``str``). Missing cells are left blank.

    Colour scale (comparable across panels and sample sizes): each panel shows the estimated density
    ``count / (n * bin_area)`` over ``[-range, range]^2`` divided by ``ref_density`` (the uniform
    checkerboard density 1/32 by default), clipped to ``[0, vmax]``, viridis. ``n`` counts every point,
    so non-finite or out-of-range points are lost mass. The default ``vmax=2.9`` reproduces the
    paper's ``counts / 160`` clipping for 1e6 samples with 200 bins over ``[-4.2, 4.2]``; the real
    checkerboard thus shows its squares at about a third of the colour range (1e6 samples; fewer
    samples give more speckle but the same mean level).
    """
    rows = list(samples.keys()) if row_labels is None else list(row_labels)
    cols = list(nfes)
    if not rows or not cols:
        raise ValueError("histogram_grid needs at least one row and one NFE column")
    if not (range > 0 and bins >= 1 and vmax > 0 and ref_density > 0):
        raise ValueError("range, bins, vmax and ref_density must be positive")
    bin_area = (2.0 * range / bins) ** 2
    fig = Figure(figsize=(panel_size * len(cols), panel_size * len(rows) + (0.3 if title else 0.0)))
    height = panel_size * len(rows) + (0.3 if title else 0.0)
    label_w = 0.25  # inches for row labels
    width = panel_size * len(cols) + label_w
    fig.set_size_inches(width, height + 0.25)
    axes = fig.subplots(
        len(rows),
        len(cols),
        squeeze=False,
        gridspec_kw={
            "wspace": 0.03,
            "hspace": 0.03,
            "left": label_w / width,
            "right": 0.995,
            "bottom": 0.005,
            "top": 1.0 - (0.25 + (0.3 if title else 0.0)) / (height + 0.25),
        },
    )
    for r, row in enumerate(rows):
        cells = samples.get(row, {})
        for c, nfe in enumerate(cols):
            ax = axes[r][c]
            _blank(ax)
            if r == 0:
                ax.set_title(_nfe_title(nfe), fontsize=9)
            if c == 0:
                ax.set_ylabel(str(row), fontsize=8)
            x = cells.get(nfe) if cells is not None else None
            if x is None:
                continue
            pts = _to_numpy_points(x)
            n = max(len(pts), 1)
            pts = pts[np.isfinite(pts).all(axis=1)]
            h, _, _ = np.histogram2d(
                pts[:, 0], pts[:, 1], bins=bins, range=[[-range, range], [-range, range]]
            )
            rel = h / (n * bin_area) / ref_density
            ax.imshow(
                np.clip(rel.T, 0.0, vmax),
                origin="lower",
                extent=(-range, range, -range, range),
                cmap="viridis",
                vmin=0.0,
                vmax=vmax,
                interpolation="antialiased",
                aspect="equal",
            )
    if title:
        fig.suptitle(title, fontsize=10, y=1.0 - 0.08 / (height + 0.25), va="top")
    return save_figure(fig, path, dpi)


def _group_label(key: tuple[tuple[str, Any], ...]) -> str:
    parts = [f"{k}={v}" for k, v in key if v is not None]
    return " ".join(parts) if parts else "all"


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def metric_curves(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    metric: str,
    x: str = "nfe",
    group_keys: Sequence[str] = ("model", "K", "solver", "order"),
    logy: bool = True,
    floor: float | None = None,
    title: str | None = None,
    dpi: int = 150,
) -> Path:
    """One line per group of ``records`` (``metric`` against ``x``) on a logarithmic x-axis.

    Records are dicts such as ``{"model": "gmflow", "K": 64, "solver": "gm-sde", "order": 2,
    "nfe": 4, "sw2": 0.05}``. Groups are the distinct values of ``group_keys`` (a missing key counts
    as ``None`` and is left out of the label); points are sorted by ``x``. Up to 12 distinct integer
    ``x`` values (NFEs) get a log2 axis with every value labelled, anything else (e.g. milliseconds)
    a plain log axis. Records whose ``x`` or ``metric`` is missing, non-numeric or non-finite (or
    ``x <= 0``) are skipped. The y-axis is logarithmic when ``logy`` and every plotted value (and
    ``floor``) is positive, else linear. ``floor`` draws a dashed horizontal line (e.g. the
    sliced-W2 Monte-Carlo floor). The legend sits inside the axes for up to 6 groups, outside on
    the right otherwise.
    """
    groups: dict[tuple[tuple[str, Any], ...], list[tuple[float, float]]] = {}
    for rec in records:
        xv, yv = _as_float(rec.get(x)), _as_float(rec.get(metric))
        if xv is None or yv is None or xv <= 0:
            continue
        key = tuple((k, rec.get(k)) for k in group_keys)
        groups.setdefault(key, []).append((xv, yv))
    if not groups:
        raise ValueError(f"no record has finite numeric values for x={x!r} and metric={metric!r}")
    fig = Figure(figsize=(5.0, 3.6))
    ax = fig.subplots()
    xs_all: set[float] = set()
    ys_all: list[float] = []
    for i, (key, pts) in enumerate(groups.items()):
        pts.sort()
        xs, ys = zip(*pts)
        xs_all.update(xs)
        ys_all.extend(ys)
        style = ("-", "--", ":", "-.")[(i // 10) % 4]  # the colour cycle has 10 colours
        ax.plot(xs, ys, style, marker="o", markersize=3.5, linewidth=1.4, label=_group_label(key))
    if floor is not None:
        ax.axhline(floor, color="0.35", linestyle="--", linewidth=1.0, label="floor")
        ys_all.append(float(floor))
    ticks = sorted(xs_all)
    if len(ticks) <= 12 and all(float(t).is_integer() for t in ticks):  # NFE-like: label every value
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}" for t in ticks])
    else:  # a continuous quantity (e.g. milliseconds): matplotlib's log-scale ticks
        ax.set_xscale("log")
    if logy and min(ys_all) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.grid(True, which="major", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    n_entries = len(groups) + (floor is not None)
    if n_entries <= 6:
        ax.legend(fontsize=7, frameon=False)
    else:
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path, dpi)


def sweep_panels(
    sweeps: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike,
    *,
    xs: Sequence[str],
    y: str,
    label_key: str | None = None,
    vlines: Mapping[str, float] | None = None,
    title: str | None = None,
    dpi: int = 150,
) -> Path:
    """One panel per metric in ``xs``: ``y`` against it along each named sweep, on linear axes.

    ``sweeps[name]`` is a list of records in sweep order (e.g. increasing guidance scale); each sweep is
    a line through its points, each point annotated with ``record[label_key]`` when given. Points whose
    x or y is missing or non-finite are skipped. ``vlines[x]`` draws a dashed vertical reference line
    (e.g. 0 = the value of real data for a difference).
    """
    if not xs:
        raise ValueError("xs must name at least one metric")
    fig = Figure(figsize=(3.6 * len(xs), 3.4))
    axes = fig.subplots(1, len(xs), sharey=True, squeeze=False)[0]
    plotted = False
    for ax, xk in zip(axes, xs):
        for i, (name, recs) in enumerate(sweeps.items()):
            pts = [
                (_as_float(r.get(xk)), _as_float(r.get(y)), r.get(label_key) if label_key else None)
                for r in recs
            ]
            pts = [p for p in pts if p[0] is not None and p[1] is not None]
            if not pts:
                continue
            plotted = True
            style = ("-", "--", ":", "-.")[(i // 10) % 4]
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=3.5,
                           linewidth=1.3, label=name)[0]  # fmt: skip
            for px, py, lab in pts:
                if lab is not None:
                    text = f"{lab:g}" if isinstance(lab, float) else str(lab)
                    ax.annotate(text, (px, py), fontsize=6, xytext=(2, 2), textcoords="offset points",
                                color=line.get_color())  # fmt: skip
        if vlines and xk in vlines:
            ax.axvline(vlines[xk], color="0.35", linestyle="--", linewidth=1.0)
        ax.set_xlabel(xk)
        ax.grid(True, alpha=0.3)
    if not plotted:
        raise ValueError(f"no record has finite numeric values for {y!r} and any of {list(xs)}")
    axes[0].set_ylabel(y)
    if len(sweeps) > 4:  # many sweeps: the legend beside the panels, not over the points
        axes[-1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        axes[0].legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi)


def image_grid(
    images: Tensor,
    path: str | os.PathLike,
    *,
    nrow: int,
    padding: int = 2,
    pad_value: float = 1.0,
    scale: int | None = None,
) -> Path:
    """Save ``images`` ``(n, C, H, W)`` with values in ``[-1, 1]`` (``C`` = 1 grey or 3 RGB) as one PNG.

    ``nrow`` is the number of images per row (the ``torchvision.utils.make_grid`` convention); rows are
    filled left to right, the last one padded with ``pad_value``. Images are separated by ``padding``
    pixels of ``pad_value`` (in ``[-1, 1]``; 1 = white). Values map to ``[0, 1]`` by ``(v + 1) / 2``
    and are clipped. ``scale`` is an integer nearest-neighbour up-sampling factor; by default the
    smallest one making each tile at least 64 px (e.g. 8 for 8x8 digits). Pixel-exact: no axes.
    """
    img = torch.as_tensor(images).detach().to(device="cpu", dtype=torch.float32)
    if img.ndim != 4 or img.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (n, C, H, W) with C in (1, 3), got {tuple(img.shape)}")
    if img.shape[0] < 1:
        raise ValueError("images must contain at least one image")
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    n, ch, h, w = img.shape
    if scale is None:
        scale = max(1, math.ceil(64 / max(h, w)))
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    img = torch.nan_to_num(img, nan=-1.0).clamp(-1.0, 1.0)
    img = img.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    h, w = h * scale, w * scale
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.full((ch, nrows * (h + padding) + padding, ncol * (w + padding) + padding), float(pad_value))
    for i in torch.arange(n).tolist():
        r, c = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, top : top + h, left : left + w] = img[i]
    arr = ((grid.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).numpy()
    arr = arr[0] if ch == 1 else np.transpose(arr, (1, 2, 0))

    def write(f: Any) -> None:
        from PIL import Image

        # uint8 (H, W) -> mode L, (H, W, 3) -> RGB
        Image.fromarray(np.ascontiguousarray(arr)).save(f, format="PNG")

    return atomic_write(path, write)
