"""gmflow.experiments.base: the Experiment mix-in (copies, overrides) and run_experiment."""

from __future__ import annotations

import pytest

from gmflow.config import ConfigError
from gmflow.experiments import get_preset, run_experiment


def test_overrides_return_copies():
    cfg = get_preset("toy-smoke")
    a = cfg.with_sets(["loop.steps=3"])
    b = cfg.with_overrides({"loop": {"steps": 3}})
    c = cfg.copy()
    c.loop.steps = 3
    assert a == b == c and cfg.loop.steps == 20
    assert type(a).from_dict(a.to_dict()) == a
    a.check_types()
    a.loop.steps = "3"
    with pytest.raises(ConfigError, match="^loop.steps: expected an integer"):
        a.check_types()


def test_run_experiment_validates_before_writing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="^model.num_components"):
        run_experiment(get_preset("toy-smoke").with_sets(["model.num_components=0", f"loop.out_dir={out}"]))
    assert not out.exists()


def test_image_run_resume_accepts_loop_io_keys_and_refuses_training_keys(digits_run, copy_run):
    d = copy_run(digits_run.path)
    cfg = get_preset("digits-smoke").with_sets(
        ["data.name=digits16", "loop.steps=3", "loop.batch_size=16", f"loop.out_dir={d}"]
    )
    for sets, key in [
        (["model.base=16"], "model.base"),
        (["data.name=digits8"], "data.name"),
        (["loss.time_sampler=logit_normal"], "loss.time_sampler"),
        (["loop.batch_size=8"], "loop.batch_size"),
        (["loop.ema=none"], "loop.ema"),
    ]:
        with pytest.raises(ConfigError, match=f"holds a run with a different config .*{key}: "):
            run_experiment(cfg.with_sets(sets), progress=False)
    ok = cfg.with_sets(["loop.steps=4", "loop.ckpt_every=1", "loop.log_every=1", "loop.device=cpu"])
    res = run_experiment(ok, progress=False)
    assert (res.resumed_from, res.step) == (3, 4)
