"""``gmflow.sample``: one entry point for every solver.

How each solver spends its ``nfe`` model evaluations (a batched cond+uncond call counts once):

============== ============================================================================
solver         steps and evaluations
============== ============================================================================
euler          ``nfe`` steps, 1 evaluation each
heun           ``floor(nfe/2) + 1`` steps; all but the last are Heun (2 evaluations) and the
               final step is Euler, so the model is never evaluated at the grid end (EDM's
               layout: nfe = 9 -> 4 Heun steps + 1 Euler step; an even nfe spends the spare
               evaluation on one more Euler step)
dpm-solver-2   as heun, with DPM-Solver-2 steps (intermediate point ``r``, default 0.5)
dpm++2m        ``nfe`` steps, 1 evaluation each (first and last step first order)
ddpm           ``nfe`` ancestral steps, ``variance="small"`` (default) or ``"large"``
gm-sde         ``nfe`` steps; each draws x0 from the GM and applies the exact GM transition
gm-ode         ``nfe`` steps; each runs ``substeps`` (default ``ceil(128/nfe)``) analytic Euler
               sub-steps on one network output
============== ============================================================================

``order=2`` (GM solvers only) adds the multistep extrapolation of §5.5 (no extra evaluations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..flow import GRID_KINDS, time_grid
from ..gm import GaussianMixture
from ..guidance import ProbabilisticGuidance
from .evaluator import Evaluator, Guidance
from .gm_solvers import SecondOrder, default_substeps, gm_ode_step, gm_sde_step
from .ode import DPMpp2M, ddpm_step, dpm_solver2_step, euler_step, heun_step

__all__ = ["sample", "SOLVERS", "num_steps"]

SOLVERS = ("euler", "heun", "dpm-solver-2", "dpm++2m", "ddpm", "gm-sde", "gm-ode")
_TWO_EVAL = ("heun", "dpm-solver-2")
_GM_SOLVERS = ("gm-sde", "gm-ode")


def num_steps(solver: str, nfe: int) -> int:
    """Number of grid intervals a solver uses for ``nfe`` evaluations."""
    return nfe // 2 + 1 if solver in _TWO_EVAL else nfe


def _check_int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def _validate_times(times: Tensor, steps: int, solver: str) -> list[float]:
    ts = [float(v) for v in torch.as_tensor(times, dtype=torch.float64).flatten()]
    if len(ts) != steps + 1:
        raise ValueError(
            f"times must have {steps + 1} entries for solver={solver!r} (its step count + 1), got {len(ts)}"
        )
    if any(not 0.0 <= v <= 1.0 for v in ts):
        raise ValueError("times must lie in [0, 1]")
    desc = all(a > b for a, b in zip(ts, ts[1:]))
    asc = all(a < b for a, b in zip(ts, ts[1:]))
    if solver in ("euler", "heun"):
        if not (desc or asc):
            raise ValueError("times must be strictly monotone")
    elif not desc or ts[-1] != 0.0:
        raise ValueError(f"times must decrease strictly to 0 for solver={solver!r}")
    return ts


@torch.no_grad()
def sample(
    model: Callable[..., Tensor | GaussianMixture],
    noise: Tensor,
    *,
    solver: str,
    nfe: int,
    order: int = 1,
    substeps: int | None = None,
    generator: torch.Generator | None = None,
    times: Tensor | None = None,
    grid: str = "uniform",
    shift: float = 1.0,
    kappa: float = 20.0,
    r: float = 0.5,
    variance: str = "small",
    cond: dict[str, Any] | None = None,
    uncond: dict[str, Any] | None = None,
    guidance: Guidance | None = None,
    progress: bool = False,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate from ``noise`` (``t = times[0]``, by default 1) to data (``t = 0``).

    Args:
        model: ``model(x_t, t, **cond)`` returning the velocity ``u`` (tensor shaped like ``x_t``) or a
            :class:`~gmflow.GaussianMixture` over it; ``t`` is a float tensor of shape ``(B,)``.
        noise: ``(B, *event)`` starting point (``N(0, I)`` samples). fp64 noise keeps all maths in
            fp64; otherwise the solver maths is fp32 (the model may run under bf16 autocast).
        solver: one of :data:`SOLVERS`; see the module docstring for how each spends ``nfe``.
        nfe: model evaluations per sample.
        order: 1 or 2 (2 only for ``gm-sde`` / ``gm-ode``).
        substeps: GM-ODE sub-steps per network step (default ``ceil(128/nfe)``).
        generator: randomness of stochastic solvers (``gm-sde``, ``ddpm``).
        times: explicit grid of ``num_steps(solver, nfe) + 1`` times (overrides ``grid``); ``euler`` and
            ``heun`` also accept increasing grids (ODE inversion, data -> noise).
        grid, shift, kappa: grid family when ``times`` is not given (see :func:`gmflow.time_grid`).
        r: DPM-Solver-2 intermediate point in (0, 1].
        variance: DDPM variance, ``"small"`` or ``"large"``.
        cond, uncond: keyword inputs of the conditional / unconditional model call.
        guidance: :class:`~gmflow.CFG`, :class:`~gmflow.ProbabilisticGuidance` or
            :class:`~gmflow.AutoGuidance`.
        progress: show a tqdm bar over steps.
        return_trajectory: also return the states at every grid time, ``(steps + 1, B, *event)``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    nfe = _check_int("nfe", nfe, 1)
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if order == 2 and solver not in _GM_SOLVERS:
        raise ValueError(f"order=2 applies to 'gm-sde'/'gm-ode' only; {solver!r} has a fixed order")
    if substeps is not None:
        if solver != "gm-ode":
            raise ValueError(f"substeps applies to solver='gm-ode' only, got solver={solver!r}")
        substeps = _check_int("substeps", substeps, 1)
    if not isinstance(noise, Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
    if noise.dim() < 2 or noise.shape[0] < 1:
        raise ValueError(f"noise must have shape (B, *event) with B >= 1, got {tuple(noise.shape)}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise contains NaN or Inf values")
    if not 0.0 < r <= 1.0:
        raise ValueError(f"r must be in (0, 1], got {r}")
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    if grid not in GRID_KINDS:
        raise ValueError(f"grid must be one of {GRID_KINDS}, got {grid!r}")

    steps = num_steps(solver, nfe)
    if times is None:
        times = time_grid(steps, grid, shift=shift, kappa=kappa)
    ts = _validate_times(times, steps, solver)
    n_second = nfe - steps if solver in _TWO_EVAL else 0

    work = torch.float64 if noise.dtype == torch.float64 else torch.float32
    ev = Evaluator(model, work, cond=cond, uncond=uncond, guidance=guidance)
    x = noise.to(work)
    b = x.shape[0]

    def tvec(v: float) -> Tensor:
        return torch.full((b,), v, device=x.device, dtype=work)

    def predict(xx: Tensor, tt: float) -> tuple[Tensor, Tensor]:
        return ev.predict(xx, tvec(tt))

    w_tilde = guidance.scale if isinstance(guidance, ProbabilisticGuidance) else 0.0
    second = SecondOrder(w_tilde) if order == 2 else None
    dpmpp = DPMpp2M() if solver == "dpm++2m" else None
    n_sub = substeps or default_substeps(nfe)

    traj = [x] if return_trajectory else None
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"sampling ({solver}, nfe={nfe})", leave=False)
    for i in it:
        t, t_next = ts[i], ts[i + 1]
        if solver == "euler":
            x = euler_step(predict, x, t, t_next)
        elif solver == "heun":
            x = heun_step(predict, x, t, t_next, second_order=i < n_second)
        elif solver == "dpm-solver-2":
            x = dpm_solver2_step(predict, x, t, t_next, r=r, second_order=i < n_second)
        elif solver == "dpm++2m":
            x = dpmpp.step(predict, x, t, t_next)
        elif solver == "ddpm":
            x = ddpm_step(predict, x, t, t_next, variance, generator)
        else:
            gm, info = ev.x0_gm(x, tvec(t))
            with torch.autocast(device_type=x.device.type, enabled=False):
                if second is not None:
                    gm = second(gm, info, x, t, t_next)
                if solver == "gm-sde":
                    x = gm_sde_step(gm, x, t, t_next, generator)
                else:
                    x = gm_ode_step(gm, x, t, t_next, n_sub)
        if traj is not None:
            traj.append(x)
    if ev.nfe != nfe:  # pragma: no cover - guards the accounting documented above
        raise RuntimeError(f"internal error: solver {solver!r} used {ev.nfe} evaluations for nfe={nfe}")
    out = x.to(noise.dtype)
    if traj is not None:
        return out, torch.stack(traj).to(noise.dtype)
    return out
