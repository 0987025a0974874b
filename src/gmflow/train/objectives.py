"""Flow-matching objectives (per-sample losses), data batches and the per-step random streams.

The loop (:func:`gmflow.train.train`) takes any

* ``objective(model, batch, generator) -> Tensor (B,)`` -- per-sample losses of a local batch, and
* ``batch_fn(step, rank, world_size, generator) -> Tensor`` -- the local batch of update ``step``,

and averages the per-sample losses. :func:`flow_objective` and :func:`dataset_batch_fn` build the
ones for training on clean data (toy 2-D and image experiments). Randomness of step ``k`` on rank
``r`` comes from :func:`step_generator` ``(seed, k, r)``, so a resumed run sees exactly the batches
and noise of an uninterrupted one.

Objectives (``t ~ time_sampler``, ``eps ~ N(0, I)``, ``x_t = (1 - t) x0 + t eps``, ``u = eps - x0``;
derivations in ``docs/maths/losses.md``):

* ``"fm"``: ``mean_C (u_theta(x_t, t) - u)^2`` (velocity head);
* ``"gm_nll"``: ``-log q_theta(u | x_t)`` under the predicted u-GM (GMFlow Eq. 5-6);
* ``"transition"``: ``-log q_theta(x_low | x_high)`` with ``t_low = (1 - lambda) t_high`` (GMFlow §3.2).

A GM model that carries a spectrum net as ``model.spectrum_net`` (:class:`~gmflow.nn.SpectralDenoiser`)
also gets ``spectral_weight`` times the spectral loss (GMFlow Eq. 20, :func:`gmflow.spectral.spectral_loss`)
of its x0-GM at the network's input, added per sample: the objective calls
``model(x, t, spectral_x0=x0, **cond) -> (gm, spectral loss (B,))``, so the loss is computed inside
the model's forward (where DistributedDataParallel sees the spectrum net). It trains only the
spectrum net (stop-gradient through the GM and the KR map), so the GM network's gradient is that of
the loss above alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..config import need
from ..flow import TIME_SAMPLERS, interpolate, sample_time, transition_pair
from ..gm import GaussianMixture
from ..losses import fm_loss, gm_nll_loss, transition_loss
from ..nn import drop_labels

__all__ = [
    "BatchFn",
    "FlowLoss",
    "LOSSES",
    "Objective",
    "dataset_batch_fn",
    "flow_loss",
    "flow_objective",
    "step_generator",
    "step_seed",
]

Objective = Callable[[nn.Module, Tensor, "torch.Generator | None"], Tensor]
BatchFn = Callable[[int, int, int, torch.Generator], Any]
LOSSES = ("fm", "gm_nll", "transition")


@dataclass
class FlowLoss:
    """The ``loss`` section of experiments that train on clean data (see the module docstring).

    ``kind``: ``"fm"`` (needs a velocity head), ``"gm_nll"`` or ``"transition"`` (need a GM head);
    ``trans_ratio``: lambda of the transition loss; ``time_*``: the training-time distribution
    (:func:`gmflow.flow.sample_time`), ``t`` clamped to ``[time_eps, 1]``.
    """

    kind: str = "transition"
    trans_ratio: float = 0.9
    time_sampler: str = "uniform"
    time_loc: float = 0.0  # logit_normal location
    time_scale: float = 1.0  # logit_normal scale
    time_eps: float = 1e-4
    label_dropout: float = 0.0  # class-conditional models: P(label -> null class), for guidance

    def validate(self, head: str, prefix: str = "loss.") -> FlowLoss:
        """Check the fields and that ``kind`` fits the model's ``head`` (``"gm"`` or ``"velocity"``)."""
        p = prefix
        need(self.kind in LOSSES, f"{p}kind", f"must be one of {', '.join(LOSSES)}, got {self.kind!r}")
        if self.kind == "fm":
            need(head == "velocity", f"{p}kind", "'fm' needs model.head='velocity' (set model.head=velocity)")
        else:
            need(head == "gm", f"{p}kind", f"{self.kind!r} needs model.head='gm' (or use {p}kind=fm)")
        need(
            0.0 < self.trans_ratio <= 1.0,
            f"{p}trans_ratio",
            f"lambda must be in (0, 1], got {self.trans_ratio}",
        )
        need(
            self.time_sampler in TIME_SAMPLERS,
            f"{p}time_sampler",
            f"must be one of {', '.join(TIME_SAMPLERS)}, got {self.time_sampler!r}",
        )
        need(self.time_scale > 0, f"{p}time_scale", f"must be > 0, got {self.time_scale}")
        need(0.0 <= self.time_eps < 1.0, f"{p}time_eps", f"must be in [0, 1), got {self.time_eps}")
        need(
            0.0 <= self.label_dropout < 1.0,
            f"{p}label_dropout",
            f"must be in [0, 1), got {self.label_dropout}",
        )
        return self


def step_seed(seed: int, step: int, rank: int) -> int:
    """63-bit seed of update ``step`` on ``rank``: BLAKE2b hash of ``(seed, step, rank)``."""
    h = hashlib.blake2b(f"gmflow:{int(seed)}:{int(step)}:{int(rank)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with :func:`step_seed`."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, rank))


