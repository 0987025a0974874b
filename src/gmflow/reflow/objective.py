"""The Simple ReFlow objective and pair batches (derivations in ``docs/maths/reflow.md``).

Objective, for a pair ``(x0, x1)`` (Simple ReFlow Eq. 13 as reconstructed)::

    t ~ T,   x_t = (1 - t) x0 + t x1,   D = x_t - t u_theta(x_t, t)        (GM student: u = GM mean)
    l  = w(t) d(D, x0),     d = mean(e^2 + lambda (H e)^2),  e = D - x0   (HPF distance, lambda = hpf_lambda)
    w  = 1/t^2 ("velocity": l = d((x1 - x0) - u), the plain velocity MSE of 2-rectified flow) or 1 ("none")
    L  = l / sg[l]  if normalize  (value 1, gradient grad log l: Simple ReFlow's per-sample weight)

With ``normalize`` the weight ``w(t)`` cancels in the gradient (it does not depend on theta).
A batch is the stacked tensor ``(B, 2, *event)`` (``[:, 0] = x0``, ``[:, 1] = x1``) so that the
training loop can move it with ``.to(device)``; the objective also accepts a tuple ``(x0, x1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..flow import sample_time
from ..gm import GaussianMixture
from .dataset import PairDataset
from .losses import error_distance, normalized
from .projection import project_pairs

__all__ = [
    "PROJECTION_METHODS",
    "PairMixing",
    "ReflowError",
    "ReflowLoss",
    "WEIGHTS",
    "reflow_batch_fn",
    "reflow_objective",
]

WEIGHTS = ("velocity", "none")
PROJECTION_METHODS = ("ot", "sinkhorn")


class ReflowError(ValueError):
    """Inconsistent ReFlow inputs (teacher / student / pairs); the message names the argument."""


@dataclass
class ReflowLoss:
    """The ``loss`` section of a ReFlow run (defaults = 2-rectified flow).

    normalize: per-sample loss normalisation ``l / sg[l]``; time_sampler: ``"uniform"``,
    ``"u_shaped"`` (2-RF++), ``"pow10"`` (Simple ReFlow, density ``∝ 10^t``), ...; weight:
    ``"velocity"`` (plain velocity MSE = ``1/t^2`` in D-space) or ``"none"`` (D-space MSE);
    hpf_lambda, hpf_sigma: HPF loss weight (images only) and Gaussian-blur width of ``H``;
    norm_eps: floor of ``sg[l]``; time_eps: ``t`` is clamped to ``[time_eps, 1]``.
    """

    normalize: bool = False
    time_sampler: str = "uniform"
    weight: str = "velocity"
    hpf_lambda: float = 0.0
    hpf_sigma: float = 1.0
    norm_eps: float = 1e-8
    time_eps: float = 1e-4


@dataclass
class PairMixing:
    """The ``pairs`` section: where the pairs are and how batches mix and project them.

    backward / forward: pair directories (recorded; ``None`` when pairs are given in memory);
    rho: probability of drawing a forward pair; projection_alpha: coupling projection of the backward
    part of each batch (0 = off): minibatch OT match of the generated ``x0`` to as many real ones,
    ``x0 <- (1 - a) x0 + a match``; projection_method: ``"ot"`` (exact assignment) or ``"sinkhorn"``;
    projection_pool: real draws per projected pair, ``M = ceil(pool B)`` (>= 1). ``1`` matches the
    batch marginal exactly (each real used once); larger pools give closer matches but bias the
    projected marginal towards the generated one.
    """

    backward: str | None = None
    forward: str | None = None
    rho: float = 0.0
    projection_alpha: float = 0.0
    projection_method: str = "ot"
    projection_pool: float = 1.0


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Tensor) and batch.dim() >= 3 and batch.shape[1] == 2:
        return batch[:, 0], batch[:, 1]
    raise ValueError("a ReFlow batch is a tuple (x0, x1) or a stacked tensor (B, 2, *event)")


def reflow_objective(loss: ReflowLoss):
    """``objective(model, (x0, x1), generator) -> (B,)`` per-sample ReFlow losses (module docstring)."""

    def objective(model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> Tensor:
        x0, x1 = _unpack(batch)
        dt = torch.float64 if x0.dtype == torch.float64 else torch.float32
        t = sample_time(
            x0.shape[0], loss.time_sampler, generator=generator, device=x0.device, dtype=dt, eps=loss.time_eps
        )
        tb = t.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        x_t = (1.0 - tb) * x0 + tb * x1
        out = model(x_t, t)
        u = out.mean() if isinstance(out, GaussianMixture) else out
        # D - x0 = x_t - t u - x0 = t ((x1 - x0) - u): the velocity error times t (no cancellation)
        err_v = (x1 - x0).to(dt) - u.to(dt)
        value = error_distance(err_v, hpf_lambda=loss.hpf_lambda, sigma=loss.hpf_sigma)  # = d(D, x0) / t^2
        if loss.weight == "none":
            value = value * t.square()
        return normalized(value, loss.norm_eps) if loss.normalize else value

    objective.__name__ = "reflow_objective"
    return objective


def _cpu_generator(g: torch.Generator) -> torch.Generator:
    if g.device.type == "cpu":
        return g
    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
    return torch.Generator().manual_seed(seed)


def _real(real_data: Any, n: int, g: torch.Generator) -> Tensor:
    if isinstance(real_data, Tensor):
        return real_data[torch.randint(len(real_data), (n,), generator=g)]
    return real_data.sample(n, generator=g)


def reflow_batch_fn(pairs: PairDataset, mixing: PairMixing, batch_size: int, real_data: Any = None):
    """``batch_fn(step, rank, world_size, generator) -> (B_local, 2, *event)`` of ``pairs``.

    Each element is a forward pair with probability ``mixing.rho`` and a backward pair otherwise
    (uniform with replacement inside each set; :meth:`PairDataset.draw`). With
    ``mixing.projection_alpha > 0`` the backward part is projected onto the data marginal with
    :func:`~gmflow.reflow.project_pairs` against ``ceil(projection_pool * n_backward)`` fresh draws
    of ``real_data`` (a tensor ``(N, *event)`` or an object with ``.sample(n, generator=)``).
    """
    if mixing.rho > 0 and pairs.forward is None:
        raise ReflowError(f"rho={mixing.rho} > 0 draws forward pairs, but pairs has no forward pairs")
    if mixing.projection_alpha > 0 and real_data is None:
        raise ReflowError("projection_alpha > 0 needs real_data (real x0 to project the backward pairs onto)")
    global_batch = int(batch_size)

    def batch_fn(step: int, rank: int, world_size: int, generator: torch.Generator) -> Tensor:
        n = global_batch // world_size
        g = _cpu_generator(generator)
        x0, x1, is_fwd = pairs.draw(n, mixing.rho, generator=g)
        bwd = ~is_fwd
        if mixing.projection_alpha > 0 and bool(bwd.any()):
            real = _real(real_data, math.ceil(mixing.projection_pool * int(bwd.sum())), g).to(x0)
            x0[bwd], _ = project_pairs(
                x0[bwd], x1[bwd], real, alpha=mixing.projection_alpha, method=mixing.projection_method
            )
        return torch.stack([x0, x1], dim=1)

    return batch_fn
