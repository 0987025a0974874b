import math

import numpy as np
import pytest
import torch

from gmflow.data import Checkerboard
from gmflow.metrics import (
    REFERENCE_SEED,
    cell_mass_chi2,
    cell_mass_kl,
    cell_masses,
    checkerboard_metrics,
    histogram_kl,
    in_support_fraction,
    rbf_mmd,
    reference_set,
    sliced_w2,
    sliced_w2_mean,
    sw2_floor,
)
from gmflow.metrics.toy2d import _directions


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gauss(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=_gen(seed), dtype=torch.float64)


# ---------------------------------------------------------------- sliced W2


def test_sliced_w2_identical_is_zero_and_symmetric():
    x = _gauss(3000, 0)
    assert sliced_w2(x, x) == 0.0
    assert sliced_w2(x, x[torch.randperm(3000, generator=_gen(1))]) == pytest.approx(0.0, abs=1e-12)
    y = _gauss(3000, 2)
    assert sliced_w2(x, y) == pytest.approx(sliced_w2(y, x), rel=1e-12)
    assert sliced_w2(x.float(), y.float()) == pytest.approx(sliced_w2(x, y), rel=1e-5)


def test_sliced_w2_translation_exact():
    # y = x + m: each direction has W2 = |m . theta| exactly (same sorting order)
    x = _gauss(2000, 0)
    m = torch.tensor([1.0, -2.0], dtype=torch.float64)
    d = _directions(256, 5)
    expected = math.sqrt(float((d @ m).square().mean()))
    assert sliced_w2(x, x + m, seed=5) == pytest.approx(expected, rel=1e-9)
    # and the population value |m| / sqrt(2) for many directions
    assert sliced_w2(x, x + m, n_projections=4096) == pytest.approx(float(m.norm()) / math.sqrt(2), rel=0.03)


def test_sliced_w2_two_gaussians_closed_form():
    # independent draws of N(0, I) and N(m, I): SW2 -> |m| / sqrt(2) (plus finite-sample error)
    m = torch.tensor([2.0, 1.0], dtype=torch.float64)
    x, y = _gauss(10_000, 0), _gauss(10_000, 1) + m
    val = sliced_w2(x, y, n_projections=1024)
    assert val == pytest.approx(float(m.norm()) / math.sqrt(2), rel=0.04)


def _w2_sq_1d_bruteforce(a: np.ndarray, b: np.ndarray) -> float:
    """Integral of (Fa^-1 - Fb^-1)^2 on a fine uniform quantile grid (midpoint rule, grid divisible)."""
    a, b = np.sort(a), np.sort(b)
    q = (np.arange(len(a) * len(b)) + 0.5) / (len(a) * len(b))
    qa = a[np.floor(q * len(a)).astype(int)]
    qb = b[np.floor(q * len(b)).astype(int)]
    return float(np.mean((qa - qb) ** 2))


def test_sliced_w2_unequal_sizes_exact():
    x, y = _gauss(30, 0), _gauss(45, 1) * 1.5 + 0.3
    d = _directions(16, 0).numpy()
    brute = [_w2_sq_1d_bruteforce(x.numpy() @ t, y.numpy() @ t) for t in d]
    assert sliced_w2(x, y, n_projections=16, seed=0) == pytest.approx(math.sqrt(np.mean(brute)), rel=1e-9)
    # a set and its duplicate are the same empirical measure
    assert sliced_w2(x, torch.cat([x, x, x])) == pytest.approx(0.0, abs=1e-12)
    assert sliced_w2(x, x[:20]) > 0.01


