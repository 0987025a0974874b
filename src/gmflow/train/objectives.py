"""Training objectives (per-sample losses) and data batches for the trainer.

The trainer is generic: it takes any

* ``objective(model, batch, generator) -> Tensor (B,)`` -- per-sample losses of a local batch, and
* ``batch_fn(step, rank, world_size, generator) -> Tensor`` -- the local batch of update ``step``,

and averages the per-sample losses. :func:`make_objective` and :func:`make_batch_fn` build the toy
ones from a :class:`~gmflow.train.config.TrainConfig`. Randomness of step ``k`` on rank ``r`` comes
from :func:`step_generator` ``(seed, k, r)``, so a resumed run sees exactly the batches and noise of
an uninterrupted one.

Objectives (``t ~ time_sampler``, ``eps ~ N(0, I)``, ``x_t = (1 - t) x0 + t eps``, ``u = eps - x0``):

* ``"fm"``: ``mean_C (u_theta(x_t, t) - u)^2`` (velocity head);
* ``"gm_nll"``: ``-log q_theta(u | x_t)`` under the predicted u-GM (paper Eq. 5-6);
* ``"transition"``: ``-log q_theta(x_low | x_high)`` with ``t_low = (1 - lambda) t_high`` (paper §3.2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..flow import interpolate, sample_time, transition_pair
from ..gm import GaussianMixture
from ..losses import fm_loss, gm_nll_loss, transition_loss

__all__ = [
    "Objective",
    "BatchFn",
    "step_seed",
    "step_generator",
    "objective",
    "make_objective",
    "make_batch_fn",
]

Objective = Callable[[nn.Module, Tensor, "torch.Generator | None"], Tensor]
BatchFn = Callable[[int, int, int, torch.Generator], Tensor]


def step_seed(seed: int, step: int, rank: int) -> int:
    """63-bit seed of update ``step`` on ``rank``: BLAKE2b hash of ``(seed, step, rank)``."""
    h = hashlib.blake2b(f"gmflow:{int(seed)}:{int(step)}:{int(rank)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with :func:`step_seed`."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, rank))


def _setting(cfg: Any, name: str, default: Any) -> Any:
    return getattr(cfg, name, default) if cfg is not None else default


def objective(model: nn.Module, x0: Tensor, cfg: Any, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample loss ``(B,)`` of ``cfg.loss`` on the clean batch ``x0`` (see the module docstring).

    Uses ``cfg.loss``, ``cfg.trans_ratio``, ``cfg.time_sampler``, ``cfg.time_loc``, ``cfg.time_scale``
    and ``cfg.time_eps``. Random draws (in order: t, then the noise) use ``generator``, which must live
    on ``x0``'s device.
    """
    loss = _setting(cfg, "loss", "transition")
    b = x0.shape[0]
    tdtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    t = sample_time(
        b,
        _setting(cfg, "time_sampler", "uniform"),
        generator=generator,
        device=x0.device,
        dtype=tdtype,
        loc=_setting(cfg, "time_loc", 0.0),
        scale=_setting(cfg, "time_scale", 1.0),
        eps=_setting(cfg, "time_eps", 1e-4),
    )
    if loss == "transition":
        x_low, t_low, x_high = transition_pair(x0, t, _setting(cfg, "trans_ratio", 0.9), generator)
        out = model(x_high, t)
        _expect_gm(out, loss)
        return transition_loss(out, x_high, t, x_low, t_low, reduction="none")
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = interpolate(x0, eps, t)
    u = eps - x0
    out = model(x_t, t)
    if loss == "fm":
        if isinstance(out, GaussianMixture):
            raise TypeError(
                "loss 'fm' needs a model that returns the velocity; this one returned a GaussianMixture"
            )
        return fm_loss(out, u, reduction="none")
    if loss == "gm_nll":
        _expect_gm(out, loss)
        return gm_nll_loss(out, u, reduction="none")
    raise ValueError(f"unknown loss {loss!r}; expected 'fm', 'gm_nll' or 'transition'")


def _expect_gm(out: object, loss: str) -> None:
    if not isinstance(out, GaussianMixture):
        raise TypeError(f"loss {loss!r} needs a model that returns a gmflow.GaussianMixture (head 'gm')")


def make_objective(cfg: Any) -> Objective:
    """``objective(model, batch, generator)`` closed over ``cfg`` (for :func:`gmflow.train.train`)."""

    def fn(model: nn.Module, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return objective(model, x0, cfg, generator)

    fn.__name__ = f"objective_{cfg.loss}"
    return fn


def make_batch_fn(cfg: Any, dataset: Any = None) -> BatchFn:
    """Batches of the toy data set ``cfg.data.name``: ``batch_size / world_size`` fresh points per rank.

    ``dataset`` (anything with ``.sample(n, generator=, device=)``) overrides the named data set.
    """
    if dataset is None:
        from ..data import make_toy2d

        dataset = make_toy2d(cfg.data.name)
    global_batch = int(cfg.batch_size)

    def batch_fn(step: int, rank: int, world_size: int, generator: torch.Generator) -> Tensor:
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} is not divisible by the world size {world_size}")
        return dataset.sample(global_batch // world_size, generator=generator, device=generator.device)

    return batch_fn
