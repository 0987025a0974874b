"""``gmflow bench images --part guided``: sweep cells, best-cell selection, the smoke run end to end."""

from __future__ import annotations

import json

import pytest

from gmflow.bench import images_guided as ig
from gmflow.bench import images_setup
from gmflow.bench.images_setup import UNGUIDED
from gmflow.cli import main


def test_sweep_cells_cover_both_models_at_their_headline_nfe():
    gp = ig.GUIDED_PRESETS["quick"]
    cells = ig.sweep_cells(gp, (4, 8))
    gm = [c for c in cells if c[0] == "gmflow"]
    fm = [c for c in cells if c[0] == "fm"]
    assert [c[4] for c in gm] == list(gp.pg_scales) and {c[1:4] for c in gm} == {("gm-ode", 2, 4)}
    assert len(fm) == len(gp.fm_solvers) * len(gp.cfg_scales) and {c[3] for c in fm} == {8}
    assert UNGUIDED["cfg"] in gp.cfg_scales and UNGUIDED["probabilistic"] in gp.pg_scales


def test_best_cells_come_from_draw_0_and_the_headline_from_fresh_draws():
    def rec(model, scale, draw, fd, solver="heun"):
        return dict(model=model, solver=solver, order=1, nfe=8, scale=scale, draw=draw, fd=fd, class_acc=0.5,
                    batch_factor=1 if scale == 1.0 else 2)  # fmt: skip

    records = [
        rec("fm", 1.0, 0, float("nan")), rec("fm", 1.0, 0, 50.0, solver="dpm++2m"), rec("fm", 3.0, 0, 40.0),
        rec("fm", 3.0, 0, 45.0, solver="dpm++2m"), rec("fm", 3.0, 1, 44.0), rec("fm", 3.0, 2, 46.0),
        rec("fm", 1.0, 1, 10.0),  # a later draw never changes the choice
    ]  # fmt: skip
    assert ig.best_cells(records) == {"fm": ("fm", "heun", 1, 8, 3.0)}  # NaN never wins
    row = ig.headline_rows(records)["fm"]
    assert row["fds"] == [44.0, 46.0] and row["batch_factor"] == 2  # draw 0 (the selection) left out
    assert ig.headline_rows(records[:4]) == {}  # no fresh draw yet


@pytest.mark.slow
def test_smoke_run_reuses_the_main_models_and_resumes(tmp_path, capsys):
    out = tmp_path / "bench"
    gp = ig.GUIDED_PRESETS["smoke"]
    args = ["bench", "images", "--part", "guided", "--preset", "smoke", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "training it" in capsys.readouterr().out
    res = out / "guided"
    records = json.loads((res / "results.json").read_text())
    n_sweep = len(ig.sweep_cells(gp, images_setup.PRESETS["smoke"].headline))
    assert len(records) == n_sweep + 2 * gp.draws
    for r in records:
        unguided = r["scale"] == UNGUIDED[ig.KIND[r["model"]]]
        assert r["guidance"] == ("none" if unguided else ig.KIND[r["model"]])
        assert r["batch_factor"] == (1 if unguided else 2) and (r["seed"], r["n_eval"]) == (0, gp.n_eval)
        assert {"fd", "precision", "recall", "class_acc"} <= set(r)
    best = ig.best_cells(records)
    for name, cell in best.items():  # the best cell of the sweep is the one scored on the fresh draws
        again = [r for r in records if r["draw"] > 0 and r["model"] == name]
        assert sorted(r["draw"] for r in again) == [1, 2]
        assert all((r["solver"], r["order"], r["nfe"], r["scale"]) == cell[1:] for r in again)
    text = (res / "results.md").read_text()
    assert "guided FD (test split, 2 fresh noise draws)" in text and "doubled batch" in text
    pngs = ["fd_vs_scale.png", *(ig._grid_name(c) for c in best.values())]
    assert all((res / p).stat().st_size > 500 for p in pngs)
    stamps = {p: (res / p).stat().st_mtime_ns for p in pngs[1:]}
    capsys.readouterr()
    assert main(args) == 0  # resume: the models are reused, no new cells, grids kept
    assert "reused" in capsys.readouterr().out
    assert json.loads((res / "results.json").read_text()) == records
    assert {p: (res / p).stat().st_mtime_ns for p in pngs[1:]} == stamps
    assert main([*args, "--seed", "1"]) == 2  # results of another seed are not mixed in
    assert "another --seed" in capsys.readouterr().err


def test_unguided_cells_are_copied_from_the_main_part(tmp_path):
    pr, gp = images_setup.PRESETS["smoke"], ig.GUIDED_PRESETS["smoke"]
    gm_nfe, fm_nfe = pr.headline
    main_records = [
        dict(model="fm", solver="heun", order=1, nfe=fm_nfe, draw=0, fd=5.0, precision=0.5, recall=0.4,
             class_acc=0.3, nonfinite=0, ms=1.0),
        dict(model="fm", solver="heun", order=1, nfe=fm_nfe, draw=1, fd=6.0, precision=0.5, recall=0.4,
             class_acc=0.3, nonfinite=0, ms=1.0),  # another draw: not the sweep's noise
        dict(model="gmflow", solver="gm-sde", order=2, nfe=gm_nfe, draw=0, fd=7.0, precision=0.5,
             recall=0.4, class_acc=0.3, nonfinite=0, ms=1.0),  # not the part's GM solver
    ]  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(main_records))
    (tmp_path / "meta.json").write_text(json.dumps({"seed": 0}))
    records: list[dict] = []
    assert ig.reuse_main_cells(records, tmp_path, pr, gp, seed=1) == 0  # another seed: other noise
    assert ig.reuse_main_cells(records, tmp_path, pr, gp, seed=0) == 1
    (r,) = records
    assert (r["model"], r["scale"], r["guidance"], r["fd"], r["from_main"]) == ("fm", 1.0, "none", 5.0, True)
    assert ig.reuse_main_cells(records, tmp_path, pr, gp, seed=0) == 0  # already there