def test_sliced_w2_determinism_and_seed_mean():
    x, y = _gauss(1000, 0), _gauss(1000, 1)
    assert sliced_w2(x, y, seed=3) == sliced_w2(x, y, seed=3)
    assert sliced_w2(x, y, seed=3) != sliced_w2(x, y, seed=4)
    mean = sliced_w2_mean(x, y)
    assert mean == pytest.approx(sum(sliced_w2(x, y, seed=s) for s in (0, 1, 2)) / 3, rel=1e-12)
    with pytest.raises(ValueError):
        sliced_w2_mean(x, y, seeds=())


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(10), torch.zeros(10, 3), torch.zeros(1, 2), torch.zeros(2, 2, 1)],
)
def test_bad_shapes_raise(bad):
    good = torch.zeros(10, 2)
    for fn in (sliced_w2, rbf_mmd, histogram_kl):
        with pytest.raises(ValueError):
            fn(bad, good)
        with pytest.raises(ValueError):
            fn(good, bad)


def test_non_finite_raises_for_distances():
    x = _gauss(100, 0)
    y = x.clone()
    y[3, 1] = float("nan")
    for fn in (sliced_w2, rbf_mmd, histogram_kl, sliced_w2_mean):
        with pytest.raises(ValueError, match="non-finite"):
            fn(x, y)
    with pytest.raises(ValueError):
        sliced_w2(x, x, n_projections=0)


def test_sw2_floor_matches_manual_protocol():
    cb = Checkerboard()
    f = sw2_floor(cb, 2000, seed=7)
    g = _gen(7)
    ref = cb.sample(2000, generator=g)
    other = cb.sample(2000, generator=g)
    assert f == pytest.approx(sliced_w2_mean(other, ref), rel=1e-12)
    assert sw2_floor(lambda n, gen: cb.sample(n, generator=gen), 2000, seed=7) == f
    # two real draws are close, a shifted set is far above the floor
    assert 0 < f < 0.3
    assert sliced_w2_mean(other + 0.5, ref) > 5 * f
    assert sw2_floor(cb, 2000, seed=7, repeats=3) > 0
    with pytest.raises(ValueError):
        sw2_floor(cb, 1)


def test_reference_set_is_the_seeded_protocol():
    assert REFERENCE_SEED == 20251121  # the protocol's seed: every published floor depends on it
    cb = Checkerboard()
    ref, floor = reference_set(cb, 500)
    g = _gen(REFERENCE_SEED)
    want = cb.sample(500, generator=g)
    assert torch.equal(ref, want)
    assert floor == sliced_w2_mean(cb.sample(500, generator=g), want)
    by_name = reference_set("checkerboard", 500)
    assert torch.equal(by_name[0], ref) and by_name[1] == floor
    assert sw2_floor(cb, 500) == floor
    other, floor3 = reference_set(cb, 500, seed=3, repeats=2)
    assert not torch.equal(other, ref) and floor3 > 0
    with pytest.raises(ValueError, match="unknown data set"):
        reference_set("checkers", 500)
    with pytest.raises(ValueError, match="repeats"):
        reference_set(cb, 500, repeats=0)


# ---------------------------------------------------------------- MMD


def test_rbf_mmd_same_vs_different():
    cb = Checkerboard()
    a = cb.sample(1000, generator=_gen(0))
    b = cb.sample(1000, generator=_gen(1))
    c = torch.randn(1000, 2, generator=_gen(2)) * 2.3  # same scale, different shape
    same, diff = rbf_mmd(a, b), rbf_mmd(a, c)
    assert abs(same) < 3e-3  # same law: sd of the estimate ~1e-3 at 1000 points
    assert diff > 0.03
    assert diff > 20 * abs(same)
    assert rbf_mmd(a, a + 1.0) > diff / 2
    assert rbf_mmd(a, b) == rbf_mmd(a, b)  # deterministic


def test_rbf_mmd_closed_form_single_points():
    # m = n = 2 with identical pairs: unbiased formula by hand, one bandwidth
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 2.0], [0.0, 3.0]])
    h = 1.0

    def k(a, b):
        return math.exp(-float((a - b).square().sum()) / (2 * h * h))

    kxx = 2 * k(x[0], x[1]) / 2
    kyy = 2 * k(y[0], y[1]) / 2
    kxy = sum(k(a, b) for a in x for b in y) / 4
    assert rbf_mmd(x, y, bandwidths=(h,)) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-12)


