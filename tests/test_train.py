"""Tests for gmflow.train: config, EMA, warmup, objectives, determinism and divergence handling."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch
from torch import nn

from gmflow.gm import GaussianMixture
from gmflow.nn import ToyMLP
from gmflow.train import (
    EMA,
    PRESETS,
    ConfigError,
    TrainConfig,
    TrainingDivergedError,
    apply_overrides,
    apply_sets,
    ema_beta,
    get_preset,
    load_checkpoint,
    load_overrides,
    make_batch_fn,
    make_objective,
    read_manifest,
    step_generator,
    step_seed,
    train,
    warmup_factor,
)


def smoke(**sets: object) -> TrainConfig:
    """The tiny preset with overrides given as keyword arguments (dots as ``__``)."""
    return apply_sets(get_preset("toy-smoke"), [f"{k.replace('__', '.')}={v}" for k, v in sets.items()])


def weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------------------------------- config
def test_presets_validate_and_official_minimal_recipe():
    for name, cfg in PRESETS.items():
        cfg.validate(), name
    m = get_preset("toy-official-minimal")
    assert (m.model.num_components, m.model.width, m.model.depth) == (64, 512, 5)
    assert (m.batch_size, m.optimizer, m.lr, m.steps, m.loss) == (4096, "adam", 2e-4, 5000, "gm_nll")
    assert (m.time_sampler, m.ema, m.warmup_steps, m.grad_clip) == ("uniform", "none", 0, 0.0)
    g = get_preset("toy-gmflow")
    assert (g.loss, g.trans_ratio, g.optimizer, g.weight_decay, g.ema, g.ema_gamma) == (
        "transition",
        0.9,
        "adamw",
        0.0,
        "power",
        7.0,
    )
    assert g.warmup_steps > 0 and g.model.num_components == 64
    assert get_preset("toy-fm").model.head == "velocity"
    # get_preset returns copies
    get_preset("toy-smoke").model.width = 999
    assert PRESETS["toy-smoke"].model.width != 999


def test_set_coercion_and_round_trip():
    cfg = apply_sets(
        get_preset("toy-smoke"),
        [
            "steps=1e2",
            "lr=3e-4",
            "model.num_components=16",
            "betas=0.9,0.95",
            "ema_rampup=none",
            "data.name=moons",
            "model.constant_logstd=-1",
            "out_dir=/tmp/x",
        ],
    )
    assert cfg.steps == 100 and isinstance(cfg.steps, int)
    assert cfg.lr == 3e-4 and cfg.model.num_components == 16 and cfg.betas == (0.9, 0.95)
    assert cfg.ema_rampup is None and cfg.data.name == "moons" and cfg.model.constant_logstd == -1.0
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert apply_sets(cfg, ["betas=[0.8, 0.9]"]).betas == (0.8, 0.9)


@pytest.mark.parametrize(
    "item, match",
    [
        ("model.num_componets=3", "did you mean model.num_components"),
        ("head=gm", "model.head"),
        ("steps=abc", "steps: expected an integer"),
        ("steps=1.5", "steps: expected an integer"),
        ("lr=fast", "lr: expected a number"),
        ("betas=0.9", "betas: expected 2 values"),
        ("model=3", "model: is a section"),
        ("nonsense", "key=value"),
    ],
)
def test_set_errors(item, match):
    with pytest.raises(ConfigError, match=match):
        apply_sets(get_preset("toy-smoke"), [item])


@pytest.mark.parametrize(
    "sets, field",
    [
        (["steps=0"], "steps"),
        (["steps=-5"], "steps"),
        (["model.num_components=0"], "model.num_components"),
        (["lr=0"], "lr"),
        (["lr=-1e-3"], "lr"),
        (["trans_ratio=0"], "trans_ratio"),
        (["trans_ratio=1.5"], "trans_ratio"),
        (["loss=fm"], "loss"),  # fm needs a velocity head
        (["model.head=velocity"], "loss"),  # transition needs a GM head
        (["data.name=mnist"], "data.name"),
        (["time_sampler=beta"], "time_sampler"),
        (["optimizer=sgd"], "optimizer"),
        (["ema=karras"], "ema"),
        (["precision=fp16"], "precision"),
        (["batch_size=0"], "batch_size"),
        (["betas=0.9,1.0"], "betas"),
    ],
)
def test_validation_names_the_field(sets, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        apply_sets(get_preset("toy-smoke"), sets).validate()


def test_validate_catches_wrong_python_types(tmp_path):
    with pytest.raises(ConfigError, match="steps"):
        dataclasses.replace(get_preset("toy-smoke"), steps="10").validate()
    cfg = dataclasses.replace(get_preset("toy-smoke"), out_dir=tmp_path)  # a Path is accepted
    assert cfg.validate().out_dir == str(tmp_path) and cfg.to_dict()["out_dir"] == str(tmp_path)


def test_load_overrides_yaml_and_toml(tmp_path):
    y = tmp_path / "o.yaml"
    y.write_text("steps: 7\nmodel:\n  num_components: 4\nbetas: [0.9, 0.95]\n")
    t = tmp_path / "o.toml"
    t.write_text('lr = 0.003\n[model]\nhead = "velocity"\n[data]\nname = "ring"\n')
    cfg = apply_overrides(get_preset("toy-smoke"), load_overrides(y))
    assert (cfg.steps, cfg.model.num_components, cfg.betas) == (7, 4, (0.9, 0.95))
    cfg = apply_overrides(cfg, load_overrides(t))
    assert (cfg.lr, cfg.model.head, cfg.data.name) == (0.003, "velocity", "ring")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 3\n")
    with pytest.raises(ConfigError, match="model.widht"):
        apply_overrides(get_preset("toy-smoke"), load_overrides(bad))
    for name, text, match in [
        ("x.json", "{}", "must end in"),
        ("b.toml", "a = [", "invalid TOML"),
        ("l.yaml", "- 1\n- 2\n", "mapping"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_overrides(tmp_path / name)
    with pytest.raises(ConfigError, match="cannot read"):
        load_overrides(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_power_rule_values():
    assert ema_beta(1, "power", gamma=7) == 0.0
    assert ema_beta(2, "power", gamma=7) == pytest.approx(0.5**8)
    assert ema_beta(3, "power", gamma=7) == pytest.approx((2 / 3) ** 8)
    lin = nn.Linear(1, 1, bias=False)
    ema = EMA(lin, "power", gamma=7)
    vals, expect = [3.0, 5.0, 11.0], None
    for i, v in enumerate(vals, start=1):
        lin.weight.data.fill_(v)
        beta = ema.update(lin)
        assert beta == pytest.approx(ema_beta(i, "power", gamma=7))
        expect = v if expect is None else beta * expect + (1 - beta) * v
        assert float(ema.shadow["weight"]) == pytest.approx(expect, rel=1e-6)
    assert float(ema.shadow["weight"]) == pytest.approx(
        (3.0 * 0.5**8 + 5.0 * (1 - 0.5**8)) * (2 / 3) ** 8 + 11.0 * (1 - (2 / 3) ** 8), rel=1e-6
    )
    out = ema.averaged_model(lin)
    assert float(out.weight) == pytest.approx(expect, rel=1e-6) and not out.weight.requires_grad


def test_ema_rampup_rule():
    b, hl = 4096, 500.0
    # early: half-life = rampup * nimg = 0.05 * i * b images
    assert ema_beta(1, "rampup", batch_size=b, halflife_kimg=hl, rampup=0.05) == pytest.approx(
        0.5 ** (1 / 0.05)
    )
    assert ema_beta(10, "rampup", batch_size=b, halflife_kimg=hl, rampup=0.05) == pytest.approx(
        0.5 ** (1 / 0.5)
    )
    # late: capped at halflife_kimg * 1000 images
    assert ema_beta(10**6, "rampup", batch_size=b, halflife_kimg=hl, rampup=0.05) == pytest.approx(
        0.5 ** (b / 5e5)
    )
    assert ema_beta(1, "rampup", batch_size=b, halflife_kimg=hl, rampup=None) == pytest.approx(
        0.5 ** (b / 5e5)
    )
    with pytest.raises(ValueError):
        EMA(nn.Linear(1, 1), "rampup")


def test_ema_keeps_float32_shadow_of_double_model():
    m = nn.Linear(2, 2).double()
    ema = EMA(m)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    ema.update(m)
    ema.copy_to(m)


# ------------------------------------------------------------------------------------ lr and seeds
def test_warmup_factor_and_logged_lr(tmp_path):
    assert warmup_factor(0, 1000) == pytest.approx(0.001)
    assert warmup_factor(500, 1000) == pytest.approx(0.5005)
    assert warmup_factor(1000, 1000) == warmup_factor(5000, 1000) == 1.0
    assert warmup_factor(0, 0) == 1.0
    cfg = smoke(steps=8, warmup_steps=4, lr=0.01, log_every=1, out_dir=tmp_path / "run")
    train(cfg, progress=False)
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == pytest.approx([0.01 * warmup_factor(i, 4) for i in range(8)])
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert all(math.isfinite(float(r["grad_norm"])) and float(r["step_ms"]) > 0 for r in rows)


def test_step_seed_is_stable_and_distinct():
    assert step_seed(0, 1, 0) == step_seed(0, 1, 0)
    assert len({step_seed(s, k, r) for s in range(3) for k in range(3) for r in range(3)}) == 27
    a = torch.rand(3, generator=step_generator(1, 2, 0))
    assert torch.equal(a, torch.rand(3, generator=step_generator(1, 2, 0)))


def test_determinism_same_seed_equal_other_seed_different():
    r1 = train(smoke(steps=6), progress=False)
    r2 = train(smoke(steps=6), progress=False)
    r3 = train(smoke(steps=6, seed=1), progress=False)
    w1, w2, w3 = weights(r1.model), weights(r2.model), weights(r3.model)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)
    assert r1.ema_model is not None and r1.step == 6 and math.isfinite(r1.last_loss)
    assert r1.median_step_ms > 0 and len(r1.step_ms) == 6


# --------------------------------------------------------------------------------------- objectives
@pytest.mark.parametrize("loss, head", [("fm", "velocity"), ("gm_nll", "gm"), ("transition", "gm")])
def test_objectives_return_finite_per_sample_losses(loss, head):
    cfg = smoke(loss=loss, model__head=head, time_sampler="logit_normal")
    model = ToyMLP(**cfg.model_kwargs())
    g = step_generator(0, 1, 0)
    x0 = make_batch_fn(cfg)(1, 0, 1, g)
    per = make_objective(cfg)(model, x0, g)
    assert per.shape == (cfg.batch_size,) and torch.isfinite(per).all()
    per.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_objective_head_mismatch_is_a_clear_error():
    cfg = smoke()
    gm_model = ToyMLP(**cfg.model_kwargs())
    x0 = torch.randn(8, 2)
    with pytest.raises(TypeError, match="velocity"):
        make_objective(dataclasses.replace(cfg, loss="fm"))(gm_model, x0, None)
    vel = ToyMLP(
        **dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head="velocity")).model_kwargs()
    )
    with pytest.raises(TypeError, match="GaussianMixture"):
        make_objective(cfg)(vel, x0, None)


def test_pluggable_objective_and_batch_fn():
    """A ReFlow-like use: fixed (noise, data) pairs, plain regression objective."""
    cfg = smoke(steps=5, loss="fm", model__head="velocity", ema="none")
    pairs = torch.randn(256, 2, 2)
    seen = []

    def batch_fn(step, rank, world, g):
        seen.append(step)
        return pairs[torch.randint(0, 256, (cfg.batch_size // world,), generator=g)]

    def objective(model, batch, g):
        noise, x0 = batch[:, 0], batch[:, 1]
        t = torch.rand(batch.shape[0], generator=g)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
        return (model(x_t, t) - (noise - x0)).square().mean(1)

    res = train(cfg, objective=objective, batch_fn=batch_fn, progress=False)
    assert seen == [1, 2, 3, 4, 5] and res.ema_model is None and math.isfinite(res.last_loss)


def test_bf16_autocast_trains():
    res = train(smoke(steps=3, precision="bf16"), progress=False)
    assert math.isfinite(res.last_loss)
    assert all(p.dtype == torch.float32 for p in res.model.parameters())


def test_grad_norm_and_clip_helper():
    from gmflow.train.trainer import _grad_norm_and_clip

    lin = nn.Linear(2, 2)
    lin.weight.grad = torch.full((2, 2), 3.0)
    lin.bias.grad = torch.full((2,), 4.0)
    total = math.sqrt(4 * 9 + 2 * 16)
    assert _grad_norm_and_clip(list(lin.parameters()), math.inf) == pytest.approx(total)
    assert torch.equal(lin.weight.grad, torch.full((2, 2), 3.0))  # no clipping: untouched
    assert _grad_norm_and_clip(list(lin.parameters()), 1.0) == pytest.approx(total)
    clipped = torch.cat([lin.weight.grad.flatten(), lin.bias.grad])
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-5)


def test_grad_clip_and_clip_start():
    res = train(smoke(steps=4, grad_clip=1e-3, grad_clip_start=2), progress=False)
    assert math.isfinite(res.last_loss) and res.skipped_updates == 0


# ------------------------------------------------------------------------------ divergence, resume
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = smoke(steps=20, ckpt_every=10, out_dir=tmp_path / "run")
    good = make_batch_fn(cfg)

    def poisoned(step, rank, world, g):
        x = good(step, rank, world, g)
        return x * float("nan") if step == 14 else x

    with pytest.raises(TrainingDivergedError, match="step 14") as info:
        train(cfg, batch_fn=poisoned, progress=False)
    assert "step 10" in str(info.value)  # names the last good checkpoint
    assert read_manifest(tmp_path / "run")["step"] == 10
    ck = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in ck.model_state.values())
    # the run can be resumed (with good data) from step 10
    res = train(cfg, progress=False)
    assert res.resumed_from == 10 and res.step == 20


def test_resume_refuses_a_different_config_but_allows_more_steps(tmp_path):
    cfg = smoke(steps=4, out_dir=tmp_path / "run")
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match="lr"):
        train(apply_sets(cfg, ["lr=0.5"]), progress=False)
    res = train(apply_sets(cfg, ["steps=6", "log_every=2"]), progress=False)
    assert (res.resumed_from, res.step) == (4, 6)
    done = train(apply_sets(cfg, ["steps=6"]), progress=False)  # already complete: nothing to do
    assert (done.resumed_from, done.step) == (6, 6)


def test_in_process_resume_matches_uninterrupted(tmp_path):
    full = train(smoke(steps=12, out_dir=tmp_path / "a"), progress=False)
    train(smoke(steps=5, out_dir=tmp_path / "b"), progress=False)
    resumed = train(smoke(steps=12, out_dir=tmp_path / "b"), progress=False)
    wa, wb = weights(full.model), weights(resumed.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = weights(full.ema_model), weights(resumed.ema_model)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_gm_model_returns_gm():
    cfg = smoke()
    out = ToyMLP(**cfg.model_kwargs())(torch.zeros(3, 2), torch.full((3,), 0.5))
    assert isinstance(out, GaussianMixture) and out.num_components == cfg.model.num_components
