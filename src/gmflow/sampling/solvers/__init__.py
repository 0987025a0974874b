"""Solver classes and the one registry :data:`SOLVERS` (name -> class); callers ask traits, not names."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .base import GMPrediction, MeanPrediction, Solver
from .gm import GMODE, GMSDE
from .ode import DDPM, DPMSolver2, DPMSolverPP2M, Euler, Heun
from .substeps import SUBSTEP_METHODS

__all__ = [
    "SOLVERS",
    "get_solver",
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
    "SUBSTEP_METHODS",
]

SOLVERS: Mapping[str, type[Solver]] = MappingProxyType(
    {cls.name: cls for cls in (Euler, Heun, DPMSolver2, DPMSolverPP2M, DDPM, GMSDE, GMODE)}
)
"""Read-only ``name -> Solver class`` in the documented order (``"euler"`` ... ``"gm-ode"``)."""


def get_solver(name: str) -> type[Solver]:
    """The solver class registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"solver must be one of {tuple(SOLVERS)}, got {name!r}") from None
