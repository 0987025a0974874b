"""Samplers: :func:`sample` runs any solver of :data:`SOLVERS` (see :mod:`gmflow.sampling.core`)."""

from .core import num_steps, sample
from .solvers import (
    DDPM,
    GMODE,
    GMSDE,
    SOLVERS,
    DPMSolver2,
    DPMSolverPP2M,
    Euler,
    GMPrediction,
    Heun,
    MeanPrediction,
    Solver,
    get_solver,
)

__all__ = [
    "sample",
    "SOLVERS",
    "get_solver",
    "num_steps",
    "Solver",
    "MeanPrediction",
    "GMPrediction",
    "Euler",
    "Heun",
    "DPMSolver2",
    "DPMSolverPP2M",
    "DDPM",
    "GMSDE",
    "GMODE",
]
