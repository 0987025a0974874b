"""``gmflow bench reflow``: the smoke preset end to end, reuse on re-run, and the report helpers."""

from __future__ import annotations

import argparse
import json

import pytest

from gmflow.bench import reflow as bench
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
        "teacher", "2rf", "+norm", "+pow10", "+forward", "+projection", "+sigmoid", "+dpm", "full"
    ]  # fmt: skip
    for r in records:  # NFE (main + guide): AutoGuidance's guide calls are counted
        assert (r["nfe_main"], r["nfe_guide"]) == (r["nfe"], r["nfe"] if r["variant"] == "full" else 0)
        assert r["nfe_total"] == r["nfe_main"] + r["nfe_guide"]
    assert {r["nfe"] for r in records} == set(bench.PRESETS["smoke"].nfes)
    by = {(r["dataset"], r["variant"], r["nfe"]): r for r in records}
    assert by[("ring", "+projection", 1)]["prev_variant"] == "+forward"  # a branch off +forward
    assert by[("ring", "+sigmoid", 1)]["prev_variant"] == "+forward"
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


def test_digits_held_out_split_never_feeds_pairs(tmp_path):
    """The digits reference is the test split; forward pairs invert training images only."""
    import torch

    from gmflow.bench.reflow_beds import PRESETS, Sizes, digits_reference, make_pairs, memorisation
    from gmflow.data import Digits
    from gmflow.nn import SmallUNet

    tr = Digits.split_indices(1797, "train", 0.2, 0)
    te = Digits.split_indices(1797, "test", 0.2, 0)
    assert not set(tr.tolist()) & set(te.tolist()) and len(tr) + len(te) == 1797

    class _Features:  # stands in for the classifier: features = pooled pixels
        def features(self, x):
            return torch.nn.functional.avg_pool2d(x, 4).flatten(1)

    ref = digits_reference(_Features(), seed=0)
    assert len(ref["ref"]) == len(te) and ref["floor"] > 0
    assert torch.equal(ref["ref"], Digits(16, "test").tensor())
    torch.manual_seed(0)
    teacher = SmallUNet(1, 8, (1,), image_size=16, time_dim=16)
    s = PRESETS["smoke"].digits
    sizes = Sizes(**{**s.__dict__, "n_bwd": 16, "n_fwd": 24, "n_diag": 8, "pair_nfe": 2})
    bed = dict(teacher=teacher, sizes=sizes, shape=(1, 16, 16), fwd_data=ref["train"][:24])
    pairs, _ = make_pairs("digits", bed, tmp_path, 0, False)
    x0_fwd = pairs.forward[0].flatten(1)
    d_train = torch.cdist(x0_fwd.double(), ref["train"].flatten(1).double()).min(1).values
    d_test = torch.cdist(x0_fwd.double(), ref["ref"].flatten(1).double()).min(1).values
    assert d_train.max() < 1e-5 and d_test.min() > 1e-2  # every forward x0 is a training image
    # memorisation: training images themselves are "copies", test images are not
    assert memorisation(ref["train"][:50], ref["train"], ref["nn_test"])["nn_ratio"] == 0.0
    m = memorisation(ref["ref"], ref["train"], ref["nn_test"])
    assert m["nn_ratio"] == 1.0 and m["copy_frac"] <= 0.02  # 1 % by construction (ties aside)
