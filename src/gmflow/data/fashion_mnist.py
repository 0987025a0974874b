"""Fashion-MNIST (Xiao et al. 2017) read from its four standard IDX files; nothing is downloaded.

70,000 grey-scale 28x28 images of 10 kinds of garment: the ``"train"`` split is the 60,000 images of
``train-images-idx3-ubyte(.gz)`` / ``train-labels-idx1-ubyte(.gz)``, the ``"test"`` split the 10,000
of ``t10k-images-idx3-ubyte(.gz)`` / ``t10k-labels-idx1-ubyte(.gz)`` (the official split), in file
order. Pixels map to ``[-1, 1]`` by ``x = v / 127.5 - 1``; ``pad_to=32`` pads with ``-1`` (the
background) to 32x32 (:mod:`gmflow.data.images`).

The directory is, in order of precedence: the ``root`` argument, the environment variable
``GMFLOW_FASHION_MNIST``, or ``/usr/share/datasets/fashion-mnist``, where the Debian package
``dataset-fashion-mnist`` installs the files (``apt-get install dataset-fashion-mnist``). A missing
directory or file raises :class:`~gmflow.data.images.MissingDataError` (a ``ValueError``) saying which
file and how to get it; a corrupt file a ``ValueError`` naming the file and the defect. Decoded files
are cached per process, so building the data set again is cheap.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .idx import read_idx
from .images import MissingDataError, PixelImageSet

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_ENV",
    "FashionMNIST",
    "fashion_mnist_dir",
    "load_fashion_mnist_arrays",
]

FASHION_MNIST_ENV = "GMFLOW_FASHION_MNIST"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW = (
    "install the Debian package (apt-get install dataset-fashion-mnist) or put the four IDX files "
    f"(train-images-idx3-ubyte.gz etc.) in a directory and pass root=DIR or set {FASHION_MNIST_ENV}=DIR"
)


def _resolve_dir(root: str | os.PathLike | None) -> tuple[Path, str]:
    if root is not None:
        return Path(root).expanduser(), "from the root argument"
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        return Path(env).expanduser(), f"from ${FASHION_MNIST_ENV}"
    return FASHION_MNIST_DEFAULT_DIR, "the default"


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The directory of the IDX files: ``root``, else ``$GMFLOW_FASHION_MNIST``, else the default."""
    return _resolve_dir(root)[0]


def _find(directory: Path, where: str, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    if not directory.is_dir():
        raise MissingDataError(f"Fashion-MNIST directory {directory} ({where}) does not exist; {_HOW}")
    raise MissingDataError(
        f"Fashion-MNIST file {stem}.gz (or {stem}) not found in {directory} ({where}); {_HOW}"
    )


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _decode(images: tuple[str, int, int], labels: tuple[str, int, int]) -> tuple[Tensor, Tensor]:
    """Validated ``(pixels (N, 28, 28) uint8, labels (N,) int64)``; keyed by (path, size, mtime) of both."""
    x, y = read_idx(images[0]), read_idx(labels[0])
    if x.dtype != "u1" or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(
            f"corrupt Fashion-MNIST image file {images[0]}: expected uint8 images of shape (N, 28, 28), "
            f"the header says {x.dtype.name} of shape {x.shape}"
        )
    if y.dtype != "u1" or y.ndim != 1:
        raise ValueError(
            f"corrupt Fashion-MNIST label file {labels[0]}: expected uint8 labels of shape (N,), "
            f"the header says {y.dtype.name} of shape {y.shape}"
        )
    if len(x) != len(y):
        raise ValueError(
            f"corrupt Fashion-MNIST files: {len(x)} images in {images[0]} but {len(y)} labels in {labels[0]}"
        )
    if len(y) and int(y.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"corrupt Fashion-MNIST label file {labels[0]}: label {int(y.max())} out of range 0..9"
        )
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype("i8"))


def load_fashion_mnist_arrays(
    split: str = "train", root: str | os.PathLike | None = None
) -> tuple[Tensor, Tensor]:
    """``(pixels (N, 28, 28) uint8, labels (N,) int64)`` of ``split``, decoded once per process.

    The tensors are the cache's own: do not modify them (:class:`FashionMNIST` never does).
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {tuple(_FILES)}, got split={split!r}")
    directory, where = _resolve_dir(root)
    paths = [_find(directory, where, stem) for stem in _FILES[split]]
    return _decode(*(_stamp(p) for p in paths))


class FashionMNIST(PixelImageSet):
    """Fashion-MNIST as a ``(N, 1, 28, 28)`` (or ``pad_to``-padded) image set in ``[-1, 1]``.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000), the official files.
        root: directory of the IDX files (default: ``$GMFLOW_FASHION_MNIST`` or
            ``/usr/share/datasets/fashion-mnist``).
        pad_to: ``None`` (28x28) or a size ``>= 28`` (e.g. 32) to pad to with ``-1``.
        limit: keep at most the first ``limit`` images of the split (``None``: all).

    Class ``k`` is named ``FASHION_MNIST_CLASSES[k]`` (``ds.classes``).
    """

    classes = FASHION_MNIST_CLASSES
    base_name = "fmnist"

    def __init__(
        self,
        split: str = "train",
        root: str | os.PathLike | None = None,
        pad_to: int | None = None,
        limit: int | None = None,
    ) -> None:
        self.split = self._check_split(split)
        self.root = None if root is None else str(root)
        self.directory = fashion_mnist_dir(root)
        pixels, labels = load_fashion_mnist_arrays(split, root)
        self._init_pixels(pixels, labels, pad_to, limit)

    @property
    def config(self) -> dict[str, Any]:
        return dict(split=self.split, root=self.root, pad_to=self.pad_to, limit=self.limit)
