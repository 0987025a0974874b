"""Knothe–Rosenblatt (KR) transport between a pixel-wise GM and ``N(0, I)`` (docs/maths/kr.md).

Per sample, the GM's full covariance (``sum_k A_k (mu_k - m)(mu_k - m)^T + s^2 I``) is averaged over
positions and eigendecomposed; coordinates are rotated into its eigenbasis (descending eigenvalues).
In that basis axis ``j`` given axes ``< j`` is a 1-D GM with means ``mu_k[j]``, std ``s`` and weights
``log w_k = a_k - sum_{i<j} (x_i - mu_k[i])^2 / (2 s^2)`` (log-softmax). The map per axis is
``z_j = Phi^{-1}(F_j(x_j))`` with the mixture CDF ``F_j(x) = sum_k w_k Phi((x - mu_k[j]) / s)``.

The inverse solves ``F_j(x) = Phi(z_j)`` by a safeguarded Newton iteration inside the bracket
``[min_k mu_k + s z, max_k mu_k + s z]`` (the mixture CDF lies between its extreme components'
CDFs), falling back to bisection whenever a Newton step leaves the bracket. Tails are handled
by evaluating the upper tail as ``1 - F`` with ``Phi(-.)`` so that ``|z|`` up to ~8 stays accurate.
Pure PyTorch; runs in fp32 (fp64 for fp64 inputs) with autocast disabled.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .gm import GaussianMixture

__all__ = ["gm_to_standard_normal", "standard_normal_to_gm", "principal_axes"]

_SQRT_2PI = math.sqrt(2.0 * math.pi)
#: convergence of the inverse's Newton iteration is checked every this many iterations
_CHECK_EVERY = 4


def principal_axes(gm: GaussianMixture) -> Tensor:
    """Eigenvectors (columns, descending eigenvalues) of the position-averaged GM covariance ``(B, C, C)``."""
    w = gm.weights  # (B,K,1,*S)
    m = (w * gm.means).sum(1, keepdim=True)
    d = (gm.means - m).reshape(*gm.means.shape[:3], -1)  # (B,K,C,P)
    wf = w.reshape(*w.shape[:3], -1)  # (B,K,1,P)
    cov = torch.einsum("bkcp,bkdp->bcd", wf * d, d) / d.shape[-1]
    _, vecs = torch.linalg.eigh(cov)  # ascending; the isotropic s^2 I does not change eigenvectors
    return vecs.flip(-1)


def _rotate(x: Tensor, vecs: Tensor, transpose: bool, channel_dim: int = 1) -> Tensor:
    """Rotate the channel axis: ``x' = V^T x`` (``transpose``) or ``x = V x'``; ``vecs`` is ``(B, C, C)``."""
    xm = x.movedim(channel_dim, -1)  # (B, ..., C)
    mat = vecs if transpose else vecs.transpose(1, 2)
    shape = xm.shape
    out = torch.bmm(xm.reshape(shape[0], -1, shape[-1]), mat).reshape(shape)
    return out.movedim(-1, channel_dim)


def _prep(gm: GaussianMixture, x: Tensor) -> tuple[torch.dtype, Tensor, Tensor, Tensor, Tensor]:
    if tuple(x.shape) != (gm.batch_size, *gm.event_shape):
        raise ValueError(f"input must have shape {(gm.batch_size, *gm.event_shape)}, got {tuple(x.shape)}")
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    gm = gm.to(dtype=dt)
    vecs = principal_axes(gm)
    means = _rotate(gm.means, vecs, transpose=True, channel_dim=2)  # (B,K,C,*S) in the eigenbasis
    return dt, vecs, means, gm.logweights, gm.logstds.exp()


def gm_to_standard_normal(gm: GaussianMixture, x: Tensor) -> Tensor:
    """Forward KR map: samples of ``gm`` (``(B, C, *S)``) -> standard-normal values (same shape)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        dt, vecs, means, logw, s = _prep(gm, x)
        xr = _rotate(x.to(dt), vecs, transpose=True)
        z = torch.empty_like(xr)
        cum = torch.zeros_like(logw)
        for j in range(xr.shape[1]):
            w = torch.log_softmax(logw - cum, dim=1)
            dz = (xr[:, j : j + 1].unsqueeze(1) - means[:, :, j : j + 1]) / s  # (B,K,1,*S)
            lower = (w.exp() * torch.special.ndtr(dz)).sum(1)
            upper = (w.exp() * torch.special.ndtr(-dz)).sum(1)
            tiny = torch.finfo(dt).tiny
            zl = torch.special.ndtri(lower.clamp_min(tiny))
            zu = -torch.special.ndtri(upper.clamp_min(tiny))
            z[:, j : j + 1] = torch.where(lower < 0.5, zl, zu)
            cum = cum + 0.5 * dz.square()
        return z.to(x.dtype)


