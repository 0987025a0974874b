"""A GM denoiser together with the spectrum net of spectral GM-SDE sampling (docs/maths/spectral.md §6).

:class:`SpectralDenoiser` holds an image GM denoiser (the *trunk*: a GM-head
:class:`~gmflow.nn.GMDiT` or :class:`~gmflow.nn.SmallUNet`) and a :class:`~gmflow.nn.SpectrumMLP`
as ``spectrum_net``, so both train in one run and live in one checkpoint:

* ``forward`` is the trunk's: ``model(x_t (B, C, H, W), t (B,), **cond) -> GaussianMixture`` over u;
* :func:`gmflow.sample` finds ``model.spectrum_net`` and samples the GM-SDE spectrally by default;
* :func:`gmflow.train.flow_loss` finds it too and asks ``forward(..., spectral_x0=x0)`` for the
  spectral loss (Eq. 20) as well, which trains only the spectrum net (stop-gradient through the GM
  and the KR map); the trunk is trained by the transition loss alone;
* :meth:`optimizer_groups` is the training loop's hook for per-group optimizer settings: the trunk
  and the spectrum net are two groups, the spectrum net with its own learning rate ``spectrum_lr``
  (``None``: the loop's).

State-dict keys are ``trunk.<the trunk's own keys>`` and ``spectrum_net.<the net's keys>``: each part
keeps its own layout (the official GM-DiT / spectrum-net names), so ``model.trunk`` and
``model.spectrum_net`` can be saved as an official pipeline folder (:func:`gmflow.pretrained.save`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..gm import GaussianMixture
from ..spectral import spectral_loss
from .dit import GMDiT
from .spectrum import SpectrumMLP
from .unet import SmallUNet

__all__ = ["SpectralDenoiser"]

_TRUNKS: dict[str, type] = {"GMDiT": GMDiT, "SmallUNet": SmallUNet}


class SpectralDenoiser(nn.Module):
    """``trunk`` (GM head, images ``(C, H, W)``) + ``spectrum_net`` (``base_size`` ``(C, >= H, >= W)``).

    ``spectrum_lr``: learning rate of the spectrum net's optimizer group (training only; not part of
    :attr:`config`). Raises TypeError / ValueError when the parts do not fit together.
    """

    def __init__(
        self, trunk: nn.Module, spectrum_net: SpectrumMLP, *, spectrum_lr: float | None = None
    ) -> None:
        super().__init__()
        if not isinstance(trunk, (GMDiT, SmallUNet)):
            raise TypeError(f"trunk must be a GMDiT or a SmallUNet, got {type(trunk).__name__}")
        if trunk.head != "gm":
            raise ValueError(
                f"trunk must have a GM head (spectral sampling draws from its GM), got {trunk.head!r}"
            )
        if not isinstance(spectrum_net, SpectrumMLP):
            raise TypeError(
                f"spectrum_net must be a gmflow.nn.SpectrumMLP, got {type(spectrum_net).__name__}"
            )
        c, h, w = (int(v) for v in trunk.event_shape)
        bc, bh, bw = spectrum_net.base_size
        if bc != c or bh < h or bw < w:
            raise ValueError(
                f"spectrum_net base_size {list(spectrum_net.base_size)} does not fit the trunk's images "
                f"{(c, h, w)} (needs {c} channels and at least {h} x {w})"
            )
        if spectrum_lr is not None and not (isinstance(spectrum_lr, (int, float)) and spectrum_lr > 0):
            raise ValueError(f"spectrum_lr must be None or a number > 0, got {spectrum_lr!r}")
        self.trunk = trunk
        self.spectrum_net = spectrum_net
        self.spectrum_lr = None if spectrum_lr is None else float(spectrum_lr)

    # ----------------------------------------------------------------------------------- config
    @property
    def config(self) -> dict[str, Any]:
        """``{"trunk": {"class", "config"}, "spectrum_net": config}``; :meth:`from_config` rebuilds it."""
        trunk = {"class": type(self.trunk).__name__, "config": dict(self.trunk.config)}
        return {"trunk": trunk, "spectrum_net": self.spectrum_net.config}

    def to_config(self) -> dict[str, Any]:
        return self.config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SpectralDenoiser:
        """Rebuild from :attr:`config` (freshly initialised weights)."""
        trunk = config.get("trunk") if isinstance(config, dict) else None
        name = trunk.get("class") if isinstance(trunk, dict) else None
        if name not in _TRUNKS or not isinstance(trunk.get("config"), dict):
            raise ValueError(
                f"config['trunk'] must be {{'class': GMDiT|SmallUNet, 'config': {{...}}}}, got {trunk!r}"
            )
        if not isinstance(config.get("spectrum_net"), dict):
            raise ValueError("config['spectrum_net'] must be the SpectrumMLP config dict")
        return cls(
            _TRUNKS[name].from_config(trunk["config"]), SpectrumMLP.from_config(config["spectrum_net"])
        )

    # ----------------------------------------------------------------------------------- what samplers ask
    @property
    def head(self) -> str:
        return "gm"

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size(self.trunk.event_shape)

    @property
    def num_classes(self) -> int:
        """Classes of the trunk (0: unconditional); the null class is id ``num_classes``."""
        return int(self.trunk.num_classes)

    @property
    def null_class(self) -> int:
        return self.num_classes

    # ----------------------------------------------------------------------------------- training
    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The loop's per-group hook: ``[{"params": trunk}, {"params": spectrum net, "lr": spectrum_lr}]``.

        (``"lr"`` is left out when ``spectrum_lr`` is None, i.e. the loop's learning rate applies.)
        """
        spec: dict[str, Any] = {"params": [p for p in self.spectrum_net.parameters() if p.requires_grad]}
        if self.spectrum_lr is not None:
            spec["lr"] = self.spectrum_lr
        return [{"params": [p for p in self.trunk.parameters() if p.requires_grad]}, spec]

    def forward(
        self, x_t: Tensor, t: Tensor, *, spectral_x0: Tensor | None = None, **cond: Any
    ) -> GaussianMixture | tuple[GaussianMixture, Tensor]:
        """The trunk's GM over ``u`` at ``(x_t, t)``; with ``spectral_x0`` (the clean batch, training)
        also the per-sample spectral loss ``(B,)`` of its x0-GM (:func:`gmflow.spectral.spectral_loss`).

        The loss is computed here, inside ``forward``, so that a DistributedDataParallel wrapper sees
        the spectrum net used in the forward pass (DDP does not reduce the gradients of parameters
        used outside it).
        """
        gm = self.trunk(x_t, t, **cond)
        if spectral_x0 is None:
            return gm
        return gm, spectral_loss(self.spectrum_net, gm.u_to_x0(x_t, t), spectral_x0, reduction="none")

    def extra_repr(self) -> str:
        return f"spectrum_lr={self.spectrum_lr}"
