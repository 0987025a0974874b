"""Samplers: :func:`sample` dispatches to every solver (see :mod:`gmflow.sampling.core`)."""

from .core import SOLVERS, num_steps, sample

__all__ = ["sample", "SOLVERS", "num_steps"]