def standard_normal_to_gm(gm: GaussianMixture, z: Tensor, newton_steps: int | None = None) -> Tensor:
    """Inverse KR map: ``z ~ N(0, I)`` (``(B, C, *S)``) -> samples of ``gm`` (same shape).

    ``newton_steps`` caps the safeguarded Newton iterations per axis: 16 (fp32) / 40 (fp64) by default.
    The iteration stops early once no iterate moved by more than a few ulps in the last step (checked
    every :data:`_CHECK_EVERY` iterations, one host sync each).
    """
    if newton_steps is None:
        newton_steps = 40 if z.dtype == torch.float64 else 16
    with torch.autocast(device_type=z.device.type, enabled=False):
        dt, vecs, means, logw, s = _prep(gm, z)
        zz = z.to(dt)
        out = torch.empty_like(zz)
        cum = torch.zeros_like(logw)
        tiny, eps = torch.finfo(dt).tiny, torch.finfo(dt).eps
        s1 = s.squeeze(1)
        for j in range(zz.shape[1]):
            w = torch.log_softmax(logw - cum, dim=1).exp()
            mu = means[:, :, j : j + 1]  # (B,K,1,*S)
            zj = zz[:, j : j + 1]
            # match the tail the target lies in: F(x) = Phi(z) for z < 0, 1 - F(x) = Phi(-z) otherwise,
            # written as one increasing function g(x) = sign (sum_k w_k Phi(sign dz_k) - Phi(-|z|))
            sign = torch.where(zj < 0, 1.0, -1.0).to(dt).unsqueeze(1)
            target = torch.special.ndtr(-zj.abs())
            lo = mu.amin(1) + s1 * zj
            hi = mu.amax(1) + s1 * zj
            # start from the moment-matched 1-D Gaussian of the slice
            m1 = (w * mu).sum(1)
            v1 = (w * (mu - m1.unsqueeze(1)).square()).sum(1) + s1.square()
            x = (m1 + v1.sqrt() * zj).clamp(lo, hi)
            for it in range(newton_steps):
                dz = (x.unsqueeze(1) - mu) / s
                tail = (w * torch.special.ndtr(sign * dz)).sum(1)
                g = sign.squeeze(1) * (tail - target)
                pdf = (w * torch.exp(-0.5 * dz.square())).sum(1) / (s1 * _SQRT_2PI)
                lo = torch.where(g < 0, x, lo)
                hi = torch.where(g > 0, x, hi)
                step = x - g / pdf.clamp_min(tiny)
                # closed bracket: a converged iterate sits on an end point (step == x == lo or hi)
                inside = (step >= lo) & (step <= hi) & torch.isfinite(step)
                new = torch.where(inside, step, 0.5 * (lo + hi))
                done = (it + 1) % _CHECK_EVERY == 0 and bool(
                    ((new - x).abs() <= 4 * eps * (1 + x.abs())).all()
                )
                x = new
                if done:
                    break
            out[:, j : j + 1] = x
            cum = cum + 0.5 * ((x.unsqueeze(1) - mu) / s).square()
        return _rotate(out, vecs, transpose=False).to(z.dtype)
