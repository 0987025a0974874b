"""Over-saturation measures of grey images, on samples *before* clipping (docs/maths/evaluation.md §9).

Images live in the data range ``[-1, 1]``; an 8-bit grey level is ``2/255`` wide, so a value rounds to
grey level 0 or 255 exactly when ``|x| >= 1 - 1/255`` (:data:`HALF_LEVEL`). For images ``x (N, C, H, W)``
with ``D = C H W`` pixels each:

* ``frac_bounds``  = mean over all pixels of ``1[|x| >= 1 - 1/255]``: at or beyond the range (what a
  clip to ``[-1, 1]`` and 8-bit rounding turns into pure black or white);
* ``frac_beyond``  = mean of ``1[|x| > 1]``: strictly outside the range (0 for real data);
* ``excess``       = mean of ``max(|x| - 1, 0)``: how far values overshoot the range, per pixel (0 for
  real data; unlike ``frac_beyond`` it barely sees small noise around a bound);
* ``mean_abs``     = mean of ``|x|``;
* ``contrast``     = mean over images of the per-image standard deviation ``sqrt(mean_d (x_d - xbar)^2)``
  (divisor ``D``);
* ``pixel_w1``     = the 1-Wasserstein distance between the pixel-intensity distributions of the two
  sets, ``W1 = integral |F_x(v) - F_ref(v)| dv`` (exact on the empirical distributions; no bins).

:func:`saturation_metrics` returns these for the samples, the same for the reference as ``ref_*``, and
the differences ``d_frac_bounds``, ``d_mean_abs``, ``d_contrast`` (samples minus reference), the form of
the paper's "saturation relative to real data".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HALF_LEVEL", "PixelStats", "pixel_stats", "pixel_w1", "saturation_metrics"]

HALF_LEVEL = 1.0 / 255.0  # half an 8-bit grey level of the range [-1, 1]


@dataclass(frozen=True, eq=False)
class PixelStats:
    """Saturation statistics of one image set and its pixel-intensity distribution.

    ``values`` ``(V,)`` float64 are the distinct pixel values in increasing order and ``weights``
    ``(V,)`` their frequencies (summing to 1): the exact empirical distribution, compact for
    quantised data (real 8-bit images have at most 256 distinct values).
    """

    frac_bounds: float
    frac_beyond: float
    excess: float
    mean_abs: float
    contrast: float
    values: Tensor
    weights: Tensor
    num_images: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        keys = ("frac_bounds", "frac_beyond", "excess", "mean_abs", "contrast")
        return {prefix + k: getattr(self, k) for k in keys}


def _check_images(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[0] < 1 or x[0].numel() < 1:
        raise ValueError(f"{name} must have shape (N, C, H, W) with N >= 1, got {tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (drop or count them before scoring)")
    return x


def pixel_stats(images: Tensor) -> PixelStats:
    """:class:`PixelStats` of ``images (N, C, H, W)`` (finite floats, data range ``[-1, 1]``)."""
    return _stats(images, "images")


def _stats(images: object, name: str) -> PixelStats:
    x = _check_images(images, name)
    flat = x.flatten(1)
    a = flat.abs()
    values, counts = torch.unique(flat.flatten(), sorted=True, return_counts=True)
    return PixelStats(
        frac_bounds=float((a >= 1.0 - HALF_LEVEL).double().mean()),
        frac_beyond=float((a > 1.0).double().mean()),
        excess=float((a - 1.0).clamp_min(0.0).mean()),
        mean_abs=float(a.mean()),
        contrast=float(flat.std(dim=1, unbiased=False).mean()),
        values=values,
        weights=counts.double() / flat.numel(),
        num_images=int(x.shape[0]),
    )


def _cdf_at(values: Tensor, weights: Tensor, z: Tensor) -> Tensor:
    """``F(z) = sum of weights of values <= z`` for each ``z``."""
    cum = torch.cat([weights.new_zeros(1), weights.cumsum(0)])
    return cum[torch.searchsorted(values, z, right=True)]


def pixel_w1(a: PixelStats | Tensor, b: PixelStats | Tensor) -> float:
    """1-Wasserstein distance between the pixel-intensity distributions of two image sets.

    ``W1 = integral |F_a(v) - F_b(v)| dv``; both CDFs are step functions, so the integral is the exact
    sum over the merged support points ``z_k``: ``sum_k |F_a(z_k) - F_b(z_k)| (z_{k+1} - z_k)``. Shifting
    every pixel by ``c`` gives ``|c|``. Accepts images ``(N, C, H, W)`` or their :class:`PixelStats`.
    """
    sa = a if isinstance(a, PixelStats) else pixel_stats(a)
    sb = b if isinstance(b, PixelStats) else pixel_stats(b)
    z = torch.unique(torch.cat([sa.values, sb.values]), sorted=True)
    gap = _cdf_at(sa.values, sa.weights, z[:-1]) - _cdf_at(sb.values, sb.weights, z[:-1])
    return float((gap.abs() * z.diff()).sum())


def saturation_metrics(samples: Tensor, reference: PixelStats | Tensor) -> dict[str, float]:
    """Saturation measures of ``samples (N, C, H, W)`` (before clipping) against ``reference``.

    ``reference``: real images ``(M, C, H, W)`` or their :func:`pixel_stats` (compute it once when
    scoring many sample sets). Returns ``frac_bounds, frac_beyond, excess, mean_abs, contrast, pixel_w1``,
    ``ref_*`` for the reference and ``d_frac_bounds, d_mean_abs, d_contrast`` (samples - reference).
    Raises TypeError / ValueError for a non-tensor, a wrong shape or non-finite values.
    """
    ref = reference if isinstance(reference, PixelStats) else _stats(reference, "reference")
    s = _stats(samples, "samples")
    out = {**s.as_dict(), "pixel_w1": pixel_w1(s, ref), **ref.as_dict("ref_")}
    for k in ("frac_bounds", "mean_abs", "contrast"):
        out[f"d_{k}"] = out[k] - out[f"ref_{k}"]
    return out
