"""diffusers schedulers for GM models: thin adapters over gmflow's GMSDE / GMODE solver objects.

The config is the official one, ``{num_train_timesteps: N, shift: s}``
(:class:`gmflow.pretrained.SchedulerConfig`); both classes take each other's config and the official
``FlowEulerODEScheduler`` config (``GMFlowSDEScheduler.from_config(pipe.scheduler.config)``), and any
other key is a ValueError naming it.

Time: ``timesteps = N t`` (float32, ``N t_i`` for the grid ``t_i`` of ``num_inference_steps`` steps,
the ``1000 (1 - i/steps)`` of the official code when ``s = 1``); ``sigmas`` = the grid ``t_i`` itself
with the final 0 appended. Only this interface uses ``N t``: the model is evaluated at
:attr:`GMFlowScheduler.t` (the float64 grid time; ``timestep / N`` is it up to float32 rounding).

One :meth:`~GMFlowScheduler.step` per network evaluation::

    scheduler.set_timesteps(8, order=2)
    for timestep in scheduler.timesteps:
        gm = model(x, torch.full((b,), scheduler.t), class_labels=y)          # a GM over u
        x = scheduler.step(gm, timestep, x, generator=g).prev_sample

``model_output``: a :class:`~gmflow.GaussianMixture` over the velocity ``u`` (what GM heads return), the
official transformer's dict ``{"means", "logweights", "logstds"}`` (also over ``u``), or a
:class:`~gmflow.sampling.GMPrediction` (an x0-GM, e.g. after guidance). The step maths is the solver's
(GMFlow Eqs. 9-10, App. A.2; docs/maths/solvers.md); it runs in float32 (float64 for a float64 sample).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from torch import Tensor

from ..gm import GaussianMixture
from ..pretrained import SchedulerConfig, check_scheduler_keys
from ..sampling import GMODE, GMSDE, GMPrediction, Solver
from ..sampling.solvers.base import check_int
from ..spectral import SpectrumNet

__all__ = ["GMFlowScheduler", "GMFlowODEScheduler", "GMFlowSDEScheduler"]

_GM_KEYS = ("means", "logweights", "logstds")


class GMFlowScheduler(SchedulerMixin, ConfigMixin):
    """Shared adapter: config, grid, timestep bookkeeping and model-output conversion.

    Subclasses build their solver in ``set_timesteps``; :attr:`solver` is that object (its
    ``step_index``, ``times`` and state are the scheduler's).
    """

    order = 1  # network evaluations per step (diffusers' meaning of the class attribute)
    _compatibles: ClassVar[list[str]] = []
    kind: ClassVar[str]

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        self.schedule = SchedulerConfig(self.kind, num_train_timesteps, shift)
        self.solver: Solver | None = None
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs
    ):
        """diffusers' ``from_config``; unknown (non-``_``) keys raise ValueError instead of being dropped."""
        if isinstance(config, Mapping):
            check_scheduler_keys({**config, **kwargs}, f"{cls.__name__}.from_config")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ------------------------------------------------------------------ grid
    def _install(
        self,
        solver: Solver,
        num_inference_steps: int | None,
        device: torch.device | str | None,
        sigmas: Tensor | list[float] | None,
    ) -> None:
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps or sigmas")
            n = check_int("num_inference_steps", num_inference_steps, 1)
            times = self.schedule.times(n)
        else:
            s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
            if num_inference_steps is not None and num_inference_steps != s.numel():
                raise ValueError(
                    f"sigmas has {s.numel()} values for num_inference_steps={num_inference_steps}"
                )
            n, times = s.numel(), torch.cat([s, s.new_zeros(1)])
            if n < 1 or bool((s <= 0).any()):
                raise ValueError("sigmas must be decreasing times in (0, 1], without the final 0")
        solver.set_timesteps(n, times=times)
        self.solver = solver
        self.num_inference_steps = n
        grid = torch.tensor(solver.times, dtype=torch.float64)
        self.sigmas = grid.to(torch.float32)
        self.timesteps = (grid[:-1] * self.schedule.num_train_timesteps).to(
            device=device, dtype=torch.float32
        )

    @property
    def step_index(self) -> int | None:
        """Steps taken since :meth:`set_timesteps` (``None`` before it)."""
        return None if self.solver is None else self.solver.step_index

    @property
    def t(self) -> float:
        """Time in [0, 1] of the next network evaluation (the model's ``t``)."""
        self._check_ready()
        return self.solver.timestep

    def _check_ready(self) -> None:
        if self.solver is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps() before stepping")
        if self.solver.done:
            raise RuntimeError(
                f"{type(self).__name__}: every step is taken; call set_timesteps() to start again"
            )

    # ------------------------------------------------------------------ stepping
    def _x0_prediction(self, model_output: Any, x: Tensor, t: float) -> GMPrediction:
        if isinstance(model_output, GMPrediction):
            return GMPrediction(model_output.gm.to(dtype=x.dtype), model_output.guided)
        if isinstance(model_output, Mapping):
            missing = [k for k in _GM_KEYS if k not in model_output]
            if missing:
                raise ValueError(
                    f"model_output dict lacks {', '.join(missing)} (a GM needs {', '.join(_GM_KEYS)})"
                )
            model_output = GaussianMixture(*(model_output[k] for k in _GM_KEYS))
        if not isinstance(model_output, GaussianMixture):
            raise TypeError(
                f"{type(self).__name__}.step takes a GaussianMixture over u, its dict or a GMPrediction, got "
                f"{type(model_output).__name__} (a velocity tensor needs a flow-matching scheduler, "
                "e.g. diffusers' FlowMatchEulerDiscreteScheduler)"
            )
        tv = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return GMPrediction(model_output.to(dtype=x.dtype).u_to_x0(x, tv), None)

    def step(
        self,
        model_output: GaussianMixture | Mapping[str, Tensor] | GMPrediction,
        timestep: float | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[Tensor]:
        """One step from ``sample`` at ``timestep`` (the next of :attr:`timesteps`) with one model output."""
        self._check_ready()
        i = self.solver.step_index
        want = self.timesteps[i]
        got = torch.as_tensor(timestep).detach().to(device=want.device, dtype=torch.float32).flatten()
        if got.numel() == 0 or not bool((got == want).all()):
            raise ValueError(
                f"{type(self).__name__}.step: expected timestep {float(want):g} (step {i} of "
                f"{self.num_inference_steps}), got {timestep!r}"
            )
        if not isinstance(sample, Tensor) or not sample.is_floating_point():
            raise TypeError("sample must be a floating-point torch.Tensor")
        x = sample.to(torch.float64 if sample.dtype == torch.float64 else torch.float32)
        t = self.solver.timestep
        prev = self.solver.step(self._x0_prediction(model_output, x, t), t, x, generator=generator)
        prev = prev.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class GMFlowSDEScheduler(GMFlowScheduler):
    """GM-SDE (GMFlow Eq. 9) over :class:`~gmflow.sampling.GMSDE`: ``x' = c1 x + c2 x0^ + sqrt(c3) n``.

    ``output_mode="sample"`` draws ``x0^`` from the x0-GM (spectrally with ``spectrum_net``),
    ``"mean"`` takes its mean. Draws come from the ``generator`` passed to :meth:`step`.
    """

    kind = "sde"

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        sigmas: Tensor | list[float] | None = None,
        *,
        order: int = 1,
        output_mode: str = "sample",
        spectrum_net: SpectrumNet | None = None,
    ) -> None:
        """Grid of ``num_inference_steps`` steps (config ``shift``) or explicit ``sigmas``; a fresh solver."""
        solver = GMSDE(order=order, spectrum_net=spectrum_net, output_mode=output_mode)
        self._install(solver, num_inference_steps, device, sigmas)


class GMFlowODEScheduler(GMFlowScheduler):
    """GM-ODE (GMFlow Eq. 10) over :class:`~gmflow.sampling.GMODE`: ``substeps`` analytic sub-steps per
    network step with ``substep_method`` (default ``"pc3"`` with ``ceil(16 (t - t'))`` sub-steps;
    ``"euler"``: the paper's, ``ceil(128 / num_inference_steps)``; the official GM-ODE 2 uses 32 x 4
    Euler)."""

    kind = "ode"

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        sigmas: Tensor | list[float] | None = None,
        *,
        order: int = 1,
        substeps: int | None = None,
        substep_method: str | None = None,
    ) -> None:
        """Grid of ``num_inference_steps`` steps (config ``shift``) or explicit ``sigmas``; a fresh solver."""
        solver = GMODE(order=order, substeps=substeps, substep_method=substep_method)
        self._install(solver, num_inference_steps, device, sigmas)
