"""The scheduler of a GM-DiT pipeline folder: ``scheduler/scheduler_config.json``.

The official pipeline keeps a ``FlowEulerODEScheduler`` config with two keys, and its GM-SDE scheduler
is built from the same config (``GMFlowSDEScheduler.from_config(pipe.scheduler.config)``)::

    {"_class_name": "FlowEulerODEScheduler", "num_train_timesteps": 1000, "shift": 1.0}

* ``num_train_timesteps`` ``N``: the network-time scale of the scheduler interface,
  ``timestep = N t`` (t in [0, 1], t = 1 noise); :class:`~gmflow.nn.GMDiT` embeds ``1000 t`` itself.
* ``shift`` ``s`` > 0: the sampling grid ``t_i = s u_i / (1 + (s - 1) u_i)``, ``u_i = 1 - i/steps``
  (:func:`gmflow.time_grid` kind ``"shift"``; ``s = 1`` is the uniform grid ``1 - i/steps``).

``_class_name`` picks the solver family: ``FlowEulerODEScheduler`` / ``GMFlowODEScheduler`` -> the
GM-ODE, ``GMFlowSDEScheduler`` -> the GM-SDE. Keys starting with ``_`` are metadata; any other key is
an error (nothing is silently ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Any

from torch import Tensor

from ..flow import time_grid

__all__ = ["SCHEDULER_CLASSES", "SCHEDULER_CONFIG_NAME", "SCHEDULER_KEYS", "SchedulerConfig"]

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
SCHEDULER_KEYS = ("num_train_timesteps", "shift")
# _class_name -> solver family; the first name of each family is the one written on save (official)
SCHEDULER_CLASSES = {
    "FlowEulerODEScheduler": "ode",
    "GMFlowODEScheduler": "ode",
    "GMFlowSDEScheduler": "sde",
}
_WRITTEN = {"ode": "FlowEulerODEScheduler", "sde": "GMFlowSDEScheduler"}


def check_scheduler_keys(config: dict[str, Any], where: str) -> None:
    """ValueError naming the keys of ``config`` that are neither :data:`SCHEDULER_KEYS` nor ``_`` metadata."""
    unknown = sorted(k for k in config if not str(k).startswith("_") and k not in SCHEDULER_KEYS)
    if unknown:
        raise ValueError(
            f"{where}: unknown scheduler config key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} (expected {', '.join(SCHEDULER_KEYS)})"
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """Solver family (``"ode"`` or ``"sde"``) and the two official keys; validated on construction."""

    kind: str = "ode"
    num_train_timesteps: int = 1000
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("ode", "sde"):
            raise ValueError(f"scheduler kind must be 'ode' or 'sde', got {self.kind!r}")
        n = self.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_train_timesteps must be an int >= 1, got {n!r}")
        s = self.shift
        if isinstance(s, bool) or not isinstance(s, Real) or not 0.0 < float(s) < float("inf"):
            raise ValueError(f"shift must be a finite float > 0, got {s!r}")
        object.__setattr__(self, "shift", float(s))

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "scheduler config") -> SchedulerConfig:
        """Parse a ``scheduler_config.json`` object (see the module docstring); ``where`` prefixes errors."""
        if not isinstance(config, dict):
            raise ValueError(f"{where} must hold a JSON object, got {type(config).__name__}")
        check_scheduler_keys(config, where)
        name = config.get("_class_name", "FlowEulerODEScheduler")
        if name not in SCHEDULER_CLASSES:
            raise ValueError(
                f"{where}: _class_name {name!r} is not a GMFlow scheduler "
                f"(expected one of {', '.join(SCHEDULER_CLASSES)})"
            )
        kw = {k: config[k] for k in SCHEDULER_KEYS if k in config}
        try:
            return cls(SCHEDULER_CLASSES[name], **kw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``scheduler_config.json`` (official class names)."""
        return {
            "_class_name": _WRITTEN[self.kind],
            "num_train_timesteps": self.num_train_timesteps,
            "shift": self.shift,
        }

    def times(self, steps: int) -> Tensor:
        """The float64 grid ``t_0 = 1 > ... > t_steps = 0`` of ``steps`` network steps."""
        return time_grid(steps, "shift", shift=self.shift)
