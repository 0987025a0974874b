"""Gaussian mixtures with a shared isotropic std, and their analytic operations.

Shapes (docs/maths/gm.md):

* ``means``      ``(B, K, C, *S)`` — K component means per position; the event is the channel axis C.
* ``logweights`` ``(B, K, 1, *S)`` — log-softmax-normalised over K (dim 1).
* ``logstds``    ``(B, 1, 1, *[1]*len(S))`` — one isotropic std per sample, shared by components,
  channels and positions.

Every position in ``*S`` is an independent mixture over the C channels (pixel-wise factorisation).
All objects are immutable; every operation returns a new object. The one primitive behind products,
ratios, guidance and the change of noise level is the *exponential tilt* by an isotropic quadratic,
``p(x) * exp(-zeta/2 ||x||^2 + nu . x)`` (see :meth:`GaussianMixture.tilt`), written in the
division-free form so that ``zeta -> 0`` is exact. The isotropic :class:`~gmflow.gaussian.Gaussian`
and the transition coefficients live in :mod:`gmflow.gaussian` (re-exported here); the
Knothe–Rosenblatt maps to and from ``N(0, I)`` are in :mod:`gmflow.kr`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .flow import expand_t
from .gaussian import Gaussian, check_float, reverse_transition_coefs

__all__ = ["Gaussian", "GaussianMixture", "reverse_transition_coefs"]

_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------------- fast reductions
# PyTorch's CPU kernels are slow for reductions over a non-innermost axis followed by a tiny axis
# (the channel axis of 2-D toy data has C = 2). These helpers pick a layout-friendly kernel; they
# compute exactly the same quantities.
def log_softmax_k(logits: Tensor) -> Tensor:
    """log-softmax over K of ``(B, K, 1, *S)`` logits."""
    return torch.log_softmax(logits.squeeze(2), dim=1).unsqueeze(2)


def sum_channels(x: Tensor) -> Tensor:
    """``x.sum(2, keepdim=True)`` for ``(B, K, C, *S)``."""
    if x.dim() == 3:
        return x @ torch.ones(x.shape[2], 1, dtype=x.dtype, device=x.device)
    return x.sum(2, keepdim=True)


def weighted_sum_k(w: Tensor, x: Tensor) -> Tensor:
    """``(w * x).sum(1)`` for ``w (B, K, 1, *S)``, ``x (B, K, C, *S)``; returns ``(B, C, *S)``."""
    if x.dim() == 3:
        return torch.bmm(w.transpose(1, 2), x).squeeze(1)
    return (w * x).sum(1)


def _scalar_shape(means_shape: torch.Size) -> tuple[int, ...]:
    """Shape ``(B, 1, 1, *[1]*len(S))`` of a per-sample scalar for a GM with ``means_shape``."""
    return (means_shape[0], 1, 1) + (1,) * (len(means_shape) - 3)


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Pixel-wise Gaussian mixture ``sum_k A_k N(x; mu_k, s^2 I)`` with one ``s`` per sample.

    Args:
        means: ``(B, K, C, *S)``.
        logweights: ``(B, K, 1, *S)``, log-softmax-normalised over K (use :meth:`from_logits` to
            normalise raw logits).
        logstds: ``(B, 1, 1, *[1]*len(S))``, ``log s``.
    """

    means: Tensor
    logweights: Tensor
    logstds: Tensor

    def __post_init__(self) -> None:
        for name in ("means", "logweights", "logstds"):
            check_float(name, getattr(self, name))
        m, w, s = self.means, self.logweights, self.logstds
        if m.dim() < 3:
            raise ValueError(f"means must have shape (B, K, C, *S), got {tuple(m.shape)}")
        b, k, _c, *sp = m.shape
        want_w = (b, k, 1, *sp)
        if tuple(w.shape) != want_w:
            raise ValueError(
                f"logweights must have shape (B, K, 1, *S) = {want_w} for means {tuple(m.shape)}, "
                f"got {tuple(w.shape)}"
            )
        want_s = _scalar_shape(m.shape)
        if tuple(s.shape) != want_s:
            raise ValueError(
                f"logstds must have shape (B, 1, 1, *[1]*len(S)) = {want_s} for means {tuple(m.shape)}, "
                f"got {tuple(s.shape)}"
            )
        if not (m.dtype == w.dtype == s.dtype):
            raise TypeError(
                f"means, logweights and logstds must share a dtype, got {m.dtype}, {w.dtype}, {s.dtype}"
            )
        if not (m.device == w.device == s.device):
            raise ValueError("means, logweights and logstds must be on the same device")

    # ------------------------------------------------------------------ construction / basics
    @classmethod
    def from_logits(cls, means: Tensor, logits: Tensor, logstds: Tensor) -> GaussianMixture:
        """Build from unnormalised logits (log-softmax over K is applied)."""
        return cls(means, log_softmax_k(logits), logstds)

    @property
    def num_components(self) -> int:
        return self.means.shape[1]

    @property
    def channels(self) -> int:
        return self.means.shape[2]

    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    @property
    def event_shape(self) -> torch.Size:
        """Shape of one sample, ``(C, *S)``."""
        return self.means.shape[2:]

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def weights(self) -> Tensor:
        return self.logweights.exp()

    @property
    def var(self) -> Tensor:
        """Shared component variance ``s^2``, shape ``(B, 1, 1, ...)``."""
        return torch.exp(2.0 * self.logstds)

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> GaussianMixture:
        return GaussianMixture(
            self.means.to(device=device, dtype=dtype),
            self.logweights.to(device=device, dtype=dtype),
            self.logstds.to(device=device, dtype=dtype),
        )

    def detach(self) -> GaussianMixture:
        return GaussianMixture(self.means.detach(), self.logweights.detach(), self.logstds.detach())

    def __getitem__(self, index: Tensor | slice) -> GaussianMixture:
        """Select samples along the batch axis."""
        return GaussianMixture(self.means[index], self.logweights[index], self.logstds[index])

    @staticmethod
    def cat(gms: list[GaussianMixture]) -> GaussianMixture:
        return GaussianMixture(
            torch.cat([g.means for g in gms]),
            torch.cat([g.logweights for g in gms]),
            torch.cat([g.logstds for g in gms]),
        )

    def nonfinite_fields(self) -> tuple[str, ...]:
        """Names of the parameters holding NaN or Inf, e.g. ``("logstds",)``; empty if all are finite.

        ``logweights`` may be ``-inf`` (a component of weight zero). This costs one device sync, so the
        constructor does not call it (training builds a GM every step and stops on a non-finite loss);
        the samplers check every model output with it. One sum per field decides the common case (a NaN
        or Inf anywhere makes the sum NaN or Inf); only a flagged sum, which may also be a finite overflow,
        runs the elementwise check.
        """
        fields = (self.means, self.logweights, self.logstds)
        sums = torch.stack([f.sum() for f in fields])
        fast = torch.stack([torch.isfinite(sums[0]), sums[1] < math.inf, torch.isfinite(sums[2])])
        if all(fast.tolist()):
            return ()
        ok = torch.stack(
            [
                torch.isfinite(self.means).all(),
                (self.logweights < math.inf).all(),
                torch.isfinite(self.logstds).all(),
            ]
        ).tolist()
        return tuple(n for n, good in zip(("means", "logweights", "logstds"), ok) if not good)

    # ------------------------------------------------------------------ moments / density / sampling
    def mean(self) -> Tensor:
        """Mixture mean ``sum_k A_k mu_k``, shape ``(B, C, *S)`` (docs/maths/gm.md)."""
        return weighted_sum_k(self.weights, self.means)

    def to_gaussian(self, spatial_average: bool = False) -> Gaussian:
        """Moment-matched isotropic surrogate (GMFlow App. A.1).

        ``m = sum_k A_k mu_k``, ``var = (1/C) sum_k A_k ||mu_k - m||^2 + s^2`` per position; with
        ``spatial_average`` the variance is averaged over positions (one scalar per sample).
        """
        w = self.weights
        m = weighted_sum_k(w, self.means)
        spread = weighted_sum_k(w, (self.means - m.unsqueeze(1)).square()).mean(1, keepdim=True)
        var = spread + self.var.squeeze(1)
        g = Gaussian(m, var)
        return g.spatial_average() if spatial_average else g

    def log_prob(self, x: Tensor) -> Tensor:
        """``log q(x)`` per position, shape ``(B, *S)`` for ``x`` of shape ``(B, C, *S)`` (docs/maths/gm.md).

        ``logsumexp_k(a_k - ||x - mu_k||^2 / (2 s^2) - C log s - C/2 log 2 pi)``.
        """
        check_float("x", x)
        if tuple(x.shape) != (self.batch_size, *self.event_shape):
            raise ValueError(
                f"x must have shape (B, C, *S) = {(self.batch_size, *self.event_shape)}, got {tuple(x.shape)}"
            )
        c = self.channels
        sq = sum_channels((x.unsqueeze(1) - self.means).square())  # (B,K,1,*S)
        comp = self.logweights - 0.5 * sq * torch.exp(-2.0 * self.logstds) - c * self.logstds
        return torch.logsumexp(comp.squeeze(2), dim=1) - 0.5 * c * _LOG_2PI

    def sample_components(self, generator: torch.Generator | None = None) -> Tensor:
        """Component index per position by inverse CDF over K, shape ``(B, 1, 1, *S)`` (long)."""
        w = self.weights.squeeze(2).movedim(1, -1)  # (B, *S, K)
        cdf = torch.cumsum(w, dim=-1)
        u = torch.rand((*cdf.shape[:-1], 1), generator=generator, device=self.device, dtype=self.dtype)
        idx = torch.searchsorted(cdf.contiguous(), u * cdf[..., -1:]).clamp_max(self.num_components - 1)
        return idx.movedim(-1, 1).unsqueeze(1)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One sample per position, shape ``(B, C, *S)``: pick ``k ~ A``, add ``s * N(0, I)``."""
        idx = self.sample_components(generator)
        idx = idx.expand(-1, -1, self.channels, *([-1] * (self.means.dim() - 3)))
        chosen = torch.gather(self.means, 1, idx).squeeze(1)
        noise = torch.randn(chosen.shape, generator=generator, device=self.device, dtype=self.dtype)
        return chosen + self.logstds.squeeze(1).exp() * noise

    # ------------------------------------------------------------------ u-space <-> x0-space
    def u_to_x0(self, x_t: Tensor, t: Tensor | float) -> GaussianMixture:
        """Velocity GM at ``(x_t, t)`` -> x0 GM: ``mu^x_k = x_t - t mu_k``, ``s_x = t s``.

        ``t`` is clamped at 1e-6 inside the log (as in the reference code), so ``t = 0`` gives a
        near-delta GM at ``x_t``.
        """
        tt = expand_t(t, self.means.dim(), like=self.means)
        means = x_t.unsqueeze(1) - tt * self.means
        logstds = self.logstds + torch.log(tt.clamp_min(1e-6))
        return GaussianMixture(means, self.logweights, logstds)

    def x0_to_u(self, x_t: Tensor, t: Tensor | float) -> GaussianMixture:
        """Inverse of :meth:`u_to_x0`: ``mu_k = (x_t - mu^x_k) / t``, ``s = s_x / t``."""
        tt = expand_t(t, self.means.dim(), like=self.means).clamp_min(1e-6)
        means = (x_t.unsqueeze(1) - self.means) / tt
        logstds = self.logstds - torch.log(tt)
        return GaussianMixture(means, self.logweights, logstds)

    # ------------------------------------------------------------------ products
    def tilt(self, zeta: Tensor, nu: Tensor) -> GaussianMixture:
        """Normalised ``q(x) exp(-zeta/2 ||x||^2 + nu . x)`` — still a K-component GM with shared std.

        ``zeta`` is a per-sample scalar (broadcastable to ``(B, 1, *[1]*len(S))``), ``nu`` is
        ``(B, C, *S)``. With ``v = s^2`` and ``d = 1 + v zeta`` (must be > 0):

        * ``mu_k' = (mu_k + v nu) / d``
        * ``a_k' = logsoftmax_k(a_k + mu_k . (nu - zeta mu_k / 2) / d)``
        * ``v' = v / d``

        This division-free form is exact at ``zeta = 0`` (docs/maths/gm.md).
        """
        nd = self.means.dim()
        if zeta.dim() > 0:
            if zeta.numel() != self.batch_size:
                raise ValueError(
                    f"zeta must be one scalar per sample (B={self.batch_size}), got {tuple(zeta.shape)}"
                )
            zeta = zeta.reshape(self.batch_size, *([1] * (nd - 1)))
        v = self.var
        d = 1.0 + v * zeta
        nu_k = nu.unsqueeze(1)
        means = (self.means + v * nu_k) / d
        if nd == 3:  # vector data: dot products as matrix products (fast on CPU for tiny C)
            dot = torch.matmul(self.means, nu.unsqueeze(-1))  # (B, K, 1)
            delta = (dot - 0.5 * zeta * sum_channels(self.means.square())) / d
        else:
            delta = sum_channels(self.means * (nu_k - 0.5 * zeta * self.means)) / d
        logweights = log_softmax_k(self.logweights + delta)
        logstds = self.logstds - 0.5 * torch.log(d)
        return GaussianMixture(means, logweights, logstds)

    def _check_scalar_var(self, g: Gaussian, what: str) -> None:
        if any(n != 1 for n in g.var.shape[2:]):
            raise ValueError(
                f"{what}: the Gaussian's var must be one scalar per sample, shape (B, 1, 1, ...), "
                f"to keep a shared mixture std; got {tuple(g.var.shape)} (use Gaussian.spatial_average())"
            )

    def mul_gaussian(self, g: Gaussian, power_gm: float = 1.0, power_g: float = 1.0) -> GaussianMixture:
        """Normalised ``q^{g_m} N^{g_g}`` read as ``(q N^{rho})^{g_m}``, ``rho = g_g/g_m`` (GMFlow App. D.2).

        Equivalent to tilting by ``zeta = rho / w``, ``nu = rho m / w``; ``g.var`` must be per sample.
        """
        self._check_scalar_var(g, "mul_gaussian")
        rho = power_g / power_gm
        return self.tilt(rho / g.var, rho * g.mean / g.var)

    def mul_gaussian_ratio(self, num: Gaussian, den: Gaussian) -> GaussianMixture:
        """Normalised ``q(x) N(x; m1, w1) / N(x; m2, w2)`` (used by guidance and 2nd-order steps).

        ``zeta = 1/w1 - 1/w2``, ``nu = m1/w1 - m2/w2``: identity when ``num == den``.
        """
        self._check_scalar_var(num, "mul_gaussian_ratio")
        self._check_scalar_var(den, "mul_gaussian_ratio")
        zeta = 1.0 / num.var - 1.0 / den.var
        nu = num.mean / num.var - den.mean / den.var
        return self.tilt(zeta, nu)

    # ------------------------------------------------------------------ noise-level change / transitions
    def reanchor(
        self, x_src: Tensor, t_src: Tensor | float, x_tgt: Tensor, t_tgt: Tensor | float
    ) -> GaussianMixture:
        """Change of noise level of an x0 GM (GMFlow Eq. 10, App. C.5).

        Given ``q(x0 | x_src)`` at ``t_src``, the implied ``q^(x0 | x_tgt)`` at ``t_tgt < t_src`` is
        ``q(x0|x_src) N(x_tgt; a_t x0, s_t^2) / N(x_src; a_s x0, s_s^2)``, i.e. a tilt with
        ``zeta = a_t^2/s_t^2 - a_s^2/s_s^2`` and ``nu = a_t x_tgt / s_t^2 - a_s x_src / s_s^2``
        (``a = 1 - t``, ``s = t``, both ``t`` clamped at 1e-6).
        """
        nd = x_src.dim()
        ts = expand_t(t_src, nd, like=x_src).clamp_min(1e-6)
        tt = expand_t(t_tgt, nd, like=x_src).clamp_min(1e-6)
        a_s, a_t = 1.0 - ts, 1.0 - tt
        zeta = a_t.square() / tt.square() - a_s.square() / ts.square()
        nu = a_t * x_tgt / tt.square() - a_s * x_src / ts.square()
        return self.tilt(zeta.reshape(-1), nu)

    def reverse_transition(self, x_t: Tensor, t: Tensor | float, t_next: Tensor | float) -> GaussianMixture:
        """GM-SDE kernel ``q(x_{t'} | x_t)`` from this x0 GM (GMFlow Eq. 9).

        ``sum_k A_k N(c1 x_t + c2 mu^x_k, (c3 + c2^2 s_x^2) I)`` with the coefficients of
        :func:`reverse_transition_coefs`.
        """
        c1, c2, c3 = reverse_transition_coefs(t, t_next, x_t.dim(), like=x_t)
        means = c1.unsqueeze(1) * x_t.unsqueeze(1) + c2.unsqueeze(1) * self.means
        c2s = _as_scalar(c2, self.means)
        c3s = _as_scalar(c3, self.means)
        logstds = 0.5 * torch.logaddexp(2.0 * (self.logstds + torch.log(c2s)), torch.log(c3s))
        return GaussianMixture(means, self.logweights, logstds)


def _as_scalar(c: Tensor, like: Tensor) -> Tensor:
    """Per-sample coefficient ``(B, 1, ...)`` -> GM scalar shape ``(B, 1, 1, ...)``."""
    return c.reshape(c.shape[0], *([1] * (like.dim() - 1)))
