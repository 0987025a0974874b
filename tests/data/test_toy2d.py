import importlib.util
import math

import pytest
import torch

from gmflow.data import DATASETS, TOY2D_NAMES, Checkerboard, SwissRoll, TwoMoons, load_dataset, make_toy2d


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_checkerboard_support_and_uniform_split():
    cb = Checkerboard()
    n = 80_000
    x = cb.sample(n, generator=_gen(0))
    assert x.shape == (n, 2) and x.dtype == torch.float32
    assert x.abs().max() <= 4.0
    assert cb.in_support(x).all()
    idx = cb.cell_index(x)
    assert idx.min() == 0 and idx.max() == 7
    counts = torch.bincount(idx, minlength=8).double()
    # Pearson chi-square with 7 d.o.f.: P(chi2 > 24.3) = 0.001
    chi2 = float(((counts - n / 8) ** 2 / (n / 8)).sum())
    assert chi2 < 24.3
    # uniform inside each cell: the position within the cell (side 2) is U(0, 2)^2
    frac = torch.remainder(x.double() + 4.0, 2.0)
    assert torch.allclose(frac.mean(0), torch.ones(2, dtype=torch.float64), atol=0.02)
    assert torch.allclose(frac.var(0), torch.full((2,), 4 / 12, dtype=torch.float64), atol=0.02)


def test_checkerboard_cells_layout():
    cb = Checkerboard()
    pts = torch.tensor(
        [
            [-3.5, -3.5],  # bottom-left square: kept, cell 0
            [-1.5, -3.5],  # its right neighbour: empty
            [0.5, 0.5],  # (+, +) around the origin: kept
            [-0.5, -0.5],  # (-, -): kept
            [-0.5, 0.5],  # (-, +): empty
            [0.5, -0.5],  # (+, -): empty
            [3.5, 3.5],  # top-right: kept, cell 7
            [4.0, 4.0],  # outer corner (float rounding of a sample can land here): inside
            [4.5, 0.0],  # outside the board
            [float("nan"), 0.0],
            [float("inf"), 1.0],
        ]
    )
    idx = cb.cell_index(pts)
    assert idx.tolist() == [0, -1, 5, 2, -1, -1, 7, 7, -1, -1, -1]
    assert cb.in_support(pts).tolist() == [i >= 0 for i in idx.tolist()]
    # other scales rescale the board
    assert Checkerboard(scale=1.0).cell_index(pts / 4).tolist()[:7] == idx.tolist()[:7]


def test_checkerboard_cell_index_matches_cells_table():
    cb = Checkerboard()
    centres = (-1.0 + 0.5 * (Checkerboard.cells().double() + 0.5)) * 4.0
    assert cb.cell_index(centres).tolist() == list(range(8))
    with pytest.raises(ValueError):
        cb.cell_index(torch.zeros(3, 3))


@pytest.mark.parametrize("name", ["checkerboard", "moons", "swissroll"])
def test_determinism_shapes_and_range(name):
    ds = make_toy2d(name)
    assert ds.name == name and ds.dim == 2
    a = ds.sample(5000, generator=_gen(3))
    b = ds.sample(5000, generator=_gen(3))
    c = ds.sample(5000, generator=_gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (5000, 2) and torch.isfinite(a).all()
    assert a.abs().max() < 4.5
    assert a.std(0).min() > 0.5  # spread over the box, not collapsed
    d = ds.sample(7, generator=_gen(3), dtype=torch.float64, device="cpu")
    assert d.dtype == torch.float64 and d.shape == (7, 2)
    assert torch.equal(ds(11, _gen(5)), ds.sample(11, generator=_gen(5)))


def test_moons_and_swissroll_geometry():
    m = TwoMoons(noise=0.0, scale=1.0).sample(2000, generator=_gen(0)).double()
    # noise-free moons: every point is on the upper unit circle or the lower shifted one
    p = m + torch.tensor([0.5, 0.25], dtype=torch.float64)
    r_up = p.norm(dim=1)
    r_lo = (p - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1)
    assert torch.minimum((r_up - 1).abs(), (r_lo - 1).abs()).max() < 1e-5
    assert 0.45 < float((r_lo - 1).abs().lt(1e-5).double().mean()) < 0.55
    s = SwissRoll(noise=0.0, scale=1.0).sample(2000, generator=_gen(0)).double()
    r = s.norm(dim=1)  # radius equals the angle parameter t in [1.5 pi, 4.5 pi]
    assert r.min() >= 1.5 * math.pi - 1e-4 and r.max() <= 4.5 * math.pi + 1e-4
    ang = torch.atan2(s[:, 1], s[:, 0])
    assert torch.allclose(torch.cos(ang), torch.cos(r), atol=1e-4)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", None, True])
def test_bad_n_raises(bad):
    with pytest.raises(ValueError, match="n"):
        Checkerboard().sample(bad)


def test_bad_constructor_and_dtype():
    with pytest.raises(ValueError):
        Checkerboard(scale=0.0)
    with pytest.raises(ValueError):
        TwoMoons(noise=-1.0)
    with pytest.raises(ValueError):
        SwissRoll(scale=-2.0)
    with pytest.raises(ValueError):
        Checkerboard().sample(4, dtype=torch.int64)


def test_make_toy2d_names_and_errors():
    assert set(TOY2D_NAMES) == {"checkerboard", "moons", "swissroll", "ring"}
    assert isinstance(make_toy2d("Checkerboard", scale=2.0), Checkerboard)
    assert make_toy2d("checkerboard", scale=2.0).scale == 2.0
    with pytest.raises(ValueError, match="swissroll"):
        make_toy2d("spirals")


def test_ring_via_gmm_module():
    if importlib.util.find_spec("gmflow.data.gmm") is None:
        pytest.skip("gmflow.data.gmm not written yet")
    ds = make_toy2d("ring")
    x = ds.sample(4000, generator=_gen(0))
    assert x.shape == (4000, 2)
    r = x.double().norm(dim=1)
    assert abs(float(r.mean()) - 4.0) < 0.1
    assert torch.equal(x, ds.sample(4000, generator=_gen(0)))


def test_load_dataset_by_name():
    assert set(TOY2D_NAMES) <= set(DATASETS)
    cb = load_dataset(" Checkerboard ", scale=2.0)
    assert isinstance(cb, Checkerboard) and cb.scale == 2.0
    ring = load_dataset("ring")
    assert torch.equal(ring.sample(5, generator=_gen(1)), make_toy2d("ring").sample(5, generator=_gen(1)))
    with pytest.raises(ValueError, match="unknown data set 'moon'; valid names: checkerboard, moons"):
        load_dataset("moon")
