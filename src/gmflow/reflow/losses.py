"""Simple ReFlow loss pieces: the high-pass-filter (HPF) distance and per-sample loss normalisation.

Convention: ``t = 1`` noise, ``t = 0`` data, ``x_t = (1 - t) x0 + t x1``; the denoiser of a velocity
model is ``D = x_t - t u``, and ``D - x0 = t ((x1 - x0) - u)``.

**HPF distance** (docs/maths/reflow.md §5; the operator is a reconstruction)::

    d(D, x0) = mean_{C,H,W} [ e^2 + lambda (H e)^2 ],     e = D - x0,
    H e      = e - G_sigma * e                            (per channel; G = normalised Gaussian blur)

``H`` is linear and maps constant images to zero (the blur pads by edge replication, so it keeps
constants). ``d`` is the quadratic form ``e^T (I + lambda H^T H) e / n`` whose matrix is symmetric
positive definite for ``lambda >= 0``; the minimiser of ``E_{x0 | x_t} d(D, x0)`` over ``D`` is therefore
still the posterior mean ``E[x0 | x_t]`` (the gradient ``2 (I + lambda H^T H)(D - E[x0 | x_t]) / n``
vanishes only there), so the loss respects flow-matching theory.

**Normalisation** (docs/maths/reflow.md §4): ``l / (sg[l] + eps)`` has the value ~1 and the gradient
``grad l / l = grad log l`` (per sample).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["gaussian_kernel1d", "hpf_operator", "reflow_distance", "error_distance", "normalized"]


def gaussian_kernel1d(
    sigma: float, radius: int | None = None, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Normalised 1-D Gaussian ``k_i ∝ exp(-i^2 / (2 sigma^2))``, ``i = -r..r``, ``r = ceil(3 sigma)``."""
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    r = max(1, math.ceil(3.0 * sigma)) if radius is None else int(radius)
    if r < 1:
        raise ValueError(f"radius must be >= 1, got {radius!r}")
    i = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (i / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable per-channel Gaussian blur of ``(B, C, H, W)`` with replicate padding (keeps constants)."""
    b, c, h, w = x.shape
    k = gaussian_kernel1d(sigma, dtype=x.dtype).to(x.device)
    r = (k.numel() - 1) // 2
    y = x.reshape(b * c, 1, h, w)
    y = torch.nn.functional.pad(y, (r, r, r, r), mode="replicate")
    y = torch.nn.functional.conv2d(y, k.reshape(1, 1, 1, -1))
    y = torch.nn.functional.conv2d(y, k.reshape(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


def hpf_operator(x: Tensor, sigma: float = 1.0) -> Tensor:
    """High-pass filter ``H x = x - G_sigma * x`` of an image batch ``(B, C, H, W)`` (linear, per channel).

    The Gaussian blur ``G_sigma`` (radius ``ceil(3 sigma)``, separable, edge-replicate padding) is a
    convex combination of pixels, so ``H`` of a constant image is exactly 0.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"hpf_operator needs images of shape (B, C, H, W), got {shape}")
    return x - _blur(x, sigma)


def error_distance(err: Tensor, *, hpf_lambda: float = 0.0, sigma: float = 1.0) -> Tensor:
    """Per-sample ``mean(err^2 + lambda (H err)^2)`` over all non-batch dims, shape ``(B,)``.

    ``lambda > 0`` needs image-shaped errors ``(B, C, H, W)``; vector data ``(B, C)`` raises ``ValueError``.
    """
    if not (isinstance(hpf_lambda, (int, float)) and math.isfinite(hpf_lambda) and hpf_lambda >= 0):
        raise ValueError(f"hpf_lambda must be a finite number >= 0, got {hpf_lambda!r}")
    d = err.square().flatten(1).mean(1)
    if hpf_lambda > 0:
        if err.dim() != 4:
            raise ValueError(
                f"hpf_lambda={hpf_lambda} > 0 needs image data (B, C, H, W); got shape {tuple(err.shape)} "
                "(use hpf_lambda=0 for vector data)"
            )
        d = d + hpf_lambda * hpf_operator(err, sigma).square().flatten(1).mean(1)
    return d


def reflow_distance(d_pred: Tensor, x0: Tensor, *, hpf_lambda: float = 0.0, sigma: float = 1.0) -> Tensor:
    """``d(D, x0) = mean(e^2 + lambda (H e)^2)``, ``e = D - x0``, per sample ``(B,)`` (module docstring).

    ``hpf_lambda = 0`` is the plain per-sample mean squared error.
    """
    if d_pred.shape != x0.shape:
        raise ValueError(f"d_pred {tuple(d_pred.shape)} and x0 {tuple(x0.shape)} must have the same shape")
    return error_distance(d_pred - x0, hpf_lambda=hpf_lambda, sigma=sigma)


def normalized(per_sample: Tensor, eps: float = 1e-8) -> Tensor:
    """``l / (sg[l] + eps)``: value ~1 per sample, gradient ``grad log l`` (docs/maths/reflow.md §4)."""
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return per_sample / (per_sample.detach() + eps)
