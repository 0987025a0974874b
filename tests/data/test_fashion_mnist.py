"""gmflow.data.fashion_mnist: synthetic IDX directories (root / env var), errors, padding, the real files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmflow.data import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_DIR,
    FASHION_MNIST_ENV,
    FashionMNIST,
    MissingDataError,
    fashion_mnist_dir,
    load_dataset,
    read_idx,
)
from gmflow.data.fashion_mnist import load_fashion_mnist_arrays

INSTALL = "apt-get install dataset-fashion-mnist"
REAL = (FASHION_MNIST_DEFAULT_DIR / "train-images-idx3-ubyte.gz").is_file()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)


@pytest.mark.parametrize("gz", [True, False])
def test_reads_a_synthetic_directory(fake_fmnist, gz):
    d = fake_fmnist(gz=gz)
    tr, te = FashionMNIST("train", root=d), FashionMNIST("test", root=d)
    assert len(tr) == 40 and len(te) == 20 and tr.directory == d
    x = tr.tensor()
    assert x.shape == (40, 1, 28, 28) and x.dtype == torch.float32 and tr.event_shape == (1, 28, 28)
    raw = read_idx(d / f"train-images-idx3-ubyte{'.gz' if gz else ''}")
    torch.testing.assert_close(x[:, 0], torch.tensor(raw, dtype=torch.float32) / 127.5 - 1.0)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0  # exact ends of the range
    assert torch.equal(tr.labels(), torch.arange(40) % 10) and tr.labels().dtype == torch.int64
    assert tr.num_classes == 10 and tr.classes == FASHION_MNIST_CLASSES and tr.classes[9] == "Ankle boot"
    assert tr.name == "fmnist" and tr.channels == 1
    assert FashionMNIST(**tr.config).config == tr.config


def test_env_var_and_precedence(fake_fmnist, monkeypatch):
    a, b = fake_fmnist(name="a"), fake_fmnist(n_train=30, name="b")
    assert fashion_mnist_dir() == FASHION_MNIST_DEFAULT_DIR
    monkeypatch.setenv(FASHION_MNIST_ENV, str(b))
    assert fashion_mnist_dir() == b and len(FashionMNIST()) == 30 and len(load_dataset("fmnist")) == 30
    assert fashion_mnist_dir(a) == a and len(FashionMNIST(root=a)) == 40  # the argument wins


def test_padding_limit_and_sampling(fake_fmnist):
    d = fake_fmnist()
    base, pad = FashionMNIST(root=d), FashionMNIST(root=d, pad_to=32)
    assert pad.event_shape == (1, 32, 32) and pad.name == "fmnist32"
    xp = pad.tensor()
    assert torch.equal(xp[:, :, 2:30, 2:30], base.tensor())  # centred: 2 pixels on each side
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (xp[:, 0, border] == -1.0).all()  # padded with the background
    odd = FashionMNIST(root=d, pad_to=31).tensor()
    assert torch.equal(odd[:, :, 1:29, 1:29], base.tensor())  # odd margin: extra pixel right/bottom
    small = FashionMNIST(root=d, limit=7)
    assert len(small) == 7 and torch.equal(small.tensor(), base.tensor()[:7])
    assert len(FashionMNIST(root=d, limit=1000)) == 40  # at most the split
    g = torch.Generator().manual_seed(0)
    x, y = pad.sample(50, generator=g, return_labels=True)
    assert x.shape == (50, 1, 32, 32) and y.shape == (50,)
    again = pad.sample(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert again.dtype == torch.float64 and torch.equal(again.float(), x)
    match = (x.flatten(1)[:, None] == xp.flatten(1)[None]).all(-1)  # every draw is an image of the split
    assert match.any(1).all() and torch.equal(pad.labels()[match.float().argmax(1)], y)
    for bad in (dict(pad_to=27), dict(pad_to=True), dict(limit=0), dict(split="all")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FashionMNIST(root=d, **bad)


def test_decoded_files_are_cached_per_process(fake_fmnist):
    d = fake_fmnist()
    a, b = load_fashion_mnist_arrays("train", d), load_fashion_mnist_arrays("train", d)
    assert a[0] is b[0] and a[1] is b[1]
    ds = FashionMNIST(root=d)
    ds.tensor().fill_(0.0)
    ds.labels().fill_(3)
    assert torch.equal(FashionMNIST(root=d).labels(), torch.arange(40) % 10)  # copies, cache untouched


def test_missing_directory_and_files(tmp_path, fake_fmnist, monkeypatch):
    with pytest.raises(MissingDataError) as info:
        FashionMNIST(root=tmp_path / "nowhere")
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    assert "nowhere" in msg and "does not exist" in msg and INSTALL in msg and FASHION_MNIST_ENV in msg
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "env-dir"))
    with pytest.raises(MissingDataError, match=rf"env-dir \(from \${FASHION_MNIST_ENV}\) does not exist"):
        load_dataset("fmnist32", split="test")
    d = fake_fmnist()
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    FashionMNIST("train", root=d)  # the train split is complete
    with pytest.raises(MissingDataError, match=r"t10k-labels-idx1-ubyte\.gz \(or t10k-labels-idx1-ubyte\)"):
        FashionMNIST("test", root=d)


def test_inconsistent_files_give_one_line_errors(tmp_path, write_idx, idx_bytes):
    def make(name, images, labels):
        d = tmp_path / name
        d.mkdir()
        write_idx(d / "train-images-idx3-ubyte.gz", images)
        write_idx(d / "train-labels-idx1-ubyte.gz", labels)
        with pytest.raises(ValueError) as info:
            FashionMNIST(root=d)
        assert "\n" not in str(info.value) and str(d) in str(info.value)
        return str(info.value)

    x, y = np.zeros((5, 28, 28), np.uint8), np.arange(5, dtype=np.uint8)
    assert "5 images in" in make("count", x, y[:4]) and "but 4 labels" in make("count2", x, y[:4])
    assert "shape (N, 28, 28)" in make("size", np.zeros((5, 27, 28), np.uint8), y)
    assert "uint8 images" in make("dtype", x.astype(np.int32), y)
    assert "uint8 labels" in make("labels2d", x, y.reshape(5, 1))
    assert "label 10 out of range" in make("range", x, np.array([0, 1, 2, 3, 10], np.uint8))
    d = tmp_path / "truncated"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte", idx_bytes(x)[:-50])  # uncompressed names are accepted too
    write_idx(d / "train-labels-idx1-ubyte", y)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: truncated data"):
        FashionMNIST(root=d)


def test_registry_names(fake_fmnist, monkeypatch):
    assert {"fmnist", "fmnist32", "mnist5k", "mnist5k32"} <= set(DATASETS)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(fake_fmnist()))
    assert load_dataset("fmnist").event_shape == (1, 28, 28)
    te = load_dataset(" FMNIST32 ", split="test")
    assert isinstance(te, FashionMNIST) and te.event_shape == (1, 32, 32) and len(te) == 20
    assert load_dataset("fmnist", limit=3).config == dict(split="train", root=None, pad_to=None, limit=3)


@pytest.mark.skipif(not REAL, reason=f"Fashion-MNIST IDX files not installed ({INSTALL})")
def test_real_fashion_mnist_files():
    tr, te = load_dataset("fmnist"), load_dataset("fmnist32", split="test")
    assert len(tr) == 60000 and len(te) == 10000 and te.event_shape == (1, 32, 32)
    assert tr.labels().bincount().tolist() == [6000] * 10 and te.labels().bincount().tolist() == [1000] * 10
    x = tr.sample(2000, generator=torch.Generator().manual_seed(0))
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert -0.6 < float(x.mean()) < -0.3  # mostly dark background (mean grey level ~ 73 / 255)
    corners = te.tensor()[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == -1.0).all()
