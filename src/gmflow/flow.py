"""The one flow convention, prediction converters, transitions, time grids and training-time samplers.

Convention (docs/maths/README.md §2): ``t in [0, 1]``, ``t = 1`` is pure noise, ``t = 0`` is data;
``sigma_t = t``, ``alpha_t = 1 - t``::

    x_t = (1 - t) x0 + t eps,      u = eps - x0,      x0 = x_t - t u,      eps = x_t + (1 - t) u.

Every public function takes ``t`` as a float tensor of shape ``(B,)`` (or a Python float).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "expand_t",
    "interpolate",
    "u_to_x0",
    "x0_to_u",
    "u_to_eps",
    "eps_to_u",
    "x0_to_eps",
    "eps_to_x0",
    "forward_transition",
    "transition_pair",
    "time_grid",
    "GRID_KINDS",
    "sample_time",
    "TIME_SAMPLERS",
]


def expand_t(t: Tensor | float, ndim: int, like: Tensor) -> Tensor:
    """Broadcast ``t`` (float, 0-d or ``(B,)``) to shape ``(B, 1, ..., 1)`` with ``ndim`` dims.

    The result has the dtype and device of ``like`` (whose first dim is B).
    """
    b = like.shape[0]
    if isinstance(t, Tensor):
        if t.dim() == 0 or t.numel() == 1:
            t = t.reshape(()).to(device=like.device, dtype=like.dtype).expand(b)
        elif t.dim() == 1 and t.shape[0] == b:
            t = t.to(device=like.device, dtype=like.dtype)
        else:
            raise ValueError(f"t must be a float or a tensor of shape (B,) = ({b},), got {tuple(t.shape)}")
    elif isinstance(t, (int, float)):
        t = torch.full((b,), float(t), device=like.device, dtype=like.dtype)
    else:
        raise TypeError(f"t must be a float or a tensor, got {type(t).__name__}")
    return t.reshape(b, *([1] * (ndim - 1)))


def _t(t: Tensor | float, x: Tensor) -> Tensor:
    return expand_t(t, x.dim(), like=x)


def interpolate(x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """``x_t = (1 - t) x0 + t eps``."""
    tt = _t(t, x0)
    return (1.0 - tt) * x0 + tt * eps


def u_to_x0(u: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """``x0 = x_t - t u``."""
    return x_t - _t(t, x_t) * u


def x0_to_u(x0: Tensor, x_t: Tensor, t: Tensor | float, t_min: float = 1e-6) -> Tensor:
    """``u = (x_t - x0) / t`` (t clamped at ``t_min``)."""
    return (x_t - x0) / _t(t, x_t).clamp_min(t_min)


def u_to_eps(u: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
    """``eps = x_t + (1 - t) u``."""
    return x_t + (1.0 - _t(t, x_t)) * u


def eps_to_u(eps: Tensor, x_t: Tensor, t: Tensor | float, a_min: float = 1e-6) -> Tensor:
    """``u = (eps - x_t) / (1 - t)`` (``1 - t`` clamped at ``a_min``)."""
    return (eps - x_t) / (1.0 - _t(t, x_t)).clamp_min(a_min)


def x0_to_eps(x0: Tensor, x_t: Tensor, t: Tensor | float, t_min: float = 1e-6) -> Tensor:
    """``eps = (x_t - (1 - t) x0) / t``."""
    tt = _t(t, x_t)
    return (x_t - (1.0 - tt) * x0) / tt.clamp_min(t_min)


def eps_to_x0(eps: Tensor, x_t: Tensor, t: Tensor | float, a_min: float = 1e-6) -> Tensor:
    """``x0 = (x_t - t eps) / (1 - t)``."""
    tt = _t(t, x_t)
    return (x_t - tt * eps) / (1.0 - tt).clamp_min(a_min)


def forward_transition(x_s: Tensor, s: Tensor | float, t: Tensor | float, noise: Tensor) -> Tensor:
    """Sample ``x_t | x_s`` for ``s <= t`` (docs/maths/gm.md §7).

    ``x_t = (a_t/a_s) x_s + sqrt(t^2 - (a_t/a_s)^2 s^2) n``, ``a = 1 - t``; ``a_s`` clamped at 1e-6.
    """
    ss, tt = _t(s, x_s), _t(t, x_s)
    if bool((ss > tt + 1e-12).any()):
        raise ValueError("forward_transition needs s <= t (a lower noise level to a higher one)")
    ratio = (1.0 - tt) / (1.0 - ss).clamp_min(1e-6)
    var = (tt.square() - ratio.square() * ss.square()).clamp_min(0.0)
    return ratio * x_s + var.sqrt() * noise


def transition_pair(
    x0: Tensor,
    t_high: Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
    eps: float = 1e-7,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training pair for the transition loss (docs/maths/losses.md §3).

    ``t_low = max(min((1 - ratio) t_high, t_high - eps), 0)``;
    ``x_low = (1 - t_low) x0 + t_low eps0``; ``x_high`` from ``x_low`` by :func:`forward_transition`
    with a second, independent noise. Returns ``(x_low, t_low, x_high)``.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio (transition ratio lambda) must be in (0, 1], got {ratio}")
    t_low = torch.minimum((1.0 - ratio) * t_high, t_high - eps).clamp_min(0.0)
    n0 = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    n1 = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_low = interpolate(x0, n0, t_low)
    x_high = forward_transition(x_low, t_low, t_high, n1)
    return x_low, t_low, x_high


# ---------------------------------------------------------------------------------------- sampling grids
GRID_KINDS = ("uniform", "shift", "sigmoid")


def time_grid(
    steps: int,
    kind: str = "uniform",
    *,
    shift: float = 1.0,
    kappa: float = 20.0,
    t_max: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Descending sampling grid ``t_0 = t_max > t_1 > ... > t_steps = 0`` (shape ``(steps + 1,)``).

    * ``"uniform"``: ``t_i = t_max (1 - i/steps)``.
    * ``"shift"`` (SD3): uniform ``t`` warped by ``t' = shift t / (1 + (shift - 1) t)``.
    * ``"sigmoid"`` (Simple ReFlow; docs/maths/reflow.md §10): with ``u_i = 1 - i/steps``,
      ``t_i = [s(kappa (u_i - 1/2)) - s(-kappa/2)] / [s(kappa/2) - s(-kappa/2)]`` (``s`` = logistic),
      scaled by ``t_max``; ``kappa -> 0`` gives the uniform grid, large ``kappa`` packs steps at both ends.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"t_max must be in (0, 1], got {t_max}")
    u = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "uniform":
        t = u
    elif kind == "shift":
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        t = shift * u / (1.0 + (shift - 1.0) * u)
    elif kind == "sigmoid":
        if kappa <= 0:
            raise ValueError(f"kappa must be > 0, got {kappa}")
        lo, hi = (
            torch.sigmoid(torch.tensor(-kappa / 2, dtype=torch.float64)),
            torch.sigmoid(torch.tensor(kappa / 2, dtype=torch.float64)),
        )
        if float(hi - lo) < 1e-12:  # kappa so small that sigmoid is linear to machine precision
            t = u
        else:
            t = (torch.sigmoid(kappa * (u - 0.5)) - lo) / (hi - lo)
    else:
        raise ValueError(f"kind must be one of {GRID_KINDS}, got {kind!r}")
    t = t * t_max
    t[0], t[-1] = t_max, 0.0
    return t.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------- training times
TIME_SAMPLERS = ("uniform", "logit_normal", "pow10", "u_shaped")


def sample_time(
    n: int,
    kind: str = "uniform",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    loc: float = 0.0,
    scale: float = 1.0,
    u_shape_a: float = 4.0,
    eps: float = 1e-4,
    t_max: float = 1.0,
) -> Tensor:
    """Draw ``n`` training times in ``[eps, t_max]`` (t = 1 noise).

    * ``"uniform"``: ``t ~ U(0, 1)``.
    * ``"logit_normal"``: ``t = sigmoid(N(loc, scale^2))`` (SD3).
    * ``"pow10"``: density ``ln(10) 10^t / 9`` (Simple ReFlow), sampled as ``t = log10(1 + 9 u)``.
    * ``"u_shaped"``: the 2-RF++ baseline, a 50/50 mixture of ``p(t) ∝ e^{a t}`` and ``e^{a (1 - t)}``.

    Values are clamped to ``[eps, t_max]`` (``eps`` keeps ``sigma_t > 0``; ``t_max < 1`` keeps an
    EDM-style teacher's ``sigma = t / (1 - t)`` finite, e.g. ``80/81`` for ``sigma_max = 80``).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not (isinstance(t_max, (int, float)) and eps < t_max <= 1.0):
        raise ValueError(f"t_max must be a number in (eps, 1] = ({eps}, 1], got {t_max!r}")
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    if kind == "uniform":
        t = u
    elif kind == "logit_normal":
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
        t = torch.sigmoid(loc + scale * z)
    elif kind == "pow10":
        t = torch.log10(1.0 + 9.0 * u)
    elif kind == "u_shaped":
        a = u_shape_a
        # inverse CDF of p(t) = a e^{a t} / (e^a - 1) on [0, 1]
        v = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        t_exp = torch.log1p(u * math.expm1(a)) / a
        t = torch.where(v < 0.5, t_exp, 1.0 - t_exp)
    else:
        raise ValueError(f"kind must be one of {TIME_SAMPLERS}, got {kind!r}")
    return t.clamp(eps, t_max).to(dtype)
