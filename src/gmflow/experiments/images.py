"""The image experiment: GMFlow or flow matching on an image data set, with a U-Net or a GM-DiT.

Data sets (:func:`gmflow.data.load_dataset`): Fashion-MNIST (``fmnist`` 28x28, ``fmnist32`` padded),
MNIST-5k (``mnist5k``, ``mnist5k32``) and sklearn digits (``digits8``, ``digits16``). Networks:
:class:`~gmflow.nn.SmallUNet` (``model.arch=unet``) or :class:`~gmflow.nn.GMDiT` (``model.arch=dit``),
each with a GM head (``model.head=gm``, K = ``model.num_components``) or a velocity head with the
identical trunk (``model.head=velocity``, the flow-matching baseline), class-conditional or not.

Class-conditional models (``model.conditional``) get ``class_labels`` with every batch; the label of
each sample is replaced by the null class (id = number of classes) with probability
``loss.label_dropout``, so that the same network serves as its own unconditional model for guidance.

Spectral training (``model.spectral=true``, GM head, either architecture): a
:class:`~gmflow.nn.SpectrumMLP` (hidden widths ``model.spectrum_layers``, base size = the data's
``(C, H, W)``) is trained jointly with the GM loss by ``model.spectral_weight`` times the spectral
loss (GMFlow Eq. 20; weight 1 is the reference setting), in its own optimizer group with learning
rate ``model.spectral_lr`` (none: ``loop.lr``, as in the reference config, where the spectrum net
shares the network's AdamW). The run's network is then a :class:`~gmflow.nn.SpectralDenoiser`
(trunk + ``spectrum_net``, one checkpoint), which ``gmflow.sample`` samples spectrally with gm-sde
by default. The trunk's initialisation, random stream and updates are those of the same run
without ``model.spectral`` (the spectral loss never reaches the trunk; docs/maths/spectral.md §6).

Keys (``--set``): ``data.name``, ``model.*``, ``loss.*`` (:class:`~gmflow.train.FlowLoss`),
``loop.*`` (:class:`~gmflow.train.LoopConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import need
from ..data import load_dataset
from ..nn import GMDiT, SmallUNet, SpectralDenoiser, SpectrumMLP
from ..train import FlowLoss, LoopConfig, dataset_batch_fn, flow_objective
from .base import Experiment

__all__ = ["IMAGE_DATASETS", "ImageData", "ImageModel", "ImagesConfig"]

IMAGE_DATASETS = ("digits8", "digits16", "fmnist", "fmnist32", "mnist5k", "mnist5k32")
ARCHS = ("unet", "dit")


@dataclass
class ImageData:
    """An image data set by name (:data:`IMAGE_DATASETS`); training uses its ``train`` split."""

    name: str = "digits16"


@dataclass
class ImageModel:
    """The network: ``arch`` and head, then the arguments of that architecture.

    ``unet``: ``base``, ``mults``, ``num_res``, ``time_dim``, ``dropout`` (:class:`~gmflow.nn.SmallUNet`).
    ``dit``: ``patch_size``, ``num_layers``, ``num_heads`` x ``head_dim`` (hidden size),
    ``logstd_inner_dim``, ``dropout`` (:class:`~gmflow.nn.GMDiT`; unconditional when ``conditional`` is
    false: its class table then holds only the null row).
    ``spectral``: train a spectrum net with the GM (``spectrum_layers``, ``spectral_weight``,
    ``spectral_lr``; see the module docstring).
    """

    arch: str = "unet"
    head: str = "velocity"  # "velocity" (flow matching) or "gm" (GMFlow)
    num_components: int = 8  # K, GM head only
    conditional: bool = False  # class-conditional, with a null class for guidance
    base: int = 32
    mults: tuple[int, ...] = (1, 2)
    num_res: int = 1
    time_dim: int = 128
    dropout: float = 0.0
    patch_size: int = 2
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    logstd_inner_dim: int = 256
    spectral: bool = False  # GM head only: a SpectrumMLP trained with the spectral loss
    spectrum_layers: tuple[int, ...] = (64, 8)  # the paper's spectrum net widths
    spectral_weight: float = 1.0  # weight of the spectral loss (reference: 1)
    spectral_lr: float | None = None  # the spectrum net's learning rate (None: loop.lr)


@dataclass
class ImagesConfig(Experiment):
    """An image run; defaults: flow matching with a small unconditional U-Net on 16x16 digits."""

    kind: ClassVar[str] = "images"

    data: ImageData = field(default_factory=ImageData)
    model: ImageModel = field(default_factory=ImageModel)
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
        need(m.arch in ARCHS, "model.arch", f"must be one of {', '.join(ARCHS)}, got {m.arch!r}")
        need(m.head in ("gm", "velocity"), "model.head", f"must be 'gm' or 'velocity', got {m.head!r}")
        need(m.num_components >= 1, "model.num_components", f"K must be >= 1, got {m.num_components}")
        keys = ("base", "num_res", "time_dim") if m.arch == "unet" else ("patch_size", "num_layers")
        for k in (*keys, *(("num_heads", "head_dim", "logstd_inner_dim") if m.arch == "dit" else ())):
            need(getattr(m, k) >= 1, f"model.{k}", f"must be >= 1, got {getattr(m, k)}")
        need(len(m.mults) >= 1 and min(m.mults) >= 1, "model.mults", f"must be ints >= 1, got {m.mults}")
        need(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
        need(not m.spectral or m.head == "gm", "model.spectral", "needs a GM head (model.head=gm)")
        need(
            len(m.spectrum_layers) >= 1 and min(m.spectrum_layers) >= 1,
            "model.spectrum_layers",
            f"must be ints >= 1, got {m.spectrum_layers}",
        )
        need(m.spectral_weight > 0, "model.spectral_weight", f"must be > 0, got {m.spectral_weight}")
        need(
            m.spectral_lr is None or m.spectral_lr > 0,
            "model.spectral_lr",
            f"must be > 0 or none, got {m.spectral_lr}",
        )
        self.loss.validate(m.head)
        need(
            m.conditional or self.loss.label_dropout == 0,
            "loss.label_dropout",
            "needs a class-conditional model (model.conditional=true)",
        )
        self.loop.validate()
        return self

    @property
    def data_name(self) -> str:
        return self.data.name

    def dataset(self, split: str = "train") -> Any:
        return load_dataset(self.data.name, split)

    def build_model(self, data: Any) -> nn.Module:
        """The network for ``data`` (its channels, image size and number of classes); with
        ``model.spectral`` a :class:`~gmflow.nn.SpectralDenoiser` of it and a spectrum net (built
        after the trunk, so the trunk's initial weights do not depend on ``model.spectral``)."""
        trunk = self._build_trunk(data)
        m = self.model
        if not m.spectral:
            return trunk
        net = SpectrumMLP(base_size=[int(v) for v in data.event_shape], layers=list(m.spectrum_layers))
        return SpectralDenoiser(trunk, net, spectrum_lr=m.spectral_lr)

    def _build_trunk(self, data: Any) -> nn.Module:
        m = self.model
        c, h, w = data.event_shape
        classes = int(data.num_classes) if m.conditional else 0
        if m.arch == "dit":
            if h != w:
                raise ValueError(f"data.name: the GM-DiT needs square images, got {h}x{w}")
            return GMDiT(
                in_channels=c, sample_size=h, patch_size=m.patch_size, num_layers=m.num_layers,
                num_attention_heads=m.num_heads, attention_head_dim=m.head_dim,
                num_gaussians=m.num_components, logstd_inner_dim=m.logstd_inner_dim,
                num_embeds_ada_norm=classes, head=m.head, dropout=m.dropout,
            )  # fmt: skip
        kw = {"num_classes": classes} if classes else {}
        return SmallUNet(
            c, m.base, m.mults, num_res=m.num_res, time_dim=m.time_dim, dropout=m.dropout, head=m.head,
            num_components=m.num_components, image_size=h, **kw,
        )  # fmt: skip

    def build(self):
        data = self.dataset("train")
        torch.manual_seed(self.loop.seed)
        model = self.build_model(data)
        null = int(data.num_classes) if self.model.conditional else None
        objective = flow_objective(self.loss, null_label=null, spectral_weight=self.model.spectral_weight)
        return model, objective, dataset_batch_fn(data, self.loop.batch_size, labels=self.model.conditional)


def _fmnist(head: str, **loop: Any) -> ImagesConfig:
    """Class-conditional GM-DiT / velocity twin on padded Fashion-MNIST with the paper's ImageNet loss
    settings: transition loss lambda = 0.5 (GM), logit-normal t, label dropout 0.1, EMA."""
    loss = FlowLoss(kind="transition" if head == "gm" else "fm", trans_ratio=0.5, time_sampler="logit_normal",
                    label_dropout=0.1)  # fmt: skip
    model = ImageModel(arch="dit", head=head, conditional=True, patch_size=4, num_layers=6, num_heads=4,
                       head_dim=32, logstd_inner_dim=256)  # fmt: skip
    return ImagesConfig(data=ImageData("fmnist32"), model=model, loss=loss, loop=LoopConfig(**loop))


def _images_smoke() -> ImagesConfig:
    """A one-layer GM-DiT on 8x8 digits, 10 steps (seconds)."""
    cfg = _fmnist("gm", steps=10, batch_size=16, lr=1e-3, warmup_steps=2, ckpt_every=5, log_every=5)
    return cfg.with_sets(
        ["data.name=digits8", "model.patch_size=2", "model.num_layers=1", "model.num_heads=2",
         "model.head_dim=8", "model.logstd_inner_dim=16"]
    )  # fmt: skip


IMAGES_PRESETS: dict[str, ImagesConfig] = {
    # Fashion-MNIST 32x32, class-conditional GM-DiT (K = 8, 6 layers, hidden 128, patch 4) and its
    # flow-matching twin (same trunk, budget and recipe): a long run (hours on 2 CPU cores; not measured
    # at this size). The measured comparisons use smaller trunks: `gmflow bench images` (docs/RESULTS.md).
    "fmnist-gmdit": _fmnist("gm", steps=20000, batch_size=128, lr=3e-4, warmup_steps=500, ema="rampup"),
    "fmnist-fm": _fmnist("velocity", steps=20000, batch_size=128, lr=3e-4, warmup_steps=500, ema="rampup"),
    # The same GM-DiT with a spectrum net trained by the spectral loss (spectral GM-SDE sampling by
    # default); its trunk trains exactly as in fmnist-gmdit. Not measured at this size.
    "fmnist-gmdit-spectral": _fmnist(
        "gm", steps=20000, batch_size=128, lr=3e-4, warmup_steps=500, ema="rampup"
    ).with_sets(["model.spectral=true"]),
    # The same on MNIST-5k (the always-available small set).
    "mnist5k-gmdit": _fmnist(
        "gm", steps=5000, batch_size=128, lr=3e-4, warmup_steps=200, ema="rampup"
    ).with_sets(["data.name=mnist5k32"]),
    "mnist5k-fm": _fmnist(
        "velocity", steps=5000, batch_size=128, lr=3e-4, warmup_steps=200, ema="rampup"
    ).with_sets(["data.name=mnist5k32"]),
    # Seconds-long runs for tests and smoke checks (no quality claim).
    "digits-smoke": ImagesConfig(
        data=ImageData("digits8"),
        model=ImageModel(base=8, mults=(1, 2), time_dim=16),
        loop=LoopConfig(steps=10, batch_size=32, lr=1e-3, warmup_steps=2, ckpt_every=5, log_every=5),
    ),
    "images-smoke": _images_smoke(),
    "images-smoke-spectral": _images_smoke().with_sets(["model.spectral=true"]),
}
