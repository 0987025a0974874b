"""diffusers integration (the optional extra ``pip install "gmflow[diffusers]"``).

* :class:`GMFlowSDEScheduler`, :class:`GMFlowODEScheduler`: ``SchedulerMixin`` + ``ConfigMixin``
  adapters over gmflow's GM-SDE / GM-ODE solvers, with the official config keys.
* :class:`GMDiTPipeline`: a ``DiffusionPipeline`` (transformer, spectrum net, scheduler, optional VAE,
  ``id2label``) that loads and saves the official folder layout (:mod:`gmflow.pretrained`).

This package imports diffusers at import time; ``import gmflow`` never imports it.
"""

try:
    import diffusers  # noqa: F401 - fail here, with the install hint, rather than deep inside a submodule
except ImportError as e:  # pragma: no cover - exercised in environments without the extra
    raise ImportError('gmflow.diffusers needs the diffusers package: pip install "gmflow[diffusers]"') from e

from .pipeline import GMDiTPipeline
from .schedulers import GMFlowODEScheduler, GMFlowScheduler, GMFlowSDEScheduler

__all__ = ["GMDiTPipeline", "GMFlowODEScheduler", "GMFlowSDEScheduler", "GMFlowScheduler"]
