"""scikit-learn's handwritten digits (``load_digits``) as a small image data set (test bed T2).

1,797 grey-scale 8x8 images of the digits 0-9 ship inside the scikit-learn wheel, so nothing is
downloaded. Raw pixel values are integers in ``0..16``; they are mapped affinely to ``[-1, 1]``::

    x = 2 * v / 16 - 1

``size=16`` upsamples with **bilinear** interpolation (``align_corners=False``). Bilinear output is
a convex combination of input pixels, so the range stays inside ``[-1, 1]`` without clamping (bicubic
would overshoot and need a clamp, which piles mass on the boundary).

Splits are deterministic: a permutation drawn from ``torch.Generator().manual_seed(seed)`` puts
``round(test_fraction * N)`` images in ``"test"`` and the rest in ``"train"``; ``"all"`` keeps every
image in the original order.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .images import ImageSet

__all__ = ["DIGITS_SIZES", "DIGITS_SPLITS", "Digits", "load_digits_arrays"]

DIGITS_SIZES: tuple[int, ...] = (8, 16)
DIGITS_SPLITS: tuple[str, ...] = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Raw ``(images (1797, 8, 8) float64 in 0..16, labels (1797,) int64)`` from scikit-learn (cached)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "gmflow.data.digits needs scikit-learn (bundled digits data): pip install 'gmflow[images]'"
        ) from err
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


class Digits(ImageSet):
    """The scikit-learn digits as a ``(N, 1, size, size)`` image set in ``[-1, 1]``.

    Args:
        size: 8 (native) or 16 (bilinear 2x upsampling).
        split: ``"train"``, ``"test"`` or ``"all"``.
        test_fraction: fraction of the 1,797 images held out as ``"test"``, in ``(0, 1)``.
        seed: seed of the split permutation.

    The interface of :class:`~gmflow.data.images.ImageSet`: ``sample(n, generator=...)`` draws ``n``
    images uniformly *with replacement* from the split; the draw depends only on the generator's
    state. ``Digits(...)(n, generator)`` is the same (the ``sampler(n, generator)`` protocol).
    """

    bin_width = 2.0 / 16.0  # 17 raw levels 0..16 (nominal for size 16, whose bilinear values lie between)

    def __init__(
        self, size: int = 8, split: str = "train", test_fraction: float = 0.2, seed: int = 0
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or int(size) not in DIGITS_SIZES:
            raise ValueError(f"size must be one of {DIGITS_SIZES}, got size={size!r}")
        if split not in DIGITS_SPLITS:
            raise ValueError(f"split must be one of {DIGITS_SPLITS}, got split={split!r}")
        if not (isinstance(test_fraction, numbers.Real) and 0.0 < float(test_fraction) < 1.0):
            raise ValueError(f"test_fraction must be in (0, 1), got test_fraction={test_fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got seed={seed!r}")
        self.size = int(size)
        self.split = split
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)

        images, labels = load_digits_arrays()
        x = torch.from_numpy(images.copy()).to(torch.float32).unsqueeze(1) * (2.0 / 16.0) - 1.0
        if self.size != 8:
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False
            )
        y = torch.from_numpy(labels.copy())
        idx = self.split_indices(len(y), self.split, self.test_fraction, self.seed)
        self._images = x[idx].contiguous()
        self._labels = y[idx].contiguous()

    # ------------------------------------------------------------------------------- metadata
    @staticmethod
    def split_indices(n: int, split: str, test_fraction: float, seed: int) -> Tensor:
        """Indices of ``split`` among ``n`` images: a seeded permutation, test first."""
        if split == "all":
            return torch.arange(n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
        return perm[:n_test] if split == "test" else perm[n_test:]

    @property
    def name(self) -> str:
        return f"digits{self.size}"

    @property
    def event_shape(self) -> torch.Size:
        """Shape of one image, ``(1, size, size)``."""
        return torch.Size((1, self.size, self.size))

    def _images_at(self, idx: Tensor | None) -> Tensor:
        return self._images.clone() if idx is None else self._images[idx]

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments: ``Digits(**ds.config)`` rebuilds the same split."""
        return dict(size=self.size, split=self.split, test_fraction=self.test_fraction, seed=self.seed)
