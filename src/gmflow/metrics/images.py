"""Offline image metrics on the features and predictions of a data set's classifier.

With ``f`` the penultimate pre-ReLU features of :class:`~gmflow.metrics.classifier.ImageClassifier`
(the stand-in for Inception features; one classifier per data set, see ``get_classifier``):

* :func:`frechet_distance` -- "FD-digits", the Fréchet distance between Gaussians fitted to two
  feature sets (Heusel et al. 2017)::

      FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})

* :func:`knn_precision_recall` -- k-NN precision / recall (Kynkäänniemi et al. 2019).
* :func:`class_accuracy` -- for class-conditional samples, the fraction the classifier assigns to
  the requested class: ``class_acc = mean_i 1[argmax_c logits_c(x_i) = y_i]``.
* :func:`image_metrics` -- FD and precision / recall, plus classifier confidence, a classifier score
  ``exp(E_x KL(p(y|x) || p(y)))`` (the Inception-score analogue) and, given the requested labels,
  ``class_acc``.

Everything statistical runs in float64 on the CPU (``docs/maths/evaluation.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .classifier import ImageClassifier

__all__ = [
    "class_accuracy",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "image_metrics",
    "knn_precision_recall",
    "knn_radii",
]


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


def knn_radii(feats: Tensor | np.ndarray, k: int = 3, *, batch_size: int = 1024) -> Tensor:
    """``r_k(x; X)`` of every row ``x`` of ``feats (N, F)``: the distance to its k-th nearest other row,
    ``(N,)`` float64 (the ``real_radii`` of :func:`knn_precision_recall`, computed once per reference)."""
    x = _as_feats(feats, "feats")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive int, got {k!r}")
    if x.shape[0] <= k:
        raise ValueError(f"feats needs more than k={k} samples, got {x.shape[0]}")
    return _kth_radius(x, k, batch_size)


def knn_precision_recall(
    real_feats: Tensor | np.ndarray,
    fake_feats: Tensor | np.ndarray,
    k: int = 3,
    *,
    batch_size: int = 1024,
    real_radii: Tensor | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), returns ``(precision, recall)``.

    With ``r_k(x; X)`` the distance from ``x`` to its k-th nearest neighbour in ``X \\ {x}``::

        precision = mean_{g in fake} 1[ exists r in real: ||g - r|| <= r_k(r; real) ]
        recall    = mean_{r in real} 1[ exists g in fake: ||r - g|| <= r_k(g; fake) ]

    Both sets need more than ``k`` points. ``real_radii``: :func:`knn_radii` of ``real_feats`` with the
    same ``k`` (skips the ``N_real x N_real`` distances when many sets are scored against one reference).
    """
    real, fake = _as_feats(real_feats, "real_feats"), _as_feats(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, x in (("real_feats", real), ("fake_feats", fake)):
        if x.shape[0] <= k:
            raise ValueError(f"{name} needs more than k={k} samples, got {x.shape[0]}")
    if real_radii is None:
        real_radii = _kth_radius(real, k, batch_size)
    elif tuple(real_radii.shape) != (real.shape[0],):
        raise ValueError(
            f"real_radii must have shape ({real.shape[0]},) (knn_radii of real_feats), "
            f"got {tuple(real_radii.shape)}"
        )
    precision = _covered(fake, real, real_radii.to(torch.float64), batch_size).double().mean()
    recall = _covered(real, fake, _kth_radius(fake, k, batch_size), batch_size).double().mean()
    return float(precision), float(recall)


# ------------------------------------------------------------------------------- class accuracy
def _check_labels(labels: Any, n: int, num_classes: int) -> Tensor:
    y = torch.as_tensor(labels)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.shape != (n,):
        raise ValueError(f"labels must be an integer tensor of shape ({n},), got {y.dtype} {tuple(y.shape)}")
    y = y.to(device="cpu", dtype=torch.int64)
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must be class ids in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}"
        )
    return y


def _class_acc(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())


