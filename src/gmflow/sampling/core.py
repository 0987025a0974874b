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
gm-ode         ``nfe`` steps; each runs ``substeps`` analytic sub-steps on one network output
               (``substep_method`` ``"pc3"``, default ``ceil(16 (t - t'))``, i.e. ``ceil(16/nfe)``
               on the uniform grid; ``"euler"``, the paper's, default ``ceil(128/nfe)``)
============== ============================================================================

``spectral`` (gm-sde only): the GM-SDE draws ``x0^`` by spectral sampling with a spectrum net (GMFlow
App. A.3; :class:`~gmflow.sampling.solvers.GMSDE`), automatically when the model carries one as
``model.spectrum_net``.

``output_mode="mean"`` (gm-sde only): each step uses the mean of the x0-GM instead of a draw (the
ancestral DDPM step on the GM mean).

Network evaluations (:func:`network_evaluations`): ``nfe`` counts calls of the main model. A batched
cond+uncond pass (:class:`~gmflow.CFG`, :class:`~gmflow.ProbabilisticGuidance`) is one network call
(on a doubled batch); :class:`~gmflow.AutoGuidance` also calls its guide model once per evaluation,
so it costs ``nfe`` main + ``nfe`` guide = ``2 nfe`` network evaluations.

``order=2`` (GM solvers only) adds the multistep extrapolation of GMFlow App. A.2 (no extra
evaluations). Each solver is a class in :mod:`gmflow.sampling.solvers`; :func:`sample` validates its
inputs, builds the solver from :data:`SOLVERS` and feeds it one model evaluation per
:meth:`~gmflow.sampling.solvers.Solver.step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..gm import GaussianMixture
from ..guidance import AutoGuidance
from ..spectral import SpectrumNet, resolve_spectrum_net
from .evaluator import Evaluator, Guidance
from .solvers import SOLVERS, get_solver
from .solvers.base import check_int

__all__ = ["sample", "SOLVERS", "network_evaluations", "num_steps"]


def num_steps(solver: str, nfe: int) -> int:
    """Number of grid intervals ``solver`` uses for ``nfe`` evaluations."""
    return get_solver(solver).num_steps(nfe)


def network_evaluations(nfe: int, guidance: Guidance | None = None) -> dict[str, int]:
    """``{"main", "guide", "total"}`` network evaluations per sample of :func:`sample` with ``nfe``.

    ``main = nfe`` (CFG's unconditional half is batched with the conditional one: no extra call);
    ``guide = nfe`` with :class:`~gmflow.AutoGuidance`, else 0; ``total = main + guide``.
    """
    nfe = check_int("nfe", nfe, 1)
    guide = nfe if isinstance(guidance, AutoGuidance) else 0
    return {"main": nfe, "guide": guide, "total": nfe + guide}


@torch.no_grad()
def sample(
    model: Callable[..., Tensor | GaussianMixture],
    noise: Tensor,
    *,
    solver: str,
    nfe: int,
    order: int = 1,
    substeps: int | None = None,
    substep_method: str | None = None,
    generator: torch.Generator | None = None,
    times: Tensor | None = None,
    grid: str = "uniform",
    shift: float = 1.0,
    kappa: float = 20.0,
    r: float = 0.5,
    variance: str = "small",
    spectral: SpectrumNet | bool | None = None,
    output_mode: str = "sample",
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
            Non-finite outputs raise ValueError naming the solver, step and ``t``.
        noise: ``(B, *event)`` starting point (``N(0, I)`` samples). fp64 noise keeps all maths in
            fp64; otherwise the solver maths is fp32 (the model may run under bf16 autocast).
        solver: one of :data:`SOLVERS`; see the module docstring for how each spends ``nfe``.
        nfe: model evaluations per sample.
        order: 1 or 2 (2 only for solvers whose ``orders`` include it: ``gm-sde`` / ``gm-ode``).
        substeps: GM-ODE sub-steps per network step (default
            :func:`~gmflow.sampling.solvers.substeps.default_substeps` of ``nfe``, the method and
            the step's length).
        substep_method: GM-ODE sub-step integrator, ``"pc3"`` (default), ``"pc2"`` or ``"euler"``
            (docs/maths/solvers.md §5).
        generator: randomness of ``stochastic`` solvers (``gm-sde``, ``ddpm``).
        times: explicit grid of ``num_steps(solver, nfe) + 1`` times (overrides ``grid``);
            ``invertible`` solvers (``euler``, ``heun``) also accept increasing grids (ODE inversion,
            data -> noise).
        grid, shift, kappa: grid family when ``times`` is not given (see :func:`gmflow.time_grid`).
        r: DPM-Solver-2 intermediate point in (0, 1].
        variance: DDPM variance, ``"small"`` or ``"large"``.
        spectral: spectral GM-SDE sampling: a spectrum net ``net(mean, var) -> log power spectrum``
            (e.g. :class:`~gmflow.nn.SpectrumMLP`), ``True`` (use ``model.spectrum_net``), ``False``
            (never), or ``None`` (default: ``model.spectrum_net`` if the model has one and the solver
            is ``gm-sde``, else plain per-pixel draws). An explicit net or ``True`` with another solver
            raises ValueError.
        output_mode: gm-sde's x0 estimate, ``"sample"`` (a draw from the x0-GM, the GM-SDE) or
            ``"mean"`` (its mean; ``spectral`` then defaults to no net).
        cond, uncond: keyword inputs of the conditional / unconditional model call.
        guidance: :class:`~gmflow.CFG`, :class:`~gmflow.ProbabilisticGuidance` or
            :class:`~gmflow.AutoGuidance`.
        progress: show a tqdm bar over steps.
        return_trajectory: also return the states at every grid time, ``(steps + 1, B, *event)``.
    """
    cls = get_solver(solver)
    nfe = check_int("nfe", nfe, 1)
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if order not in cls.orders:
        which = "/".join(repr(n) for n, c in SOLVERS.items() if order in c.orders)
        raise ValueError(f"order={order} applies to {which} only; {solver!r} has a fixed order")
    for opt, val in (("substeps", substeps), ("substep_method", substep_method)):
        if val is not None and opt not in cls.options:
            which = "/".join(repr(n) for n, c in SOLVERS.items() if opt in c.options)
            raise ValueError(f"{opt} applies to solver={which} only, got solver={solver!r}")
    if output_mode != "sample" and "output_mode" not in cls.options:
        which = "/".join(repr(n) for n, c in SOLVERS.items() if "output_mode" in c.options)
        raise ValueError(f"output_mode applies to solver={which} only, got solver={solver!r}")
    if not isinstance(noise, Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
    if noise.dim() < 2 or noise.shape[0] < 1:
        raise ValueError(f"noise must have shape (B, *event) with B >= 1, got {tuple(noise.shape)}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise contains NaN or Inf values")
    if spectral is None and output_mode == "mean":
        spectral = False  # nothing is drawn from the GM
    net = _spectrum_net(spectral, model, solver, "spectrum_net" in cls.options)
    given = {
        "order": order, "substeps": substeps, "substep_method": substep_method, "r": r,
        "variance": variance, "spectrum_net": net, "output_mode": output_mode,
    }  # fmt: skip
    s = cls(**{k: given[k] for k in cls.options})
    s.set_timesteps(nfe, times=times, grid=grid, shift=shift, kappa=kappa)

    work = torch.float64 if noise.dtype == torch.float64 else torch.float32
    ev = Evaluator(model, work, cond=cond, uncond=uncond, guidance=guidance, solver=solver)
    evaluate = ev.x0_gm if cls.needs_gm else ev.predict
    x = noise.to(work)
    traj = [x] if return_trajectory else None
    bar = (
        tqdm(total=len(s.times) - 1, desc=f"sampling ({solver}, nfe={nfe})", leave=False, disable=None)
        if progress
        else None
    )
    while not s.done:
        i, t = s.step_index, s.timestep
        x = s.step(evaluate(x, t, i), t, x, generator=generator)
        if s.step_index > i:
            if traj is not None:
                traj.append(x)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    count = network_evaluations(nfe, guidance)
    if (ev.nfe, ev.guide_nfe) != (count["main"], count["guide"]):  # pragma: no cover - guards the docs
        raise RuntimeError(
            f"internal error: solver {solver!r} used {ev.nfe} + {ev.guide_nfe} evaluations for nfe={nfe}"
        )
    out = x.to(noise.dtype)
    if traj is not None:
        return out, torch.stack(traj).to(noise.dtype)
    return out


def _spectrum_net(
    spectral: SpectrumNet | bool | None, model: object, solver: str, supported: bool
) -> SpectrumNet | None:
    """The spectrum net the solver uses (see ``spectral`` of :func:`sample`)."""
    if not supported:
        if spectral is None or spectral is False:
            return None
        which = "/".join(repr(n) for n, c in SOLVERS.items() if "spectrum_net" in c.options)
        raise ValueError(f"spectral applies to solver={which} only, got solver={solver!r}")
    return resolve_spectrum_net(spectral, model)
