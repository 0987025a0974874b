"""GM-SDE and GM-ODE steps (research/gmflow.md §5.2) and the second-order extrapolation (§5.5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..gm import Gaussian, GaussianMixture, reverse_transition_coefs
from ..guidance import GuidedGM

_DAMP_CA = 0.005  # research/gmflow.md §5.5: damping sqrt(max(0, 1 - (w~^2 + ca) s_c^2 / h_prev^2))


class SecondOrder:
    """Multistep second-order GM update with the ``q^(x0 | x_t)`` conversion (paper A.2, §5.5).

    At step ``i > 0`` with step sizes ``h = t_i - t_{i+1}`` and ``h_prev``:

    1. ``m_prev`` = mean of the cached (post-guidance, pre-extrapolation) x0-GM moved to the current
       ``(x_t, t)`` by :meth:`GaussianMixture.reanchor` (Eq. 10).
    2. ``d = (m_cur - m_prev) (h / 2 h_prev) sqrt(max(0, 1 - (w~^2 + 0.005) s^2 / h_prev^2))`` with
       ``s^2`` the spatially averaged surrogate variance.
    3. ``B = d (+ b_guidance)``; ``P = mean(B^2)``; if ``P > s^2``, ``B`` is rescaled to power ``s^2``.
    4. Target ``N(m_base + B, s^2 max(1 - P/s^2, 1e-6))``; new GM = base GM x ``N(target)/N(base)``.
    """

    def __init__(self, guidance_scale: float = 0.0) -> None:
        self.w2 = float(guidance_scale) ** 2
        self.prev: tuple[GaussianMixture, Tensor, float, float] | None = None

    def __call__(
        self, gm: GaussianMixture, info: GuidedGM | None, x: Tensor, t: float, t_next: float
    ) -> GaussianMixture:
        h = t - t_next
        out = gm
        if self.prev is not None:
            prev_gm, prev_x, prev_t, prev_h = self.prev
            if info is not None:
                base_gm, base, avg_var, bias, cur = info.cond, info.base, info.avg_var, info.bias, gm.mean()
            else:
                base_gm, base = gm, gm.to_gaussian(spatial_average=True)
                avg_var, bias, cur = base.var, None, base.mean
            m_prev = ReanchoredMean(prev_gm, prev_x, prev_t)(x, t)
            damp = (1.0 - (self.w2 + _DAMP_CA) * avg_var / prev_h**2).clamp_min(0.0).sqrt()
            big_b = (cur - m_prev) * (0.5 * h / prev_h) * damp
            if bias is not None:
                big_b = big_b + bias
            power = big_b.square().flatten(1).mean(1).reshape(avg_var.shape)
            big_b = torch.where(power > avg_var, big_b * torch.sqrt(avg_var / power.clamp_min(1e-30)), big_b)
            target = Gaussian(base.mean + big_b, avg_var * (1.0 - power / avg_var).clamp_min(1e-6))
            out = base_gm.mul_gaussian_ratio(target, base)
        self.prev = (gm, x, t, h)
        return out


def gm_sde_step(
    gm: GaussianMixture, x: Tensor, t: float, t_next: float, generator: torch.Generator | None
) -> Tensor:
    """``x' = c1 x + c2 x0^ + sqrt(c3) n`` with ``x0^ ~`` the x0-GM (Eq. 9); exact sample at ``t' = 0``."""
    x0_hat = gm.sample(generator)
    c1, c2, c3 = reverse_transition_coefs(t, t_next, x.dim(), like=x)
    out = c1 * x + c2 * x0_hat
    if t_next > 0:
        out = out + c3.sqrt() * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
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


def gm_ode_step(gm: GaussianMixture, x: Tensor, t: float, t_next: float, substeps: int) -> Tensor:
    """GM-ODE: ``substeps`` Euler steps in x0 form, reusing one network output (§5.2).

    ``tau_j = t + (j/n)(t' - t)``; ``x0_j`` = mean of the GM for ``j = 0``, else the mean of
    ``q^(x0 | x_tau_j)`` re-anchored from ``(x_t, t)``; ``x <- x + (tau_{j+1} - tau_j)(x - x0_j)/tau_j``.
    """
    field = ReanchoredMean(gm, x, t) if substeps > 1 else None
    for j in range(substeps):
        tau = t + (j / substeps) * (t_next - t)
        tau_next = t + ((j + 1) / substeps) * (t_next - t)
        x0 = gm.mean() if j == 0 else field(x, tau)
        x = x + (tau_next - tau) * (x - x0) / tau
    return x


def default_substeps(nfe: int) -> int:
    """``ceil(128 / nfe)`` (the paper's toy setting)."""
    return math.ceil(128 / nfe)
