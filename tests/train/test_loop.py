"""gmflow.train.loop: the generic loop — determinism, resume, clipping, divergence, signals, run log."""

from __future__ import annotations

import csv
import json
import math
import os
import signal

import pytest
import torch
from torch import nn

from gmflow.config import ConfigError, to_dict
from gmflow.experiments import Toy2DConfig, get_preset, run_experiment
from gmflow.nn import ToyMLP
from gmflow.train import (
    LOG_COLUMNS,
    RUN_FORMAT,
    LoopConfig,
    TrainingDivergedError,
    TrainingInterrupted,
    load_checkpoint,
    read_manifest,
    train,
    warmup_factor,
)


def smoke(*sets: str) -> Toy2DConfig:
    """The toy-smoke preset (K = 8, batch 128) with ``--set`` style overrides."""
    return get_preset("toy-smoke").with_sets(list(sets))


def fit(cfg: Toy2DConfig):
    return run_experiment(cfg, progress=False)


def weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same(a: nn.Module, b: nn.Module) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def log_rows(d) -> list[dict[str, str]]:
    with open(d / "log.csv") as f:
        return list(csv.DictReader(f))


def grad_norm(m: nn.Module) -> float:
    return float(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]).norm())


# --------------------------------------------------------------------------------- log and randomness
def test_warmup_lr_and_run_log(tmp_path):
    d = tmp_path / "run"
    fit(smoke("loop.steps=8", "loop.warmup_steps=4", "loop.lr=0.01", "loop.log_every=1", f"loop.out_dir={d}"))
    rows = log_rows(d)
    assert tuple(rows[0]) == LOG_COLUMNS
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.01 * warmup_factor(i, 4) for i in range(8)])
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert all(math.isfinite(float(r["grad_norm"])) and float(r["step_ms"]) > 0 for r in rows)


def test_log_rows_average_log_every_steps_and_resume_drops_later_rows(tmp_path):
    d = tmp_path / "run"
    fit(smoke("loop.steps=5", "loop.log_every=2", "loop.ckpt_every=0", f"loop.out_dir={d}"))
    assert [int(r["step"]) for r in log_rows(d)] == [2, 4, 5]  # and always the last step
    fit(smoke("loop.steps=7", "loop.log_every=2", "loop.ckpt_every=0", f"loop.out_dir={d}"))
    assert [int(r["step"]) for r in log_rows(d)] == [2, 4, 5, 6, 7]


def test_determinism_same_seed_equal_other_seed_different():
    r1 = fit(smoke("loop.steps=6"))
    r2 = fit(smoke("loop.steps=6"))
    r3 = fit(smoke("loop.steps=6", "loop.seed=1"))
    assert same(r1.model, r2.model) and same(r1.ema_model, r2.ema_model)
    assert not same(r1.model, r3.model)
    assert r1.ema_model is not None and not same(r1.model, r1.ema_model)
    assert r1.step == 6 and r1.out_dir is None and math.isfinite(r1.last_loss)
    assert r1.median_step_ms > 0 and len(r1.step_ms) == 6 and r1.resumed_from == 0


def test_pluggable_model_objective_and_batch_fn():
    """The loop knows no experiment: fixed (noise, data) pairs and a plain regression objective."""
    loop = LoopConfig(steps=5, batch_size=64, warmup_steps=0, ema="none")
    pairs = torch.randn(256, 2, 2)
    seen = []

    def batch_fn(step, rank, world, g):
        seen.append((step, rank, world))
        return pairs[torch.randint(0, 256, (loop.batch_size // world,), generator=g)]

    def objective(model, batch, g):
        noise, x0 = batch[:, 0], batch[:, 1]
        t = torch.rand(batch.shape[0], generator=g)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
        return (model(x_t, t) - (noise - x0)).square().mean(1)

    torch.manual_seed(0)
    model = ToyMLP(2, 32, 2, head="velocity", time_dim=16, pos_freqs=4)
    res = train(loop, model, objective, batch_fn, progress=False)
    assert seen == [(k, 0, 1) for k in range(1, 6)]
    assert res.ema_model is None and res.model is model and math.isfinite(res.last_loss)


def test_default_record_and_model_info(tmp_path):
    loop = LoopConfig(steps=1, batch_size=4, out_dir=str(tmp_path / "run"), ema="none")
    train(
        loop,
        nn.Linear(2, 1),
        lambda m, b, g: m(b)[:, 0].square(),
        lambda k, r, w, g: torch.ones(4, 2),
        progress=False,
    )
    rec = json.loads((tmp_path / "run" / "config.json").read_text())
    assert rec["format"] == RUN_FORMAT == "gmflow-run/2" and rec["experiment"] is None
    assert rec["config"] == {"loop": to_dict(loop)}
    assert rec["model"] == {"class": "Linear", "config": None}
    assert (rec["step"], rec["world_size"]) == (1, 1)


def test_bf16_autocast_trains():
    res = fit(smoke("loop.steps=3", "loop.precision=bf16"))
    assert math.isfinite(res.last_loss)
    assert all(p.dtype == torch.float32 for p in res.model.parameters())


# ------------------------------------------------------------------------------------------ clipping
def _clip_run(tmp_path, name: str, steps: int, clip: float, start: int = 0):
    d = tmp_path / name
    cfg = smoke(
        f"loop.steps={steps}",
        f"loop.grad_clip={clip}",
        f"loop.grad_clip_start={start}",
        "loop.ema=none",
        "loop.log_every=1",
        f"loop.out_dir={d}",
    )
    res = fit(cfg)
    return res, grad_norm(res.model), float(log_rows(d)[-1]["grad_norm"])


def test_grad_clip_bounds_the_applied_gradient_from_grad_clip_start(tmp_path):
    """The gradients left on the model are the ones of the last update, after clipping."""
    bound = 1e-3
    clipped, applied, before = _clip_run(tmp_path, "a", steps=3, clip=bound, start=2)
    assert before > 10 * bound  # the log records the norm before clipping ...
    assert applied == pytest.approx(bound, rel=1e-3)  # ... the update used the clipped gradient
    # updates 1..grad_clip_start are not clipped: the same weights as without clipping
    early, applied2, before2 = _clip_run(tmp_path, "b", steps=2, clip=bound, start=2)
    plain2, _, _ = _clip_run(tmp_path, "c", steps=2, clip=0.0)
    assert applied2 == pytest.approx(before2, rel=1e-4) and same(early.model, plain2.model)
    plain3, applied3, before3 = _clip_run(tmp_path, "d", steps=3, clip=0.0)
    assert applied3 == pytest.approx(before3, rel=1e-4) and not same(clipped.model, plain3.model)
    assert clipped.skipped_updates == 0


class _Weights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -0.3]))


