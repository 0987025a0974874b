"""Baseline steps on the mean prediction: Euler, Heun, DPM-Solver-2, DPM-Solver++(2M), DDPM.

Schedule ``alpha = 1 - t``, ``sigma = t``, log-SNR ``lambda(t) = log((1 - t)/t)``. ``predict(x, t)``
returns ``(x0, u)`` for a batch at the scalar time ``t`` (a Python float).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Predict = Callable[[Tensor, float], tuple[Tensor, Tensor]]

_T_EPS = 1e-6


def log_snr(t: float) -> float:
    """``lambda(t) = log((1 - t)/t)`` with ``t`` clamped to ``[1e-6, 1 - 1e-6]``."""
    t = min(max(t, _T_EPS), 1.0 - _T_EPS)
    return math.log((1.0 - t) / t)


def euler_step(predict: Predict, x: Tensor, t: float, t_next: float) -> Tensor:
    """``x' = x + (t' - t) u(x, t)`` (DDIM with eta = 0 for this schedule)."""
    _, u = predict(x, t)
    return x + (t_next - t) * u


def heun_step(predict: Predict, x: Tensor, t: float, t_next: float, second_order: bool = True) -> Tensor:
    """EDM's Heun: ``x_e = x + h u1``, ``x' = x + h (u1 + u2)/2`` with ``u2 = u(x_e, t')``, ``h = t' - t``."""
    _, u1 = predict(x, t)
    x_e = x + (t_next - t) * u1
    if not second_order:
        return x_e
    _, u2 = predict(x_e, t_next)
    return x + (t_next - t) * 0.5 * (u1 + u2)


def dpm_solver2_intermediate(t: float, t_next: float, r: float) -> float:
    """Intermediate time ``s1`` at log-SNR ``lambda_t + r (lambda_t' - lambda_t)``.

    When an end point has infinite log-SNR (``t = 1`` or ``t' = 0``) it is interpolated in time
    instead, ``s1 = t + r (t' - t)``.
    """
    if t >= 1.0 - _T_EPS or t_next <= _T_EPS:
        return t + r * (t_next - t)
    lam = log_snr(t) + r * (log_snr(t_next) - log_snr(t))
    return 1.0 / (1.0 + math.exp(lam))


def dpm_solver2_step(
    predict: Predict, x: Tensor, t: float, t_next: float, r: float = 0.5, second_order: bool = True
) -> Tensor:
    """Single-step DPM-Solver-2 in data-prediction form (research/simple_reflow.md §2.3).

    ``u = (s1/t) x + (1 - s1/t) D(x, t)``;
    ``x' = (t'/t) x + (1 - t'/t) [D(x, t) + (D(u, s1) - D(x, t)) / (2 r)]``.
    Without the correction term this is the Euler step.
    """
    d0, _ = predict(x, t)
    if not second_order:
        return (t_next / t) * x + (1.0 - t_next / t) * d0
    s1 = dpm_solver2_intermediate(t, t_next, r)
    x_mid = (s1 / t) * x + (1.0 - s1 / t) * d0
    d1, _ = predict(x_mid, s1)
    d = d0 + (d1 - d0) / (2.0 * r)
    return (t_next / t) * x + (1.0 - t_next / t) * d


class DPMpp2M:
    """DPM-Solver++(2M), data prediction, multistep (Lu et al. 2022), with a first-order last step.

    Step ``t -> t'`` with ``h = lambda(t') - lambda(t)``:
    ``x' = (t'/t) x + (1 - t'/t) D~`` where ``D~ = D_i`` on the first and the final step, else
    ``D~ = (1 + 1/(2 rho)) D_i - 1/(2 rho) D_{i-1}``, ``rho = h_prev / h``.
    (``alpha'(1 - e^{-h}) = 1 - t'/t`` for this schedule; log-SNRs use ``t`` clamped to
    ``[1e-6, 1 - 1e-6]``, as the reference adapter clamps ``alpha`` at 1e-6.)
    """

    def __init__(self) -> None:
        self.prev_d: Tensor | None = None
        self.prev_h: float | None = None

    def step(self, predict: Predict, x: Tensor, t: float, t_next: float) -> Tensor:
        d, _ = predict(x, t)
        last = t_next <= _T_EPS
        h = log_snr(t_next) - log_snr(t)
        if self.prev_d is None or last:
            d_eff = d
        else:
            rho = self.prev_h / h
            d_eff = (1.0 + 0.5 / rho) * d - (0.5 / rho) * self.prev_d
        self.prev_d, self.prev_h = d, h
        return (t_next / t) * x + (1.0 - t_next / t) * d_eff


def ddpm_step(
    predict: Predict,
    x: Tensor,
    t: float,
    t_next: float,
    variance: str,
    generator: torch.Generator | None,
) -> Tensor:
    """Ancestral DDPM step ``x' = c1 x + c2 D(x, t) + std n`` (research/gmflow.md §4.3, §5.3).

    ``variance="small"``: ``std = sqrt(c3)`` (the exact posterior for a delta x0);
    ``"large"``: ``std = sqrt(1 - r^2) t sqrt((a'^2 + t'^2)/(a^2 + t^2))``. No noise on the final step.
    """
    from ..gm import reverse_transition_coefs

    d, _ = predict(x, t)
    c1, c2, c3 = reverse_transition_coefs(t, t_next, x.dim(), like=x)
    mean = c1 * x + c2 * d
    if t_next <= _T_EPS:
        return mean
    if variance == "small":
        std = c3.sqrt()
    else:
        a, an = 1.0 - t, 1.0 - t_next
        r = (t_next / t) * a / an
        std = torch.full_like(
            c3, math.sqrt(max(1.0 - r * r, 0.0)) * t * math.sqrt((an**2 + t_next**2) / (a**2 + t**2))
        )
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mean + std * noise
