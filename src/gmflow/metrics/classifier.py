"""The offline classifiers behind the image metrics: architecture, per-data-set recipes and training.

A small CNN (:class:`ImageClassifier`) is trained once per labelled image set on its train split and
cached on disk (:func:`~gmflow.metrics.classifier_cache.get_classifier`). Its penultimate-layer
**pre-activation** features (before the ReLU, so covariances are not singular) play the role of
Inception features in :mod:`gmflow.metrics.images`; its predictions give the class accuracy of
class-conditional samples. No Inception network and no download are needed.

Recipes (:data:`CLASSIFIER_RECIPES`, by data-set name): the digits keep the original 3-conv network
(one pooling); Fashion-MNIST and MNIST-5k (28x28 or padded 32x32) use a 3-conv network with batch
norm and two poolings (test accuracy 0.917 on Fashion-MNIST after 5 epochs, 0.982 on MNIST-5k).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.registry import load_dataset

__all__ = [
    "CLASSIFIER_DATASETS",
    "CLASSIFIER_RECIPES",
    "DEFAULT_TRAIN",
    "DigitClassifier",
    "ImageClassifier",
    "build_classifier",
    "classifier_data",
    "classifier_dataset_name",
    "classifier_recipe",
    "train_classifier",
]

_DIGITS_ARCH: dict[str, Any] = dict(widths=(16, 32, 32), pools=1, batch_norm=False, feature_dim=64)
_PIXELS_ARCH: dict[str, Any] = dict(widths=(16, 32, 64), pools=2, batch_norm=True, feature_dim=128)
#: Training recipe of the digits classifiers (``split_seed`` seeds the digits train/test split).
DEFAULT_TRAIN: dict[str, Any] = dict(
    epochs=15, batch_size=64, lr=1e-2, weight_decay=1e-4, split_seed=0, limit=None
)
_FMNIST_TRAIN: dict[str, Any] = dict(epochs=5, batch_size=128, lr=3e-3, weight_decay=1e-4, limit=None)
_MNIST5K_TRAIN: dict[str, Any] = dict(epochs=15, batch_size=64, lr=3e-3, weight_decay=1e-4, limit=None)
#: ``name -> (architecture keyword arguments, training options)``; ``limit`` trains on the first
#: ``limit`` images of the train split only (``None``: all of them).
CLASSIFIER_RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "digits8": (_DIGITS_ARCH, DEFAULT_TRAIN),
    "digits16": (_DIGITS_ARCH, DEFAULT_TRAIN),
    "fmnist": (_PIXELS_ARCH, _FMNIST_TRAIN),
    "fmnist32": (_PIXELS_ARCH, _FMNIST_TRAIN),
    "mnist5k": (_PIXELS_ARCH, _MNIST5K_TRAIN),
    "mnist5k32": (_PIXELS_ARCH, _MNIST5K_TRAIN),
}
CLASSIFIER_DATASETS: tuple[str, ...] = tuple(CLASSIFIER_RECIPES)


def classifier_dataset_name(data: int | str) -> str:
    """The data-set name of ``data``: a name of :data:`CLASSIFIER_DATASETS`, or a digits size 8 / 16."""
    if isinstance(data, numbers.Integral) and not isinstance(data, bool):
        if int(data) not in (8, 16):
            raise ValueError(f"a digits classifier size must be 8 or 16, got {data!r}")
        return f"digits{int(data)}"
    key = str(data).strip().lower() if isinstance(data, str) else None
    if key not in CLASSIFIER_RECIPES:
        raise ValueError(
            f"no classifier for data set {data!r}; valid: {', '.join(CLASSIFIER_DATASETS)} "
            "(or a digits size 8 / 16)"
        )
    return key


# ------------------------------------------------------------------------------------ classifier
class ImageClassifier(nn.Module):
    """Small CNN for ``(N, C, size, size)`` images in ``[-1, 1]``; ``-> logits (N, num_classes)``.

    ::

        for i, w in enumerate(widths):  Conv3x3(w) [BatchNorm] ReLU [MaxPool2 if i < pools]
        AdaptiveMaxPool(2) Flatten
        f = Linear(4 widths[-1], F)            <- features(x): pre-activation, (N, F)
        logits = Linear(F, num_classes)(Dropout(ReLU(f)))

    ``ImageClassifier(8)`` / ``(16)`` is the digits network (widths 16, 32, 32; one pooling; F = 64).
    """

    def __init__(
        self,
        size: int = 16,
        widths: tuple[int, ...] = (16, 32, 32),
        pools: int = 1,
        batch_norm: bool = False,
        feature_dim: int = 64,
        dropout: float = 0.25,
        num_classes: int = 10,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths!r}")
        if not 0 <= int(pools) <= len(widths) or int(size) < 2 * 2 ** int(pools):
            raise ValueError(
                f"pools must be in 0..{len(widths)} and size >= 2 * 2**pools, got pools={pools!r}, "
                f"size={size!r}"
            )
        self._config = dict(
            size=int(size), widths=widths, pools=int(pools), batch_norm=bool(batch_norm),
            feature_dim=int(feature_dim), dropout=float(dropout), num_classes=int(num_classes),
            in_channels=int(in_channels),
        )  # fmt: skip
        self.size, self.in_channels = int(size), int(in_channels)
        self.feature_dim, self.num_classes = int(feature_dim), int(num_classes)
        layers: list[nn.Module] = []
        prev = self.in_channels
        for i, w in enumerate(widths):
            layers += [
                nn.Conv2d(prev, w, 3, padding=1),
                *([nn.BatchNorm2d(w)] if batch_norm else []),
                nn.ReLU(),
            ]
            if i < int(pools):
                layers.append(nn.MaxPool2d(2))
            prev = w
        layers += [nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(4 * prev, self.feature_dim)]
        self.trunk = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.ReLU(), nn.Dropout(dropout), nn.Linear(self.feature_dim, self.num_classes)
        )
        self.data_name: str | None = None  # set by train_classifier / get_classifier
        self.test_accuracy: float | None = None
        self.cache_path = None
        self.loaded_from_cache = False
        self.train_seconds: float | None = None

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def _check(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("images must be a floating-point torch.Tensor")
        shape = (self.in_channels, self.size, self.size)
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"images must have shape (N, {', '.join(map(str, shape))}), got {tuple(x.shape)}"
            )
        p = next(self.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.trunk(self._check(x)))

    @torch.no_grad()
    def features_and_logits(self, x: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
        """Eval-mode ``(features (N, F), logits (N, num_classes))`` in float32 on the CPU, batched."""
        x = self._check(x)
        was_training = self.training
        self.eval()
        try:
            feats, logits = [], []
            with torch.autocast(device_type=x.device.type, enabled=False):
                for chunk in x.split(batch_size):
                    f = self.trunk(chunk)
                    feats.append(f.float().cpu())
                    logits.append(self.classifier(f).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(feats), torch.cat(logits)

    def features(self, x: Tensor, batch_size: int = 512) -> Tensor:
        """Penultimate pre-ReLU features ``(N, F)`` (eval mode, no grad)."""
        return self.features_and_logits(x, batch_size)[0]

    def predict(self, x: Tensor, batch_size: int = 512) -> Tensor:
        """Predicted classes ``(N,)`` int64 (eval mode, no grad)."""
        return self.features_and_logits(x, batch_size)[1].argmax(1)

    def accuracy(self, x: Tensor, labels: Tensor) -> float:
        """Fraction of ``x`` classified as ``labels``."""
        return float((self.predict(x) == labels.cpu()).double().mean())


#: The digits classifier under its original name (``DigitClassifier(8)`` is ``ImageClassifier(8)``).
DigitClassifier = ImageClassifier


def classifier_recipe(
    data: int | str, arch: dict | None = None, **train: Any
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(name, architecture kwargs, training options)`` of ``data`` with the overrides applied.

    Raises ``TypeError`` naming unknown training options.
    """
    name = classifier_dataset_name(data)
    base_arch, base_train = CLASSIFIER_RECIPES[name]
    hp = {**base_train, **train}
    unknown = set(hp) - set(base_train)
    if unknown:
        raise TypeError(
            f"unknown training options {sorted(unknown)} for {name!r}; known: {sorted(base_train)}"
        )
    return name, {**base_arch, **(arch or {})}, hp