def test_nonfinite_gradient_skips_the_update():
    """sqrt|b.w| at b = 0: the loss is 0 (finite) but its gradient is NaN; that update is skipped."""
    loop = LoopConfig(steps=1, batch_size=8, warmup_steps=0, ema="none", lr=0.1)

    def objective(model, batch, g):
        return (batch @ model.w).abs().sqrt()

    def batch_fn(step, rank, world, g):
        return torch.zeros(8, 2) if step == 2 else torch.randn(8, 2, generator=g)

    one = train(loop, _Weights(), objective, batch_fn, progress=False)
    two = train(LoopConfig(**{**loop.__dict__, "steps": 2}), _Weights(), objective, batch_fn, progress=False)
    assert (one.skipped_updates, two.skipped_updates) == (0, 1)
    assert not torch.equal(one.model.w, _Weights().w) and torch.equal(one.model.w, two.model.w)
    assert two.last_loss == 0.0


# ------------------------------------------------------------------------------ divergence, resume
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = smoke("loop.steps=20", "loop.ckpt_every=10", f"loop.out_dir={tmp_path / 'run'}")
    model, objective, good = cfg.build()

    def poisoned(step, rank, world, g):
        x = good(step, rank, world, g)
        return x * float("nan") if step == 14 else x

    with pytest.raises(TrainingDivergedError, match="step 14") as info:
        train(cfg.loop, model, objective, poisoned, record=cfg.record(), progress=False)
    assert "step 10" in str(info.value)  # names the last good checkpoint
    assert read_manifest(tmp_path / "run")["step"] == 10
    ck = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in ck.model_state.values())
    res = fit(cfg)  # the run resumes (with good data) from step 10
    assert res.resumed_from == 10 and res.step == 20


def test_divergence_without_checkpoint_says_so():
    cfg = smoke("loop.steps=3")
    model, objective, _ = cfg.build()
    with pytest.raises(TrainingDivergedError, match=r"step 1;.*last good checkpoint: none"):
        train(cfg.loop, model, objective, lambda *a: torch.full((128, 2), math.inf), progress=False)


def test_resume_refuses_a_changed_training_key_but_allows_more_steps(tmp_path, capsys):
    cfg = smoke("loop.steps=4", f"loop.out_dir={tmp_path / 'run'}")
    fit(cfg)
    for sets, key in [
        (["loop.lr=0.5"], "loop.lr"),
        (["loop.seed=3"], "loop.seed"),
        (["model.width=16"], "model.width"),
        (["loss.trans_ratio=0.5"], "loss.trans_ratio"),
    ]:
        with pytest.raises(ConfigError, match=f"different config .*{key}: ") as info:
            fit(cfg.with_sets(sets))
        assert "\n" not in str(info.value)
    res = fit(cfg.with_sets(["loop.steps=6", "loop.log_every=2", "loop.ckpt_every=5"]))
    assert (res.resumed_from, res.step) == (4, 6)
    res = run_experiment(cfg.with_sets(["loop.steps=6"]), progress=False, verbose=True)
    assert (res.resumed_from, res.step) == (6, 6)  # already complete: nothing to do
    assert "already trained to step 6" in capsys.readouterr().err


