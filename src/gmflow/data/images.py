"""The interface shared by the finite, labelled image sets (digits, Fashion-MNIST, MNIST-5k).

An :class:`ImageSet` holds ``N`` images of one split with their class labels and offers

* ``tensor()`` -- every image, ``(N, C, H, W)`` float32 in ``[-1, 1]``; ``labels()`` -- ``(N,)`` int64;
* ``sample(n, generator=, device=, dtype=)`` -- ``n`` images drawn uniformly *with replacement*
  (indices drawn on the generator's device, so a seed gives the same images everywhere);
* ``event_shape``, ``num_classes``, ``classes`` (class names), ``name``, ``config``, ``len()``;
* ``bin_width`` -- the spacing of the stored grey levels in ``[-1, 1]`` units (``2/255`` for 8-bit
  pixels), which converts a density on ``[-1, 1]`` to bits per dimension of the stored levels
  (:func:`gmflow.metrics.bits_per_dim`).

:class:`PixelImageSet` is the base of the sets stored as 8-bit grey levels ``v in 0..255``; they are
kept as ``uint8`` and decoded on demand with ``x = v / 127.5 - 1`` (``0 -> -1`` and ``255 -> 1``
exactly), then optionally zero-padded in ``[-1, 1]`` space, i.e. with ``-1``, the black background,
to ``pad_to x pad_to`` (the image centred, the odd pixel of an odd margin on the right / bottom).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = ["ImageSet", "MissingDataError", "PixelImageSet", "decode_pixels"]


class MissingDataError(ValueError):
    """A data set's files are not where they were looked for (the message says how to get them)."""


def decode_pixels(raw: Tensor, pad_to: int | None = None) -> Tensor:
    """``(n, H, W)`` uint8 grey levels -> ``(n, 1, P, P)`` float32 ``v / 127.5 - 1``, padded with ``-1``."""
    x = raw.unsqueeze(1).to(torch.float32) / 127.5 - 1.0
    if pad_to is None:
        return x
    h, w = x.shape[-2:]
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    pad = (left, pad_to - w - left, top, pad_to - h - top)
    return torch.nn.functional.pad(x, pad, value=-1.0)


class ImageSet:
    """Base of the finite labelled image sets; subclasses set ``_labels`` and implement ``_images_at``."""

    channels: int = 1
    classes: tuple[str, ...] = tuple(str(i) for i in range(10))
    bin_width: float = 2.0 / 255.0  # grey-level spacing in [-1, 1] units
    _labels: Tensor

    def _images_at(self, idx: Tensor | None) -> Tensor:
        """Float32 images ``(n, C, H, W)`` at the indices ``idx`` (all of them, a fresh copy, for None)."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def event_shape(self) -> torch.Size:
        raise NotImplementedError

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments: ``type(ds)(**ds.config)`` rebuilds the same split."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self._labels.shape[0]

    def tensor(self) -> Tensor:
        """All images of the split, ``(N, C, H, W)`` float32 in ``[-1, 1]`` (a copy)."""
        return self._images_at(None)

    def labels(self) -> Tensor:
        """Class labels of the split, ``(N,)`` int64 (a copy), aligned with :meth:`tensor`."""
        return self._labels.clone()

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``n`` images drawn uniformly with replacement, ``(n, *event_shape)`` on ``device``/``dtype``.

        Indices are drawn on the generator's device (CPU without a generator), so the same seed
        gives the same images everywhere. ``return_labels=True`` also returns the ``(n,)`` labels.
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) <= 0:
            raise ValueError(f"n must be a positive int, got n={n!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        rng_device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(0, len(self), (int(n),), generator=generator, device=rng_device).cpu()
        out_device = device if device is not None else rng_device
        x = self._images_at(idx).to(device=out_device, dtype=dtype)
        if return_labels:
            return x, self._labels[idx].to(out_device)
        return x

    def __call__(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Shorthand for ``sample(n, generator=generator)`` (the ``sampler(n, generator)`` protocol)."""
        return self.sample(n, generator=generator)  # type: ignore[return-value]

    def to_config(self) -> dict[str, Any]:
        return self.config

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args}, n={len(self)})"


def _check_optional_int(value: Any, name: str, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be None or an int >= {minimum}, got {name}={value!r}")
    return int(value)


class PixelImageSet(ImageSet):
    """An image set stored as ``uint8`` grey levels ``(N, H, W)``, decoded by :func:`decode_pixels`.

    Subclasses call :meth:`_init_pixels` with the split's pixels ``(N, H, W)`` uint8 and labels
    ``(N,)`` int64 (tensors of the per-process cache, kept as views) after validating ``split``.
    ``pad_to`` (``None`` or ``>= max(H, W)``) pads every image to ``pad_to x pad_to`` with ``-1``;
    ``limit`` keeps at most the first ``limit`` images.
    """

    splits: tuple[str, ...] = ("train", "test")
    base_name: str = "pixels"

    def _check_split(self, split: Any) -> str:
        if split not in self.splits:
            raise ValueError(f"split must be one of {self.splits}, got split={split!r}")
        return split

    def _init_pixels(self, pixels: Tensor, labels: Tensor, pad_to: Any, limit: Any) -> None:
        self.limit = _check_optional_int(limit, "limit", 1)
        self.pad_to = _check_optional_int(pad_to, "pad_to", max(pixels.shape[1:]))
        stop = len(labels) if self.limit is None else min(self.limit, len(labels))
        self._raw = pixels[:stop]  # a view of the per-process cache: never written, never exposed
        self._labels = labels[:stop]
        self._hw = tuple(int(s) for s in pixels.shape[1:])

    def _images_at(self, idx: Tensor | None) -> Tensor:
        return decode_pixels(self._raw if idx is None else self._raw[idx], self.pad_to)

    @property
    def name(self) -> str:
        return self.base_name if self.pad_to is None else f"{self.base_name}{self.pad_to}"

    @property
    def event_shape(self) -> torch.Size:
        h, w = self._hw if self.pad_to is None else (self.pad_to, self.pad_to)
        return torch.Size((self.channels, h, w))
