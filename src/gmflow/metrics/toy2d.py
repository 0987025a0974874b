"""Sample-quality metrics for 2-D point sets (checkerboard and other toy data).

All functions take ``(n, 2)`` tensors (or array-likes) of any float dtype and device, compute in
float64 on the CPU and return Python floats (``cell_masses`` returns a tensor).

What they measure (``docs/maths/evaluation.md``):

* ``sliced_w2`` — distance between two point clouds; on the checkerboard it is dominated by the mass
  split over the 8 squares, and its Monte-Carlo floor (two draws of real data) is not zero. Report it
  relative to the floor of :func:`gmflow.metrics.reference_set`. Its seed-to-seed noise is large
  (sd ~25 % of the floor at 20k points).
* ``in_support_fraction`` — fraction of points inside the 8 squares: a stable sharpness signal.
* ``cell_masses`` / ``cell_mass_kl`` / ``cell_mass_chi2`` — the mass split over the 8 squares.
* ``rbf_mmd`` and ``histogram_kl`` — general two-sample discrepancies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gmflow.data.toy2d import Checkerboard

__all__ = [
    "cell_mass_chi2",
    "cell_mass_kl",
    "cell_masses",
    "checkerboard_metrics",
    "histogram_kl",
    "in_support_fraction",
    "rbf_mmd",
    "sliced_w2",
    "sliced_w2_mean",
]


def _points(x: Any, name: str, *, min_n: int = 2, finite: bool = True) -> Tensor:
    """Validate an ``(n, 2)`` point set and return it as a float64 CPU tensor."""
    t = torch.as_tensor(x)
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2), got {tuple(t.shape)}")
    if t.shape[0] < min_n:
        raise ValueError(f"{name} needs at least {min_n} points, got {t.shape[0]}")
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a real tensor, got dtype {t.dtype}")
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if finite:
        ok = np.isfinite(t.numpy()).all(axis=1)
        if not ok.all():
            raise ValueError(f"{name} contains {int((~ok).sum())} non-finite point(s) (NaN or inf)")
    return t


def _directions(n_projections: int, seed: int) -> Tensor:
    """``(P, 2)`` float64 unit vectors, uniform on the circle: normalised ``N(0, I)`` draws."""
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be a positive int, got {n_projections!r}")
    g = torch.Generator().manual_seed(int(seed))
    d = torch.randn(n_projections, 2, generator=g, dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def _w2_sq_sorted(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Squared 1-D W2 between empirical measures, row-wise; ``xs (P, n)``, ``ys (P, m)`` sorted.

    ``W2^2 = int_0^1 (Fx^-1(q) - Fy^-1(q))^2 dq``. The quantile functions are step functions with
    jumps at ``i/n`` and ``j/m``; the integral is summed exactly over the merged breakpoints. For
    ``n == m`` this is ``mean_i (xs_i - ys_i)^2``.
    """
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return np.square(xs - ys).mean(axis=1)
    # merged breakpoints, exact in integers: k / (n*m) with k in {i*m} U {j*n}
    k = np.unique(
        np.concatenate([np.arange(n + 1, dtype=np.int64) * m, np.arange(m + 1, dtype=np.int64) * n])
    )
    w = np.diff(k) / (n * m)  # interval lengths, sum to 1
    left = k[:-1]
    return (np.square(xs[:, left // m] - ys[:, left // n]) * w).sum(axis=1)


def sliced_w2(x: Tensor, y: Tensor, *, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two 2-D point sets.

    ``SW2(x, y) = sqrt( (1/P) sum_p W2^2(<x, theta_p>, <y, theta_p>) )`` with ``P = n_projections``
    unit directions ``theta_p = z_p / |z_p|``, ``z_p ~ N(0, I_2)`` from ``torch.Generator`` seeded
    with ``seed`` (float64). ``W2^2`` between the two 1-D empirical measures is computed exactly by
    quantile matching (sorting); with equal sizes it is ``mean_i (x_(i) - y_(i))^2``, with unequal sizes
    the two empirical quantile functions are integrated over the merged grid of breakpoints.

    Example: ``y = x + m`` gives ``W2 = |m . theta|`` per direction, so ``SW2 -> |m| / sqrt(2)``.
    Raises ``ValueError`` on bad shapes, fewer than 2 points or any NaN/inf.
    """
    xp, yp = _points(x, "x"), _points(y, "y")
    d = _directions(n_projections, seed)
    xn, yn, dn = xp.numpy(), yp.numpy(), d.numpy()
    step = max(1, min(64, 2**24 // max(xn.shape[0], yn.shape[0])))  # <= 128 MB of projections per set
    total = 0.0
    for start in range(0, n_projections, step):
        chunk = dn[start : start + step]
        # <theta, x> as two broadcast products; numpy's sort is much faster than torch's on CPU
        xs = np.sort(chunk[:, :1] * xn[:, 0] + chunk[:, 1:] * xn[:, 1], axis=1)
        ys = np.sort(chunk[:, :1] * yn[:, 0] + chunk[:, 1:] * yn[:, 1], axis=1)
        total += float(_w2_sq_sorted(xs, ys).sum())
    return math.sqrt(total / n_projections)


def sliced_w2_mean(x: Tensor, y: Tensor, seeds: Sequence[int] = (0, 1, 2), n_projections: int = 256) -> float:
    """Mean of :func:`sliced_w2` over projection seeds (reference protocol: seeds 0, 1, 2; 256 directions)."""
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError("seeds must not be empty")
    xp, yp = _points(x, "x"), _points(y, "y")
    return sum(sliced_w2(xp, yp, n_projections=n_projections, seed=s) for s in seeds) / len(seeds)


def _subsample(x: Tensor, max_points: int, g: torch.Generator) -> Tensor:
    if x.shape[0] <= max_points:
        return x
    return x[torch.randperm(x.shape[0], generator=g)[:max_points]]


def _kernel_sum(a: np.ndarray, b: np.ndarray, bandwidths: Sequence[float], exclude_diag: bool) -> float:
    """``sum_{i,j} k(a_i, b_j)`` for ``k = sum_h exp(-|a-b|^2 / (2 h^2))``, in row blocks (torch, fp64)."""
    ta, tb = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))
    total = 0.0
    for start in range(0, ta.shape[0], 2048):
        d2 = torch.cdist(ta[start : start + 2048], tb).square_()
        for h in bandwidths:
            total += float(torch.exp(d2 * (-1.0 / (2.0 * h * h))).sum())
    if exclude_diag:  # the diagonal terms k(a_i, a_i) = len(bandwidths) each
        total -= len(bandwidths) * ta.shape[0]
    return total


def rbf_mmd(
    x: Tensor,
    y: Tensor,
    *,
    bandwidths: Sequence[float] = (0.1, 0.5, 1.0, 2.0),
    max_points: int = 4000,
    seed: int = 0,
) -> float:
    """Unbiased squared MMD with a sum of RBF kernels.

    ``k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2))`` over ``bandwidths`` (data units), and

    ``MMD^2_u = 1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j)
    - 2/(mn) sum_{i,j} k(x_i, y_j)``.

    For cost (O(m n) kernel evaluations) each set larger than ``max_points`` is replaced by a
    uniform subsample of ``max_points`` points without replacement (``torch.randperm`` with a
    generator seeded by ``seed``; x is subsampled before y). Being unbiased, the estimate can be
    slightly negative when the two distributions are equal.
    """
    xp, yp = _points(x, "x"), _points(y, "y")
    if not bandwidths or any(not (h > 0) for h in bandwidths):
        raise ValueError(f"bandwidths must be positive, got {tuple(bandwidths)!r}")
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise ValueError(f"max_points must be an int >= 2, got {max_points!r}")
    g = torch.Generator().manual_seed(int(seed))
    xp, yp = _subsample(xp, max_points, g).numpy(), _subsample(yp, max_points, g).numpy()
    m, n = xp.shape[0], yp.shape[0]
    kxx = _kernel_sum(xp, xp, bandwidths, exclude_diag=True) / (m * (m - 1))
    kyy = _kernel_sum(yp, yp, bandwidths, exclude_diag=True) / (n * (n - 1))
    kxy = _kernel_sum(xp, yp, bandwidths, exclude_diag=False) / (m * n)
    return kxx + kyy - 2.0 * kxy


def in_support_fraction(x: Tensor, scale: float = 4.0) -> float:
    """Fraction of all points lying in the 8 checkerboard squares (non-finite points count as outside)."""
    xp = _points(x, "x", min_n=1, finite=False)
    return float(Checkerboard(scale).in_support(xp).double().mean())


def cell_masses(x: Tensor, scale: float = 4.0) -> Tensor:
    """``(8,)`` float64 fractions of the IN-SUPPORT points falling in each checkerboard square.

    Normalised by the number of in-support points (sums to 1), so the split is measured independently
    of :func:`in_support_fraction`. All zeros when no point is in support. Cell order as
    :meth:`gmflow.data.Checkerboard.cell_index` (row-major from the bottom-left square).
    """
    xp = _points(x, "x", min_n=1, finite=False)
    idx = Checkerboard(scale).cell_index(xp)
    counts = torch.bincount(idx[idx >= 0], minlength=Checkerboard.n_cells).double()
    total = counts.sum()
    return counts / total if total > 0 else counts


def cell_mass_kl(x: Tensor, scale: float = 4.0) -> float:
    """``KL(p || u) = sum_k p_k log(8 p_k)`` between the in-support cell split and uniform over 8.

    ``0 log 0 = 0``; the value lies in ``[0, log 8]`` and is ``log 8`` (the maximum) when no point is
    in support. Its finite-sample bias for real data is about ``7 / (2 n_in)`` nats.
    """
    p = cell_masses(x, scale)
    if p.sum() == 0:
        return math.log(Checkerboard.n_cells)
    nz = p > 0
    return float((p[nz] * torch.log(p[nz] * Checkerboard.n_cells)).sum())


def cell_mass_chi2(x: Tensor, scale: float = 4.0) -> float:
    """Pearson chi-square of the in-support cell counts against uniform: ``sum_k (O_k - E)^2 / E``.

    ``E = n_in / 8``. Under real data it follows chi-square with 7 d.o.f. (mean 7, sd ~3.7), whatever
    ``n``; ``nan`` when no point is in support.
    """
    xp = _points(x, "x", min_n=1, finite=False)
    idx = Checkerboard(scale).cell_index(xp)
    counts = torch.bincount(idx[idx >= 0], minlength=Checkerboard.n_cells).double()
    e = counts.sum() / Checkerboard.n_cells
    if e == 0:
        return math.nan
    return float(((counts - e).square() / e).sum())


def _hist2d(x: Tensor, bins: int, half_range: float) -> Tensor:
    """Normalised ``(bins, bins)`` histogram over ``[-r, r]^2``; points outside go to the border bins."""
    ij = torch.floor((x + half_range) / (2.0 * half_range) * bins).long().clamp(0, bins - 1)
    h = torch.bincount(ij[:, 0] * bins + ij[:, 1], minlength=bins * bins).double()
    return h / h.sum()


def histogram_kl(x: Tensor, y: Tensor, *, bins: int = 64, range: float = 4.2, eps: float = 1e-10) -> float:
    """``KL(P_x || P_y)`` between smoothed 2-D histograms of ``x`` (e.g. samples) and ``y`` (e.g. data).

    Each set is binned on a ``bins x bins`` grid over ``[-range, range]^2``; points outside the box are
    clamped into the border bins (so outliers are counted, not dropped). Smoothing: with bin
    frequencies ``f_b`` (summing to 1), ``P_b = (f_b + eps) / (1 + B eps)`` with ``B = bins^2``, then
    ``KL = sum_b P_x,b log(P_x,b / P_y,b)``. ``eps`` keeps empty bins finite: a sample mass ``f`` in a
    bin where ``y`` has none costs about ``f log(f / eps)`` nats. Raises on non-finite points.
    """
    xp, yp = _points(x, "x"), _points(y, "y")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    if not (range > 0 and math.isfinite(range)):
        raise ValueError(f"range must be a positive finite number, got {range!r}")
    if not (eps > 0):
        raise ValueError(f"eps must be > 0, got {eps!r}")
    b = bins * bins
    px = (_hist2d(xp, bins, range) + eps) / (1.0 + b * eps)
    py = (_hist2d(yp, bins, range) + eps) / (1.0 + b * eps)
    return float((px * (px.log() - py.log())).sum())


def checkerboard_metrics(
    x: Tensor,
    reference: Tensor,
    *,
    floor: float | None = None,
    scale: float = 4.0,
    seeds: Sequence[int] = (0, 1, 2),
    n_projections: int = 256,
) -> dict[str, float]:
    """All checkerboard numbers of the reference protocol in one dict.

    Keys: ``sw2`` (:func:`sliced_w2_mean` against ``reference``), ``sw2_ratio`` (``sw2 / floor``, only
    when ``floor`` is given), ``in_support``, ``cell_mass_kl``, ``cell_chi2`` and ``n`` (points in ``x``).
    Non-finite samples make ``sw2`` raise; drop or count them before calling if that is expected.
    """
    out: dict[str, float] = {"n": float(len(x))}
    out["sw2"] = sliced_w2_mean(x, reference, seeds=seeds, n_projections=n_projections)
    if floor is not None:
        out["sw2_ratio"] = out["sw2"] / floor
    out["in_support"] = in_support_fraction(x, scale)
    out["cell_mass_kl"] = cell_mass_kl(x, scale)
    out["cell_chi2"] = cell_mass_chi2(x, scale)
    return out
