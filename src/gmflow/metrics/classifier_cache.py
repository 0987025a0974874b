"""The on-disk cache of the trained image classifiers: :func:`get_classifier` trains once per key.

The file ``<cache_dir>/{name}_classifier_{key}.safetensors`` (``name`` the data set, e.g.
``fmnist_classifier_…`` or ``digits16_classifier_…``) holds the weights, with the key, the test
accuracy and the architecture in its metadata. The key is a hash of the data set (name, number of
images and a digest of the labels of both splits, so another directory of IDX files gets its own
classifier), the seed, the architecture, the training options and torch's major.minor version.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..io import atomic_write_bytes, sha256_bytes
from .classifier import (
    ImageClassifier,
    build_classifier,
    classifier_data,
    classifier_recipe,
    train_classifier,
)

__all__ = ["default_cache_dir", "get_classifier"]

_CACHE_FORMAT = 2


def default_cache_dir() -> Path:
    """``$GMFLOW_CACHE`` if set, else ``~/.cache/gmflow``."""
    env = os.environ.get("GMFLOW_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gmflow"


def _data_digest(name: str, train_set: Any, test_set: Any) -> dict[str, Any]:
    """What identifies the training and test data of ``name``: sizes and a digest of the labels."""
    out: dict[str, Any] = {"name": name}
    for split, ds in (("train", train_set), ("test", test_set)):
        labels = ds.labels().numpy()
        out[split] = [len(labels), sha256_bytes(labels.tobytes())[:16]]
    return out


def _cache_key(data: dict[str, Any], seed: int, arch: dict, train: dict) -> str:
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    blob = dict(format=_CACHE_FORMAT, data=data, seed=seed, arch=arch, train=train, torch=torch_mm)
    return sha256_bytes(json.dumps(blob, sort_keys=True).encode())[:16]


def _try_load(path: Path, key: str, model: ImageClassifier) -> bool:
    """Load cached weights into ``model``; False (with a warning) if the file is missing or not trusted."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if meta.get("key") != key:
            raise ValueError(f"cache key mismatch ({meta.get('key')!r} != {key!r})")
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            raise ValueError("non-finite weights")
        model.load_state_dict(state, strict=True)
        model.test_accuracy = float(meta["test_accuracy"])
    except Exception as err:  # noqa: BLE001 - any unreadable cache is retrained
        warnings.warn(f"ignoring unusable classifier cache {path} ({err}); retraining", stacklevel=3)
        return False
    return True


def _atomic_save(path: Path, model: ImageClassifier, key: str) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = dict(key=key, test_accuracy=repr(model.test_accuracy), config=json.dumps(model.config))
    atomic_write_bytes(path, save(state, metadata=meta))


def get_classifier(
    data: int | str = 16,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    progress: bool | None = None,
    arch: dict | None = None,
    **train: Any,
) -> ImageClassifier:
    """The trained :class:`ImageClassifier` of ``data`` in eval mode, from the cache or trained once.

    ``data`` is a name of :data:`~gmflow.metrics.classifier.CLASSIFIER_DATASETS` (``"fmnist"``,
    ``"fmnist32"``, ``"mnist5k"``, ``"mnist5k32"``, ``"digits8"``, ``"digits16"``) or a digits size
    (``8`` / ``16``, i.e. ``"digits8"`` / ``"digits16"``). ``train`` overrides the recipe's training
    options (e.g. ``epochs=1, limit=256`` for tests), ``arch`` its architecture.

    Writes are atomic (temp file + rename). A file that cannot be read, has the wrong key or
    non-finite weights is retrained and overwritten (with a warning); an unwritable cache directory
    only warns. ``cache_dir`` defaults to :func:`default_cache_dir`. ``progress``: ``None`` shows a
    training bar only when stderr is a terminal. Sets ``loaded_from_cache``, ``cache_path``,
    ``test_accuracy``, ``data_name`` and, after training, ``train_seconds``.
    """
    name, arch_kw, hp = classifier_recipe(data, arch, **train)
    train_set, test_set = classifier_data(name, hp)
    model = build_classifier(arch_kw, train_set)
    key = _cache_key(_data_digest(name, train_set, test_set), seed, model.config, hp)
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"{name}_classifier_{key}.safetensors"
    if _try_load(path, key, model):
        model.loaded_from_cache = True
    else:
        t0 = time.perf_counter()
        model = train_classifier(name, seed, progress=progress, arch=arch, **train)
        model.train_seconds = time.perf_counter() - t0
        try:
            _atomic_save(path, model, key)
        except OSError as err:
            warnings.warn(f"could not write classifier cache {path}: {err}", stacklevel=2)
    model.data_name = name
    model.cache_path = path
    return model.eval()