def flow_loss(
    model: nn.Module,
    x0: Tensor,
    loss: FlowLoss,
    generator: torch.Generator | None = None,
    *,
    labels: Tensor | None = None,
    null_label: int | None = None,
    spectral_weight: float = 1.0,
) -> Tensor:
    """Per-sample loss ``(B,)`` of ``loss.kind`` on the clean batch ``x0`` (see the module docstring).

    ``labels`` (B,) int64 condition the model (``model(x, t, class_labels=labels)``); each is replaced
    by ``null_label`` with probability ``loss.label_dropout`` (classifier-free guidance training).
    Random draws (in order: t, the noise, then the label dropout) use ``generator``, which must live on
    ``x0``'s device. ``spectral_weight``: weight of the spectral loss when ``model`` (or the module
    inside a DDP wrapper) has a ``spectrum_net``; the spectral loss draws nothing.
    """
    b = x0.shape[0]
    tdtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    t = sample_time(
        b,
        loss.time_sampler,
        generator=generator,
        device=x0.device,
        dtype=tdtype,
        loc=loss.time_loc,
        scale=loss.time_scale,
        eps=loss.time_eps,
    )
    if loss.kind == "transition":
        x_low, t_low, x_high = transition_pair(x0, t, loss.trans_ratio, generator)
        out, spec = _call(model, x_high, t, x0, _condition(labels, null_label, loss.label_dropout, generator))
        _expect_gm(out, loss.kind)
        per = transition_loss(out, x_high, t, x_low, t_low, reduction="none")
        return per if spec is None else per + spectral_weight * spec
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = interpolate(x0, eps, t)
    u = eps - x0
    out, spec = _call(model, x_t, t, x0, _condition(labels, null_label, loss.label_dropout, generator))
    if loss.kind == "fm":
        if isinstance(out, GaussianMixture):
            raise TypeError(
                "loss 'fm' needs a model that returns the velocity; this one returned a GaussianMixture"
            )
        return fm_loss(out, u, reduction="none")
    if loss.kind == "gm_nll":
        _expect_gm(out, loss.kind)
        per = gm_nll_loss(out, u, reduction="none")
        return per if spec is None else per + spectral_weight * spec
    raise ValueError(f"unknown loss {loss.kind!r}; expected one of {', '.join(LOSSES)}")


def _call(model: nn.Module, x: Tensor, t: Tensor, x0: Tensor, cond: dict[str, Tensor]) -> tuple[Any, Any]:
    """``(model output, spectral loss (B,) or None)``: models with a ``spectrum_net`` (also inside a DDP
    wrapper) are called with ``spectral_x0=x0`` and return both."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    if getattr(inner, "spectrum_net", None) is None:
        return model(x, t, **cond), None
    out = model(x, t, spectral_x0=x0, **cond)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            "a model with a spectrum_net must return (gm, spectral loss) when called with spectral_x0= "
            "(see gmflow.nn.SpectralDenoiser)"
        )
    return out


def _condition(
    labels: Tensor | None, null_label: int | None, p: float, generator: torch.Generator | None
) -> dict[str, Tensor]:
    """``{"class_labels": labels}`` with label dropout applied (nothing for unconditional models)."""
    if labels is None:
        return {}
    if p > 0 and null_label is None:
        raise ValueError("label_dropout > 0 needs null_label (the model's null class id)")
    return {"class_labels": drop_labels(labels, p, null_label, generator)}


def _expect_gm(out: object, kind: str) -> None:
    if not isinstance(out, GaussianMixture):
        raise TypeError(f"loss {kind!r} needs a model that returns a gmflow.GaussianMixture (head 'gm')")


def flow_objective(loss: FlowLoss, null_label: int | None = None, spectral_weight: float = 1.0) -> Objective:
    """``objective(model, batch, generator)`` of :func:`flow_loss` closed over ``loss``.

    A batch is the clean images / points ``x0``, or ``(x0, labels)`` for class-conditional models
    (``null_label``: the model's null class id, for label dropout). ``spectral_weight``: see
    :func:`flow_loss` (used only by models with a ``spectrum_net``).
    """

    def objective(model: nn.Module, batch: Any, generator: torch.Generator | None = None) -> Tensor:
        kw = {"spectral_weight": spectral_weight}
        if isinstance(batch, tuple):
            x0, labels = batch
            return flow_loss(model, x0, loss, generator, labels=labels, null_label=null_label, **kw)
        return flow_loss(model, batch, loss, generator, **kw)

    objective.__name__ = f"objective_{loss.kind}"
    return objective


def dataset_batch_fn(dataset: Any, batch_size: int, *, labels: bool = False) -> BatchFn:
    """``batch_size / world_size`` fresh draws per rank from ``dataset.sample(n, generator=, device=)``.

    ``labels=True`` returns ``(x0, labels)`` batches (``dataset.sample(..., return_labels=True)``).
    """
    global_batch = int(batch_size)
    kw = {"return_labels": True} if labels else {}

    def batch_fn(step: int, rank: int, world_size: int, generator: torch.Generator) -> Any:
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} is not divisible by the world size {world_size}")
        return dataset.sample(global_batch // world_size, generator=generator, device=generator.device, **kw)

    return batch_fn
