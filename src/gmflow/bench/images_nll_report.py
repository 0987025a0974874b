"""What ``gmflow bench images --part nll`` reports: radially averaged spectra, the figure and results.md."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from ..flow import interpolate
from ..kr import gm_to_standard_normal
from ..spectral import field_to_hartley
from ..viz import save_figure
from .images_setup import mean_sd

__all__ = ["fd_summary", "monotone", "radial_spectra", "results_markdown", "spectrum_figure"]


def _radial(power: Tensor) -> list[float]:
    """Mean of ``power (H, W)`` over rings of integer radius ``round(|k|)`` of the signed frequencies."""
    h, w = power.shape
    fy = torch.fft.fftfreq(h, d=1.0 / h, dtype=torch.float64)
    fx = torch.fft.fftfreq(w, d=1.0 / w, dtype=torch.float64)
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long().flatten()
    sums = torch.zeros(int(r.max()) + 1, dtype=torch.float64).index_add_(0, r, power.double().flatten())
    counts = torch.bincount(r, minlength=len(sums)).double()
    return (sums / counts).tolist()


@torch.no_grad()
def radial_spectra(
    model: nn.Module, x0: Tensor, labels: Tensor, ts: tuple[float, ...], generator: torch.Generator
) -> dict[str, Any]:
    """Radially averaged power spectra (docs/maths/spectral.md §6) of a model with a ``spectrum_net``.

    For each ``t``: ``learned`` = batch mean of ``exp(lps)`` of the net on the x0-GM's surrogate at
    ``x_t``; ``target`` = batch mean of ``z_r^2``, ``z_r = Hc(T(x0))`` (the KR-whitened images, what the
    spectral loss fits). ``data``: the power of ``Hc(x0 - mean image)``, scaled to mean 1. Channels are
    averaged; ``freq`` is the ring radius in cycles per image.
    """
    centred = x0.double() - x0.double().mean(0, keepdim=True)
    data = field_to_hartley(centred).square().mean((0, 1))
    out: dict[str, Any] = {"data": _radial(data / data.mean()), "curves": []}
    out["freq"] = list(range(len(out["data"])))
    for t in ts:
        tt = torch.full((x0.shape[0],), float(t))
        eps = torch.randn(x0.shape, generator=generator)
        x_t = interpolate(x0, eps, tt)
        q = model(x_t, tt, class_labels=labels).u_to_x0(x_t, tt)
        g = q.to_gaussian()
        learned = model.spectrum_net(g.mean, g.var).exp().mean((0, 1))
        target = field_to_hartley(gm_to_standard_normal(q, x0)).square().mean((0, 1))
        out["curves"].append({"t": float(t), "learned": _radial(learned), "target": _radial(target)})
    return out


def spectrum_figure(spectra: dict[str, Any], path: str | os.PathLike, *, title: str, dpi: int = 150) -> Path:
    """One panel per ``t``: learned vs target spectrum (and the data's), log power vs frequency."""
    curves = spectra["curves"]
    fig = Figure(figsize=(3.4 * len(curves), 3.2))
    axes = np.atleast_1d(fig.subplots(1, len(curves), sharey=True))
    f = spectra["freq"]
    for ax, c in zip(axes, curves):
        ax.plot(f, c["target"], "-", color="C0", label="target: KR-whitened test images")
        ax.plot(f, c["learned"], "--", color="C3", label="learned: spectrum net")
        ax.plot(f, spectra["data"], ":", color="0.4", label="data (centred, mean 1)")
        ax.axhline(1.0, color="0.75", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("frequency |k| (cycles / image)")
        ax.set_title(f"t = {c['t']:g}", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("power (flat = 1)")
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi)


def fd_summary(records: list[dict]) -> dict[bool, list[float]]:
    """``{spectral: [FD per draw]}`` of the FD records."""
    out: dict[bool, list[float]] = {False: [], True: []}
    for r in sorted((r for r in records if r["part"] == "fd"), key=lambda r: r["draw"]):
        out[bool(r["spectral"])].append(r["fd"])
    return out


def monotone(values: list[float]) -> bool:
    """Strictly decreasing and finite."""
    return all(math.isfinite(v) for v in values) and all(b < a for a, b in zip(values, values[1:]))


def results_markdown(records, spectra, pr, preset: str, est: dict[str, float], minutes: float) -> str:
    """results.md: the bits/dim table, the FD comparison, the spectra and the timing."""
    bpd = sorted((r for r in records if r["part"] == "bpd"), key=lambda r: r["K"])
    fds = fd_summary(records)
    lines = [f"# gmflow bench images --part nll — preset `{preset}`", "", pr.description, ""]
    if bpd:
        vals = [r["bpd"] for r in bpd]
        spec = [r for r in bpd if r["bpd_spectral"] is not None]
        ks = ", ".join(str(r["K"]) for r in bpd)
        lines.append(
            f"- bits/dim (test split, {bpd[0]['n']} images, {pr.num_t} t draws) "
            f"{'decreases' if monotone(vals) else 'does NOT decrease'} monotonically over K = {ks}: "
            + ", ".join(f"{v:.4f}" for v in vals)
        )
        for r in spec:
            lines.append(
                f"- K = {r['K']} + spectral: {r['bpd_spectral']:.4f} ± {r['stderr_spectral']:.4f} vs "
                f"{r['bpd']:.4f} ± {r['stderr']:.4f} without ({r['bpd_spectral'] - r['bpd']:+.4f} bits/dim)"
            )
    if fds[False] and fds[True]:
        better = statistics.fmean(fds[True]) < statistics.fmean(fds[False])
        lines.append(
            f"- FD of GM-SDE 2 at NFE {pr.nfe} (K = {max(pr.components)}, {len(fds[True])} noise draws): "
            f"spectral {mean_sd(fds[True])} vs per-pixel {mean_sd(fds[False])} -> spectral "
            f"{'lowers' if better else 'does NOT lower'} FD"
        )
    lines += ["", "## Bits/dim (Eq. 21, test split, dequantised 8-bit levels; ± standard error)", "",
              "| K | bits/dim | K + spectral |", "|---|---|---|"]  # fmt: skip
    for r in bpd:
        s = f"{r['bpd_spectral']:.4f} ± {r['stderr_spectral']:.4f}" if r["bpd_spectral"] is not None else ""
        lines.append(f"| {r['K']} | {r['bpd']:.4f} ± {r['stderr']:.4f} | {s} |")
    lines += ["", f"## FD of GM-SDE 2, NFE {pr.nfe} (per draw)", "", "| draw | per-pixel | spectral |",
              "|---|---|---|"]  # fmt: skip
    for d, (a, b) in enumerate(zip(fds[False], fds[True])):
        lines.append(f"| {d} | {a:.3f} | {b:.3f} |")
    lines += ["", "## Spectrum (radial mean power; target = KR-whitened test images)", ""]
    lines += ["| t | " + " | ".join(f"|k|={k}" for k in spectra["freq"][::4]) + " |",
              "|---|" + "---|" * len(spectra["freq"][::4])]  # fmt: skip
    for c in spectra["curves"]:
        for name in ("target", "learned"):
            lines.append(f"| {c['t']:g} {name} | " + " | ".join(f"{v:.3g}" for v in c[name][::4]) + " |")
    lines.append("| data | " + " | ".join(f"{v:.3g}" for v in spectra["data"][::4]) + " |")
    m = {k: est[f"{k}_s"] / 60 for k in ("total", "train", "bpd", "fd")}
    lines += ["", f"Estimate before the run (this machine, then): {m['total']:.1f} min (training "
              f"{m['train']:.1f}, bits/dim {m['bpd']:.1f}, FD {m['fd']:.1f}).",
              f"Total wall time of this invocation: {minutes:.1f} min.", ""]  # fmt: skip
    return "\n".join(lines)
