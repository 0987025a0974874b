"""Tests for gmflow.data.digits: range, shapes, splits and determinism of the digits image set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmflow.data import load_dataset
from gmflow.data.digits import Digits, load_digits_arrays


@pytest.mark.parametrize("size", [8, 16])
def test_shape_range_and_name(size):
    ds = Digits(size, "all")
    x = ds.tensor()
    assert x.shape == (1797, 1, size, size) and x.dtype == torch.float32
    assert ds.event_shape == (1, size, size) and ds.channels == 1 and ds.name == f"digits{size}"
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0  # 0 and 16 both occur in the raw data
    assert ds.labels().shape == (1797,) and set(ds.labels().tolist()) == set(range(10))


def test_affine_scaling_of_raw_pixels():
    images, labels = load_digits_arrays()
    x = Digits(8, "all").tensor()
    expected = torch.tensor(images, dtype=torch.float32) / 8.0 - 1.0
    torch.testing.assert_close(x[:, 0], expected)
    assert torch.equal(Digits(8, "all").labels(), torch.tensor(np.asarray(labels)))


def test_upsampled_is_bilinear_of_native_and_downsamples_back():
    x8, x16 = Digits(8, "all").tensor(), Digits(16, "all").tensor()
    ref = torch.nn.functional.interpolate(x8, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x16, ref)
    # Each 16x16 pixel blends its 8x8 parent (weight 9/16) with neighbours: 2x2 average pooling of
    # the upsampled image stays close to the original.
    back = torch.nn.functional.avg_pool2d(x16, 2)
    assert (back - x8).abs().mean() < 0.15
    assert (x16[:, :, ::2, ::2] - x8).abs().max() > 0  # not a nearest-neighbour copy


def test_splits_partition_the_data_and_are_seeded():
    n = 1797
    tr, te = Digits(8, "train"), Digits(8, "test")
    assert len(te) == round(0.2 * n) and len(tr) + len(te) == n
    idx_tr = Digits.split_indices(n, "train", 0.2, 0)
    idx_te = Digits.split_indices(n, "test", 0.2, 0)
    assert sorted(torch.cat([idx_tr, idx_te]).tolist()) == list(range(n))  # disjoint and complete
    full = Digits(8, "all")
    assert torch.equal(tr.tensor(), full.tensor()[idx_tr]) and torch.equal(te.labels(), full.labels()[idx_te])
    # same seed -> same split; another seed -> another split
    assert torch.equal(Digits(8, "test", seed=0).tensor(), te.tensor())
    assert not torch.equal(Digits(8, "test", seed=1).labels(), te.labels())
    assert len(Digits(8, "test", test_fraction=0.5)) == round(0.5 * n)
    # the 16x16 split selects the same images as the 8x8 split
    assert torch.equal(Digits(16, "test").labels(), te.labels())


def test_sample_deterministic_given_generator():
    ds = Digits(16, "train")
    a = ds.sample(64, generator=torch.Generator().manual_seed(3))
    b = ds.sample(64, generator=torch.Generator().manual_seed(3))
    c = ds.sample(64, generator=torch.Generator().manual_seed(4))
    assert a.shape == (64, 1, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(ds(64, torch.Generator().manual_seed(3)), a)
    d = ds.sample(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert d.dtype == torch.float64


def test_sample_draws_from_the_split_with_labels():
    ds = Digits(8, "test")
    x, y = ds.sample(500, generator=torch.Generator().manual_seed(0), return_labels=True)
    assert x.shape == (500, 1, 8, 8) and y.shape == (500,)
    data, labels = ds.tensor().flatten(1), ds.labels()
    # every sample is an image of the split, with its label
    match = (x.flatten(1)[:, None, :] == data[None]).all(-1)  # (500, N)
    assert match.any(1).all()
    assert all(int(y[i]) in labels[match[i]].tolist() for i in range(500))
    # with replacement: 500 draws out of 359 images must repeat
    assert len({tuple(r.tolist()) for r in x.flatten(1)}) < 500


def test_tensor_returns_a_copy():
    ds = Digits(8, "train")
    x = ds.tensor()
    x.fill_(0)
    assert float(ds.tensor().min()) == -1.0


@pytest.mark.parametrize(
    "kwargs",
    [dict(size=12), dict(size=8.0), dict(split="val"), dict(test_fraction=0.0), dict(test_fraction=1.0)],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Digits(**kwargs)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_sample_count(n):
    with pytest.raises(ValueError):
        Digits(8).sample(n)


def test_config_round_trip():
    ds = Digits(16, "test", test_fraction=0.3, seed=5)
    assert torch.equal(Digits(**ds.config).tensor(), ds.tensor())


def test_load_dataset_digits_splits():
    train, test = load_dataset("digits16"), load_dataset("digits16", split="test")
    assert isinstance(train, Digits) and train.split == "train" and train.size == 16
    assert torch.equal(train.tensor(), Digits(16, "train").tensor())
    assert torch.equal(test.tensor(), Digits(16, "test").tensor())
    assert load_dataset("digits8").size == 8
