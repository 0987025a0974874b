"""ReFlow diagnostics: path straightness, per-t relative loss spread (Fig. 1 of Simple ReFlow), 1-step error.

Convention: ``t = 1`` noise, ``t = 0`` data, ``x_t = (1 - t) x0 + t x1``, velocity ``u = x1 - x0``, so the
denoiser of a velocity model is ``D(x_t, t) = x_t - t u(x_t, t)``. A model may return the velocity or a
:class:`~gmflow.GaussianMixture` over it (its mean is used).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..flow import time_grid
from ..gm import GaussianMixture
from ..sampling import sample

__all__ = ["velocity", "straightness", "per_t_relative_loss", "one_step_error"]


@torch.no_grad()
def velocity(model: Callable[..., Any], x: Tensor, t: float | Tensor) -> Tensor:
    """``u(x, t)`` of a model (mean of a GM output), shaped like ``x``; ``t`` a float or ``(B,)`` tensor."""
    tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if tt.dim() == 0:
        tt = tt.expand(x.shape[0])
    out = model(x, tt)
    u = out.mean() if isinstance(out, GaussianMixture) else out
    if not isinstance(u, Tensor) or u.shape != x.shape:
        raise ValueError(f"model must return a velocity shaped like x_t {tuple(x.shape)} (or a GM over it)")
    return u.to(x.dtype)


def _sq(a: Tensor) -> Tensor:
    """Per-sample squared L2 norm over the event dims, ``(B,)``."""
    return a.reshape(a.shape[0], -1).square().sum(1)


@torch.no_grad()
def straightness(
    model: Callable[..., Any],
    noise: Tensor,
    *,
    nfe: int = 64,
    solver: str = "euler",
    return_per_t: bool = False,
    **sample_kwargs: Any,
) -> float | tuple[float, dict[str, np.ndarray]]:
    """Straightness of the model's own ODE paths from ``x1 = noise`` (t = 1) to ``x0`` (t = 0).

    ``S = int_0^1 E || (x1 - x0) - u(x_t, t) ||^2 dt`` (full squared L2 norm over the event), zero iff
    every path is a straight line travelled at constant speed (Liu et al. 2023). Estimated on the
    solver's grid ``1 = t_0 > ... > t_K = 0`` as the left Riemann sum
    ``S ~ sum_k (t_k - t_{k+1}) E || (x1 - x0) - u(x_{t_k}, t_k) ||^2`` with ``x_{t_k}`` the trajectory
    states and ``x0 = x_{t_K}``.

    Returns ``S`` (a float), and with ``return_per_t=True`` also ``{"t": t_k, "value": E||...||^2}``.
    """
    x0, traj = sample(model, noise, solver=solver, nfe=nfe, return_trajectory=True, **sample_kwargs)
    steps = traj.shape[0] - 1
    times = sample_kwargs.get("times")
    if times is None:
        times = time_grid(
            steps, sample_kwargs.get("grid", "uniform"),
            shift=sample_kwargs.get("shift", 1.0), kappa=sample_kwargs.get("kappa", 20.0),
        )  # fmt: skip
    ts = [float(v) for v in torch.as_tensor(times, dtype=torch.float64).flatten()]
    chord = noise - x0
    per_t = []
    for k in range(steps):
        per_t.append(float(_sq(chord - velocity(model, traj[k], ts[k])).double().mean()))
    dt = np.abs(np.diff(np.asarray(ts)))
    s = float(np.sum(dt * np.asarray(per_t)))
    if return_per_t:
        return s, {"t": np.asarray(ts[:-1]), "value": np.asarray(per_t)}
    return s


def _distance(name: str | Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(name):
        return name
    if name == "l2":
        return lambda p, q: _sq(p - q)
    if name == "l1":
        return lambda p, q: (p - q).reshape(p.shape[0], -1).abs().sum(1)
    raise ValueError(f"distance must be 'l2', 'l1' or a callable (pred, target) -> (B,), got {name!r}")


@torch.no_grad()
def per_t_relative_loss(
    model: Callable[..., Any],
    x0: Tensor,
    x1: Tensor,
    *,
    ts: Any,
    distance: str | Callable[[Tensor, Tensor], Tensor] = "l2",
) -> dict[str, np.ndarray]:
    """Spread of the per-sample denoiser loss at each ``t`` (the statistic of Simple ReFlow Fig. 1).

    For each ``t`` in ``ts``: ``x_t = (1 - t) x0 + t x1``, ``D = x_t - t u(x_t, t)``,
    ``l_i = d(D_i, x0_i)`` (default squared L2), and the relative loss ``l_i / mean_j l_j``.

    Returns numpy arrays over ``ts``: ``"t"``, ``"min"``, ``"mean"`` (1 unless every ``l_i`` is 0),
    ``"max"`` of the relative loss, and the raw ``"loss_mean"`` = ``mean_i l_i``.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)} must have the same shape")
    dist = _distance(distance)
    tv = [float(v) for v in torch.as_tensor(ts, dtype=torch.float64).flatten()]
    out: dict[str, list[float]] = {"t": [], "min": [], "mean": [], "max": [], "loss_mean": []}
    for t in tv:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"ts must lie in [0, 1], got {t}")
        x_t = (1.0 - t) * x0 + t * x1
        d = x_t - t * velocity(model, x_t, t)
        loss = dist(d, x0).double()
        mean = float(loss.mean())
        rel = loss / mean if mean > 0 else torch.zeros_like(loss)
        for k, v in (
            ("t", t),
            ("min", rel.min()),
            ("mean", rel.mean()),
            ("max", rel.max()),
            ("loss_mean", mean),
        ):
            out[k].append(float(v))
    return {k: np.asarray(v) for k, v in out.items()}


@torch.no_grad()
def one_step_error(student: Callable[..., Any], x0: Tensor, x1: Tensor) -> float:
    """``E || (x1 - u(x1, 1)) - x0 ||^2 / D``: the student's one Euler step from t = 1 vs the teacher's ``x0``
    (``D`` = elements per sample)."""
    if x0.shape != x1.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)} must have the same shape")
    x0_hat = x1 - velocity(student, x1, 1.0)
    return float(_sq(x0_hat - x0).double().mean()) / x0[0].numel()
