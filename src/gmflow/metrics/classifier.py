"""The offline digits classifier behind the image metrics: architecture, training and cache.

A small CNN (:class:`DigitClassifier`) is trained on the digits train split once and cached on disk
(:func:`get_classifier`). Its penultimate-layer **pre-activation** features (before the ReLU, so
covariances are not singular) play the role of Inception features in :mod:`gmflow.metrics.images`;
no Inception network and no download are needed.
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
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.digits import Digits
from ..io import atomic_write_bytes, sha256_bytes

__all__ = ["DEFAULT_TRAIN", "DigitClassifier", "default_cache_dir", "get_classifier", "train_classifier"]

_CACHE_FORMAT = 1
DEFAULT_TRAIN: dict[str, Any] = dict(epochs=15, batch_size=64, lr=1e-2, weight_decay=1e-4, split_seed=0)


# ------------------------------------------------------------------------------------ classifier
class DigitClassifier(nn.Module):
    """Small CNN for 8x8 / 16x16 digits in ``[-1, 1]``; ``(N, 1, S, S) -> logits (N, 10)``.

    ::

        Conv3x3(1, w) ReLU MaxPool2                       (first conv at full resolution)
        Conv3x3(w, 2w) ReLU Conv3x3(2w, 2w) ReLU AdaptiveMaxPool(2) Flatten
        f = Linear(8w, F)                      <- features(x): pre-activation, (N, F)
        logits = Linear(F, 10)(Dropout(ReLU(f)))
    """

    def __init__(self, size: int = 16, width: int = 16, feature_dim: int = 64, dropout: float = 0.25) -> None:
        super().__init__()
        if size not in (8, 16):
            raise ValueError(f"size must be 8 or 16, got {size!r}")
        self._config = dict(
            size=int(size), width=int(width), feature_dim=int(feature_dim), dropout=float(dropout)
        )
        self.size = int(size)
        self.feature_dim = int(feature_dim)
        w = int(width)
        self.trunk = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * w, feature_dim),
        )
        self.classifier = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(feature_dim, 10))
        self.test_accuracy: float | None = None  # set by train_classifier / get_classifier
        self.cache_path: Path | None = None
        self.loaded_from_cache = False
        self.train_seconds: float | None = None

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def _check(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("images must be a floating-point torch.Tensor")
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, self.size, self.size):
            raise ValueError(f"images must have shape (N, 1, {self.size}, {self.size}), got {tuple(x.shape)}")
        p = next(self.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.trunk(self._check(x)))

    @torch.no_grad()
    def features_and_logits(self, x: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
        """Eval-mode ``(features (N, F), logits (N, 10))`` in float32 on the CPU, batched."""
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

    def accuracy(self, x: Tensor, labels: Tensor) -> float:
        """Fraction of ``x`` classified as ``labels``."""
        logits = self.features_and_logits(x)[1]
        return float((logits.argmax(1) == labels.cpu()).double().mean())


def train_classifier(
    size: int = 16, seed: int = 0, *, progress: bool = False, arch: dict | None = None, **train: Any
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on ``Digits(size, "train", seed=split_seed)``.

    Cross-entropy, Adam with a one-cycle learning-rate schedule (peak ``lr`` after 20% of the steps,
    cosine decay to ~0), mini-batches drawn without replacement each epoch.

    Deterministic given ``seed`` (init, shuffling and dropout use a forked, seeded RNG; the global
    RNG state is left untouched). Sets ``test_accuracy`` on the test split.
    """
    hp = {**DEFAULT_TRAIN, **train}
    unknown = set(hp) - set(DEFAULT_TRAIN)
    if unknown:
        raise TypeError(f"unknown training options {sorted(unknown)}; known: {sorted(DEFAULT_TRAIN)}")
    tr = Digits(size, "train", seed=hp["split_seed"])
    te = Digits(size, "test", seed=hp["split_seed"])
    x, y = tr.tensor(), tr.labels()
    with torch.random.fork_rng(devices=[]), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        torch.manual_seed(seed)
        model = DigitClassifier(size, **(arch or {}))
        opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
        gen = torch.Generator().manual_seed(seed)
        n_batches = -(-len(y) // int(hp["batch_size"]))
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=hp["lr"], total_steps=max(int(hp["epochs"]) * n_batches, 1), pct_start=0.2
        )
        steps = range(int(hp["epochs"]))
        if progress:
            steps = tqdm(steps, desc=f"digit classifier {size}x{size}", unit="epoch")
        model.train()
        for _ in steps:
            for idx in torch.randperm(len(y), generator=gen).split(int(hp["batch_size"])):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    model.test_accuracy = model.accuracy(te.tensor(), te.labels())
    return model


# ------------------------------------------------------------------------------------- caching
def default_cache_dir() -> Path:
    """``$GMFLOW_CACHE`` if set, else ``~/.cache/gmflow``."""
    env = os.environ.get("GMFLOW_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gmflow"


def _cache_key(size: int, seed: int, arch: dict, train: dict) -> str:
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    blob = dict(format=_CACHE_FORMAT, size=size, seed=seed, arch=arch, train=train, torch=torch_mm)
    return sha256_bytes(json.dumps(blob, sort_keys=True).encode())[:16]


def _try_load(path: Path, key: str, model: DigitClassifier) -> bool:
    """Load cached weights into ``model``; False (with a warning) if the file is missing or not trusted."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if meta.get("key") != key:
            raise ValueError(f"cache key mismatch ({meta.get('key')!r} != {key!r})")
        if not all(torch.isfinite(v).all() for v in state.values()):
            raise ValueError("non-finite weights")
        model.load_state_dict(state, strict=True)
        model.test_accuracy = float(meta["test_accuracy"])
    except Exception as err:  # noqa: BLE001 - any unreadable cache is retrained
        warnings.warn(f"ignoring unusable classifier cache {path} ({err}); retraining", stacklevel=3)
        return False
    return True


def _atomic_save(path: Path, model: DigitClassifier, key: str) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = dict(key=key, test_accuracy=repr(model.test_accuracy), config=json.dumps(model.config))
    atomic_write_bytes(path, save(state, metadata=meta))


def get_classifier(
    size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    progress: bool = False,
    arch: dict | None = None,
    **train: Any,
) -> DigitClassifier:
    """A trained :class:`DigitClassifier` in eval mode, from the cache or trained once and cached.

    The file ``<cache_dir>/digits_classifier_{size}_{key}.safetensors`` is keyed by a hash of
    (size, seed, architecture, training hyper-parameters, torch major.minor). Writes are atomic
    (temp file + rename). A file that cannot be read, has the wrong key or non-finite weights is
    retrained and overwritten (with a warning). An unwritable cache directory only warns.
    ``train`` overrides :data:`DEFAULT_TRAIN` (e.g. ``epochs=3`` for tests).
    """
    if size not in (8, 16):
        raise ValueError(f"size must be 8 or 16, got {size!r}")
    arch_cfg = DigitClassifier(size, **(arch or {})).config
    hp = {**DEFAULT_TRAIN, **train}
    key = _cache_key(size, seed, arch_cfg, hp)
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"digits_classifier_{size}_{key}.safetensors"
    model = DigitClassifier(size, **(arch or {}))
    if _try_load(path, key, model):
        model.loaded_from_cache = True
    else:
        t0 = time.perf_counter()
        model = train_classifier(size, seed, progress=progress, arch=arch, **train)
        model.train_seconds = time.perf_counter() - t0
        try:
            _atomic_save(path, model, key)
        except OSError as err:
            warnings.warn(f"could not write classifier cache {path}: {err}", stacklevel=2)
    model.cache_path = path
    return model.eval()
