"""Baseline solvers on the mean prediction: Euler, Heun, DPM-Solver-2, DPM-Solver++(2M), DDPM.

Schedule ``alpha = 1 - t``, ``sigma = t``, log-SNR ``lambda(t) = log((1 - t)/t)``. Each step consumes a
:class:`~gmflow.sampling.solvers.base.MeanPrediction` ``(x0, u)`` = ``(D(x, t), u(x, t))``, with
``x0 = x - t u``. Derivations: docs/maths/solvers.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...gaussian import reverse_transition_coefs
from .base import MeanPrediction, Solver

__all__ = ["Euler", "Heun", "DPMSolver2", "DPMSolverPP2M", "DDPM", "log_snr", "dpm_solver2_intermediate"]

_T_EPS = 1e-6


def log_snr(t: float) -> float:
    """``lambda(t) = log((1 - t)/t)`` with ``t`` clamped to ``[1e-6, 1 - 1e-6]``."""
    t = min(max(t, _T_EPS), 1.0 - _T_EPS)
    return math.log((1.0 - t) / t)


def dpm_solver2_intermediate(t: float, t_next: float, r: float) -> float:
    """Intermediate time ``s1`` at log-SNR ``lambda_t + r (lambda_t' - lambda_t)``.

    When an end point has infinite log-SNR (``t = 1`` or ``t' = 0``) it is interpolated in time
    instead, ``s1 = t + r (t' - t)``.
    """
    if t >= 1.0 - _T_EPS or t_next <= _T_EPS:
        return t + r * (t_next - t)
    lam = log_snr(t) + r * (log_snr(t_next) - log_snr(t))
    return 1.0 / (1.0 + math.exp(lam))


class Euler(Solver):
    """``x' = x + (t' - t) u(x, t)``: Euler on ``dx/dt = u`` (DDIM with eta = 0 for this schedule).

    Runs on increasing grids too (ODE inversion, data -> noise).
    """

    name = "euler"
    invertible = True

    def _advance(
        self, p: MeanPrediction, x: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, bool]:
        t, t_next = self.interval
        return x + (t_next - t) * p.u, True


class _TwoEvaluation(Solver):
    """Single-step second-order solvers with two evaluations per step.

    For ``nfe`` evaluations the grid has ``nfe // 2 + 1`` intervals: the first ``nfe - steps`` are
    second order (2 evaluations), the rest first order (1 evaluation), so the last step never
    evaluates the model at the grid end (EDM's layout; nfe = 9 -> 4 two-evaluation steps + 1 Euler
    step). Between its two calls, :meth:`step` keeps the interval's start state in the object.
    """

    @classmethod
    def num_steps(cls, nfe: int) -> int:
        return nfe // 2 + 1

    def _reset(self) -> None:
        self._n_second = self.nfe - (len(self.times) - 1)
        self._pending: tuple[float, Tensor, Tensor] | None = None  # (t_eval, x_start, first output)

    @property
    def second_order(self) -> bool:
        """The current interval takes two evaluations."""
        return self.step_index < self._n_second

    @property
    def timestep(self) -> float:
        return self._pending[0] if self._pending is not None else self.times[self.step_index]


class Heun(_TwoEvaluation):
    """EDM's Heun step (Karras et al. 2022, Algorithm 1), ``h = t' - t``:

    ``x_e = x + h u(x, t)`` (returned by the first call), ``x' = x + h (u(x, t) + u(x_e, t'))/2``
    (the second call). The last step is Euler (``x' = x_e``). Runs on increasing grids too.
    """

    name = "heun"
    invertible = True

    def _advance(
        self, p: MeanPrediction, x: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, bool]:
        t, t_next = self.interval
        if self._pending is None:
            x_e = x + (t_next - t) * p.u
            if not self.second_order:
                return x_e, True
            self._pending = (t_next, x, p.u)
            return x_e, False
        _, x_start, u1 = self._pending
        self._pending = None
        return x_start + (t_next - t) * 0.5 * (u1 + p.u), True


class DPMSolver2(_TwoEvaluation):
    """Single-step DPM-Solver-2 in data-prediction form, i.e. DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1).

    ``r`` in (0, 1] places the intermediate point.

    First call at ``(x, t)``: ``x_mid = (s1/t) x + (1 - s1/t) D(x, t)`` with ``s1`` from
    :func:`dpm_solver2_intermediate`; second call at ``(x_mid, s1)``:
    ``x' = (t'/t) x + (1 - t'/t) [D(x, t) + (D(x_mid, s1) - D(x, t)) / (2 r)]``.
    The last step is first order, ``x' = (t'/t) x + (1 - t'/t) D(x, t)``.
    """

    name = "dpm-solver-2"
    options = ("r",)

    def __init__(self, r: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < r <= 1.0:
            raise ValueError(f"r must be in (0, 1], got {r}")
        self.r = r

    def _advance(
        self, p: MeanPrediction, x: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, bool]:
        t, t_next = self.interval
        if self._pending is None:
            d0 = p.x0
            if not self.second_order:
                return (t_next / t) * x + (1.0 - t_next / t) * d0, True
            s1 = dpm_solver2_intermediate(t, t_next, self.r)
            self._pending = (s1, x, d0)
            return (s1 / t) * x + (1.0 - s1 / t) * d0, False
        _, x_start, d0 = self._pending
        self._pending = None
        d = d0 + (p.x0 - d0) / (2.0 * self.r)
        return (t_next / t) * x_start + (1.0 - t_next / t) * d, True


class DPMSolverPP2M(Solver):
    """DPM-Solver++(2M), data prediction, multistep (Lu et al. 2022b, Algorithm 2), first-order last step.

    Step ``t -> t'`` with ``h = lambda(t') - lambda(t)``: ``x' = (t'/t) x + (1 - t'/t) D~`` where
    ``D~ = D_i`` on the first and the final step, else ``D~ = (1 + 1/(2 rho)) D_i - 1/(2 rho) D_{i-1}``,
    ``rho = h_prev / h``. (``alpha'(1 - e^{-h}) = 1 - t'/t`` for this schedule; log-SNRs use ``t``
    clamped to ``[1e-6, 1 - 1e-6]``.) The object keeps ``D_{i-1}`` and ``h_prev``.
    """

    name = "dpm++2m"

    def _reset(self) -> None:
        self.prev_d: Tensor | None = None
        self.prev_h: float | None = None

    def _advance(
        self, p: MeanPrediction, x: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, bool]:
        t, t_next = self.interval
        d = p.x0
        last = t_next <= _T_EPS
        h = log_snr(t_next) - log_snr(t)
        if self.prev_d is None or last:
            d_eff = d
        else:
            rho = self.prev_h / h
            d_eff = (1.0 + 0.5 / rho) * d - (0.5 / rho) * self.prev_d
        self.prev_d, self.prev_h = d, h
        return (t_next / t) * x + (1.0 - t_next / t) * d_eff, True


class DDPM(Solver):
    """Ancestral DDPM step ``x' = c1 x + c2 D(x, t) + std n`` (Ho et al. 2020; GMFlow Eq. 9 with a delta x0).

    ``c1, c2, c3`` from :func:`~gmflow.gaussian.reverse_transition_coefs`. ``variance="small"``:
    ``std = sqrt(c3)`` (the exact posterior for a delta x0); ``"large"``:
    ``std = sqrt(1 - r^2) t sqrt((a'^2 + t'^2)/(a^2 + t^2))`` with ``r = (t'/t)(a/a')``, ``a = 1 - t``.
    No noise on the final step (``t' = 0``). ``n ~ N(0, I)`` is drawn from the step's ``generator``.
    """

    name = "ddpm"
    stochastic = True
    options = ("variance",)

    def __init__(self, variance: str = "small") -> None:
        super().__init__()
        if variance not in ("small", "large"):
            raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
        self.variance = variance

    def _advance(
        self, p: MeanPrediction, x: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, bool]:
        t, t_next = self.interval
        c1, c2, c3 = reverse_transition_coefs(t, t_next, x.dim(), like=x)
        mean = c1 * x + c2 * p.x0
        if t_next <= _T_EPS:
            return mean, True
        if self.variance == "small":
            std = c3.sqrt()
        else:
            a, an = 1.0 - t, 1.0 - t_next
            r = (t_next / t) * a / an
            std = torch.full_like(
                c3, math.sqrt(max(1.0 - r * r, 0.0)) * t * math.sqrt((an**2 + t_next**2) / (a**2 + t**2))
            )
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean + std * noise, True
