import numpy as np
import pytest
import torch
from PIL import Image

from gmflow.data import make_toy2d
from gmflow.viz import histogram_grid, image_grid, metric_curves, sweep_panels


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_histogram_grid_writes_png(tmp_path):
    samples = {}
    for i, name in enumerate(["checkerboard", "moons", "swissroll"]):
        ds = make_toy2d(name)
        samples[name] = {1: ds.sample(3000, generator=_gen(i)), 4: ds.sample(3000, generator=_gen(10 + i))}
    del samples["moons"][4]  # missing cell -> blank
    samples["checkerboard"][4][0, 0] = float("nan")  # non-finite points are ignored
    path = histogram_grid(samples, tmp_path / "sub" / "hist.png", nfes=[1, 4, 8], bins=64, title="toy")
    assert path.exists() and path.stat().st_size > 1000
    w, h = Image.open(path).size
    assert w > 3 * 150 and h > 3 * 150  # 3 x 3 panels of 1.6 in at 150 dpi
    assert not list(path.parent.glob(".*.tmp"))  # no temp file left behind
    # row subset/order and a non-int column key
    p2 = histogram_grid(samples, tmp_path / "h2.png", nfes=[1, "data"], row_labels=["swissroll"])
    assert p2.stat().st_size > 1000


def test_histogram_grid_colour_scale_is_density_relative_to_checkerboard(tmp_path):
    # the real checkerboard fills its squares at density 1/32 -> value 1/vmax of the colour range;
    # check via a 1-row grid that the image is not saturated: mean over the squares is near 1/2.9
    x = make_toy2d("checkerboard").sample(200_000, generator=_gen(0))
    path = histogram_grid({"data": {1: x}}, tmp_path / "cb.png", nfes=[1], bins=50, range=4.0, panel_size=2.0)
    img = np.asarray(Image.open(path).convert("RGB")).astype(float)
    assert img.shape[0] > 100
    # viridis: dark purple (low) vs teal (~0.34); the image has both, and nothing bright yellow
    bright_yellow = (img[..., 0] > 200) & (img[..., 1] > 200) & (img[..., 2] < 100)
    assert bright_yellow.mean() < 0.01


def test_histogram_grid_bad_args(tmp_path):
    with pytest.raises(ValueError):
        histogram_grid({}, tmp_path / "x.png", nfes=[1])
    with pytest.raises(ValueError):
        histogram_grid({"a": {1: torch.zeros(5, 3)}}, tmp_path / "x.png", nfes=[1])


def test_metric_curves_writes_png(tmp_path):
    recs = [
        {"model": "gmflow", "K": 64, "solver": s, "order": o, "nfe": n, "sw2": 0.04 * (1 + o + 4 / n)}
        for s in ("gm-sde", "gm-ode")
        for o in (1, 2)
        for n in (1, 2, 4, 8)
    ]
    recs += [{"model": "fm", "solver": "euler", "nfe": n, "sw2": 2.0 / n} for n in (1, 2, 4, 8, 16, 32)]
    recs += [{"model": "fm", "solver": "euler", "nfe": 64, "sw2": float("nan")}, {"nfe": 2}]  # skipped
    path = metric_curves(recs, tmp_path / "curves.png", metric="sw2", floor=0.04, title="sw2")
    assert path.exists() and path.stat().st_size > 1000
    # many groups -> legend outside; negative values -> linear y
    many = [{"model": f"m{i}", "nfe": n, "score": n - 3.0 * i} for i in range(12) for n in (1, 2, 4)]
    assert metric_curves(many, tmp_path / "many.png", metric="score").stat().st_size > 1000
    with pytest.raises(ValueError, match="metric"):
        metric_curves(recs, tmp_path / "none.png", metric="fid")


def test_sweep_panels_writes_png_and_skips_missing_values(tmp_path):
    sweeps = {
        "cfg": [
            {"scale": w, "precision": 0.5 + 0.1 * w, "d_mean_abs": 0.02 * w, "w1": 0.1}
            for w in (1.0, 2.0, 3.0)
        ],
        "pg": [{"scale": s, "precision": 0.5 + s, "d_mean_abs": -0.01 * s} for s in (0.0, 0.2, 0.4)],
    }
    p = sweep_panels(sweeps, tmp_path / "s.png", xs=("d_mean_abs", "w1"), y="precision", label_key="scale",
                     vlines={"d_mean_abs": 0.0}, title="t")  # fmt: skip
    assert p.stat().st_size > 1000
    with pytest.raises(ValueError, match="no record"):
        sweep_panels(sweeps, tmp_path / "n.png", xs=("fd",), y="precision")
    with pytest.raises(ValueError, match="xs"):
        sweep_panels(sweeps, tmp_path / "n.png", xs=(), y="precision")


def test_image_grid(tmp_path):
    grey = torch.rand(10, 1, 8, 8, generator=_gen(0)) * 2 - 1
    p = image_grid(grey, tmp_path / "grey.png", nrow=4, padding=2, scale=4)
    im = Image.open(p)
    assert im.mode == "L"
    assert im.size == (4 * 32 + 5 * 2, 3 * 32 + 4 * 2)  # 4 per row, 3 rows
    arr = np.asarray(im)
    tile = arr[2 : 2 + 32 : 4, 2 : 2 + 32 : 4].astype(float)  # first image, one pixel per source pixel
    assert np.allclose(tile, np.round((grey[0, 0].numpy() + 1) * 127.5), atol=1)
    rgb = torch.rand(7, 3, 16, 16, generator=_gen(1)) * 2 - 1
    p2 = image_grid(rgb, tmp_path / "rgb.png", nrow=4)
    assert Image.open(p2).mode == "RGB" and p2.stat().st_size > 1000
    with pytest.raises(ValueError):
        image_grid(torch.zeros(2, 2, 8, 8), tmp_path / "bad.png", nrow=2)
    with pytest.raises(ValueError):
        image_grid(grey, tmp_path / "bad.png", nrow=0)


def test_metric_curves_continuous_x_uses_matplotlib_log_ticks(tmp_path):
    from matplotlib.ticker import FixedLocator

    import gmflow.viz as viz

    recs = [{"row": r, "ms": 9.5 * 1.7**i + r, "err": 1.0 / (i + 1)} for r in (0, 1) for i in range(8)]
    seen = {}
    orig = viz.save_figure

    def spy(fig, path, dpi):
        seen["locator"] = fig.axes[0].xaxis.get_major_locator()
        return orig(fig, path, dpi)

    viz.save_figure = spy
    try:
        assert metric_curves(recs, tmp_path / "c.png", metric="err", x="ms", group_keys=("row",)).exists()
        assert not isinstance(seen["locator"], FixedLocator)  # 16 distinct non-integer x: no label per point
        metric_curves([{"nfe": n, "e": 1.0 / n} for n in (1, 2, 4)], tmp_path / "n.png", metric="e")
        assert isinstance(seen["locator"], FixedLocator)
    finally:
        viz.save_figure = orig
