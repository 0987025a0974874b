"""The GM solvers as they were before issue #13 (commit ee6a972), frozen as a measurement baseline.

``benchmarks/gm_cost.py`` times these next to the current solvers in one interleaved run ("today's"
GM-ODE Euler sub-steps and second-order update). Unguided, uniform grid, GM models only; the model
output check is the elementwise one of that commit. Not part of the package.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gmflow import Gaussian, GaussianMixture
from gmflow.gaussian import reverse_transition_coefs

_DAMP_CA = 0.005


def nonfinite_fields(gm: GaussianMixture) -> tuple[str, ...]:
    ok = torch.stack(
        [torch.isfinite(gm.means).all(), (gm.logweights < math.inf).all(), torch.isfinite(gm.logstds).all()]
    ).tolist()
    return tuple(n for n, good in zip(("means", "logweights", "logstds"), ok) if not good)


class ReanchoredMean:
    def __init__(self, gm: GaussianMixture, x_t: Tensor, t: float) -> None:
        b, k, c = gm.means.shape[:3]
        self.shape = (b, c, *gm.means.shape[3:])
        self.mu = gm.means.reshape(b, k, c, -1).permute(0, 3, 1, 2).contiguous()
        self.logw = gm.logweights.reshape(b, k, -1).transpose(1, 2).contiguous()
        self.musq = self.mu.square().sum(-1)
        self.v = gm.var.reshape(b, 1, 1)
        self.x_t = x_t.reshape(b, c, -1).transpose(1, 2)
        self.t = max(t, 1e-6)

    def __call__(self, x: Tensor, tau: float) -> Tensor:
        b, c = self.shape[:2]
        tau = max(tau, 1e-6)
        a_s, a_t = 1.0 - self.t, 1.0 - tau
        zeta = a_t**2 / tau**2 - a_s**2 / self.t**2
        nu = (a_t / tau**2) * x.reshape(b, c, -1).transpose(1, 2) - (a_s / self.t**2) * self.x_t
        d = 1.0 + self.v * zeta
        logits = (
            self.logw + (torch.matmul(self.mu, nu.unsqueeze(-1)).squeeze(-1) - 0.5 * zeta * self.musq) / d
        )
        w = torch.softmax(logits, dim=-1)
        m = torch.matmul(w.unsqueeze(-2), self.mu).squeeze(-2)
        return ((m + self.v * nu) / d).transpose(1, 2).reshape(self.shape)


class SecondOrder:
    def __init__(self) -> None:
        self.prev = None

    def __call__(self, gm: GaussianMixture, x: Tensor, t: float, t_next: float) -> GaussianMixture:
        h, out = t - t_next, gm
        if self.prev is not None:
            prev_gm, prev_x, prev_t, prev_h = self.prev
            base = gm.to_gaussian(spatial_average=True)
            avg_var, cur = base.var, base.mean
            m_prev = ReanchoredMean(prev_gm, prev_x, prev_t)(x, t)
            damp = (1.0 - _DAMP_CA * avg_var / prev_h**2).clamp_min(0.0).sqrt()
            big_b = (cur - m_prev) * (0.5 * h / prev_h) * damp
            power = big_b.square().flatten(1).mean(1).reshape(avg_var.shape)
            big_b = torch.where(power > avg_var, big_b * torch.sqrt(avg_var / power.clamp_min(1e-30)), big_b)
            target = Gaussian(base.mean + big_b, avg_var * (1.0 - power / avg_var).clamp_min(1e-6))
            out = gm.mul_gaussian_ratio(target, base)
        self.prev = (gm, x, t, h)
        return out


def euler_substeps(gm: GaussianMixture, x: Tensor, t: float, t_next: float, n: int) -> Tensor:
    field = ReanchoredMean(gm, x, t) if n > 1 else None
    for j in range(n):
        tau = t + (j / n) * (t_next - t)
        tau_next = t + ((j + 1) / n) * (t_next - t)
        x0 = gm.mean() if j == 0 else field(x, tau)
        x = x + (tau_next - tau) * (x - x0) / tau
    return x


@torch.no_grad()
def sample(
    model,
    noise: Tensor,
    solver: str,
    nfe: int,
    order: int = 1,
    substeps: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``gmflow.sample`` of commit ee6a972 for ``gm-sde`` / ``gm-ode`` (uniform grid, no guidance)."""
    n_sub = math.ceil(128 / nfe) if substeps is None else substeps
    second = SecondOrder() if order == 2 else None
    x = noise
    ts = [1.0 - i / nfe for i in range(nfe + 1)]
    for t, t_next in zip(ts, ts[1:]):
        tv = torch.full((x.shape[0],), t, dtype=x.dtype)
        out = model(x, tv)
        if nonfinite_fields(out):
            raise ValueError("non-finite model output")
        gm = out.to(dtype=x.dtype).u_to_x0(x, tv)
        if second is not None:
            gm = second(gm, x, t, t_next)
        if solver == "gm-ode":
            x = euler_substeps(gm, x, t, t_next, n_sub)
        else:
            x0_hat = gm.sample(generator)
            c1, c2, c3 = reverse_transition_coefs(t, t_next, x.dim(), like=x)
            x = c1 * x + c2 * x0_hat
            if t_next > 0:
                x = x + c3.sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x
