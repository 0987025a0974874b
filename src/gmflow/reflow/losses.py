"""Simple ReFlow loss pieces: the FFT-mask high-pass-filter (HPF) distance and loss normalisation.

Convention: ``t = 1`` noise, ``t = 0`` data, ``x_t = (1 - t) x0 + t x1``; the denoiser of a velocity
model is ``D = x_t - t u``, and ``D - x0 = t ((x1 - x0) - u)``.

**HPF distance** (docs/maths/reflow.md §5; the co-author's definition)::

    d(D, x0) = mean_{c,h,w} | IDFT( M ⊙ DFT(e_c) ) |^2,         e = D - x0,
    M(k)     = 1 / (1 + lambda)  if |k - DC| < r R   else 1      (R = half-diagonal of the grid)

``M > 0`` makes ``e -> IDFT(M DFT(e))`` linear, symmetric and invertible, so ``d`` is a positive definite
quadratic form and the minimiser of ``E_{x0 | x_t} d(D, x0)`` over ``D`` stays the posterior mean.
``lambda = 0`` is the MSE; an error living in the low-frequency disc costs ``(1 + lambda)^-2`` of its MSE,
an error outside it exactly its MSE.

**Normalisation** (docs/maths/reflow.md §4): per sample ``l / max(sg[l], floor)`` (value ~1, gradient
``grad log l`` above the floor); learned, ``l / max(exp(sg[g]), floor)`` with ``g(x_t, t)`` fitted to
``log E[l | x_t, t]`` by :func:`log_loss_fit`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "error_distance",
    "hpf_mask",
    "log_loss_fit",
    "normalized",
    "normalized_by",
    "reflow_distance",
]


def _check_lambda(hpf_lambda: float) -> None:
    if not (isinstance(hpf_lambda, (int, float)) and math.isfinite(hpf_lambda) and hpf_lambda >= 0):
        raise ValueError(f"hpf_lambda must be a finite number >= 0, got {hpf_lambda!r}")


def hpf_mask(
    height: int, width: int, hpf_lambda: float, radius: float = 0.1, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """The DFT-domain mask ``M`` of the HPF distance, ``(height, width)`` in unshifted (``fft2``) layout.

    A bin is "low" when its distance from DC, in bins, is below ``radius * R`` with
    ``R = sqrt(height^2 + width^2) / 2``; low bins get ``1 / (1 + lambda)``, all others 1. Distances are
    measured on the centred grid (frequencies ``-n/2 .. n/2 - 1``), i.e. with wrap-around.
    """
    _check_lambda(hpf_lambda)
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    ky = torch.fft.fftfreq(height, dtype=torch.float64) * height
    kx = torch.fft.fftfreq(width, dtype=torch.float64) * width
    dist = torch.sqrt(ky[:, None].square() + kx[None, :].square())
    low = dist < radius * math.sqrt(height**2 + width**2) / 2.0
    m = torch.ones(height, width, dtype=torch.float64)
    m[low] = 1.0 / (1.0 + hpf_lambda)
    return m.to(dtype)


def error_distance(err: Tensor, *, hpf_lambda: float = 0.0, radius: float = 0.1) -> Tensor:
    """Per-sample HPF distance of an error ``err``, shape ``(B,)`` (module docstring).

    ``lambda = 0`` is ``mean(err^2)`` over all non-batch dims (any shape). ``lambda > 0`` needs images
    ``(B, C, H, W)`` and is computed by Parseval, ``sum_c sum_k M(k)^2 |DFT(err_c)(k)|^2 / (C H^2 W^2)``.
    """
    _check_lambda(hpf_lambda)
    if hpf_lambda == 0:
        return err.square().flatten(1).mean(1)
    if err.dim() != 4:
        raise ValueError(
            f"hpf_lambda={hpf_lambda} > 0 needs image data (B, C, H, W); got shape {tuple(err.shape)} "
            "(use hpf_lambda=0 for vector data)"
        )
    _, c, h, w = err.shape
    m2 = hpf_mask(h, w, hpf_lambda, radius, dtype=err.dtype).to(err.device).square()
    spec = torch.fft.fft2(err, norm="ortho")  # orthonormal: sum |spec|^2 = sum |err|^2 per channel
    return (spec.abs().square() * m2).flatten(1).sum(1) / (c * h * w)


def reflow_distance(d_pred: Tensor, x0: Tensor, *, hpf_lambda: float = 0.0, radius: float = 0.1) -> Tensor:
    """``d(D, x0)`` with ``e = D - x0``, per sample ``(B,)`` (module docstring); ``lambda = 0`` is the MSE."""
    if d_pred.shape != x0.shape:
        raise ValueError(f"d_pred {tuple(d_pred.shape)} and x0 {tuple(x0.shape)} must have the same shape")
    return error_distance(d_pred - x0, hpf_lambda=hpf_lambda, radius=radius)


def _check_floor(floor: float) -> None:
    if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor > 0):
        raise ValueError(f"floor must be a finite number > 0, got {floor!r}")


def normalized(per_sample: Tensor, floor: float = 1e-4) -> Tensor:
    """``l / max(sg[l], floor)``: value 1 and gradient ``grad log l`` where ``l >= floor`` (per sample)."""
    _check_floor(floor)
    return per_sample / per_sample.detach().clamp_min(floor)


def normalized_by(per_sample: Tensor, log_loss: Tensor, floor: float = 1e-4) -> Tensor:
    """``l / max(exp(sg[g]), floor)``: ``l`` over a predicted loss scale ``exp(g)`` (no gradient to g)."""
    _check_floor(floor)
    if log_loss.shape != per_sample.shape:
        raise ValueError(
            f"log_loss {tuple(log_loss.shape)} must have the shape of the losses {tuple(per_sample.shape)}"
        )
    return per_sample / log_loss.detach().to(per_sample.dtype).exp().clamp_min(floor)


def log_loss_fit(per_sample: Tensor, log_loss: Tensor) -> Tensor:
    """Per-sample fit of ``g`` to ``log E[l | x_t, t]``: ``sg[l] exp(-g) + g - log sg[l] - 1`` (``>= 0``).

    Its expectation over ``l`` given ``(x_t, t)`` is minimised by ``exp(g) = E[l | x_t, t]`` (the EDM2
    uncertainty form); it is 0 exactly when ``g = log l``. Gradients reach ``g`` only.
    """
    if log_loss.shape != per_sample.shape:
        raise ValueError(
            f"log_loss {tuple(log_loss.shape)} must have the shape of the losses {tuple(per_sample.shape)}"
        )
    lv = per_sample.detach().to(log_loss.dtype).clamp_min(torch.finfo(log_loss.dtype).tiny)
    return lv * torch.exp(-log_loss) + log_loss - lv.log() - 1.0
