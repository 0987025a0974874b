"""Isotropic Gaussians ``N(mean, var I)`` and the Gaussian transition kernel of the linear schedule.

The :class:`Gaussian` is the surrogate, guidance target and product partner of
:class:`~gmflow.gm.GaussianMixture`; :func:`reverse_transition_coefs` are the DDPM posterior
coefficients behind the GM-SDE kernel (GMFlow Eq. 9) and the DDPM solver (docs/maths/gm.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .flow import expand_t

__all__ = ["Gaussian", "reverse_transition_coefs", "check_float"]

_LOG_2PI = math.log(2.0 * math.pi)


def check_float(name: str, x: object) -> None:
    """TypeError unless ``x`` is a floating-point tensor (``name`` is the argument's name)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


@dataclass(frozen=True, eq=False)
class Gaussian:
    """Isotropic Gaussian ``N(mean, var * I)`` per position.

    ``mean`` is ``(B, C, *S)``; ``var`` broadcasts against it with shape ``(B, 1, *S)`` (per position)
    or ``(B, 1, *[1]*len(S))`` (one value per sample).
    """

    mean: Tensor
    var: Tensor

    def __post_init__(self) -> None:
        check_float("mean", self.mean)
        check_float("var", self.var)
        if self.mean.dim() < 2:
            raise ValueError(f"mean must have shape (B, C, *S), got {tuple(self.mean.shape)}")
        ok = self.var.dim() == self.mean.dim() and self.var.shape[0] == self.mean.shape[0]
        ok = ok and self.var.shape[1] == 1
        ok = ok and all(v in (1, m) for v, m in zip(self.var.shape[2:], self.mean.shape[2:]))
        if not ok:
            raise ValueError(
                f"var must have shape (B, 1, *S) or (B, 1, 1, ...) matching mean {tuple(self.mean.shape)}, "
                f"got {tuple(self.var.shape)}"
            )

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def log_prob(self, x: Tensor) -> Tensor:
        """``log N(x; mean, var I)`` summed over channels, shape ``(B, *S)``."""
        c = self.channels
        sq = (x - self.mean).square().sum(1, keepdim=True)
        lp = -0.5 * sq / self.var - 0.5 * c * torch.log(self.var) - 0.5 * c * _LOG_2PI
        return lp.squeeze(1)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.var.sqrt() * noise

    def spatial_average(self) -> Gaussian:
        """Average ``var`` over all positions: one scalar per sample (the whole-image surrogate)."""
        dims = tuple(range(2, self.var.dim()))
        var = self.var.mean(dims, keepdim=True) if dims else self.var
        return Gaussian(self.mean, var)

    def product(self, other: Gaussian, power_self: float = 1.0, power_other: float = 1.0) -> Gaussian:
        """Normalised ``N1^g1 N2^g2`` (GMFlow App. D.2; docs/maths/gm.md).

        ``norm = g1 w2 + g2 w1``, ``var = w1 w2 / norm``, ``mean = (g1 w2 m1 + g2 w1 m2) / norm``.
        With powers ``(1, -1)`` this is the ratio ``N1/N2`` (an improper Gaussian when ``w1 > w2``).
        """
        w1, w2 = self.var, other.var
        norm = power_self * w2 + power_other * w1
        tiny = torch.finfo(norm.dtype).tiny
        norm = torch.where(norm.abs() < tiny, torch.full_like(norm, tiny), norm)
        var = w1 * w2 / norm
        mean = (power_self * w2 * self.mean + power_other * w1 * other.mean) / norm
        return Gaussian(mean, var)


def reverse_transition_coefs(
    t: Tensor | float, t_next: Tensor | float, ndim: int, like: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """DDPM posterior coefficients for the linear schedule (GMFlow Eq. 9, App. C; docs/maths/gm.md).

    ``x_{t'} | x_t, x0 ~ N(c1 x_t + c2 x0, c3 I)`` with ``r = (t'/t)(a/a')``, ``c1 = (t'/t)^2 a/a'``,
    ``c2 = (1 - r^2) a'``, ``c3 = (1 - r^2) t'^2``, ``a = 1 - t``. Shapes ``(B, 1, ...)`` (ndim dims).
    """
    tt = expand_t(t, ndim, like=like).clamp_min(1e-6)
    tn = expand_t(t_next, ndim, like=like)
    a, an = 1.0 - tt, (1.0 - tn).clamp_min(1e-6)
    ratio = tn / tt
    r = ratio * a / an
    one_m_r2 = (1.0 - r.square()).clamp_min(0.0)
    c1 = ratio.square() * a / an
    c2 = one_m_r2 * an
    c3 = one_m_r2 * tn.square()
    return c1, c2, c3
