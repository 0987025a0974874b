"""Offline image metrics for the digits test bed: no Inception, no download.

A small CNN (:class:`DigitClassifier`) is trained on the digits train split and cached. Its
penultimate-layer **pre-activation** features (before the ReLU, so covariances are not singular)
play the role of Inception features:

* :func:`frechet_distance` -- "FD-digits", the Fréchet distance between Gaussians fitted to two
  feature sets (Heusel et al. 2017)::

      FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})

* :func:`knn_precision_recall` -- k-NN precision / recall (Kynkäänniemi et al. 2019).
* :func:`image_metrics` -- both, plus classifier confidence and a classifier score
  ``exp(E_x KL(p(y|x) || p(y)))`` (the Inception-score analogue).

Everything statistical runs in float64 on the CPU.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..io import atomic_write_bytes, sha256_bytes

__all__ = [
    "DigitClassifier",
    "default_cache_dir",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "get_classifier",
    "image_metrics",
    "knn_precision_recall",
    "train_classifier",
]

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
    from ..data.digits import Digits

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
            from tqdm.auto import tqdm

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
        from safetensors import safe_open

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
    from safetensors.torch import save

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


# -------------------------------------------------------------------------------- Fréchet distance
def _as_feats(x: Tensor | np.ndarray, name: str) -> Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x.detach())
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, F), got {tuple(x.shape)}")
    x = x.to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x


def feature_stats(feats: Tensor | np.ndarray, shrinkage: float = 0.0) -> tuple[Tensor, Tensor]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` (divisor N-1), float64.

    ``shrinkage = lam in [0, 1]`` returns ``(1 - lam) S + lam (tr S / F) I`` (shrinkage to a scaled
    identity, which keeps S well conditioned when N is not much larger than F).
    """
    x = _as_feats(feats, "feats")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples, got {x.shape[0]}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    mu = x.mean(0)
    xc = x - mu
    cov = xc.T @ xc / (x.shape[0] - 1)
    if shrinkage > 0:
        f = cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * (torch.trace(cov) / f) * torch.eye(f, dtype=cov.dtype)
    return mu, cov


def _psd_sqrt(s: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance_from_stats(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})`` in float64.

    The trace term uses the symmetric form ``tr((S_a S_b)^{1/2}) = sum_i sqrt(lambda_i)``, with
    ``lambda_i`` the eigenvalues of ``S_a^{1/2} S_b S_a^{1/2}`` (symmetric PSD; ``S_a S_b`` is similar
    to it). Both square roots come from ``eigh`` with eigenvalues clamped at 0, so the result is real
    by construction (no ``sqrtm`` imaginary parts to discard) and works for singular S. Round-off
    can leave a tiny negative total, which is clamped to 0.
    """
    mu_a, mu_b = (torch.as_tensor(m, dtype=torch.float64) for m in (mu_a, mu_b))
    cov_a, cov_b = (torch.as_tensor(c, dtype=torch.float64) for c in (cov_a, cov_b))
    f = mu_a.shape[0]
    if mu_a.shape != (f,) or mu_b.shape != (f,) or cov_a.shape != (f, f) or cov_b.shape != (f, f):
        raise ValueError(
            f"inconsistent shapes: mu_a {tuple(mu_a.shape)}, cov_a {tuple(cov_a.shape)}, "
            f"mu_b {tuple(mu_b.shape)}, cov_b {tuple(cov_b.shape)}"
        )
    ra = _psd_sqrt(cov_a)
    m = ra @ cov_b @ ra
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_sqrt
    return max(float(fd), 0.0)


def frechet_distance(
    feat_a: Tensor | np.ndarray, feat_b: Tensor | np.ndarray, *, shrinkage: float = 0.0
) -> float:
    """Fréchet distance between Gaussians fitted to ``feat_a (N_a, F)`` and ``feat_b (N_b, F)``.

    Without shrinkage both sets need ``N > F`` samples (otherwise the sample covariance is singular
    and the estimate meaningless) and a ``ValueError`` is raised; with ``shrinkage > 0`` (see
    :func:`feature_stats`) any ``N >= 2`` is accepted. FD is biased upwards at small N: compare
    numbers only at equal N.
    """
    a, b = _as_feats(feat_a, "feat_a"), _as_feats(feat_b, "feat_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    f = a.shape[1]
    for name, x in (("feat_a", a), ("feat_b", b)):
        if shrinkage == 0 and x.shape[0] <= f:
            raise ValueError(
                f"{name} has {x.shape[0]} samples for {f} features; FD needs N > F "
                f"(draw more samples or pass shrinkage > 0)"
            )
    return frechet_distance_from_stats(*feature_stats(a, shrinkage), *feature_stats(b, shrinkage))


# ---------------------------------------------------------------------------- precision / recall
def _kth_radius(x: Tensor, k: int, batch: int) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest *other* row (self excluded)."""
    out = []
    for chunk in x.split(batch):
        d = torch.cdist(chunk, x)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # index 0 is the point itself
    return torch.cat(out)


