"""Gaussian-mixture data with an exact GM posterior — the analytic oracle of tests and benchmarks.

Data ``x0 ~ sum_j pi_j N(m_j, sd^2 I)`` (shared component std ``sd``), independently at every
position of an optional spatial shape. Under ``x_t = a x0 + t eps`` (``a = 1 - t``)::

    p(j | x_t)      ∝ pi_j N(x_t; a m_j, (a^2 sd^2 + t^2) I)
    p(x0 | x_t, j)  = N( (t^2 m_j + a sd^2 x_t) / D,  sd^2 t^2 / D ),   D = t^2 + a^2 sd^2

so the posterior over ``x0`` — and over ``u = (x_t - x0)/t`` — is again a GM with one shared std:
u-means ``(t x_t - t m_j - a sd^2 x_t) / D`` and u-std ``sd / sqrt(D)`` (finite at ``t = 0``). Calling
the data set as a model returns that exact u-GM, so ``gmflow.sample(oracle, ...)`` with ``gm-sde``
is exact in one step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..flow import expand_t
from ..gm import GaussianMixture

__all__ = ["GaussianMixtureData", "ring_gmm"]


class GaussianMixtureData:
    """Isotropic GM data set; ``__call__(x_t, t)`` is the exact posterior denoiser (a u-space GM).

    Args:
        centers: ``(J, C)`` component means.
        std: shared component std ``sd > 0``.
        weights: optional ``(J,)`` mixture weights (normalised); uniform by default.
        spatial_shape: positions per sample (``()`` for vector data ``(B, C)``; ``(H, W)`` for
            image-shaped data ``(B, C, H, W)`` with an independent draw per pixel).
        name: label used in benchmark records.
    """

    def __init__(
        self,
        centers: Tensor,
        std: float,
        weights: Tensor | None = None,
        spatial_shape: tuple[int, ...] = (),
        name: str = "gmm",
    ) -> None:
        centers = torch.as_tensor(centers, dtype=torch.float64)
        if centers.dim() != 2:
            raise ValueError(f"centers must have shape (J, C), got {tuple(centers.shape)}")
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        j = centers.shape[0]
        if weights is None:
            weights = torch.full((j,), 1.0 / j, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (j,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"weights must be ({j},) non-negative with a positive sum")
        self.centers = centers
        self.std = float(std)
        self.weights = weights / weights.sum()
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self.name = name

    @property
    def channels(self) -> int:
        return self.centers.shape[1]

    @property
    def dim(self) -> int:
        return self.channels

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (self.channels, *self.spatial_shape)

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw ``n`` samples of shape ``(n, C, *spatial_shape)``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        npos = n * math.prod(self.spatial_shape)
        idx = torch.multinomial(self.weights, npos, replacement=True, generator=generator)
        noise = torch.randn(npos, self.channels, generator=generator, dtype=torch.float64)
        x = self.centers[idx] + self.std * noise  # (n*P, C)
        x = x.reshape(n, *self.spatial_shape, self.channels).movedim(-1, 1)
        return x.to(device=device, dtype=dtype).contiguous()

    def log_prob(self, x0: Tensor) -> Tensor:
        """Exact data log-density per position, shape ``(B, *S)``."""
        return self._prior_gm(x0).log_prob(x0)

    def _prior_gm(self, like: Tensor) -> GaussianMixture:
        b, sp = like.shape[0], like.shape[2:]
        c = self.centers.to(device=like.device, dtype=like.dtype)
        j = c.shape[0]
        means = c.reshape(1, j, self.channels, *([1] * len(sp))).expand(b, j, self.channels, *sp)
        logw = torch.log(self.weights).to(device=like.device, dtype=like.dtype)
        logw = logw.reshape(1, j, 1, *([1] * len(sp))).expand(b, j, 1, *sp)
        logs = torch.full(
            (b, 1, 1, *([1] * len(sp))), math.log(self.std), device=like.device, dtype=like.dtype
        )
        return GaussianMixture(means.contiguous(), logw.contiguous(), logs)

    def posterior_x0(self, x_t: Tensor, t: Tensor | float) -> GaussianMixture:
        """Exact ``p(x0 | x_t)`` as a GM (see module docstring)."""
        return self._posterior(x_t, t, space="x0")

    def posterior_u(self, x_t: Tensor, t: Tensor | float) -> GaussianMixture:
        """Exact ``p(u | x_t)``, ``u = eps - x0``, as a GM."""
        return self._posterior(x_t, t, space="u")

    def __call__(self, x_t: Tensor, t: Tensor | float) -> GaussianMixture:
        return self.posterior_u(x_t, t)

    def _posterior(self, x_t: Tensor, t: Tensor | float, space: str) -> GaussianMixture:
        if tuple(x_t.shape[1:]) != self.event_shape:
            raise ValueError(f"x_t must have shape (B, *{self.event_shape}), got {tuple(x_t.shape)}")
        dt = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            x = x_t.to(dt)
            nd = x.dim()
            tt = expand_t(t, nd + 1, like=x)  # (B,1,1,*1) broadcast against (B,J,C,*S)
            a = 1.0 - tt
            sd2 = self.std**2
            dd = tt.square() + a.square() * sd2
            prior = self._prior_gm(x)
            m = prior.means  # (B,J,C,*S)
            xk = x.unsqueeze(1)
            # responsibilities: log pi_j + log N(x_t; a m_j, D I), k-dependent part only
            sq = (xk - a * m).square().sum(2, keepdim=True)
            logw = torch.log_softmax(prior.logweights - 0.5 * sq / dd, dim=1)
            if space == "u":
                means = (tt * xk - tt * m - a * sd2 * xk) / dd
                logs = 0.5 * math.log(sd2) - 0.5 * torch.log(dd)
            else:
                means = (tt.square() * m + a * sd2 * xk) / dd
                logs = 0.5 * torch.log(sd2 * tt.clamp_min(1e-6).square() / dd)
            logs = logs.reshape(x.shape[0], 1, 1, *([1] * (nd - 2)))
            return GaussianMixture(means, logw, logs)

    def velocity(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Exact ODE velocity ``E[u | x_t]`` (a plain velocity model for baseline solvers)."""
        return self.posterior_u(x_t, t).mean()


def ring_gmm(
    num_modes: int = 8, radius: float = 4.0, std: float = 0.25, spatial_shape: tuple[int, ...] = ()
) -> GaussianMixtureData:
    """``num_modes`` equally weighted 2-D Gaussians on a ring (issue default: 8, radius 4, std 0.25)."""
    ang = 2.0 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
    centers = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    return GaussianMixtureData(centers, std, spatial_shape=spatial_shape, name="ring")
