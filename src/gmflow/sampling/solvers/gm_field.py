"""The x0-GM of one network evaluation, laid out for the GM solvers' many tilted means and draws.

An x0-GM ``q = sum_k A_k N(mu_k, v I)`` (:class:`~gmflow.GaussianMixture`, shapes ``(B, K, C, *S)``)
is copied once into a channel-major layout, ``mu (B, C, K[, P])`` with ``P = prod(S)`` positions (no
``P`` axis for vector data), next to ``log A (B, K[, P])`` and ``||mu_k||^2 (B, K[, P])``. Every
operation the solvers need is then a handful of passes over ``(B, K[, P])`` slabs:

* the tilted mean ``mean(q exp(-zeta/2 ||x||^2 + nu . x))`` (docs/maths/gm.md §4) and its mixture part
  ``mbar = sum_k A'_k mu_k`` with ``A' = softmax_k(log A_k + (mu_k . nu - zeta ||mu_k||^2 / 2) / d)``,
  ``d = 1 + v zeta``, written with ``(zeta, nu, d)`` scaled by any common factor (``tau^2`` below),
* the spatially averaged moment-matched Gaussian (GMFlow App. A.1), and
* a draw from a tilted GM without building its ``(B, K, C, *S)`` means.

:class:`GMField` anchors a :class:`PreparedGM` at ``(x_t, t)``, optionally after an extra tilt
``(zeta0, nu0)`` (probabilistic guidance, the second-order update), and evaluates the re-anchored GM
``q^(x0 | x_tau)`` (GMFlow Eq. 10) in the ``tau^2``-scaled form that stays finite at ``tau = 0``::

    A = a_t^2 / t^2 - zeta0,        c = a_t x_t / t^2 - nu0,        u = 1 - v A
    zeta~ = a^2 - tau^2 A,          nu~ = a x - tau^2 c,            E = tau^2 + v zeta~ = tau^2 u + v a^2
    mean  = (tau^2 mbar + v nu~) / E                                 (a = 1 - tau)

Derivations and the sub-step integrators that use ``E`` and ``mbar``: docs/maths/solvers.md §5.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ...gaussian import Gaussian
from ...gm import GaussianMixture

__all__ = ["Tilt", "PreparedGM", "GMField"]

_LOOP_CHANNELS = 8  # channel dot products as a loop of multiply-adds up to this many channels


class Tilt(NamedTuple):
    """The exponential tilt ``exp(-zeta/2 ||x||^2 + nu . x)``: ``zeta (B, 1, *1)``, ``nu (B, C, *S)``."""

    zeta: Tensor
    nu: Tensor


class PreparedGM:
    """``gm`` (an x0-GM) in the channel-major layout of the module docstring; ``gm`` is kept as given."""

    def __init__(self, gm: GaussianMixture) -> None:
        b, k, c = gm.means.shape[:3]
        self.gm = gm
        self.vector = gm.means.dim() == 3
        tail = () if self.vector else (-1,)
        self.mu = gm.means.reshape(b, k, c, *tail).transpose(1, 2).contiguous()  # (B,C,K[,P])
        self.logw = gm.logweights.reshape(b, k, *tail)  # (B,K[,P])
        self.musq = self._dot(None)  # (B,K[,P])
        self.v = gm.var.reshape(b, 1, *tail[:1])  # (B,1[,1])
        self.logstd = gm.logstds.reshape(self.v.shape)
        self._weights: Tensor | None = None

    # ------------------------------------------------------------------ layout
    def flat(self, x: Tensor) -> Tensor:
        """``(B, C, *S)`` -> ``(B, C[, P])``."""
        return x.reshape(self.mu.shape[0], self.mu.shape[1], *([] if self.vector else [-1]))

    def unflat(self, x: Tensor) -> Tensor:
        """``(B, C[, P])`` -> ``(B, C, *S)``."""
        return x.reshape(self.gm.means.shape[0], *self.gm.means.shape[2:])

    def scalar(self, s: Tensor) -> Tensor:
        """A per-sample scalar ``(B, ...)`` -> ``(B, 1[, 1])``."""
        return s.reshape(self.v.shape)

    @property
    def weights(self) -> Tensor:
        """``A_k = exp(log A_k)``, ``(B, K[, P])`` (computed once)."""
        if self._weights is None:
            self._weights = self.logw.exp()
        return self._weights

    # ------------------------------------------------------------------ kernels
    def _dot(self, nu: Tensor | None, start: Tensor | None = None) -> Tensor:
        """``start + mu_k . nu`` for flat ``nu (B, C[, P])`` (``None``: ``||mu_k||^2``), ``(B, K[, P])``."""
        c = self.mu.shape[1]
        if c > _LOOP_CHANNELS:
            out = (self.mu * (self.mu if nu is None else nu.unsqueeze(2))).sum(1)
            return out if start is None else out.add_(start)
        cols = self.mu.transpose(0, 1) if nu is None else nu.transpose(0, 1).contiguous().unsqueeze(2)
        out = self.mu[:, 0] * cols[0] if start is None else torch.addcmul(start, self.mu[:, 0], cols[0])
        for i in range(1, c):
            out.addcmul_(self.mu[:, i], cols[i])
        return out

    def _logits(self, nu: Tensor, zeta: Tensor, d: Tensor) -> Tensor:
        """Tilted logits ``log A_k + mu_k . (nu / d) - ||mu_k||^2 zeta / (2 d)``, ``(B, K[, P])``."""
        return self._dot(nu / d, start=self.logw).addcmul_(self.musq, -0.5 * zeta / d)

    def _exp_shifted(self, logits: Tensor) -> Tensor:
        """``exp(logits - max_k logits)`` in place: unnormalised weights in ``(0, 1]``."""
        return logits.sub_(logits.amax(1, keepdim=True)).exp_()

    def _average(self, w: Tensor) -> Tensor:
        """``sum_k w_k mu_k``, ``(B, C[, P])``."""
        return (self.mu * w.unsqueeze(1)).sum(2)

    # ------------------------------------------------------------------ moments and draws
    def mean(self) -> Tensor:
        """``sum_k A_k mu_k``, flat ``(B, C[, P])``."""
        return self._average(self.weights)

    def tilted_mean(self, tilt: Tilt) -> Tensor:
        """Mean ``(mbar + v nu) / d`` of the GM tilted by ``tilt`` (``d = 1 + v zeta``), ``(B, C[, P])``."""
        zeta, nu = self.scalar(tilt.zeta), self.flat(tilt.nu)
        d = 1.0 + self.v * zeta
        return (self.mbar(nu, zeta, d) + self.v * nu) / d

    def mbar(self, nu: Tensor, zeta: Tensor, d: Tensor) -> Tensor:
        """Mixture part ``sum_k A'_k mu_k`` of the tilt by ``(zeta, nu)``, all scaled by one factor.

        ``nu`` flat ``(B, C[, P])``; ``zeta``, ``d`` (``= factor + v zeta``) per sample ``(B, 1[, 1])``.
        """
        e = self._exp_shifted(self._logits(nu, zeta, d))
        return self._average(e) / e.sum(1, keepdim=True)

    def surrogate(self) -> Gaussian:
        """Moment-matched ``N(m, s^2)`` with the variance averaged over positions (GMFlow App. A.1).

        ``m = sum_k A_k mu_k``, ``s^2 = mean_positions((1/C) sum_k A_k ||mu_k - m||^2) + v``; shapes as
        :meth:`GaussianMixture.to_gaussian` with ``spatial_average=True``.
        """
        w = self.weights.unsqueeze(1)
        m = (self.mu * w).sum(2)
        spread = (self.mu - m.unsqueeze(2)).square_().mul_(w).sum(2).mean(1)  # (B[,P])
        var = spread if self.vector else spread.mean(1)
        ndim = self.gm.means.dim()
        var = var.reshape(var.shape[0], *([1] * (ndim - 2))) + self.gm.var.squeeze(1)
        return Gaussian(self.unflat(m), var)

    def sample(self, tilt: Tilt, generator: torch.Generator | None = None) -> Tensor:
        """One draw per position from the tilted GM, ``(B, C, *S)``, without materialising its means.

        The draws of :meth:`GaussianMixture.sample` of the tilted GM (``GaussianMixture.tilt``): a
        uniform per position picks the component by inverse CDF, then ``N(0, I)`` noise scaled by the
        tilted std ``s / sqrt(d)``; the chosen mean is ``(mu_k + v nu) / d``, ``d = 1 + v zeta``.
        """
        zeta, nu = self.scalar(tilt.zeta), self.flat(tilt.nu)
        d = 1.0 + self.v * zeta
        cdf = torch.cumsum(self._exp_shifted(self._logits(nu, zeta, d)), dim=1)
        b, k = self.logw.shape[:2]
        event = self.gm.means.shape[2:]
        u = torch.rand((b, *event[1:], 1), generator=generator, device=cdf.device, dtype=cdf.dtype)
        thr = u.reshape(b, 1, *cdf.shape[2:]) * cdf[:, -1:]
        idx = (cdf < thr).sum(1, keepdim=True).clamp_max_(k - 1)  # (B,1[,P]): searchsorted(cdf, thr)
        chosen = torch.gather(self.mu, 2, idx.unsqueeze(1).expand(-1, event[0], *idx.shape[1:])).squeeze(2)
        noise = torch.randn((b, *event), generator=generator, device=cdf.device, dtype=cdf.dtype)
        std = torch.exp(self.logstd - 0.5 * torch.log(d))
        return self.unflat((chosen + self.v * nu) / d + std * self.flat(noise))


class GMField:
    """The re-anchored x0-GM ``q^(x0 | x_tau)`` from ``prep`` (optionally tilted) anchored at ``(x_t, t)``.

    Flat states ``(B, C[, P])`` in and out (:meth:`PreparedGM.flat`); ``t`` is clamped at ``1e-6``.
    At ``tau = t`` the field is the (tilted) GM itself (:meth:`mbar0`, :meth:`mean0`).
    """

    def __init__(self, prep: PreparedGM, x_t: Tensor, t: float, tilt: Tilt | None = None) -> None:
        self.prep = prep
        self.tilt = tilt
        self.t = max(float(t), 1e-6)
        a_t = 1.0 - self.t
        v = prep.v
        self.v = v
        if tilt is None:
            self.zeta0, self.nu0 = None, None
            big_a = torch.full_like(v, a_t**2 / self.t**2)
            self.c = (a_t / self.t**2) * x_t
        else:
            self.zeta0, self.nu0 = prep.scalar(tilt.zeta), prep.flat(tilt.nu)
            big_a = a_t**2 / self.t**2 - self.zeta0
            self.c = (a_t / self.t**2) * x_t - self.nu0
        self.big_a = big_a
        self.u = 1.0 - v * big_a

    def energy(self, tau: float) -> Tensor:
        """``E(tau) = tau^2 u + v (1 - tau)^2 > 0`` for ``tau <= t``, ``(B, 1[, 1])``."""
        return tau**2 * self.u + self.v * (1.0 - tau) ** 2

    def mbar0(self) -> Tensor:
        """Mixture part of the (tilted) GM at ``tau = t``."""
        if self.zeta0 is None:
            return self.prep.mean()
        return self.prep.mbar(self.nu0, self.zeta0, 1.0 + self.v * self.zeta0)

    def mean0(self) -> Tensor:
        """Mean of the (tilted) GM at ``tau = t``."""
        return self.prep.mean() if self.tilt is None else self.prep.tilted_mean(self.tilt)

    def mbar(self, x: Tensor, tau: float, energy: Tensor | None = None) -> Tensor:
        """Mixture part ``sum_k A'_k mu_k`` of ``q^(x0 | x_tau = x)``."""
        a, t2 = 1.0 - tau, tau**2
        e = self.energy(tau) if energy is None else energy
        return self.prep.mbar(a * x - t2 * self.c, a * a - t2 * self.big_a, e)

    def mean(self, x: Tensor, tau: float) -> Tensor:
        """``E_q^[x0 | x_tau = x] = (tau^2 mbar + v nu~) / E`` (GMFlow Eq. 10; docs/maths/gm.md §6)."""
        a, t2 = 1.0 - tau, tau**2
        e = self.energy(tau)
        nu = a * x - t2 * self.c
        m = self.prep.mbar(nu, a * a - t2 * self.big_a, e)
        return (t2 * m + self.v * nu) / e

    def delta_g(self, tau_a: float, tau_b: float, e_a: Tensor, e_b: Tensor) -> Tensor:
        """``g(tau_b) - g(tau_a)`` for ``g = (1 - tau) / (u sqrt(E))`` without dividing by ``u``.

        ``(tau_a - tau_b)(a_b tau_a + a_a tau_b) / (sqrt(E_a E_b) (a_b sqrt(E_a) + a_a sqrt(E_b)))``.
        """
        a_a, a_b = 1.0 - tau_a, 1.0 - tau_b
        sa, sb = e_a.sqrt(), e_b.sqrt()
        return (tau_a - tau_b) * (a_b * tau_a + a_a * tau_b) / (sa * sb * (a_b * sa + a_a * sb))
