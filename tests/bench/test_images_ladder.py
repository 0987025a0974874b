"""``gmflow bench images --part ladder``: rows, best cells, Table 4 lines, the smoke run end to end."""

from __future__ import annotations

import json

import pytest

from gmflow.bench import images_ladder as lad
from gmflow.bench import images_ladder_report as rep
from gmflow.bench import images_setup
from gmflow.cli import main
from gmflow.experiments import load_run


def test_every_row_changes_one_thing_of_its_parent():
    rows = {r.id: r for r in lad.ROWS}
    fields = ("model", "solver", "order", "guidance", "spectral", "substeps")
    for row in lad.ROWS:
        if row.parent is None:
            continue
        diff = {f for f in fields if getattr(row, f) != getattr(rows[row.parent], f)}
        # A4 swaps the solver family, which also takes away the GM-only knobs (order 2, spectral, w~)
        want = {"solver", "order", "guidance", "spectral"} if row.id == "A4" else None
        assert diff == want if want else len(diff) == 1, (row.id, diff)


def test_preset_scales_are_validated():
    with pytest.raises(ValueError, match="cfg_scales"):
        lad.LadderPreset("x", cfg_scales=(1.0, 2.0), pg_scales=(0.3,), n_eval=10)
    with pytest.raises(ValueError, match="pg_scales"):
        lad.LadderPreset("x", cfg_scales=(2.0,), pg_scales=(0.0, 0.3), n_eval=10)


def test_model_configs_differ_only_in_lambda_and_directory(tmp_path):
    pr = images_setup.PRESETS["quick"]
    cfgs = lad.model_configs(pr, tmp_path, 0)
    a, b = cfgs["lambda0.5"].to_dict(), cfgs["lambda1"].to_dict()
    assert a["loss"]["trans_ratio"] == 0.5 and b["loss"]["trans_ratio"] == 1.0
    assert a["model"]["spectral"] and a["model"]["num_components"] == 8
    a["loss"].pop("trans_ratio"), b["loss"].pop("trans_ratio")
    a["loop"].pop("out_dir"), b["loop"].pop("out_dir")
    assert a == b and a["loop"]["steps"] == pr.steps


def _rec(rid, scale, fd, prec, draw=0):
    return {"row": rid, "scale": scale, "draw": draw, "fd": fd, "precision": prec, "class_acc": 0.5,
            "d_mean_abs": 0.01, "d_contrast": 0.02, "pixel_w1": 0.03, "recall": 0.1, "ms": 1.0}  # fmt: skip


def test_best_cells_and_table_deltas():
    recs = [_rec("A0", 0.0, 30.0, 0.70), _rec("A0", 0.2, 20.0, 0.60), _rec("A0", 0.4, 25.0, 0.80),
            _rec("A0", 0.2, 24.0, 0.6, draw=1), _rec("A1", 0.0, 40.0, 0.75),
            _rec("A1", 0.2, 35.0, 0.7)]  # fmt: skip
    assert rep.best_fd_scale(recs, "A0") == 0.2
    s = rep.row_summary(recs, "A0")
    assert s["best_fd"] == 22.0 and s["fd_draws"] == 2 and s["best_prec"] == 0.80 and s["prec_scale"] == 0.4
    lines = rep.table4_lines(recs, lad.ROWS)
    assert len(lines) == 4  # header, rule, A0, A1 (the other rows have no cells)
    assert "22.0 ± 2.8 (2)" in lines[2] and "35.0 (1) (+13.0)" in lines[3] and "0.750 (-0.050)" in lines[3]
    (line,) = rep.summary_lines(recs, lad.ROWS)
    assert line.startswith("A1") and "worse" in line
    with pytest.raises(ValueError, match="A2"):
        rep.best_fd_scale(recs, "A2")


@pytest.mark.slow
def test_smoke_run_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "images", "--part", "ladder", "--preset", "smoke", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    res = out / "ladder"
    records = json.loads((res / "results.json").read_text())
    lp = lad.LADDER_PRESETS["smoke"]
    assert len(records) == len(lad.sweep_cells(lp)) + len(lad.ROWS) * (lp.draws - 1)
    for row in lad.ROWS:  # the repeats are at the row's best draw-0 FD
        again = [r for r in records if r["row"] == row.id and r["draw"] > 0]
        assert [r["scale"] for r in again] == [rep.best_fd_scale(records, row.id)] * (lp.draws - 1)
    guided = [r for r in records if r["scale"] != images_setup.UNGUIDED[r["guidance"]]]
    assert guided and all(r["batch_factor"] == 2 for r in guided)
    assert all({"fd", "precision", "class_acc", "d_mean_abs"} <= set(r) for r in records)
    for name, lam in (("lambda0.5", 0.5), ("lambda1", 1.0)):
        run = load_run(res / "models" / name)
        assert run.config.loss.trans_ratio == lam and run.config.model.spectral
    text = (res / "results.md").read_text()
    assert "## Table 4 analogue" in text and all(f"| {r.id} |" in text for r in lad.ROWS)
    assert (res / "fd_vs_precision.png").stat().st_size > 1000
    assert len(list(res.glob("samples_*.png"))) == len(lad.ROWS)
    capsys.readouterr()
    assert main(args) == 0  # resume: nothing retrained, no new cells
    assert json.loads((res / "results.json").read_text()) == records
    assert capsys.readouterr().err.count("already trained") == 2
    stale = [{**r, "key": "another-run"} if i == 0 else r for i, r in enumerate(records)]
    (res / "results.json").write_text(json.dumps(stale))
    assert main(args) == 0  # a record of another run key is scored again, the rest kept
    again = json.loads((res / "results.json").read_text())
    assert len(again) == len(records) and again[:-1] == records[1:] and again[-1]["key"] == records[0]["key"]
