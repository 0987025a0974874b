"""GM-SDE and GM-ODE (GMFlow Eqs. 9-10) and their second-order multistep extrapolation (GMFlow App. A.2).

Each step consumes a :class:`~gmflow.sampling.solvers.base.GMPrediction`: the x0-GM ``q(x0 | x_t)``
of one network evaluation. GM maths runs with autocast disabled. Derivations: docs/maths/solvers.md.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import Tensor

from ...gaussian import Gaussian, reverse_transition_coefs
from ...gm import GaussianMixture
from ...guidance import GuidedGM
from ...spectral import SpectrumNet, spectral_sample
from .base import GMPrediction, Solver, check_int

__all__ = ["GMSDE", "GMODE", "OUTPUT_MODES", "SecondOrder", "ReanchoredMean", "default_substeps"]

OUTPUT_MODES = ("sample", "mean")  # GM-SDE x0 estimate: a draw from the x0-GM, or its mean

_DAMP_CA = 0.005  # damping sqrt(max(0, 1 - (w~^2 + ca) s_c^2 / h_prev^2)) of the second-order step


class SecondOrder:
    """Multistep second-order GM update with the ``q^(x0 | x_t)`` conversion (GMFlow App. A.2).

    At step ``i > 0`` with step sizes ``h = t_i - t_{i+1}`` and ``h_prev``:

    1. ``m_prev`` = mean of the cached (post-guidance, pre-extrapolation) x0-GM moved to the current
       ``(x_t, t)`` by :meth:`GaussianMixture.reanchor` (Eq. 10).
    2. ``d = (m_cur - m_prev) (h / 2 h_prev) sqrt(max(0, 1 - (w~^2 + 0.005) s^2 / h_prev^2))`` with
       ``s^2`` the spatially averaged surrogate variance and ``w~`` the probabilistic-guidance scale
       (0 without it).
    3. ``B = d (+ b_guidance)``; ``P = mean(B^2)``; if ``P > s^2``, ``B`` is rescaled to power ``s^2``.
    4. Target ``N(m_base + B, s^2 max(1 - P/s^2, 1e-6))``; new GM = base GM x ``N(target)/N(base)``.
    """

    def __init__(self) -> None:
        self.prev: tuple[GaussianMixture, Tensor, float, float] | None = None
        self.target: Gaussian | None = None  # the last call's target (None if it did not extrapolate)

    def __call__(
        self, gm: GaussianMixture, info: GuidedGM | None, x: Tensor, t: float, t_next: float
    ) -> GaussianMixture:
        h = t - t_next
        out, self.target = gm, None
        if self.prev is not None:
            prev_gm, prev_x, prev_t, prev_h = self.prev
            if info is not None:
                base_gm, base, avg_var, bias, cur = info.cond, info.base, info.avg_var, info.bias, gm.mean()
                w2 = float(info.scale) ** 2
            else:
                base_gm, base = gm, gm.to_gaussian(spatial_average=True)
                avg_var, bias, cur = base.var, None, base.mean
                w2 = 0.0
            m_prev = ReanchoredMean(prev_gm, prev_x, prev_t)(x, t)
            damp = (1.0 - (w2 + _DAMP_CA) * avg_var / prev_h**2).clamp_min(0.0).sqrt()
            big_b = (cur - m_prev) * (0.5 * h / prev_h) * damp
            if bias is not None:
                big_b = big_b + bias
            power = big_b.square().flatten(1).mean(1).reshape(avg_var.shape)
            big_b = torch.where(power > avg_var, big_b * torch.sqrt(avg_var / power.clamp_min(1e-30)), big_b)
            target = Gaussian(base.mean + big_b, avg_var * (1.0 - power / avg_var).clamp_min(1e-6))
            out, self.target = base_gm.mul_gaussian_ratio(target, base), target
        self.prev = (gm, x, t, h)
        return out


class ReanchoredMean:
    """Fast ``mean(q^(x0 | x_tau))`` for many ``(x_tau, tau)`` from one x0-GM anchored at ``(x_t, t)``.

    Same maths as :meth:`GaussianMixture.reanchor` followed by ``mean()``, specialised so that each
    evaluation is two batched matrix products on ``(B, P, K)`` logits instead of elementwise work on
    ``(B, K, C, *S)``: with ``d = 1 + v zeta``,
    ``mean = (sum_k softmax_k(a_k + (mu_k . nu - zeta ||mu_k||^2 / 2) / d) mu_k + v nu) / d``.
    """

    def __init__(self, gm: GaussianMixture, x_t: Tensor, t: float) -> None:
        b, k, c = gm.means.shape[:3]
        self.shape = (b, c, *gm.means.shape[3:])
        self.mu = gm.means.reshape(b, k, c, -1).permute(0, 3, 1, 2).contiguous()  # (B,P,K,C)
        self.logw = gm.logweights.reshape(b, k, -1).transpose(1, 2).contiguous()  # (B,P,K)
        self.musq = self.mu.square().sum(-1)  # (B,P,K)
        self.v = gm.var.reshape(b, 1, 1)
        self.x_t = x_t.reshape(b, c, -1).transpose(1, 2)  # (B,P,C)
        self.t = max(t, 1e-6)

    def __call__(self, x: Tensor, tau: float) -> Tensor:
        b, c = self.shape[:2]
        tau = max(tau, 1e-6)
        a_s, a_t = 1.0 - self.t, 1.0 - tau
        zeta = a_t**2 / tau**2 - a_s**2 / self.t**2
        nu = (a_t / tau**2) * x.reshape(b, c, -1).transpose(1, 2) - (a_s / self.t**2) * self.x_t  # (B,P,C)
        d = 1.0 + self.v * zeta  # (B,1,1)
        logits = (
            self.logw + (torch.matmul(self.mu, nu.unsqueeze(-1)).squeeze(-1) - 0.5 * zeta * self.musq) / d
        )
        w = torch.softmax(logits, dim=-1)  # (B,P,K)
        m = torch.matmul(w.unsqueeze(-2), self.mu).squeeze(-2)  # (B,P,C)
        out = (m + self.v * nu) / d
        return out.transpose(1, 2).reshape(self.shape)


def default_substeps(nfe: int) -> int:
    """``ceil(128 / nfe)`` GM-ODE sub-steps per network step (the paper's toy setting)."""
    return math.ceil(128 / nfe)


class _GMSolver(Solver):
    """Shared GM-solver driver: optional second-order extrapolation, then :meth:`_gm_step`."""

    needs_gm = True
    orders = (1, 2)
    options: tuple[str, ...] = ("order",)

    def __init__(self, order: int = 1) -> None:
        super().__init__()
        if isinstance(order, bool) or order not in self.orders:
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        self.order = order

    def _reset(self) -> None:
        self._second = SecondOrder() if self.order == 2 else None  # caches the previous GM

    def _advance(self, p: GMPrediction, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, bool]:
        t, t_next = self.interval
        gm, info = p
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self._second is not None:
                gm = self._second(gm, info, x, t, t_next)
            return self._gm_step(gm, x, t, t_next, generator), True

    @abstractmethod
    def _gm_step(
        self, gm: GaussianMixture, x: Tensor, t: float, t_next: float, generator: torch.Generator | None
    ) -> Tensor:
        """One GM step ``t -> t'`` from the (extrapolated) x0-GM."""


class GMSDE(_GMSolver):
    """GM-SDE (GMFlow Eq. 9): ``x' = c1 x + c2 x0^ + sqrt(c3) n`` with ``x0^ ~ q(x0 | x_t)``.

    ``c1, c2, c3`` from :func:`~gmflow.gaussian.reverse_transition_coefs`; an exact sample of the
    reverse transition, and at ``t' = 0`` (no noise) an exact sample of the x0-GM. Draws the GM
    sample, then ``n``, from the step's ``generator``. ``order=2`` adds :class:`SecondOrder`.

    ``spectrum_net`` (e.g. a :class:`~gmflow.nn.SpectrumMLP`): spectral sampling (GMFlow App. A.3,
    docs/maths/spectral.md §5): ``x0^ = spectral_sample(gm, spectrum_net(m, v))`` with ``N(m, v)`` the
    step's Gaussian target: the second-order target when the step extrapolates, else the guided
    numerator ``N(mu_c + b, (1 - w~^2) s_c^2)`` under probabilistic guidance, else ``gm.to_gaussian()``.

    ``output_mode="mean"``: ``x0^`` is the mean of the (extrapolated) x0-GM instead of a draw, i.e. the
    ancestral DDPM step on the GM mean (order 1: :class:`~gmflow.sampling.solvers.DDPM` with
    ``variance="small"``); only the transition noise is drawn.
    """

    name = "gm-sde"
    stochastic = True
    options = ("order", "spectrum_net", "output_mode")

    def __init__(
        self, order: int = 1, spectrum_net: SpectrumNet | None = None, output_mode: str = "sample"
    ) -> None:
        super().__init__(order)
        if spectrum_net is not None and not callable(spectrum_net):
            raise TypeError(
                "spectrum_net must be None or callable as spectrum_net(mean, var), "
                f"got {type(spectrum_net).__name__}"
            )
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be 'sample' or 'mean', got {output_mode!r}")
        if output_mode == "mean" and spectrum_net is not None:
            raise ValueError("spectrum_net applies to output_mode='sample' only (the mean is not drawn)")
        self.spectrum_net = spectrum_net
        self.output_mode = output_mode
        self._guided: GuidedGM | None = None

    def _advance(self, p: GMPrediction, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, bool]:
        self._guided = p.guided  # the spectral draw's Gaussian target under guidance
        return super()._advance(p, x, generator)

    def _spectral_target(self, gm: GaussianMixture) -> Gaussian:
        if self._second is not None and self._second.target is not None:
            return self._second.target
        g = self._guided
        if g is not None:
            return Gaussian(g.base.mean + g.bias, g.avg_var * (1.0 - float(g.scale) ** 2))
        return gm.to_gaussian()

    def _gm_step(
        self, gm: GaussianMixture, x: Tensor, t: float, t_next: float, generator: torch.Generator | None
    ) -> Tensor:
        if self.output_mode == "mean":
            x0_hat = gm.mean()
        elif self.spectrum_net is None:
            x0_hat = gm.sample(generator)
        else:
            target = self._spectral_target(gm)
            x0_hat = spectral_sample(gm, self.spectrum_net(target.mean, target.var), generator)
        c1, c2, c3 = reverse_transition_coefs(t, t_next, x.dim(), like=x)
        out = c1 * x + c2 * x0_hat
        if t_next > 0:
            out = out + c3.sqrt() * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return out


class GMODE(_GMSolver):
    """GM-ODE: ``n = substeps`` analytic Euler sub-steps in x0 form on one network output (GMFlow Eq. 10).

    ``tau_j = t + (j/n)(t' - t)``; ``x0_j`` = mean of the GM for ``j = 0``, else the mean of
    ``q^(x0 | x_tau_j)`` re-anchored from ``(x_t, t)``; ``x <- x + (tau_{j+1} - tau_j)(x - x0_j)/tau_j``.
    ``substeps`` defaults to :func:`default_substeps` of the run's ``nfe``. ``order=2`` adds
    :class:`SecondOrder`.
    """

    name = "gm-ode"
    options = ("order", "substeps")

    def __init__(self, order: int = 1, substeps: int | None = None) -> None:
        super().__init__(order)
        self.substeps = None if substeps is None else check_int("substeps", substeps, 1)

    def _reset(self) -> None:
        super()._reset()
        self._n_sub = default_substeps(self.nfe) if self.substeps is None else self.substeps

    def _gm_step(
        self, gm: GaussianMixture, x: Tensor, t: float, t_next: float, generator: torch.Generator | None
    ) -> Tensor:
        n = self._n_sub
        field = ReanchoredMean(gm, x, t) if n > 1 else None
        for j in range(n):
            tau = t + (j / n) * (t_next - t)
            tau_next = t + ((j + 1) / n) * (t_next - t)
            x0 = gm.mean() if j == 0 else field(x, tau)
            x = x + (tau_next - tau) * (x - x0) / tau
        return x
