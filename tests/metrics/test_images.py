"""gmflow.metrics.images (Fréchet distance, k-NN precision/recall) and the digits classifier and its cache."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from gmflow.data.digits import Digits
from gmflow.metrics import classifier as cm
from gmflow.metrics import classifier_cache as cc
from gmflow.metrics.classifier import DigitClassifier
from gmflow.metrics.classifier_cache import default_cache_dir, get_classifier
from gmflow.metrics.images import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    image_metrics,
    knn_precision_recall,
    knn_radii,
)

FAST = dict(epochs=6)  # small training budget for the cache tests (8x8 digits, ~1 s)


def _whitened(n: int, f: int, seed: int) -> torch.Tensor:
    """``(n, f)`` float64 samples with sample mean exactly 0 and sample covariance exactly I."""
    z = torch.randn(n, f, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / (n - 1))
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T


# ------------------------------------------------------------------------------ Fréchet distance
def test_fd_of_identical_sets_is_zero():
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) < 1e-8
    assert frechet_distance(x.numpy(), x.clone()) < 1e-8  # numpy input accepted


def test_fd_of_a_shift_is_the_squared_shift():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    prev = 0.0
    for scale in (0.1, 0.5, 2.0):
        v = scale * torch.linspace(-1, 1, 8, dtype=torch.float64)
        fd = frechet_distance(x, x + v)
        assert fd == pytest.approx(float(v.square().sum()), rel=1e-6)
        assert fd > prev
        prev = fd


def test_fd_matches_closed_form_for_diagonal_gaussians():
    f = 6
    m1 = torch.linspace(-1, 1, f, dtype=torch.float64)
    m2 = torch.linspace(0, 3, f, dtype=torch.float64)
    d1 = torch.linspace(0.5, 2.0, f, dtype=torch.float64)
    d2 = torch.linspace(3.0, 0.1, f, dtype=torch.float64)
    expected = float((m1 - m2).square().sum() + (d1.sqrt() - d2.sqrt()).square().sum())
    # from statistics ...
    fd = frechet_distance_from_stats(m1, torch.diag(d1), m2, torch.diag(d2))
    assert fd == pytest.approx(expected, rel=1e-10)
    # ... and from samples whose sample mean / covariance are exactly (m, diag(d))
    a = m1 + _whitened(50, f, 0) * d1.sqrt()
    b = m2 + _whitened(80, f, 1) * d2.sqrt()
    mu, cov = feature_stats(a)
    torch.testing.assert_close(mu, m1)
    torch.testing.assert_close(cov, torch.diag(d1))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_fd_matches_scipy_sqrtm_for_full_covariances():
    g = torch.Generator().manual_seed(2)
    f = 5
    a1, a2 = (
        torch.randn(f, f, generator=g, dtype=torch.float64),
        torch.randn(f, f, generator=g, dtype=torch.float64),
    )
    s1, s2 = a1 @ a1.T + 0.1 * torch.eye(f), a2 @ a2.T + 0.1 * torch.eye(f)
    m1, m2 = (
        torch.randn(f, generator=g, dtype=torch.float64),
        torch.randn(f, generator=g, dtype=torch.float64),
    )
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float((m1 - m2).square().sum()) + float(np.trace(s1.numpy() + s2.numpy() - 2 * covmean))
    assert frechet_distance_from_stats(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)
    # symmetric in its arguments
    assert frechet_distance_from_stats(m2, s2, m1, s1) == pytest.approx(expected, rel=1e-8)


def test_fd_handles_singular_covariance():
    s = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))
    m = torch.zeros(3, dtype=torch.float64)
    assert frechet_distance_from_stats(m, s, m, s) == pytest.approx(0.0, abs=1e-12)


def test_fd_errors_and_shrinkage():
    x = torch.randn(10, 16)
    with pytest.raises(ValueError, match="N > F"):
        frechet_distance(x, torch.randn(100, 16))
    assert np.isfinite(frechet_distance(x, torch.randn(100, 16), shrinkage=0.1))
    with pytest.raises(ValueError, match="feature dims"):
        frechet_distance(torch.randn(50, 4), torch.randn(50, 5))
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        frechet_distance(torch.randn(50), torch.randn(50))
    bad = torch.randn(50, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(bad, torch.randn(50, 4))
    with pytest.raises(ValueError, match="shrinkage"):
        frechet_distance(torch.randn(50, 4), torch.randn(50, 4), shrinkage=1.5)


# ------------------------------------------------------------------------ precision and recall
def test_precision_recall_identical_and_disjoint():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    assert knn_precision_recall(x, x, k=3) == (1.0, 1.0)
    assert knn_precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_mode_dropping():
    """Fakes covering one of two real clusters: precision ~ 1, recall ~ 1/2."""
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(200, 4, generator=g) - 10, torch.randn(200, 4, generator=g) + 10])
    fake = torch.randn(300, 4, generator=g) + 10
    p, r = knn_precision_recall(real, fake, k=3)
    assert p > 0.9 and 0.4 < r < 0.55


def test_precomputed_reference_radii_give_the_same_scores():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(200, 4, generator=g), torch.randn(150, 4, generator=g) + 0.5
    radii = knn_radii(real, 3)
    assert radii.shape == (200,) and radii.dtype == torch.float64
    assert knn_precision_recall(real, fake, k=3, real_radii=radii) == knn_precision_recall(real, fake, k=3)
    with pytest.raises(ValueError, match="real_radii"):
        knn_precision_recall(real, fake, k=3, real_radii=radii[:10])
    with pytest.raises(ValueError, match="more than k"):
        knn_radii(torch.randn(3, 2), 3)


def test_precision_recall_errors():
    with pytest.raises(ValueError, match="more than k"):
        knn_precision_recall(torch.randn(3, 2), torch.randn(10, 2), k=3)
    with pytest.raises(ValueError, match="k must"):
        knn_precision_recall(torch.randn(10, 2), torch.randn(10, 2), k=0)
    with pytest.raises(ValueError, match="feature dims"):
        knn_precision_recall(torch.randn(10, 2), torch.randn(10, 3))


# ----------------------------------------------------------------------------------- classifier
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gmflow_cache")


@pytest.fixture(scope="module")
def clf8(cache):
    return get_classifier(8, cache_dir=cache, seed=0, **FAST)


def test_classifier_accuracy_and_features(clf8):
    te = Digits(8, "test")
    acc = clf8.accuracy(te.tensor(), te.labels())
    assert acc >= 0.90 and acc == pytest.approx(clf8.test_accuracy)
    assert not clf8.training
    f = clf8.features(te.tensor())
    assert f.shape == (len(te), clf8.feature_dim) and f.dtype == torch.float32
    assert (f < 0).any()  # taken before the ReLU
    cov = feature_stats(f)[1]
    assert torch.linalg.eigvalsh(cov).min() > 0  # non-singular covariance
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        clf8.features(torch.zeros(4, 1, 16, 16))


def test_cache_hit_loads_identical_weights(cache, clf8):
    assert clf8.cache_path.is_file() and clf8.cache_path.parent == cache
    assert not clf8.loaded_from_cache
    again = get_classifier(8, cache_dir=cache, seed=0, **FAST)
    assert again.loaded_from_cache and again.cache_path == clf8.cache_path
    assert again.test_accuracy == clf8.test_accuracy
    s1, s2 = clf8.state_dict(), again.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not list(cache.glob("*.tmp"))  # atomic write left no temp file
    # the key depends on the data, the seed and the training budget
    data = cc._data_digest("digits8", *cm.classifier_data("digits8", cm.DEFAULT_TRAIN))
    hp = {**cm.DEFAULT_TRAIN, **FAST}
    assert clf8.cache_path.name == f"digits8_classifier_{cc._cache_key(data, 0, clf8.config, hp)}.safetensors"
    assert cc._cache_key(data, 1, clf8.config, hp) not in clf8.cache_path.name
    assert cc._cache_key(data, 0, clf8.config, {**hp, "epochs": 7}) not in clf8.cache_path.name
    assert cc._cache_key({**data, "train": [0, "x"]}, 0, clf8.config, hp) not in clf8.cache_path.name


def test_corrupt_cache_is_retrained(tmp_path, clf8):
    tiny = dict(epochs=1)  # any budget: this test only needs the file name and a retrain
    data = cc._data_digest("digits8", *cm.classifier_data("digits8", cm.DEFAULT_TRAIN))
    key = cc._cache_key(data, 0, clf8.config, {**cm.DEFAULT_TRAIN, **tiny})
    path = tmp_path / f"digits8_classifier_{key}.safetensors"
    path.write_bytes(clf8.cache_path.read_bytes()[:100] + b"garbage")
    with pytest.warns(UserWarning, match="retraining"):
        fresh = get_classifier(8, cache_dir=tmp_path, seed=0, **tiny)
    assert not fresh.loaded_from_cache and fresh.cache_path == path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is valid again and holds the new weights
        again = get_classifier(8, cache_dir=tmp_path, seed=0, **tiny)
    assert again.loaded_from_cache
    s1, s2 = fresh.state_dict(), again.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_training_is_seeded():
    a, b = cm.train_classifier(8, 3, epochs=1), cm.train_classifier(8, 3, epochs=1)
    c = cm.train_classifier(8, 4, epochs=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["trunk.0.weight"], sc["trunk.0.weight"])


def test_untrusted_cache_files_are_rejected(tmp_path, clf8):
    from safetensors.torch import save_file

    key = clf8.cache_path.name.rsplit("_", 1)[1].split(".")[0]
    state = {k: v.clone() for k, v in clf8.state_dict().items()}
    state["trunk.0.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad), metadata=dict(key=key, test_accuracy="0.9"))
    with pytest.warns(UserWarning, match="non-finite"):
        assert not cc._try_load(bad, key, DigitClassifier(8))
    good = {k: v.clone() for k, v in clf8.state_dict().items()}
    wrong_key = tmp_path / "key.safetensors"
    save_file(good, str(wrong_key), metadata=dict(key="0" * 16, test_accuracy="0.9"))
    with pytest.warns(UserWarning, match="key mismatch"):
        assert not cc._try_load(wrong_key, key, DigitClassifier(8))
    ok = tmp_path / "ok.safetensors"
    save_file(good, str(ok), metadata=dict(key=key, test_accuracy="0.9"))
    assert cc._try_load(ok, key, DigitClassifier(8))


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GMFLOW_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("GMFLOW_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "gmflow")


# -------------------------------------------------------------------------------- image_metrics
def test_image_metrics_on_digits(clf8):
    tr, te = Digits(8, "train"), Digits(8, "test")
    same = image_metrics(tr.tensor(), tr, clf8)
    assert same["fd"] < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0
    held_out = image_metrics(te.tensor(), tr.tensor(), clf8)
    assert set(held_out) >= {"fd", "precision", "recall", "confidence", "classifier_score"}
    assert held_out["precision"] > 0.7 and held_out["recall"] > 0.7
    assert held_out["confidence"] > 0.8 and held_out["classifier_score"] > 7.0
    assert held_out["n_samples"] == len(te) and held_out["n_reference"] == len(tr)
    # FD grows as the samples are corrupted with more noise
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(te.tensor().shape, generator=g)
    fds = [image_metrics(te.tensor() + s * noise, tr, clf8)["fd"] for s in (0.0, 0.3, 1.0)]
    assert held_out["fd"] == pytest.approx(fds[0])
    assert fds[0] < fds[1] < fds[2]
    # precomputed reference features give the same numbers
    feats = clf8.features_and_logits(tr.tensor())[0]
    assert image_metrics(te.tensor(), tr.tensor(), clf8, reference_features=feats) == held_out


def test_image_metrics_errors(clf8):
    tr = Digits(8, "train").tensor()
    with pytest.raises(ValueError):
        image_metrics(torch.zeros(100, 1, 16, 16), tr, clf8)
    bad = tr[:200].clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        image_metrics(bad, tr, clf8)
    with pytest.raises(ValueError, match="N > F"):
        image_metrics(tr[:20], tr, clf8)
    with pytest.raises(ValueError, match=r"^reference_features must have shape"):
        image_metrics(tr[:200], tr, clf8, reference_features=torch.zeros(len(tr) - 1, clf8.feature_dim))


def test_16x16_classifier_short_budget(cache):
    clf = get_classifier(16, cache_dir=cache, epochs=4)
    assert clf.size == 16 and clf.test_accuracy >= 0.90
    x = Digits(16, "test").tensor()
    assert clf.features(x).shape == (len(x), clf.feature_dim)