def test_rbf_mmd_subsampling():
    a, b = _gauss(600, 0), _gauss(600, 1)
    full = rbf_mmd(a, b, max_points=600)
    sub = rbf_mmd(a, b, max_points=300, seed=1)
    assert sub != full
    assert rbf_mmd(a, b, max_points=300, seed=1) == sub
    with pytest.raises(ValueError):
        rbf_mmd(a, b, bandwidths=(0.0,))


# ---------------------------------------------------------------- checkerboard cell metrics


def test_support_and_cell_metrics_on_real_data():
    x = Checkerboard().sample(40_000, generator=_gen(0))
    assert in_support_fraction(x) == 1.0
    p = cell_masses(x)
    assert p.shape == (8,) and float(p.sum()) == pytest.approx(1.0)
    assert torch.allclose(p, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.006)
    assert cell_mass_kl(x) < 2e-3
    assert cell_mass_chi2(x) < 24.3


def test_one_cell_and_outside_points():
    one = torch.full((100, 2), -3.0)  # all in cell 0
    assert cell_mass_kl(one) == pytest.approx(math.log(8))
    assert cell_masses(one)[0] == 1.0
    assert cell_mass_chi2(one) == pytest.approx(7 * 100)
    mixed = torch.cat([one, torch.full((100, 2), 5.0), torch.tensor([[float("nan"), 0.0]] * 50)])
    assert in_support_fraction(mixed) == pytest.approx(100 / 250)
    assert cell_masses(mixed)[0] == 1.0  # normalised by in-support points
    out = torch.full((10, 2), 9.0)
    assert in_support_fraction(out) == 0.0
    assert float(cell_masses(out).sum()) == 0.0
    assert cell_mass_kl(out) == pytest.approx(math.log(8))
    assert math.isnan(cell_mass_chi2(out))
    # two cells half/half: KL = log 8 - log 2
    two = torch.cat([torch.full((50, 2), -3.0), torch.full((50, 2), 3.0)])
    assert cell_mass_kl(two) == pytest.approx(math.log(4))
    with pytest.raises(ValueError):
        in_support_fraction(torch.zeros(4, 3))


def test_histogram_kl():
    cb = Checkerboard()
    a = cb.sample(20_000, generator=_gen(0))
    b = cb.sample(20_000, generator=_gen(1))
    assert histogram_kl(a, a) == pytest.approx(0.0, abs=1e-12)
    same = histogram_kl(a, b, bins=16)
    shifted = histogram_kl(a + torch.tensor([2.0, 0.0]), b, bins=16)
    assert same < 0.02
    assert shifted > 1.0
    # mass entirely in bins that y never visits costs about log(1 / eps)
    far = histogram_kl(torch.full((10, 2), 4.1), torch.full((10, 2), -4.1), bins=4, eps=1e-10)
    assert far == pytest.approx(math.log(1 / 1e-10), rel=1e-3)
    # points beyond the range are clamped into border bins, not dropped
    assert histogram_kl(torch.full((10, 2), 100.0), torch.full((10, 2), 4.1), bins=4) == pytest.approx(
        0.0, abs=1e-9
    )


def test_checkerboard_metrics_dict():
    cb = Checkerboard()
    ref = cb.sample(3000, generator=_gen(0))
    x = cb.sample(3000, generator=_gen(1))
    out = checkerboard_metrics(x, ref, floor=0.05)
    assert set(out) == {"n", "sw2", "sw2_ratio", "in_support", "cell_mass_kl", "cell_chi2"}
    assert out["sw2_ratio"] == pytest.approx(out["sw2"] / 0.05)
    assert out["in_support"] == 1.0
    assert all(isinstance(v, float) for v in out.values())
