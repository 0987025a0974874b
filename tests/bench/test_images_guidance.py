"""``gmflow bench images --part guidance``: cells, equal-level interpolation, the smoke run end to end."""

from __future__ import annotations

import json

import pytest

from gmflow.bench import images_guidance as ig
from gmflow.bench import images_guidance_report as rep
from gmflow.bench import images_setup
from gmflow.cli import main
from gmflow.experiments import run_experiment


def _rec(kind, orth, scale, precision, sat, draw=0):
    """A record whose saturation measures all equal ``sat`` (and class_acc = precision)."""
    r = dict(kind=kind, orthogonal=orth, scale=scale, draw=draw, precision=precision, recall=0.5,
             class_acc=precision, fd=10.0)  # fmt: skip
    return {**r, **{k: sat for k, _, _ in rep.SATURATION}}


def _records():
    out = [_rec("none", None, None, 0.5, 0.0)]
    out += [_rec("cfg", 1.0, w, p, s) for w, p, s in ((2.0, 0.7, 0.2), (3.0, 0.9, 0.6))]
    out += [_rec("probabilistic", 1.0, w, p, s) for w, p, s in ((0.2, 0.6, 0.01), (0.4, 0.8, 0.03))]
    return out


def test_cells_cover_every_sweep_point_and_one_unguided_cell_per_draw():
    gp = ig.GUIDANCE_PRESETS["smoke"]
    c = ig.cells(gp)
    per_draw = 1 + len(gp.orthogonal) * (len(gp.cfg_scales) + len(gp.pg_scales))
    assert len(c) == len(set(c)) == gp.draws * per_draw
    assert sum(k == "none" for k, *_ in c) == gp.draws


def test_sweeps_start_at_the_unguided_point_and_draws_are_averaged():
    recs = _records() + [{**_records()[1], "draw": 1, "precision": 0.5}]  # a second draw of CFG w = 2
    sw = rep.sweeps(recs)
    assert [p["scale"] for p in sw[("cfg", 1.0)]] == [1.0, 2.0, 3.0]
    assert [p["scale"] for p in sw[("probabilistic", 1.0)]] == [0.0, 0.2, 0.4]
    assert sw[("cfg", 1.0)][1]["precision"] == pytest.approx(0.6) and sw[("cfg", 1.0)][1]["draws"] == 2


def test_crossing_interpolates_linearly_in_the_matched_metric():
    sw = rep.sweeps(_records())
    c = rep.crossing(sw[("cfg", 1.0)], "precision", 0.8)  # halfway between w = 2 (0.7) and 3 (0.9)
    assert c["scale"] == pytest.approx(2.5) and c["pixel_w1"] == pytest.approx(0.4)
    assert rep.crossing(sw[("cfg", 1.0)], "precision", 0.95) is None
    assert rep.crossing(sw[("cfg", 1.0)], "precision", 0.5)["scale"] == pytest.approx(1.0)


def test_equal_level_rows_and_the_comparison_verdict():
    sw = rep.sweeps(_records())
    rows = rep.equal_level_rows(sw, "precision", n_levels=3)  # levels above 0.5 up to min(0.9, 0.8)
    assert [r["level"] for r in rows] == pytest.approx([0.6, 0.7, 0.8])
    assert rows[0]["cfg"]["scale"] == pytest.approx(1.5) and rows[0]["pg"]["scale"] == pytest.approx(0.2)
    assert rows[2]["cfg"]["d_mean_abs"] == pytest.approx(0.4) and rows[2]["pg"][
        "d_mean_abs"
    ] == pytest.approx(0.03)
    lines, summary = rep._comparison(rows, "precision")
    n = 3 * len(rep.SATURATION)
    assert f"saturates less on {n} of {n}" in summary and len(lines) == 2 + 3
    # a sweep that never exceeds the unguided value gives no level
    flat = rep.sweeps([_rec("none", None, None, 0.9, 0.0), *_records()[1:]])
    assert rep.equal_level_rows(flat, "precision")[0]["level"] is None


@pytest.mark.slow
def test_smoke_run_reuses_the_main_model_and_resumes(tmp_path, capsys):
    out = tmp_path / "bench"
    cfg = images_setup.model_configs(images_setup.PRESETS["smoke"], out, 0)["gmflow"]
    run_experiment(cfg, progress=False)  # what `gmflow bench images --preset smoke` trains first
    before = (out / "models" / "gmflow" / "checkpoint.json").read_text()
    capsys.readouterr()
    args = ["bench", "images", "--part", "guidance", "--preset", "smoke", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "already trained" in capsys.readouterr().err  # the main part's model is reused
    res = out / "guidance"
    records = json.loads((res / "results.json").read_text())
    gp = ig.GUIDANCE_PRESETS["smoke"]
    assert len(records) == len(ig.cells(gp))
    assert {(r["kind"], r["batch_factor"]) for r in records} == {
        ("none", 1),
        ("cfg", 2),
        ("probabilistic", 2),
    }
    keys = {"precision", "recall", "class_acc", "fd", "nfe", *(k for k, _, _ in rep.SATURATION)}
    assert all(keys <= set(r) for r in records) and all(r["nfe"] == gp.nfe for r in records)
    text = (res / "results.md").read_text()
    assert "Table 2 analogue" in text and "At equal precision" in text and "doubled batch" in text
    pngs = ["precision_vs_saturation.png", "samples_none.png", "samples_cfg_o1_s4.png",
            "samples_probabilistic_o0_s0.6.png"]  # fmt: skip
    assert all((res / p).stat().st_size > 500 for p in pngs)
    stamps = {p: (res / p).stat().st_mtime_ns for p in pngs[1:]}
    assert main(args) == 0  # resume: no new cells, no retraining, grids kept
    assert json.loads((res / "results.json").read_text()) == records
    assert (out / "models" / "gmflow" / "checkpoint.json").read_text() == before
    assert {p: (res / p).stat().st_mtime_ns for p in pngs[1:]} == stamps


def test_unknown_part_and_preset_are_usage_errors(tmp_path, capsys):
    assert main(["bench", "images", "--part", "nope", "--out", str(tmp_path)]) == 2
    assert "--part" in capsys.readouterr().err
    assert main(["bench", "images", "--part", "guidance", "--preset", "huge", "--out", str(tmp_path)]) == 2
    assert "unknown benchmark preset 'huge'" in capsys.readouterr().err
