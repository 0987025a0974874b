"""Guidance: classifier-free (with orthogonal projection), GMFlow's probabilistic guidance, AutoGuidance.

Conventions (docs/maths/guidance.md):

* :class:`CFG` — ``x0_g = x0_c + (w - 1) * Delta``, ``Delta = x0_c - x0_u`` (``w = 1``: no guidance).
  With ``orthogonal = o``, ``Delta <- Delta - o <Delta, x0_c>/<x0_c, x0_c> x0_c`` (Sadat et al.;
  inner products over the whole sample). For a GM model every component mean is shifted by the
  same bias (the paper's "vanilla CFG" ablation).
* :class:`ProbabilisticGuidance` — ``w~ in [0, 1)``; the conditional x0-GM is re-weighted by
  ``N(mu_c + b, (1 - w~^2) s_c^2) / N(mu_c, s_c^2)`` with ``b`` the (projected) RMS-normalised
  ``mu_c - mu_u`` scaled to RMS ``w~ s_c`` (paper Eq. 8).
* :class:`AutoGuidance` — a second, weaker model ``D_bad``: ``D = D_bad + w (D_good - D_bad)`` (EDM2
  ``lerp`` convention: ``w = 1`` is no guidance; Simple ReFlow's "w = 0.6" reads as ``w = 1.6`` here,
  i.e. ``D_good + 0.6 (D_good - D_bad)``). Works on velocity models and on GM means.

All functions act on x0-space predictions; x0 is affine in u at fixed ``(x_t, t)``, so plain CFG is
the same in u- or x0-space, while the projection is defined on the x0 prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .gaussian import Gaussian
from .gm import GaussianMixture

__all__ = [
    "CFG",
    "ProbabilisticGuidance",
    "AutoGuidance",
    "cfg_x0",
    "probabilistic_guidance",
    "GuidedGM",
]


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """Mean over all non-batch dims of ``a * b``, shape ``(B, 1, ..., 1)``."""
    return (a * b).flatten(1).mean(1).reshape(a.shape[0], *([1] * (a.dim() - 1)))


def project_out(delta: Tensor, axis: Tensor, weight: float) -> Tensor:
    """``delta - weight * <delta, axis>/max(<axis, axis>, 1e-6) * axis`` (per sample)."""
    if weight == 0.0:
        return delta
    return delta - weight * _inner(delta, axis) / _inner(axis, axis).clamp_min(1e-6) * axis


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance ``x0_c + (scale - 1)(x0_c - x0_u)``; ``orthogonal`` in [0, 1]."""

    scale: float
    orthogonal: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)):
            raise TypeError(f"CFG scale must be a number, got {type(self.scale).__name__}")
        if not math.isfinite(self.scale):
            raise ValueError(f"CFG scale must be finite, got {self.scale!r}")
        if not 0.0 <= self.orthogonal <= 1.0:
            raise ValueError(f"CFG orthogonal must be in [0, 1], got {self.orthogonal}")


@dataclass(frozen=True)
class ProbabilisticGuidance:
    """GMFlow probabilistic guidance with scale ``w~ in [0, 1)`` and orthogonal projection weight."""

    scale: float
    orthogonal: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or not 0.0 <= float(self.scale) < 1.0:
            raise ValueError(f"probabilistic guidance scale must be in [0, 1), got {self.scale!r}")
        if not 0.0 <= self.orthogonal <= 1.0:
            raise ValueError(f"orthogonal must be in [0, 1], got {self.orthogonal}")


@dataclass(frozen=True)
class AutoGuidance:
    """Guide with a weaker model: ``D = D_bad + scale (D_good - D_bad)`` (``scale = 1``: none).

    ``guide_model`` follows the denoiser protocol (velocity tensor or GM). ``guide_cond`` overrides
    the conditioning passed to it (default: the same as the main model).
    """

    guide_model: Callable[..., Any]
    scale: float
    guide_cond: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        if not callable(self.guide_model):
            raise TypeError("AutoGuidance guide_model must be callable: model(x_t, t, **cond)")
        if not isinstance(self.scale, (int, float)):
            raise TypeError(f"AutoGuidance scale must be a number, got {type(self.scale).__name__}")
        if not math.isfinite(self.scale):
            raise ValueError(f"AutoGuidance scale must be finite, got {self.scale!r}")


def cfg_x0(x0_cond: Tensor, x0_uncond: Tensor, scale: float, orthogonal: float = 0.0) -> Tensor:
    """Guided x0 prediction ``x0_c + (scale - 1) Delta`` with optional orthogonal projection."""
    delta = project_out(x0_cond - x0_uncond, x0_cond, orthogonal)
    return x0_cond + (scale - 1.0) * delta


@dataclass(frozen=True, eq=False)
class GuidedGM:
    """Result of probabilistic guidance on x0-GMs.

    ``gm``: guided GM; ``cond``: the conditional GM; ``base``: its surrogate with spatially averaged
    variance (``N(mu_c, s_c^2)``); ``bias``: ``b`` (RMS ``w~ s_c``); ``avg_var``: ``s_c^2`` (``(B, 1, *1)``);
    ``scale``: ``w~``.
    """

    gm: GaussianMixture
    cond: GaussianMixture
    base: Gaussian
    bias: Tensor
    avg_var: Tensor
    scale: float


def probabilistic_guidance(
    gm_cond: GaussianMixture, mean_uncond: Tensor, scale: float, orthogonal: float = 1.0
) -> GuidedGM:
    """Probabilistic guidance on x0-GMs (GMFlow Eq. 8).

    1. ``N(mu_c, s_c^2)``: surrogate of the conditional GM, variance averaged over positions.
    2. ``b = mu_c - mu_u``, orthogonally projected against ``mu_c`` (weight ``orthogonal``),
       rescaled to RMS ``w~ s_c``: ``b <- b sqrt(s_c^2 / mean(b^2)) w~``.
    3. Guided GM ``= q_c(x0) N(x0; mu_c + b, (1 - w~^2) s_c^2) / N(x0; mu_c, s_c^2)``, renormalised.
    """
    base = gm_cond.to_gaussian(spatial_average=True)
    b = project_out(base.mean - mean_uncond, base.mean, orthogonal)
    power = b.square().flatten(1).mean(1).reshape(base.var.shape)
    b = b * torch.sqrt(base.var / power.clamp_min(1e-6)) * scale
    target = Gaussian(base.mean + b, base.var * (1.0 - scale**2))
    guided = gm_cond.mul_gaussian_ratio(target, base) if scale > 0 else gm_cond
    return GuidedGM(guided, gm_cond, base, b, base.var, scale)
