"""The GMFlow 2-D toy denoiser: a SiLU MLP on sinusoidal time and position embeddings."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..gm import GaussianMixture
from .embeddings import FourierPositionEmbedding, TimestepEmbedding, time_vector
from .heads import GMHead, VelocityHead, kaiming_linear_

__all__ = ["ToyMLP"]


class ToyMLP(nn.Module):
    """Toy denoiser ``(x_t (B, C), t (B,)) -> GaussianMixture | Tensor`` over the velocity u = eps - x0.

    Architecture (paper Sec. 4.1 / official ``GMFlowMLP2DDenoiser``)::

        h_0 = concat(TimestepEmbedding(1000 t) [time_dim], FourierPositionEmbedding(x_t) [2 pos_freqs C])
        h_l = SiLU(Linear(h_{l-1}))          l = 1 .. depth   (first layer in_dim -> width)
        out = GMHead(h_depth) | VelocityHead(h_depth)

    With the defaults (C = 2, width 512, depth 5, K = 64) the input is 256 + 256 = 512 features and
    the model has 1,412,289 parameters, the count of the official implementation.

    Args:
        channels: data dimension C.
        width, depth: trunk width and number of Linear+SiLU layers.
        head: ``"gm"`` (returns :class:`~gmflow.gm.GaussianMixture`) or ``"velocity"`` (returns u).
        num_components: K, for ``head="gm"``.
        time_dim: width of the sinusoidal timestep embedding.
        pos_freqs: frequencies per coordinate of the position embedding.
        min_period, max_period: period range of the position embedding.
        constant_logstd: fix ``log s`` instead of predicting it (``head="gm"`` only).
        logstd_from: ``"trunk"`` (paper toy: ``Linear(width, 1)`` on the last trunk features) or
            ``"time"`` (as the paper's GM-DiT: ``SiLU-Linear-SiLU-Linear`` on the detached time
            embedding, so s depends on t only).
    """

    def __init__(
        self,
        channels: int = 2,
        width: int = 512,
        depth: int = 5,
        head: str = "gm",
        num_components: int = 64,
        time_dim: int = 256,
        pos_freqs: int = 64,
        *,
        min_period: float = 5e-3,
        max_period: float = 50.0,
        constant_logstd: float | None = None,
        logstd_from: str = "trunk",
    ) -> None:
        super().__init__()
        if head not in ("gm", "velocity"):
            raise ValueError(f"head must be 'gm' or 'velocity', got {head!r}")
        if logstd_from not in ("trunk", "time"):
            raise ValueError(f"logstd_from must be 'trunk' or 'time', got {logstd_from!r}")
        if min(channels, width, depth, time_dim, pos_freqs) < 1:
            raise ValueError("channels, width, depth, time_dim and pos_freqs must all be >= 1")
        self._config: dict[str, Any] = dict(
            channels=channels,
            width=width,
            depth=depth,
            head=head,
            num_components=num_components,
            time_dim=time_dim,
            pos_freqs=pos_freqs,
            min_period=float(min_period),
            max_period=float(max_period),
            constant_logstd=None if constant_logstd is None else float(constant_logstd),
            logstd_from=logstd_from,
        )
        self.channels = channels
        self.logstd_from = logstd_from
        self.time_embed = TimestepEmbedding(time_dim)
        self.pos_embed = FourierPositionEmbedding(
            channels, pos_freqs, min_period=min_period, max_period=max_period
        )
        layers: list[nn.Module] = []
        in_dim = self.time_embed.out_dim + self.pos_embed.out_dim
        for i in range(depth):
            layers += [kaiming_linear_(nn.Linear(in_dim if i == 0 else width, width)), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.head: GMHead | VelocityHead
        if head == "gm":
            from_time = logstd_from == "time" and constant_logstd is None
            self.head = GMHead(
                width,
                channels,
                num_components,
                constant_logstd=constant_logstd,
                logstd_in_features=time_dim if from_time else None,
                logstd_hidden=width if from_time else None,
                detach_logstd=from_time,
            )
        else:
            self.head = VelocityHead(width, channels)

    # ----------------------------------------------------------------------------------- config
    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: ``ToyMLP(**model.config)`` rebuilds the model."""
        return dict(self._config)

    def to_config(self) -> dict[str, Any]:
        return self.config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ToyMLP:
        return cls(**config)

    # ---------------------------------------------------------------------------------- forward
    def _check_inputs(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Validate ``x_t`` and return ``t`` as a float tensor of shape ``(B,)`` on ``x_t``'s device."""
        if not isinstance(x_t, Tensor):
            raise TypeError(f"x_t must be a torch.Tensor, got {type(x_t).__name__}")
        if not x_t.is_floating_point():
            raise TypeError(f"x_t must be a floating-point tensor, got dtype {x_t.dtype}")
        if x_t.ndim != 2 or x_t.shape[1] != self.channels:
            raise ValueError(f"x_t must have shape (B, {self.channels}), got {tuple(x_t.shape)}")
        return time_vector(t, x_t)

    def features(self, x_t: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Trunk features ``(B, width)`` and the time embedding ``(B, time_dim)``."""
        t = self._check_inputs(x_t, t)
        temb = self.time_embed(t)
        h = torch.cat([temb, self.pos_embed(x_t)], dim=1)
        return self.trunk(h.to(self.trunk[0].weight.dtype)), temb

    def forward(self, x_t: Tensor, t: Tensor | float) -> GaussianMixture | Tensor:
        """``x_t (B, C)``, ``t (B,)`` / scalar in [0, 1] -> GM over u (means (B, K, C)) or u (B, C)."""
        h, temb = self.features(x_t, t)
        if isinstance(self.head, GMHead) and self.head.logstd_in_features is not None:
            return self.head(h, temb.to(self.trunk[0].weight.dtype))
        return self.head(h)
