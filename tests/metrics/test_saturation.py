"""gmflow.metrics.saturation: closed-form values of every measure and bad input."""

from __future__ import annotations

import pytest
import torch

from gmflow.metrics import HALF_LEVEL, pixel_stats, pixel_w1, saturation_metrics


def _img(values, shape=(1, 2, 2)) -> torch.Tensor:
    """One image per row of ``values`` (reshaped to ``shape``)."""
    return torch.tensor(values, dtype=torch.float64).reshape(-1, *shape)


def test_fractions_at_and_beyond_the_range():
    # 8 pixels: two inside, one within half a level of black (rounds to level 0), one exactly -1, three
    # beyond, one just below the white bound (rounds to 254, inside)
    x = _img([[0.0, 0.5, -1.0 + 0.5 * HALF_LEVEL, -1.0], [1.2, -1.5, 1.0 + 1e-9, 1.0 - 1.5 * HALF_LEVEL]])
    s = pixel_stats(x)
    assert s.frac_bounds == pytest.approx(5 / 8)
    assert s.frac_beyond == pytest.approx(3 / 8)
    assert s.excess == pytest.approx((0.2 + 0.5 + 1e-9) / 8)
    assert s.num_images == 2


def test_mean_abs_and_contrast_closed_form():
    # image 1: +-a alternating (mean 0, std a); image 2: constant c (std 0)
    a, c = 0.6, -0.3
    x = _img([[a, -a, a, -a], [c, c, c, c]])
    s = pixel_stats(x)
    assert s.mean_abs == pytest.approx((a + abs(c)) / 2)
    assert s.contrast == pytest.approx(a / 2)  # mean of the per-image stds (a, 0)


def test_contrast_uses_the_population_std_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 4, 3, generator=g, dtype=torch.float64) * 2 - 1
    want = x.flatten(1).var(1, unbiased=False).sqrt().mean()
    assert pixel_stats(x).contrast == pytest.approx(float(want))


def test_w1_of_point_masses_and_of_a_shift():
    zeros, ones = torch.zeros(3, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert pixel_w1(zeros, ones) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    for c in (0.1, -0.35, 1.5):
        assert pixel_w1(x, x + c) == pytest.approx(abs(c), abs=1e-12)
    assert pixel_w1(x, x) == 0.0


def test_w1_with_unequal_sizes_and_repeated_values():
    # a: {0, 1} with weights (1/2, 1/2); b: {0, 0, 0, 1} -> weights (3/4, 1/4); |F_a - F_b| = 1/4 on [0, 1)
    a = _img([[0.0, 1.0]], shape=(1, 1, 2))
    b = _img([[0.0, 0.0, 0.0, 1.0]], shape=(1, 2, 2))
    assert pixel_w1(a, b) == pytest.approx(0.25)
    # uniform grid of n points vs the same grid scaled by 2 (both centred at 0): W1 = mean |v|
    v = torch.linspace(-0.5, 0.5, 11, dtype=torch.float64)
    assert pixel_w1(v.reshape(1, 1, 1, -1), (2 * v).reshape(1, 1, 1, -1)) == pytest.approx(
        float(v.abs().mean())
    )


def test_saturation_metrics_differences_and_precomputed_reference():
    ref = _img([[-1.0, -1.0, 0.0, 1.0]])
    x = _img([[-1.2, -1.0, 0.1, 1.3]])
    m = saturation_metrics(x, ref)
    assert m["ref_frac_bounds"] == pytest.approx(3 / 4) and m["ref_frac_beyond"] == m["ref_excess"] == 0.0
    assert m["excess"] == pytest.approx((0.2 + 0.3) / 4)
    assert m["frac_bounds"] == pytest.approx(3 / 4) and m["frac_beyond"] == pytest.approx(2 / 4)
    assert m["d_mean_abs"] == pytest.approx((1.2 + 1.0 + 0.1 + 1.3) / 4 - 3 / 4)
    assert m["d_frac_bounds"] == pytest.approx(0.0)
    assert m["d_contrast"] == pytest.approx(m["contrast"] - m["ref_contrast"])
    # sorted-matching of equal-size sets: W1 = mean |x_(i) - r_(i)| = (0.2 + 0 + 0.1 + 0.3) / 4
    assert m["pixel_w1"] == pytest.approx(0.15)
    assert saturation_metrics(x, pixel_stats(ref)) == m


def test_float32_input_and_real_data_are_inside_the_range():
    x = (torch.arange(256, dtype=torch.float32) / 127.5 - 1.0).reshape(1, 1, 16, 16)
    s = pixel_stats(x)
    assert s.frac_beyond == 0.0 and s.frac_bounds == pytest.approx(2 / 256)  # levels 0 and 255
    assert len(s.values) == 256 and float(s.weights.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "bad, err, match",
    [
        ([[0.0]], TypeError, "torch.Tensor"),
        (torch.zeros(2, 4), ValueError, r"\(N, C, H, W\)"),
        (torch.zeros(0, 1, 2, 2), ValueError, "N >= 1"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.int64), TypeError, "floating-point"),
        (torch.tensor([[[[0.0, float("nan")]]]]), ValueError, "non-finite"),
    ],
)
def test_bad_input_names_the_argument(bad, err, match):
    with pytest.raises(err, match=f"^samples.*{match}"):
        saturation_metrics(bad, torch.zeros(1, 1, 2, 2))
    with pytest.raises(err, match=f"^reference.*{match}"):
        saturation_metrics(torch.zeros(1, 1, 2, 2), bad)
    with pytest.raises(err, match=f"^images.*{match}"):
        pixel_stats(bad)
