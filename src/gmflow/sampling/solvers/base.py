"""The solver protocol: traits, the time grid, and one :meth:`Solver.step` per model evaluation.

A solver object is driven like a diffusers scheduler::

    s = Heun()
    s.set_timesteps(nfe=9)                        # grid of s.num_steps(9) + 1 = 6 times
    while not s.done:
        t = s.timestep                            # time of the next model evaluation
        x = s.step(predict(x, t), t, x)           # one call per evaluation

``predict`` returns a :class:`MeanPrediction` (baseline solvers) or a :class:`GMPrediction`
(``needs_gm`` solvers) for the batch ``x`` at time ``t``. Two-evaluation steps (Heun, DPM-Solver-2)
return the intermediate state from their first call and keep what the second call needs inside the
object; multistep solvers keep their history there too. :attr:`Solver.step_index` counts the grid
intervals completed so far. Update equations: docs/maths/solvers.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from ...flow import GRID_KINDS, time_grid
from ...gm import GaussianMixture
from ...guidance import GuidedGM

__all__ = ["Solver", "MeanPrediction", "GMPrediction", "check_int"]


class MeanPrediction(NamedTuple):
    """One evaluation for the baseline solvers: ``x0`` (the data prediction ``D``) and the velocity
    ``u``, both shaped like ``x_t`` (``x0 = x_t - t u``)."""

    x0: Tensor
    u: Tensor


class GMPrediction(NamedTuple):
    """One evaluation for the GM solvers: the (guided) x0-GM ``q(x0 | x_t)`` and, under probabilistic
    guidance, its details (the second-order step uses them)."""

    gm: GaussianMixture
    guided: GuidedGM | None


def check_int(name: str, v: object, lo: int) -> int:
    """TypeError unless ``v`` is an int (not a bool), ValueError unless ``v >= lo``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


class Solver(ABC):
    """Base class; subclasses implement :meth:`_advance` (and :meth:`_reset` for state).

    Traits (class attributes):

    * ``name``: registry name.
    * ``needs_gm``: consumes :class:`GMPrediction` (the model must return a GaussianMixture).
    * ``stochastic``: draws random numbers (``step`` takes a ``generator``).
    * ``invertible``: also runs on an increasing grid (data -> noise, ODE inversion).
    * ``orders``: accepted values of ``order``.
    * ``options``: names of the constructor's keyword options (e.g. ``("order", "substeps")``).
    """

    name: ClassVar[str]
    needs_gm: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False
    invertible: ClassVar[bool] = False
    orders: ClassVar[tuple[int, ...]] = (1,)
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.times: list[float] = []
        self.nfe = 0
        self.step_index = 0

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options)
        return f"{type(self).__name__}({opts})"

    @classmethod
    def num_steps(cls, nfe: int) -> int:
        """Grid intervals for a budget of ``nfe`` evaluations (one evaluation per step by default)."""
        return nfe

    # ------------------------------------------------------------------ grid
    def set_timesteps(
        self,
        nfe: int,
        times: Tensor | list[float] | None = None,
        grid: str = "uniform",
        shift: float = 1.0,
        kappa: float = 20.0,
    ) -> None:
        """Set the grid for ``nfe`` evaluations and clear all state.

        ``times`` (``num_steps(nfe) + 1`` values in [0, 1]) overrides the ``grid`` family
        (:func:`gmflow.time_grid` with ``shift`` / ``kappa``). Grids decrease strictly to 0, or, for
        ``invertible`` solvers, may also increase strictly (data -> noise).
        """
        nfe = check_int("nfe", nfe, 1)
        if grid not in GRID_KINDS:
            raise ValueError(f"grid must be one of {GRID_KINDS}, got {grid!r}")
        steps = self.num_steps(nfe)
        if times is None:
            times = time_grid(steps, grid, shift=shift, kappa=kappa)
        self.times = self._validate_times(times, steps)
        self.nfe = nfe
        self.step_index = 0
        self._reset()

    def _validate_times(self, times: Tensor | list[float], steps: int) -> list[float]:
        ts = [float(v) for v in torch.as_tensor(times, dtype=torch.float64).flatten()]
        if len(ts) != steps + 1:
            raise ValueError(
                f"times must have {steps + 1} entries for solver={self.name!r} (its step count + 1), "
                f"got {len(ts)}"
            )
        if any(not 0.0 <= v <= 1.0 for v in ts):
            raise ValueError("times must lie in [0, 1]")
        desc = all(a > b for a, b in zip(ts, ts[1:]))
        asc = all(a < b for a, b in zip(ts, ts[1:]))
        if self.invertible:
            if not (desc or asc):
                raise ValueError("times must be strictly monotone")
        elif not desc or ts[-1] != 0.0:
            raise ValueError(f"times must decrease strictly to 0 for solver={self.name!r}")
        return ts

    @property
    def done(self) -> bool:
        """All grid intervals are integrated (also before :meth:`set_timesteps`)."""
        return self.step_index >= len(self.times) - 1

    @property
    def interval(self) -> tuple[float, float]:
        """The current grid interval ``(t, t')``."""
        return self.times[self.step_index], self.times[self.step_index + 1]

    @property
    def timestep(self) -> float:
        """Time of the next model evaluation (the start of the current interval by default)."""
        return self.times[self.step_index]

    # ------------------------------------------------------------------ stepping
    def step(
        self,
        prediction: MeanPrediction | GMPrediction,
        timestep: float,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Consume one model evaluation at ``(sample, timestep)``; return the state to evaluate next.

        ``timestep`` must be :attr:`timestep`; ``sample`` the state returned by the previous call
        (or the start). After the call that completes an interval, :attr:`step_index` has advanced
        and the returned state lies on the grid.
        """
        if self.done:
            raise RuntimeError(f"{self.name}: every step is taken; call set_timesteps() to start again")
        if float(timestep) != self.timestep:
            raise ValueError(f"{self.name}: expected the evaluation at t={self.timestep}, got t={timestep}")
        want = GMPrediction if self.needs_gm else MeanPrediction
        if not isinstance(prediction, want):
            raise TypeError(f"{self.name}.step() takes a {want.__name__}, got {type(prediction).__name__}")
        x, finished = self._advance(prediction, sample, generator)
        if finished:
            self.step_index += 1
        return x

    def _reset(self) -> None:  # noqa: B027 - optional hook; stateless solvers keep the default
        """Clear per-run state (multistep history, pending half-steps)."""

    @abstractmethod
    def _advance(
        self, prediction: MeanPrediction | GMPrediction, x: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, bool]:
        """Returns the next state and whether it completes the current interval."""
