"""``gmflow bench images --preset smoke``: records, tables, figures and resumption end to end."""

from __future__ import annotations

import json

import pytest

from gmflow.bench import images, images_setup
from gmflow.bench.images_ladder import LADDER_PRESETS
from gmflow.bench.images_nll import NLL_PRESETS
from gmflow.cli import main

pytestmark = pytest.mark.slow


def test_smoke_preset_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "images", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())
    pr = images.PRESETS["smoke"]
    cells = {(r["model"], r["solver"], r["order"], r["nfe"], r["draw"]) for r in records}
    assert len(cells) == len(records) == len(images._cells(pr))
    keys = {"model", "K", "solver", "order", "nfe", "fd", "precision", "recall", "class_acc"}
    assert all(keys <= set(r) for r in records)
    assert {r["solver"] for r in records} == {s for s, _ in images.FM_SOLVERS + images.GM_SOLVERS}
    head = [r for r in records if r["model"] == "gmflow" and r["nfe"] == pr.headline[0]]
    assert {r["draw"] for r in head} == set(range(pr.draws))  # the headline rows are repeated
    text = (out / "results.md").read_text()
    assert "FD (test split" in text and "| gmflow | gm-sde | 2 |" in text
    for name in ("fd_vs_nfe.png", "precision_vs_nfe.png", "class_acc_vs_nfe.png"):
        assert (out / name).stat().st_size > 1000
    for model, solver, order, nfe in images.grid_cells(records, pr):
        assert (out / f"samples_{model}_{solver}_o{order}_nfe{nfe}.png").stat().st_size > 500
    meta = json.loads((out / "meta.json").read_text())
    assert meta["step_time"]["ratio"] > 0
    # re-running reuses the trained models and the scored cells
    before = (out / "models" / "gmflow" / "checkpoint.json").read_text()
    capsys.readouterr()
    assert main(["bench", "images", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    assert (out / "models" / "gmflow" / "checkpoint.json").read_text() == before
    assert json.loads((out / "results.json").read_text()) == records
    assert "already trained" in capsys.readouterr().err


def _rec(model, solver, order, nfe, fd):
    return {"model": model, "solver": solver, "order": order, "nfe": nfe, "fd": fd}


def test_grids_show_each_models_best_solver_at_the_headline_nfes():
    pr = images.PRESETS["quick"]  # headline: GMFlow NFE 4 vs FM NFE 8
    records = [
        _rec("gmflow", "gm-sde", 2, 4, 150.0), _rec("gmflow", "gm-ode", 2, 4, 140.0),
        _rec("gmflow", "gm-ode", 2, 4, 142.0), _rec("gmflow", "gm-sde", 2, 4, 130.0),  # mean 140 vs 141
        _rec("fm", "heun", 1, 8, 148.0), _rec("fm", "dpm++2m", 1, 8, 146.0),
        _rec("fm", "euler", 1, 4, 200.0), _rec("fm", "dpm-solver-2", 1, 4, 180.0),
        _rec("gmflow", "gm-sde", 2, 8, 100.0),  # not a headline NFE of GMFlow
    ]  # fmt: skip
    assert images.grid_cells(records, pr) == [
        ("gmflow", "gm-sde", 2, 4), ("fm", "dpm++2m", 1, 8), ("fm", "dpm-solver-2", 1, 4)
    ]  # fmt: skip
    assert images.grid_cells([], pr) == []


def _acc(model, solver, order, nfe, draw, acc):
    return {**_rec(model, solver, order, nfe, 100.0), "draw": draw, "class_acc": acc}


def test_class_accuracy_check_repeats_the_first_draws_best_fm_solver():
    pr = images.PRESETS["quick"]  # top NFE 16, 3 draws; headline GMFlow NFE 4 vs FM NFE 8
    records = [
        _acc("fm", "euler", 1, 16, 0, 0.70), _acc("fm", "ddpm", 1, 16, 0, 0.74),
        _acc("fm", "heun", 1, 16, 0, 0.72), _acc("fm", "ddpm", 1, 8, 0, 0.90),
        _acc("gmflow", "gm-sde", 2, 16, 0, 0.95), _acc("gmflow", "gm-ode", 2, 4, 0, 0.85),
    ]  # fmt: skip
    assert images._class_acc_cells(pr, records) == [("fm", "ddpm", 1, 16, d) for d in range(3)]
    assert images._class_acc_cells(pr, []) == []  # nothing to choose from before the first draw
    records += [_acc("fm", "ddpm", 1, 16, 1, 0.80), _acc("fm", "ddpm", 1, 16, 2, 0.77)]
    line = images.summary_lines(records, pr)[-1]
    assert "77.00 ± 3.00 % of the time over 3 noise draws (74.0% / 80.0% / 77.0%; ddpm" in line


def test_parts_measured_on_an_earlier_recipe_pin_its_trunk_and_lr():
    quick = images_setup.PRESETS["quick"]
    for part in (LADDER_PRESETS["quick"], NLL_PRESETS["quick"]):
        pr = images_setup.pinned(quick, part.trunk, part.lr)
        assert (pr.trunk, pr.lr) == (images_setup.NARROW_TRUNK, 1e-3) != (quick.trunk, quick.lr)
        assert pr.steps == quick.steps and pr.data == quick.data
    full = images_setup.PRESETS["full"]
    assert images_setup.pinned(full, LADDER_PRESETS["full"].trunk, LADDER_PRESETS["full"].lr) == full


def test_model_configs_train_both_models_with_the_presets_ema(tmp_path):
    from gmflow.experiments import get_preset

    full = images_setup.model_configs(images_setup.PRESETS["full"], tmp_path, 0)
    quick = images_setup.model_configs(images_setup.PRESETS["quick"], tmp_path, 0)
    assert {c.loop.ema_rampup for c in full.values()} == {images_setup.PRESETS["full"].ema_rampup} == {0.025}
    assert {c.loop.ema_rampup for c in quick.values()} == {get_preset("fmnist-fm").loop.ema_rampup} == {0.05}
