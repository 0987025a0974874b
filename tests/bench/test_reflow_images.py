"""The image beds of ``gmflow bench reflow``: the held-out protocol, memorisation and the time estimate."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gmflow.bench import reflow as bench
from gmflow.bench.reflow_images import NearestTrain, estimate, image_reference, memorisation
from gmflow.metrics import frechet_distance

from .test_reflow import _args


class _PooledScorer:
    """Stands in for the classifier scorer: FD of 4x4-pooled pixels against the test split."""

    def __init__(self, reference):
        self.reference = reference

    def __call__(self, x):
        f = lambda v: torch.nn.functional.avg_pool2d(v, 4).flatten(1)  # noqa: E731
        return {"fd": frechet_distance(f(x), f(self.reference))}


def test_digits_held_out_split_never_feeds_pairs(tmp_path):
    """The digits reference is the test split; forward pairs invert training images only; the
    backward / test pairs use the sizes' pair solver."""
    from gmflow.bench.reflow_beds import PRESETS, make_pairs
    from gmflow.data import Digits
    from gmflow.nn import SmallUNet
    from gmflow.reflow import read_manifest

    tr = Digits.split_indices(1797, "train", 0.2, 0)
    te = Digits.split_indices(1797, "test", 0.2, 0)
    assert not set(tr.tolist()) & set(te.tolist()) and len(tr) + len(te) == 1797

    ref = image_reference("digits16", _PooledScorer(Digits(16, "test").tensor()), 360, seed=0)
    assert len(ref["ref"]) == len(te) == ref["n_eval"] and ref["floor"] > 0
    assert torch.equal(ref["ref"], Digits(16, "test").tensor())
    torch.manual_seed(0)
    teacher = SmallUNet(1, 8, (1,), image_size=16, time_dim=16)
    s = PRESETS["smoke"].digits
    sizes = replace(s, n_bwd=16, n_fwd=24, n_diag=8, pair_nfe=2, pair_solver="heun")
    bed = dict(teacher=teacher, sizes=sizes, shape=(1, 16, 16), fwd_data=ref["train"][:24])
    pairs, _ = make_pairs("digits", bed, tmp_path, 0, False)
    made = [read_manifest(tmp_path / "pairs" / "digits" / k) for k in ("backward", "forward", "test")]
    assert [(m.solver, m.nfe) for m in made] == [("heun", 2), ("heun", 3), ("heun", 2)]
    x0_fwd = pairs.forward[0].flatten(1)
    d_train = torch.cdist(x0_fwd.double(), ref["train"].flatten(1).double()).min(1).values
    d_test = torch.cdist(x0_fwd.double(), ref["ref"].flatten(1).double()).min(1).values
    assert d_train.max() < 1e-5 and d_test.min() > 1e-2  # every forward x0 is a training image
    # memorisation: training images themselves are "copies", test images are not
    assert memorisation(ref["train"][:50], ref["nearest"], ref["nn_test"])["nn_ratio"] == 0.0
    m = memorisation(ref["ref"], ref["nearest"], ref["nn_test"])
    assert m["nn_ratio"] == 1.0 and m["copy_frac"] <= 0.02  # 1 % by construction (ties aside)


def test_nearest_train_matches_brute_force_across_chunks():
    """Chunked float64 search over a float32 train set = the exact nearest distance, per pixel RMS."""
    g = torch.Generator().manual_seed(0)
    train, x = torch.rand(37, 1, 4, 4, generator=g), torch.rand(9, 1, 4, 4, generator=g)
    nearest = NearestTrain(train, chunk=5)
    assert nearest.train.dtype == torch.float32  # no float64 copy of the train set is kept
    exact = torch.cdist(x.flatten(1).double(), train.flatten(1).double()).min(1).values / 4
    torch.testing.assert_close(nearest(x), exact, rtol=0, atol=1e-12)
    assert nearest(train[[3, 30]]).max() < 1e-7


def test_estimate_of_the_fmnist_bed(tmp_path, fake_fmnist, monkeypatch, capsys):
    """--estimate measures a few steps and calls and prints the per-phase minutes, nothing is trained."""
    monkeypatch.setenv("GMFLOW_FASHION_MNIST", str(fake_fmnist(n_train=300, n_test=200)))
    pr = bench.PRESETS["smoke"]
    est = estimate("fmnist", pr, ["teacher", "2rf", "+dpm", "full"], 1, steps=1)
    phases = {k: v for k, v in est.items() if k.endswith("_s") and k != "total_s"}
    assert {"teacher_s", "rungs_s", "sampling_s", "gm_teacher_s", "gm_pairs_s"} <= set(phases)
    assert all(v > 0 for v in phases.values()) and est["total_s"] == pytest.approx(sum(phases.values()))
    assert est["sampling_s"] == pytest.approx(
        pr.fmnist.draws * 160 * sum(pr.nfes) * 5 * est["eval_ms_per_sample"] / 1e3  # full: main + guide
    )
    assert bench.run(_args(tmp_path / "est", datasets=["fmnist"], estimate=True)) == 0
    assert "fmnist estimate (min on this machine now): teacher" in capsys.readouterr().out
    assert not (tmp_path / "est" / "teachers").exists()