def classifier_data(name: str, train: dict[str, Any]) -> tuple[Any, Any]:
    """The ``(train, test)`` splits a classifier of ``name`` with training options ``train`` uses."""
    kwargs = {"seed": train["split_seed"]} if "split_seed" in train else {}
    return load_dataset(name, "train", **kwargs), load_dataset(name, "test", **kwargs)


def build_classifier(arch: dict[str, Any], train_set: Any) -> ImageClassifier:
    """An untrained :class:`ImageClassifier` with ``arch`` for the images and classes of ``train_set``."""
    c, _, size = train_set.event_shape
    return ImageClassifier(size, **arch, num_classes=train_set.num_classes, in_channels=c)


def train_classifier(
    data: int | str = 16,
    seed: int = 0,
    *,
    progress: bool | None = None,
    arch: dict | None = None,
    **train: Any,
) -> ImageClassifier:
    """Train the :class:`ImageClassifier` of ``data`` (a :data:`CLASSIFIER_DATASETS` name or digits size).

    Cross-entropy, Adam with a one-cycle learning-rate schedule (peak ``lr`` after 20% of the steps,
    cosine decay to ~0), mini-batches drawn without replacement each epoch. ``train`` overrides the
    recipe's options (:data:`CLASSIFIER_RECIPES`), ``arch`` its architecture.

    Deterministic given ``seed`` (init, shuffling and dropout use a forked, seeded RNG; the global
    RNG state is left untouched). Sets ``test_accuracy`` on the whole test split. ``progress``:
    ``None`` shows a bar only when stderr is a terminal, ``True`` / ``False`` always / never.
    """
    name, arch_kw, hp = classifier_recipe(data, arch, **train)
    tr, te = classifier_data(name, hp)
    x, y = tr.tensor(), tr.labels()
    if hp["limit"] is not None:
        x, y = x[: int(hp["limit"])], y[: int(hp["limit"])]
    bs = int(hp["batch_size"])
    with torch.random.fork_rng(devices=[]), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        torch.manual_seed(seed)
        model = build_classifier(arch_kw, tr)
        opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
        gen = torch.Generator().manual_seed(seed)
        total = max(int(hp["epochs"]) * math.ceil(len(y) / bs), 1)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp["lr"], total_steps=total, pct_start=0.2)
        disable = None if progress is None else not progress
        bar = tqdm(total=total, desc=f"{name} classifier", unit="batch", disable=disable, leave=False)
        model.train()
        for _ in range(int(hp["epochs"])):
            for idx in torch.randperm(len(y), generator=gen).split(bs):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        bar.close()
    model.eval()
    model.data_name = name
    model.test_accuracy = model.accuracy(te.tensor(), te.labels())
    return model