def _covered(query: Tensor, ref: Tensor, radii: Tensor, batch: int) -> Tensor:
    """``(N_q,)`` bool: query point inside at least one ball ``B(ref_j, radii_j)``."""
    return torch.cat([(torch.cdist(c, ref) <= radii[None]).any(1) for c in query.split(batch)])


def knn_precision_recall(
    real_feats: Tensor | np.ndarray, fake_feats: Tensor | np.ndarray, k: int = 3, *, batch_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), returns ``(precision, recall)``.

    With ``r_k(x; X)`` the distance from ``x`` to its k-th nearest neighbour in ``X \\ {x}``::

        precision = mean_{g in fake} 1[ exists r in real: ||g - r|| <= r_k(r; real) ]
        recall    = mean_{r in real} 1[ exists g in fake: ||r - g|| <= r_k(g; fake) ]

    Both sets need more than ``k`` points.
    """
    real, fake = _as_feats(real_feats, "real_feats"), _as_feats(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, x in (("real_feats", real), ("fake_feats", fake)):
        if x.shape[0] <= k:
            raise ValueError(f"{name} needs more than k={k} samples, got {x.shape[0]}")
    precision = _covered(fake, real, _kth_radius(real, k, batch_size), batch_size).double().mean()
    recall = _covered(real, fake, _kth_radius(fake, k, batch_size), batch_size).double().mean()
    return float(precision), float(recall)


# ------------------------------------------------------------------------------------- combined
def image_metrics(
    samples: Tensor,
    reference: Tensor | Any,
    classifier: DigitClassifier,
    *,
    k: int = 3,
    shrinkage: float = 0.0,
    clamp: bool = True,
) -> dict[str, float]:
    """FD, k-NN precision/recall and classifier statistics of ``samples`` against ``reference``.

    Args:
        samples: generated images ``(N, 1, S, S)`` in ``[-1, 1]`` (clamped to it when ``clamp``).
        reference: real images ``(M, 1, S, S)``, or a data set with ``.tensor()`` (e.g. ``Digits``).
        classifier: a :class:`DigitClassifier` for size S (see :func:`get_classifier`).

    Returns ``dict(fd, precision, recall, confidence, classifier_score, n_samples, n_reference)``:
    ``confidence`` is the mean max softmax probability on the samples (legible digits score near
    1) and ``classifier_score = exp(E_x KL(p(y|x) || p(y)))`` in [1, 10] (sharp *and* diverse
    class predictions score high).
    """
    if hasattr(reference, "tensor") and not isinstance(reference, Tensor):
        reference = reference.tensor()
    for name, x in (("samples", samples), ("reference", reference)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains non-finite values")
    if clamp:
        samples = samples.clamp(-1.0, 1.0)
    f_fake, logits = classifier.features_and_logits(samples)
    f_real, _ = classifier.features_and_logits(reference)
    fd = frechet_distance(f_real, f_fake, shrinkage=shrinkage)
    precision, recall = knn_precision_recall(f_real, f_fake, k=k)
    logp = torch.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    log_marginal = torch.log(p.mean(0).clamp_min(1e-300))
    kl = (p * (logp - log_marginal)).sum(1).mean()
    return dict(
        fd=fd,
        precision=precision,
        recall=recall,
        confidence=float(p.max(1).values.mean()),
        classifier_score=float(kl.exp()),
        n_samples=int(samples.shape[0]),
        n_reference=int(reference.shape[0]),
    )
