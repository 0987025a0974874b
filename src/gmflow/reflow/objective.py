"""The Simple ReFlow objective and pair batches (derivations in ``docs/maths/reflow.md``).

Objective, for a pair ``(x0, x1)`` (Simple ReFlow Eq. 13 as reconstructed)::

    t ~ T on [time_eps, time_max],   x_t = (1 - t) x0 + t x1,   D = x_t - t u_theta(x_t, t)
    l  = w(t) d(D, x0),     d = FFT-mask HPF distance of e = D - x0 (lambda = hpf_lambda; 0: MSE)
    w  = 1/t^2 ("velocity": l = d((x1 - x0) - u), the plain velocity MSE of 2-rectified flow) or 1 ("none")
    L  = l                                      normalize = "none"
         l / max(sg[l], floor)                  normalize = "sample"  (teacher pairs: x0 is a function of x_t)
         l / max(exp(sg[g]), floor) + fit(g)    normalize = "learned" (g(x_t, t) ~ log E[l | x_t, t])

With a normaliser the weight ``w(t)`` cancels in the gradient above the floor (it does not depend on
theta). ``"learned"`` needs a :class:`~gmflow.nn.WithLogLoss` student (``prepare_student`` wraps it).
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
from ..train.distributed import all_reduce_sum
from .dataset import PairDataset
from .losses import error_distance, log_loss_fit, normalized, normalized_by

__all__ = [
    "NORMALIZATIONS",
    "PROJECTION_METHODS",
    "PairMixing",
    "ReflowError",
    "ReflowLoss",
    "WEIGHTS",
    "reflow_batch_fn",
    "reflow_objective",
]

WEIGHTS = ("velocity", "none")
NORMALIZATIONS = ("none", "sample", "learned")
PROJECTION_METHODS = ("ot", "sinkhorn")


class ReflowError(ValueError):
    """Inconsistent ReFlow inputs (teacher / student / pairs); the message names the argument."""


@dataclass
class ReflowLoss:
    """The ``loss`` section of a ReFlow run (defaults = 2-rectified flow).

    normalize: ``"none"``, ``"sample"`` (per-sample ``l / max(sg[l], floor)``, for teacher pairs) or
    ``"learned"`` (a side network predicts ``log E[l | x_t, t]``, for stochastic or mixed couplings);
    time_sampler: ``"uniform"``, ``"u_shaped"`` (2-RF++), ``"pow10"`` (Simple ReFlow, density ``∝ 10^t``),
    ...; weight: ``"velocity"`` (plain velocity MSE = ``1/t^2`` in D-space) or ``"none"`` (D-space);
    hpf_lambda, hpf_radius: HPF weight (images only; 0 = MSE) and the low-frequency disc's radius as
    a fraction of the grid's half-diagonal; norm_floor: floor of the normaliser; time_eps, time_max:
    ``t`` is clamped to ``[time_eps, time_max]`` (``80/81`` for EDM-style teachers, where ``t = 1`` is
    ``sigma = inf``).
    """

    normalize: str = "none"
    time_sampler: str = "uniform"
    weight: str = "velocity"
    hpf_lambda: float = 0.0
    hpf_radius: float = 0.1
    norm_floor: float = 1e-4
    time_eps: float = 1e-4
    time_max: float = 1.0


@dataclass
class PairMixing:
    """The ``pairs`` section: where the pairs are, how batches mix them, and the coupling projection.

    backward / forward: pair directories (recorded; ``None`` when pairs are given in memory);
    rho: probability of drawing a forward pair. projection_lambda (0 = off): the backward pairs' ``x0``
    are moved once, before training, towards real data matched to them by OT,
    ``x0 <- (x0 + lambda y) / (1 + lambda)`` (:func:`~gmflow.reflow.project_coupling`);
    projection_method: ``"ot"`` (exact assignment) or ``"sinkhorn"``; projection_pool: real draws
    per projected pair (>= 1); projection_block: pairs matched jointly (the OT problems are solved on
    blocks of this many pairs).
    """

    backward: str | None = None
    forward: str | None = None
    rho: float = 0.0
    projection_lambda: float = 0.0
    projection_method: str = "ot"
    projection_pool: float = 1.0
    projection_block: int = 1024


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Tensor) and batch.dim() >= 3 and batch.shape[1] == 2:
        return batch[:, 0], batch[:, 1]
    raise ValueError("a ReFlow batch is a tuple (x0, x1) or a stacked tensor (B, 2, *event)")


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the network in .module


def reflow_objective(loss: ReflowLoss):
    """``objective(model, (x0, x1), generator) -> (B,)`` per-sample ReFlow losses (module docstring)."""

    def objective(model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> Tensor:
        x0, x1 = _unpack(batch)
        dt = torch.float64 if x0.dtype == torch.float64 else torch.float32
        t = sample_time(
            x0.shape[0], loss.time_sampler, generator=generator, device=x0.device, dtype=dt,
            eps=loss.time_eps, t_max=loss.time_max,
        )  # fmt: skip
        tb = t.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        x_t = (1.0 - tb) * x0 + tb * x1
        learned = loss.normalize == "learned"
        if learned and not hasattr(_unwrap(model), "log_loss"):
            raise ReflowError(
                "loss.normalize='learned' needs a student with a loss normaliser (gmflow.nn.WithLogLoss); "
                "prepare_student / train_reflow add it"
            )
        out = model(x_t, t, with_log_loss=True) if learned else model(x_t, t)
        out, g = out if learned else (out, None)
        u = out.mean() if isinstance(out, GaussianMixture) else out
        # D - x0 = x_t - t u - x0 = t ((x1 - x0) - u): the velocity error times t (no cancellation)
        err_v = (x1 - x0).to(dt) - u.to(dt)
        value = error_distance(err_v, hpf_lambda=loss.hpf_lambda, radius=loss.hpf_radius)  # = d(D, x0) / t^2
        if loss.weight == "none":
            value = value * t.square()
        if loss.normalize == "sample":
            return normalized(value, loss.norm_floor)
        if g is not None:
            side = _unwrap(model).log_loss
            if float(side.initialized) == 0.0:
                stats = all_reduce_sum(torch.stack([value.detach().sum(), value.new_tensor(len(value))]))
                level = math.log(max(float(stats[0] / stats[1]), loss.norm_floor))
                side.initialize(level)
                g = g + level  # this batch's g was computed with the bias still at 0
            g = g.to(dt)
            return normalized_by(value, g, loss.norm_floor) + log_loss_fit(value, g)
        return value

    objective.__name__ = "reflow_objective"
    return objective


def _cpu_generator(g: torch.Generator) -> torch.Generator:
    if g.device.type == "cpu":
        return g
    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
    return torch.Generator().manual_seed(seed)


def reflow_batch_fn(
    pairs: PairDataset, mixing: PairMixing, batch_size: int, real_data: Any = None, *, seed: int = 0
):
    """``batch_fn(step, rank, world_size, generator) -> (B_local, 2, *event)`` of ``pairs``.

    Each element is a forward pair with probability ``mixing.rho`` and a backward pair otherwise
    (uniform with replacement inside each set; :meth:`PairDataset.draw`). With
    ``mixing.projection_lambda > 0`` the backward pairs are replaced, once, by their projected coupling
    :meth:`PairDataset.projected` onto ``real_data`` (seeded by ``seed``), computed at the first call
    (so that a run refused on resumption never pays for it) and reused by every batch.
    """
    if mixing.rho > 0 and pairs.forward is None:
        raise ReflowError(f"rho={mixing.rho} > 0 draws forward pairs, but pairs has no forward pairs")
    if mixing.projection_lambda > 0 and real_data is None:
        raise ReflowError(
            "projection_lambda > 0 needs real_data (real x0 to project the backward pairs onto)"
        )
    global_batch = int(batch_size)
    source: list[PairDataset] = []

    def batch_fn(step: int, rank: int, world_size: int, generator: torch.Generator) -> Tensor:
        if not source:
            m = mixing
            source.append(
                pairs.projected(
                    real_data,
                    lam=m.projection_lambda,
                    method=m.projection_method,
                    pool=m.projection_pool,
                    block=m.projection_block,
                    seed=seed,
                )  # fmt: skip
                if m.projection_lambda > 0
                else pairs
            )
        x0, x1, _ = source[0].draw(
            global_batch // world_size, mixing.rho, generator=_cpu_generator(generator)
        )
        return torch.stack([x0, x1], dim=1)

    return batch_fn