def class_accuracy(
    classifier: ImageClassifier, samples: Tensor, labels: Tensor, *, clamp: bool = True
) -> float:
    """Fraction of ``samples (N, C, H, W)`` that ``classifier`` assigns to the requested ``labels (N,)``.

    ``class_acc = mean_i 1[argmax_c logits_c(x_i) = y_i]``; samples are clamped to ``[-1, 1]`` first
    when ``clamp``. Raises ``ValueError`` unless ``labels`` are ``N`` integer ids in
    ``0..num_classes-1``.
    """
    if not isinstance(samples, Tensor):
        raise TypeError(f"samples must be a torch.Tensor, got {type(samples).__name__}")
    logits = classifier.features_and_logits(samples.clamp(-1.0, 1.0) if clamp else samples)[1]
    return _class_acc(logits, _check_labels(labels, logits.shape[0], classifier.num_classes))


# ------------------------------------------------------------------------------------- combined
def image_metrics(
    samples: Tensor,
    reference: Tensor | Any,
    classifier: ImageClassifier,
    *,
    labels: Tensor | None = None,
    k: int = 3,
    shrinkage: float = 0.0,
    clamp: bool = True,
    reference_features: Tensor | None = None,
    reference_radii: Tensor | None = None,
) -> dict[str, float]:
    """FD, k-NN precision/recall and classifier statistics of ``samples`` against ``reference``.

    Args:
        samples: generated images ``(N, 1, S, S)`` in ``[-1, 1]`` (clamped to it when ``clamp``).
        reference: real images ``(M, 1, S, S)``, or a data set with ``.tensor()`` (e.g. the test
            split of ``load_dataset("fmnist", "test")``).
        classifier: the :class:`ImageClassifier` of the data set (see :func:`get_classifier`).
        labels: the class ids ``(N,)`` the samples were generated for (class-conditional sampling);
            adds ``class_acc`` (:func:`class_accuracy`).
        reference_features: ``classifier.features_and_logits(reference)[0]`` ``(M, F)``, computed once
            when many sample sets are scored against one reference (skips recomputing it).
        reference_radii: ``knn_radii(reference_features, k)`` ``(M,)``, likewise computed once.

    Returns ``dict(fd, precision, recall, confidence, classifier_score, n_samples, n_reference)``
    (and ``class_acc`` given ``labels``): ``confidence`` is the mean max softmax probability on the
    samples (legible images score near 1) and ``classifier_score = exp(E_x KL(p(y|x) || p(y)))`` in
    ``[1, num_classes]`` (sharp *and* diverse class predictions score high).
    """
    if hasattr(reference, "tensor") and not isinstance(reference, Tensor):
        reference = reference.tensor()
    for name, x in (("samples", samples), ("reference", reference)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains non-finite values")
    y = None if labels is None else _check_labels(labels, samples.shape[0], classifier.num_classes)
    if clamp:
        samples = samples.clamp(-1.0, 1.0)
    f_fake, logits = classifier.features_and_logits(samples)
    if reference_features is None:
        f_real = classifier.features_and_logits(reference)[0]
    else:
        f_real = _as_feats(reference_features, "reference_features")
        if f_real.shape != (reference.shape[0], f_fake.shape[1]):
            raise ValueError(
                f"reference_features must have shape ({reference.shape[0]}, {f_fake.shape[1]}) "
                f"(the classifier features of reference), got {tuple(f_real.shape)}"
            )
    fd = frechet_distance(f_real, f_fake, shrinkage=shrinkage)
    precision, recall = knn_precision_recall(f_real, f_fake, k=k, real_radii=reference_radii)
    logp = torch.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    log_marginal = torch.log(p.mean(0).clamp_min(1e-300))
    kl = (p * (logp - log_marginal)).sum(1).mean()
    out = dict(
        fd=fd,
        precision=precision,
        recall=recall,
        confidence=float(p.max(1).values.mean()),
        classifier_score=float(kl.exp()),
        n_samples=int(samples.shape[0]),
        n_reference=int(reference.shape[0]),
    )
    if y is not None:
        out["class_acc"] = _class_acc(logits, y)
    return out
