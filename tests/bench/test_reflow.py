"""``gmflow bench reflow``: the smoke preset end to end, reuse on re-run, and the report helpers."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from gmflow.bench import reflow as bench
from gmflow.bench.reflow_beds import BenchPreset, Sizes
from gmflow.bench.reflow_report import draw_means
from gmflow.config import ConfigError


def _args(out, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    ns = p.parse_args(["--preset", "smoke", "--out", str(out), "--threads", "1", "--no-progress"])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


@pytest.mark.slow
def test_smoke_run_writes_results_and_reuses_them(tmp_path, capsys):
    assert bench.run(_args(tmp_path)) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert {r["dataset"] for r in records} == {"checkerboard", "ring"}
    for r in records:
        for key in ("dataset", "variant", "nfe", "sw2", "sw2_floor", "rel_change", "prev_variant"):
            assert key in r, key
        assert r["sw2"] > 0 and r["sw2_floor"] > 0
    variants = [r["variant"] for r in records if r["dataset"] == "ring" and r["nfe"] == 1]
    assert variants == [
        "teacher", "2rf", "+norm", "+pow10", "+forward", "+projection", "+sigmoid", "+dpm", "full", "recipe"
    ]  # fmt: skip
    for r in records:  # NFE (main + guide): AutoGuidance's guide calls are counted
        assert (r["nfe_main"], r["nfe_guide"]) == (r["nfe"], r["nfe"] if r["variant"] == "full" else 0)
        assert r["nfe_total"] == r["nfe_main"] + r["nfe_guide"]
    assert {r["nfe"] for r in records} == set(bench.PRESETS["smoke"].nfes)
    by = {(r["dataset"], r["variant"], r["nfe"]): r for r in records}
    assert by[("ring", "+projection", 1)]["prev_variant"] == "+forward"  # a branch off +forward
    assert by[("ring", "+sigmoid", 1)]["prev_variant"] == "+forward"
    # the shipped 2-D recipe is the ladder's +forward student (reused, not retrained), sampled like +dpm
    assert by[("ring", "recipe", 1)]["prev_variant"] == "2rf"
    assert by[("ring", "recipe", 2)]["sw2"] == by[("ring", "+dpm", 2)]["sw2"]
    assert not (tmp_path / "students" / "ring" / "recipe").exists()
    r = by[("ring", "+forward", 2)]
    assert r["prev_variant"] == "+pow10"
    prev = by[("ring", "+pow10", 2)]["sw2"]
    assert r["rel_change"] == pytest.approx((r["sw2"] - prev) / prev)
    text = (tmp_path / "results.md").read_text()
    assert "## ring: sw2" in text and "Headline" in text and "| full |" in text
    assert "NFE (main + guide) |" in text and "| 1+1, 2+2 |" in text
    diag = json.loads((tmp_path / "diagnostics.json").read_text())
    assert set(diag["ring"]["straightness"]) == {"teacher", "2rf", "full"}
    assert len(diag["ring"]["relative_loss"]["reflow_2rf_pairs"]["max"]) == 11
    for f in ("ring_sw2_vs_nfe.png", "checkerboard_histograms.png", "ring_relative_loss.png"):
        assert (tmp_path / f).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "headline" in out and "ring (sw2): NFE 1" in out
    # a second run reuses teachers, pairs, students and evaluations: none of their files is rewritten
    stamp = _stamps(tmp_path)
    assert any("students" in p.parts for p in stamp) and any("cache" in p.parts for p in stamp)
    assert bench.run(_args(tmp_path, datasets=["ring"])) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert [x["sw2"] for x in again] == [x["sw2"] for x in records if x["dataset"] == "ring"]
    assert _stamps(tmp_path) == stamp


def _stamps(out) -> dict:
    """Modification times of every file the benchmark reuses (teachers, pairs, students, evaluations);
    the content of training logs (a finished run that is asked to train again rewrites its log as is)."""
    dirs = [out / d for d in ("teachers", "pairs", "students", "cache")]
    files = [p for d in dirs for p in d.rglob("*") if p.is_file()]
    return {p: p.read_bytes() if p.name == "log.csv" else p.stat().st_mtime_ns for p in files}


def test_bad_preset_and_dataset(tmp_path):
    with pytest.raises(ConfigError, match="preset"):
        bench.run(_args(tmp_path, preset="nope"))
    with pytest.raises(ConfigError, match="datasets"):
        bench.run(_args(tmp_path, datasets=["mnist"]))
    with pytest.raises(ConfigError, match="no sizes for the 'digits' test bed"):
        bench.run(_args(tmp_path, preset="fmnist", datasets=["digits"]))
    digits = bench.PRESETS["smoke"].digits
    with pytest.raises(ConfigError, match="digits.gm_teacher: the 'digits' bed has no GM-DiT twin"):
        BenchPreset("x", digits=Sizes(**{**digits.__dict__, "gm_teacher": True}))


def test_relative_changes_and_headline():
    recs = [
        {"dataset": "digits", "variant": v, "nfe": k, "fd": fd}
        for v, k, fd in [
            ("teacher", 1, 40.0), ("2rf", 1, 10.0), ("+norm", 1, 8.0), ("+hpf", 1, 9.0), ("full", 1, 5.0),
            ("2rf", 2, 4.0), ("full", 2, 5.0),
        ]
    ]  # fmt: skip
    bench.add_relative_changes(recs)
    by = {(r["variant"], r["nfe"]): r for r in recs}
    assert by[("2rf", 1)]["rel_change"] == pytest.approx(-0.75)
    assert by[("+hpf", 1)]["prev_variant"] == "+norm"
    assert by[("+hpf", 1)]["rel_change"] == pytest.approx(0.125)
    assert by[("full", 2)]["prev_variant"] == "2rf"
    assert by[("teacher", 1)]["rel_change"] is None
    (line,) = bench.headline(recs)
    assert line.startswith("digits (fd)") and "(-50.0%;" in line and "(+25.0%;" in line
    assert "vs 2rf at NFE 2: +25.0%" in line  # guided NFE 1 (1 + 1 evaluations) vs 2rf at NFE 2


def test_draw_means_relative_changes_and_paired_headline():
    """Several noise draws: changes per draw (same noise), tables and headline on the means (± sd)."""
    fd = {("2rf", 0): 10.0, ("2rf", 1): 12.0, ("recipe", 0): 7.0, ("recipe", 1): 9.0, ("teacher", 0): 20.0,
          ("teacher", 1): 22.0}  # fmt: skip
    recs = [{"dataset": "fmnist", "variant": v, "nfe": 9, "draw": d, "fd": x} for (v, d), x in fd.items()]
    recs[0]["nn_ratio"] = 0.9  # memorisation: first draw only
    bench.add_relative_changes(recs)
    by = {(r["variant"], r["draw"]): r for r in recs}
    assert by[("recipe", 1)]["prev_variant"] == "2rf" and by[("recipe", 1)]["rel_change"] == pytest.approx(
        -0.25
    )
    means = {r["variant"]: r for r in draw_means(recs)}
    assert means["2rf"]["draws"] == 2 and means["2rf"]["fd"] == 11.0
    assert means["2rf"]["fd_sd"] == pytest.approx(2**0.5) and means["2rf"]["nn_ratio"] == 0.9
    assert "draw" not in means["2rf"] and means["recipe"]["rel_change"] == pytest.approx(8.0 / 11.0 - 1.0)
    (line,) = bench.headline(recs)
    assert line.startswith("fmnist (fd): NFE 9: 2rf 11 ± 1.4 -> recipe 8 ± 1.4 (-27.3%")
    assert "per draw -27.5 ± 3.5%" in line  # mean and sd of -30 % and -25 %


def _fmnist_args(out, **kw):
    return _args(out, datasets=["fmnist"], **kw)


@pytest.mark.slow
def test_fmnist_smoke_bed_end_to_end(tmp_path, fake_fmnist, monkeypatch):
    """The fmnist bed on a small synthetic Fashion-MNIST: DiT teacher, ladder without +dropout, two draws,
    held-out test split, sample grids, reuse on re-run."""
    from gmflow import sample
    from gmflow.data import load_dataset
    from gmflow.experiments import load_network
    from gmflow.reflow import PairDataset
    from gmflow.reflow.pairs import shard_seed

    monkeypatch.setenv("GMFLOW_FASHION_MNIST", str(fake_fmnist(n_train=400, n_test=200)))
    out = tmp_path / "run"
    assert bench.run(_fmnist_args(out)) == 0
    records = json.loads((out / "results.json").read_text())
    assert {r["dataset"] for r in records} == {"fmnist"}
    variants = [r["variant"] for r in records if r["nfe"] == 1 and r["draw"] == 0]
    # no +dropout (the DiT teacher has no dropout); the GM-teacher variant's two rows at the end
    assert variants == [
        "teacher", "2rf", "+norm", "+pow10", "+hpf", "+forward", "+projection", "+sigmoid", "+dpm", "full",
        "recipe", "gm-teacher", "gm-recipe",
    ]  # fmt: skip
    pr = bench.PRESETS["smoke"]
    cells = {(r["variant"], r["nfe"]): [] for r in records}
    for r in records:
        cells[(r["variant"], r["nfe"])].append(r["draw"])
        assert r["fd"] > 0 and r["fd_floor"] > 0 and 0 <= r["precision"] <= 1
        assert ("nn_ratio" in r) == (r["draw"] == 0)  # memorisation on the first draw
    assert all(sorted(d) == list(range(pr.fmnist.draws)) for d in cells.values())
    by = {(r["variant"], r["nfe"], r["draw"]): r["fd"] for r in records}
    assert by[("2rf", 1, 0)] != by[("2rf", 1, 1)]  # another noise draw
    text = (out / "results.md").read_text()
    assert f"mean ± sd over {pr.fmnist.draws} noise draws" in text and "| +hpf | " in text
    assert "fmnist (fd): NFE 1: 2rf" in text and "per draw" in text
    cfg = json.loads((out / "teachers" / "fmnist" / "config.json").read_text())["config"]
    assert cfg["data"]["name"] == "fmnist32" and cfg["model"]["arch"] == "dit"
    assert cfg["model"]["conditional"] is False and cfg["loss"]["label_dropout"] == 0
    # the held-out split never feeds pairs: forward pairs invert the first training images exactly
    train, test = load_dataset("fmnist32", "train").tensor(), load_dataset("fmnist32", "test").tensor()
    pairs = PairDataset(out / "pairs" / "fmnist" / "backward", out / "pairs" / "fmnist" / "forward")
    x0 = pairs.forward[0]
    assert torch.equal(x0, train[: len(x0)])
    assert torch.cdist(x0.flatten(1).double(), test.flatten(1).double()).min() > 1e-2
    # backward pairs are data-free: x1 is the first shard's seeded noise and x0 the teacher's ODE from it
    bx0, bx1 = (v[:16] for v in pairs.backward)
    manifest = json.loads((out / "pairs" / "fmnist" / "backward" / "manifest.json").read_text())
    g = torch.Generator().manual_seed(shard_seed(manifest["seed"], "backward", 0))
    assert torch.equal(
        bx1, torch.randn((min(manifest["shard_size"], manifest["n"]), *bx1.shape[1:]), generator=g)[:16]
    )
    teacher = load_network(out / "teachers" / "fmnist")
    with torch.no_grad():
        again = sample(teacher, bx1, solver=manifest["solver"], nfe=manifest["nfe"])
    torch.testing.assert_close(again, bx0, rtol=0, atol=1e-5)
    gm = {r["variant"]: r for r in records if r["variant"].startswith("gm-") and r["nfe"] == 2}
    assert gm["gm-teacher"]["solver"] == "gm-ode" and gm["gm-teacher"]["prev_variant"] == "teacher"
    assert gm["gm-recipe"]["solver"] == "dpm-solver-2" and gm["gm-recipe"]["prev_variant"] == "recipe"
    gm_run = json.loads((out / "students" / "fmnist" / "gm-recipe" / "config.json").read_text())
    assert gm_run["pairs"]["backward"]["solver"] == "gm-ode"  # trained on the GM teacher's pairs
    # the shipped image recipe (no HPF, no forward pairs) is the +pow10 student: reused, not retrained
    assert not (out / "students" / "fmnist" / "recipe").exists()
    assert (gm_run["config"]["loss"]["hpf_lambda"], gm_run["config"]["pairs"]["rho"]) == (0.0, 0.0)
    rec = {(r["variant"], r["draw"]): r["fd"] for r in records if r["nfe"] == 1}
    assert rec[("recipe", 0)] == rec[("+pow10", 0)]  # at NFE 1 every solver is one Euler step
    assert "recipe on GM-teacher pairs" in text
    assert "- `fmnist_samples_2rf.png`: a row per NFE (1, 2 from the top)" in text
    for v in ("teacher", "2rf", "hpf", "dpm", "full", "gm-teacher", "gm-recipe"):
        assert (out / f"fmnist_samples_{v}.png").stat().st_size > 500
    stamp = _stamps(out)
    assert bench.run(_fmnist_args(out)) == 0  # a re-run reuses every evaluation
    assert _stamps(out) == stamp
