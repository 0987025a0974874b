"""gmflow — few-step generative flow models: GMFlow (Gaussian Mixture Flow Matching) and Simple ReFlow.

Time convention: ``t in [0, 1]``, ``t = 1`` is noise, ``x_t = (1 - t) x0 + t eps``, ``u = eps - x0``.
"""

from .data.gmm import GaussianMixtureData, ring_gmm
from .flow import (
    eps_to_u,
    eps_to_x0,
    forward_transition,
    interpolate,
    sample_time,
    time_grid,
    transition_pair,
    u_to_eps,
    u_to_x0,
    x0_to_eps,
    x0_to_u,
)
from .gm import Gaussian, GaussianMixture
from .guidance import CFG, AutoGuidance, ProbabilisticGuidance, probabilistic_guidance
from .losses import fm_loss, gm_kl_loss, gm_nll_loss, transition_loss
from .sampling import SOLVERS, sample
from .spectral import spectral_loss, spectral_sample

__version__ = "0.1.0"

__all__ = [
    "AutoGuidance",
    "CFG",
    "Gaussian",
    "GaussianMixture",
    "GaussianMixtureData",
    "ProbabilisticGuidance",
    "SOLVERS",
    "eps_to_u",
    "eps_to_x0",
    "fm_loss",
    "forward_transition",
    "gm_kl_loss",
    "gm_nll_loss",
    "interpolate",
    "probabilistic_guidance",
    "ring_gmm",
    "sample",
    "sample_time",
    "spectral_loss",
    "spectral_sample",
    "time_grid",
    "transition_loss",
    "transition_pair",
    "u_to_eps",
    "u_to_x0",
    "x0_to_eps",
    "x0_to_u",
]
