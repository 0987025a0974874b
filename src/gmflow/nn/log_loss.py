"""The learned loss normaliser of Simple ReFlow: a side network ``g(x_t, t) ~ log E[l | x_t, t]``.

:class:`LogLossNet` is a small MLP on a pooled copy of ``x_t`` and a sinusoidal embedding of ``t``;
:class:`WithLogLoss` carries it next to a denoiser, so that one optimiser, one EMA and one checkpoint
hold both (docs/maths/reflow.md §4). ``WithLogLoss(net, side)(x_t, t)`` is ``net(x_t, t)``: samplers
and metrics see the plain network; only ``with_log_loss=True`` also returns ``g`` of shape ``(B,)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .embeddings import timestep_embedding

__all__ = ["LogLossNet", "WithLogLoss"]


class LogLossNet(nn.Module):
    """``g(x_t, t) -> (B,)``: MLP on ``[pool(x_t), emb(t)]`` (images average-pooled to at most ``pool^2``).

    Args:
        event_shape: shape of one sample, ``(D,)`` or ``(C, H, W)``.
        width: hidden width of the two hidden layers.
        time_dim: sinusoidal features of ``t``.
        pool: image side after adaptive average pooling (``<= H, W``).

    The output bias starts at 0 and is set once, by :meth:`initialize`, to the log of the first
    batch's mean loss (the ``initialized`` buffer records it), so that the fit starts at the right
    scale instead of spending thousands of steps moving a bias.
    """

    def __init__(self, event_shape: tuple[int, ...], width: int = 64, time_dim: int = 32, pool: int = 4):
        super().__init__()
        shape = tuple(int(s) for s in event_shape)
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise ValueError(
                f"event_shape must be (D,) or (C, H, W) with positive sizes, got {event_shape!r}"
            )
        for name, v in (("width", width), ("time_dim", time_dim), ("pool", pool)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self._config = dict(event_shape=list(shape), width=width, time_dim=time_dim, pool=pool)
        self.event_shape = shape
        self.time_dim = time_dim
        if len(shape) == 3:
            self.pooled = (min(pool, shape[1]), min(pool, shape[2]))
            n_in = shape[0] * self.pooled[0] * self.pooled[1]
        else:
            self.pooled = None
            n_in = shape[0]
        self.mlp = nn.Sequential(
            nn.Linear(n_in + time_dim, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, 1),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.register_buffer("initialized", torch.zeros(()))

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: ``LogLossNet(**net.config)`` rebuilds it."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LogLossNet:
        return cls(**{**config, "event_shape": tuple(config["event_shape"])})

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        if tuple(x_t.shape[1:]) != self.event_shape:
            raise ValueError(f"x_t must have shape (B, {', '.join(map(str, self.event_shape))}), got "
                             f"{tuple(x_t.shape)}")  # fmt: skip
        h = x_t if self.pooled is None else nn.functional.adaptive_avg_pool2d(x_t, self.pooled)
        w = self.mlp[0].weight
        emb = timestep_embedding(t.reshape(-1).to(w.dtype), self.time_dim).to(w.dtype)
        return self.mlp(torch.cat([h.flatten(1).to(w.dtype), emb], dim=1)).squeeze(1)

    @torch.no_grad()
    def initialize(self, log_level: float) -> None:
        """Set the output bias to ``log_level`` once (no-op after the first call)."""
        if not math.isfinite(log_level):
            raise ValueError(f"log_level must be finite, got {log_level!r}")
        if float(self.initialized) == 0.0:
            self.mlp[-1].bias.fill_(log_level)
            self.initialized.fill_(1.0)


class WithLogLoss(nn.Module):
    """A denoiser ``net`` with its loss normaliser ``log_loss``; calls go to ``net`` (module docstring)."""

    def __init__(self, net: nn.Module, log_loss: LogLossNet):
        super().__init__()
        if not isinstance(log_loss, LogLossNet):
            raise TypeError(f"log_loss must be a LogLossNet, got {type(log_loss).__name__}")
        self.net = net
        self.log_loss = log_loss

    @property
    def config(self) -> dict[str, Any]:
        """``{"net": {"class", "config"}, "log_loss": LogLossNet config}``; ``net`` must have ``config``."""
        conf = getattr(self.net, "config", None)
        if not isinstance(conf, dict):
            raise TypeError(f"{type(self.net).__name__} has no config dict, so WithLogLoss cannot record it")
        return {
            "net": {"class": type(self.net).__name__, "config": dict(conf)},
            "log_loss": self.log_loss.config,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WithLogLoss:
        from .. import nn as gnn

        info = config.get("net", {})
        net_cls = getattr(gnn, str(info.get("class")), None)
        if net_cls is None or not hasattr(net_cls, "from_config"):
            raise ValueError(f"WithLogLoss: no gmflow.nn class {info.get('class')!r} to rebuild the network")
        return cls(net_cls.from_config(info["config"]), LogLossNet.from_config(config["log_loss"]))

    def forward(self, x_t: Tensor, t: Tensor, *, with_log_loss: bool = False, **cond: Any):
        out = self.net(x_t, t, **cond)
        if with_log_loss:
            return out, self.log_loss(x_t, t)
        return out
