"""Samplers: :func:`sample` runs any solver of :data:`SOLVERS` (see :mod:`gmflow.sampling.core`)."""

from . import solvers
from .core import network_evaluations, num_steps, sample
from .solvers import *  # noqa: F403 - the solver classes, SOLVERS and get_solver

__all__ = ["sample", "network_evaluations", "num_steps", *solvers.__all__]