def test_resume_ignore_keys_of_the_record(tmp_path):
    loop = LoopConfig(steps=2, batch_size=4, out_dir=str(tmp_path / "run"), ema="none")

    def go(steps: int, note: str, ignore=()):
        lp = LoopConfig(**{**loop.__dict__, "steps": steps})
        rec = {"experiment": "demo", "config": {"loop": to_dict(lp), "note": note}}
        return train(
            lp,
            nn.Linear(2, 1),
            lambda m, b, g: m(b)[:, 0].square(),
            lambda k, r, w, g: torch.ones(4, 2),
            record=rec,
            resume_ignore=ignore,
            progress=False,
        )

    go(2, "a")
    with pytest.raises(ConfigError, match="note: 'a' -> 'b'"):
        go(3, "b")
    assert go(3, "b", ignore=("note",)).resumed_from == 2


def test_a_run_saved_before_a_config_key_existed_resumes_through_upgrade_record(tmp_path):
    loop = LoopConfig(steps=2, batch_size=4, out_dir=str(tmp_path / "run"), ema="none")

    def go(steps: int, config: dict, upgrade=None):
        lp = LoopConfig(**{**loop.__dict__, "steps": steps})
        return train(
            lp,
            nn.Linear(2, 1),
            lambda m, b, g: m(b)[:, 0].square(),
            lambda k, r, w, g: torch.ones(4, 2),
            record={"experiment": "demo", "config": {"loop": to_dict(lp), **config}},
            upgrade_record=upgrade,
            progress=False,
        )

    go(2, {})  # an older version: no "new_key" in its config
    with pytest.raises(ConfigError, match="new_key: '<missing>' -> 0.0"):
        go(3, {"new_key": 0.0})

    def fill(rec):
        return {**rec, "config": {"new_key": 0.0, **rec["config"]}}

    assert go(3, {"new_key": 0.0}, upgrade=fill).resumed_from == 2
    with pytest.raises(ConfigError, match="new_key: 0.0 -> 0.5"):  # a changed value is still refused
        go(4, {"new_key": 0.5}, upgrade=fill)


def test_in_process_resume_matches_uninterrupted(tmp_path):
    full = fit(smoke("loop.steps=12", f"loop.out_dir={tmp_path / 'a'}"))
    fit(smoke("loop.steps=5", f"loop.out_dir={tmp_path / 'b'}"))
    resumed = fit(smoke("loop.steps=12", f"loop.out_dir={tmp_path / 'b'}"))
    assert resumed.resumed_from == 5
    assert same(full.model, resumed.model) and same(full.ema_model, resumed.ema_model)


# ----------------------------------------------------------------------------------------- signals
def _signalling(cfg: Toy2DConfig, at: int, signals: list[int]):
    model, objective, good = cfg.build()

    def batch_fn(step, rank, world, g):
        if step == at:
            for s in signals:
                os.kill(os.getpid(), s)
        return good(step, rank, world, g)

    return lambda: train(cfg.loop, model, objective, batch_fn, record=cfg.record(), progress=False)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_the_current_step_then_raises(tmp_path, sig, code):
    d = tmp_path / "run"
    cfg = smoke("loop.steps=8", "loop.ckpt_every=0", f"loop.out_dir={d}")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3; checkpoint saved") as info:
        _signalling(cfg, 3, [sig])()
    assert (info.value.step, info.value.signum, info.value.exit_code) == (3, sig, code)
    assert isinstance(info.value, KeyboardInterrupt)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the loop's handlers are removed
    assert read_manifest(d)["step"] == 3 and int(log_rows(d)[-1]["step"]) == 3
    resumed = fit(cfg)
    assert resumed.resumed_from == 3 and same(resumed.model, fit(smoke("loop.steps=8")).model)


def test_second_signal_aborts_without_a_checkpoint(tmp_path):
    d = tmp_path / "run"
    cfg = smoke("loop.steps=8", "loop.ckpt_every=2", f"loop.out_dir={d}")
    with pytest.raises(
        KeyboardInterrupt, match="second signal .SIGINT.: aborted without a checkpoint"
    ) as info:
        _signalling(cfg, 3, [signal.SIGINT, signal.SIGINT])()
    assert not isinstance(info.value, TrainingInterrupted) and info.value.exit_code == 130
    assert read_manifest(d)["step"] == 2


def test_signal_during_the_last_step_just_finishes(tmp_path):
    cfg = smoke("loop.steps=3", f"loop.out_dir={tmp_path / 'run'}")
    assert _signalling(cfg, 3, [signal.SIGTERM])().step == 3
    assert read_manifest(tmp_path / "run")["step"] == 3


# ------------------------------------------------------------------------------------- bad arguments
def test_bad_model_objective_and_out_dir(tmp_path):
    cfg = smoke("loop.steps=2")
    model, objective, batch_fn = cfg.build()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        train(cfg.loop, lambda x, t: x, objective, batch_fn, progress=False)
    with pytest.raises(ValueError, match=r"per-sample losses of shape \(128,\), got \(\)"):
        train(cfg.loop, model, lambda m, b, g: objective(m, b, g).mean(), batch_fn, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        train(
            cfg.with_sets([f"loop.out_dir={blocker / 'run'}"]).loop,
            model,
            objective,
            batch_fn,
            progress=False,
        )
    with pytest.raises(ConfigError, match="^loop.steps"):
        train(LoopConfig(steps=0), model, objective, batch_fn, progress=False)
