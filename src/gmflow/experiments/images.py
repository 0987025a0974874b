"""The image experiment: flow matching or GMFlow with :class:`~gmflow.nn.SmallUNet` on an image data set.

Data sets today: sklearn digits at 8x8 or 16x16 (``digits8`` / ``digits16``, train split of
:class:`gmflow.data.Digits`). Keys (``--set``): ``data.name``, ``model.*`` (SmallUNet arguments; the
channels and image size come from the data set), ``loss.*``, ``loop.*``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..config import need
from ..data import Digits, load_dataset
from ..nn import SmallUNet
from ..train import FlowLoss, LoopConfig, dataset_batch_fn, flow_objective
from .base import Experiment

__all__ = ["IMAGE_DATASETS", "IMAGES_PRESETS", "ImageData", "ImagesConfig", "UNetModel"]

IMAGE_DATASETS = ("digits8", "digits16")


@dataclass
class ImageData:
    """An image data set by name (:data:`IMAGE_DATASETS`)."""

    name: str = "digits16"


@dataclass
class UNetModel:
    """:class:`gmflow.nn.SmallUNet` arguments (channels and image size come from the data set)."""

    head: str = "velocity"  # "velocity" (flow matching) or "gm" (GMFlow)
    num_components: int = 8  # K, GM head only
    base: int = 32
    mults: tuple[int, ...] = (1, 2)
    num_res: int = 1
    time_dim: int = 128
    dropout: float = 0.0


@dataclass
class ImagesConfig(Experiment):
    """An image run; defaults: flow matching with a small U-Net on 16x16 digits."""

    kind: ClassVar[str] = "images"

    data: ImageData = field(default_factory=ImageData)
    model: UNetModel = field(default_factory=UNetModel)
    loss: FlowLoss = field(default_factory=lambda: FlowLoss(kind="fm"))
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(batch_size=128, warmup_steps=100))

    def validate(self) -> ImagesConfig:
        """Raise :class:`~gmflow.config.ConfigError` naming the first invalid field; return ``self``."""
        self.check_types()
        m = self.model
        need(
            self.data.name in IMAGE_DATASETS,
            "data.name",
            f"unknown image data set {self.data.name!r}; choose one of {', '.join(IMAGE_DATASETS)}",
        )
        need(m.head in ("gm", "velocity"), "model.head", f"must be 'gm' or 'velocity', got {m.head!r}")
        need(m.num_components >= 1, "model.num_components", f"K must be >= 1, got {m.num_components}")
        for k in ("base", "num_res", "time_dim"):
            need(getattr(m, k) >= 1, f"model.{k}", f"must be >= 1, got {getattr(m, k)}")
        need(len(m.mults) >= 1 and min(m.mults) >= 1, "model.mults", f"must be ints >= 1, got {m.mults}")
        need(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
        self.loss.validate(m.head)
        self.loop.validate()
        return self

    @property
    def data_name(self) -> str:
        return self.data.name

    def dataset(self, split: str = "train") -> Digits:
        return load_dataset(self.data.name, split)

    def build(self):
        data = self.dataset("train")
        c, h, _ = data.event_shape
        m = self.model
        torch.manual_seed(self.loop.seed)
        model = SmallUNet(
            c, m.base, m.mults, num_res=m.num_res, time_dim=m.time_dim, dropout=m.dropout, head=m.head,
            num_components=m.num_components, image_size=h,
        )  # fmt: skip
        return model, flow_objective(self.loss), dataset_batch_fn(data, self.loop.batch_size)


IMAGES_PRESETS: dict[str, Any] = {
    # Seconds-long run for tests and smoke checks (no quality claim).
    "digits-smoke": ImagesConfig(
        data=ImageData("digits8"),
        model=UNetModel(base=8, mults=(1, 2), time_dim=16),
        loop=LoopConfig(steps=10, batch_size=32, lr=1e-3, warmup_steps=2, ckpt_every=5, log_every=5),
    ),
}
