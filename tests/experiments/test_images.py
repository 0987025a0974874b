"""gmflow.experiments.images: the SmallUNet / GM-DiT experiment on digits (config, build, tiny runs),
and spectral training (model.spectral: trunk + spectrum net, resume, load_run, sampling)."""

from __future__ import annotations

import json

import pytest
import torch

import gmflow
from gmflow.config import ConfigError
from gmflow.experiments import (
    IMAGE_DATASETS,
    ImagesConfig,
    get_preset,
    load_network,
    load_run,
    run_experiment,
)
from gmflow.gm import GaussianMixture
from gmflow.nn import GMDiT, SmallUNet, SpectralDenoiser, SpectrumMLP


def test_defaults_and_smoke_preset():
    d = ImagesConfig().validate()
    assert (d.data.name, d.model.head, d.loss.kind, d.loop.batch_size) == ("digits16", "velocity", "fm", 128)
    s = get_preset("digits-smoke")
    assert isinstance(s, ImagesConfig) and s.data.name == "digits8" and s.model.base == 8
    assert ImagesConfig.from_dict(s.to_dict()) == s
    assert {"digits8", "digits16", "fmnist", "fmnist32", "mnist5k", "mnist5k32"} == set(IMAGE_DATASETS)


@pytest.mark.parametrize(
    "sets, key",
    [
        (["data.name=mnist"], "data.name"),
        (["data.name=checkerboard"], "data.name"),  # a toy set is no image data set
        (["model.head=mlp"], "model.head"),
        (["model.base=0"], "model.base"),
        (["model.mults=1,0"], "model.mults"),
        (["model.dropout=1"], "model.dropout"),
        (["model.num_components=0"], "model.num_components"),
        (["loss.kind=transition"], "loss.kind"),  # the default head is the velocity
        (["loop.lr=0"], "loop.lr"),
    ],
)
def test_validation_names_the_field(sets, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        get_preset("digits-smoke").with_sets(sets).validate()


@pytest.mark.parametrize("name, size", [("digits8", 8), ("digits16", 16)])
def test_build_fits_the_data_set(name, size):
    cfg = get_preset("digits-smoke").with_sets(
        [
            f"data.name={name}",
            "model.head=gm",
            "loss.kind=transition",
            "model.num_components=3",
            "model.mults=1",
        ]
    )
    model, objective, batch_fn = cfg.validate().build()
    assert isinstance(model, SmallUNet) and tuple(model.event_shape) == (1, size, size)
    g = torch.Generator().manual_seed(0)
    x0 = batch_fn(1, 0, 1, g)
    assert x0.shape == (32, 1, size, size) and x0.min() >= -1 and x0.max() <= 1
    assert isinstance(model(x0, torch.full((32,), 0.5)), GaussianMixture)
    per = objective(model, x0, g)
    assert per.shape == (32,) and torch.isfinite(per).all()
    assert cfg.dataset("test").tensor().shape[1:] == (1, size, size)
    assert len(cfg.dataset("test")) < len(cfg.dataset("train"))


def test_run_record(digits_run):
    rec = json.loads((digits_run.path / "config.json").read_text())
    assert (rec["experiment"], rec["data"], rec["step"]) == ("images", "digits16", 3)
    assert rec["model"]["class"] == "SmallUNet" and rec["model"]["config"]["image_size"] == 16
    assert ImagesConfig.from_dict(rec["config"]).model.base == 8


def test_conditional_dit_build_batches_and_label_dropout():
    cfg = get_preset("images-smoke").validate()
    assert (cfg.model.arch, cfg.model.head, cfg.model.conditional) == ("dit", "gm", True)
    assert (cfg.loss.kind, cfg.loss.trans_ratio, cfg.loss.time_sampler, cfg.loss.label_dropout) == (
        "transition",
        0.5,
        "logit_normal",
        0.1,
    )
    model, objective, batch_fn = cfg.build()
    assert isinstance(model, GMDiT) and model.num_classes == 10 and tuple(model.event_shape) == (1, 8, 8)
    x0, y = batch_fn(1, 0, 1, torch.Generator().manual_seed(0))
    assert x0.shape == (16, 1, 8, 8) and y.shape == (16,) and y.dtype == torch.int64
    # label dropout draws from the step generator: the same generator gives the same loss
    seen = []

    def spy(x, t, class_labels=None):
        seen.append(class_labels.clone())
        return model(x, t, class_labels=class_labels)

    a = objective(spy, (x0, y), torch.Generator().manual_seed(3))
    b = objective(spy, (x0, y), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(seen[0], seen[1])
    big = torch.arange(4000) % 10  # about 10 % of the labels become the null class (id 10)
    objective(spy, (torch.zeros(4000, 1, 8, 8), big), torch.Generator().manual_seed(4))
    frac = (seen[-1] == 10).float().mean().item()
    assert 0.08 < frac < 0.12 and torch.equal(seen[-1][seen[-1] != 10], big[seen[-1] != 10])


def test_unconditional_dit_has_only_the_null_row_and_takes_no_labels():
    cfg = get_preset("images-smoke").with_sets(["model.conditional=false", "loss.label_dropout=0"]).validate()
    model, objective, batch_fn = cfg.build()
    assert isinstance(model, GMDiT) and model.num_classes == 0
    assert model.emb.class_embedder.embedding_table.weight.shape[0] == 1  # the null row only
    x0 = batch_fn(1, 0, 1, torch.Generator().manual_seed(0))
    assert isinstance(x0, torch.Tensor) and x0.shape == (16, 1, 8, 8)  # no labels in the batch
    assert torch.isfinite(objective(model, x0, torch.Generator().manual_seed(1))).all()
    t = torch.full((16,), 0.5)
    assert torch.equal(model(x0, t).means, model(x0, t, class_labels=torch.zeros(16, dtype=torch.long)).means)


def test_velocity_twin_has_the_same_trunk():
    gm = get_preset("images-smoke").validate().build()[0]
    fm = get_preset("images-smoke").with_sets(["model.head=velocity", "loss.kind=fm"]).validate().build()[0]
    trunk = {k: v.shape for k, v in gm.state_dict().items() if "proj_out_2" not in k and "logstd" not in k}
    assert trunk == {k: v.shape for k, v in fm.state_dict().items() if "proj_out_2" not in k}


@pytest.mark.parametrize(
    "sets, key",
    [
        (["model.arch=vit"], "model.arch"),
        (["model.num_layers=0"], "model.num_layers"),
    ],
)
def test_dit_validation_names_the_field(sets, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        get_preset("images-smoke").with_sets(sets).validate()


def test_label_dropout_needs_a_conditional_model():
    with pytest.raises(ConfigError, match="^loss.label_dropout:"):
        get_preset("digits-smoke").with_sets(["loss.label_dropout=0.1"]).validate()


# ------------------------------------------------------------------------------------ spectral training
@pytest.mark.parametrize(
    "sets, key",
    [
        (["model.head=velocity", "loss.kind=fm"], "model.spectral"),  # a spectrum net needs a GM
        (["model.spectrum_layers=8,0"], "model.spectrum_layers"),
        (["model.spectral_weight=0"], "model.spectral_weight"),
        (["model.spectral_lr=-1"], "model.spectral_lr"),
    ],
)
def test_spectral_validation_names_the_field(sets, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        get_preset("images-smoke-spectral").with_sets(sets).validate()


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_spectral_build_wraps_the_same_trunk(arch):
    sets = [] if arch == "dit" else ["model.arch=unet", "model.base=8", "model.time_dim=16", "model.mults=1"]
    plain = get_preset("images-smoke").with_sets(sets).validate().build()[0]
    cfg = get_preset("images-smoke-spectral").with_sets([*sets, "model.spectral_lr=0.002"]).validate()
    model, objective, batch_fn = cfg.build()
    assert isinstance(model, SpectralDenoiser) and type(model.trunk) is type(plain)
    assert model.spectrum_net.base_size == (1, 8, 8) and model.spectrum_net.config["layers"] == [64, 8]
    assert model.spectrum_lr == 0.002 and model.num_classes == 10
    want = plain.state_dict()  # built after the trunk: the trunk's initial weights are unchanged
    assert all(torch.equal(v, want[k]) for k, v in model.trunk.state_dict().items())
    per = objective(
        model, batch_fn(1, 0, 1, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1)
    )
    assert per.shape == (16,) and torch.isfinite(per).all()


def test_spectral_run_trains_the_trunk_exactly_as_without_and_resumes(tmp_path):
    sets = ["loop.steps=4", "loop.ckpt_every=2", "model.spectral_lr=0.003"]
    spec_cfg = get_preset("images-smoke-spectral").with_sets([*sets, f"loop.out_dir={tmp_path / 's'}"])
    spec = run_experiment(spec_cfg, progress=False)
    plain = run_experiment(
        get_preset("images-smoke").with_sets([*sets, f"loop.out_dir={tmp_path / 'p'}"]), progress=False
    )
    for a, b in ((spec.model.trunk, plain.model), (spec.ema_model.trunk, plain.ema_model)):
        want = b.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in a.state_dict().items())  # raw and EMA weights
    flat = SpectrumMLP(base_size=[1, 8, 8], layers=[64, 8]).state_dict()
    assert not torch.equal(spec.model.spectrum_net.state_dict()["mlp.4.weight"], flat["mlp.4.weight"])
    state = torch.load(tmp_path / "s" / "state.pt", weights_only=True)
    assert sorted({g["lr"] for g in state["optimizer"]["param_groups"]}) == [0.001, 0.003]
    # interrupted after step 2 (a checkpoint), resumed to step 4: the same weights as in one go
    half = get_preset("images-smoke-spectral").with_sets([*sets, f"loop.out_dir={tmp_path / 'r'}"])
    run_experiment(half.with_sets(["loop.steps=2"]), progress=False)
    resumed = run_experiment(half, progress=False)
    assert resumed.resumed_from == 2
    want = spec.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in resumed.model.state_dict().items())
    run = load_run(tmp_path / "r")  # EMA weights, rebuilt from config.json
    assert isinstance(run.model, SpectralDenoiser) and run.head == "gm" and run.event_shape == (1, 8, 8)
    ema = spec.ema_model.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in run.model.state_dict().items())
    assert isinstance(load_network(tmp_path / "r", use_ema=False), SpectralDenoiser)


def test_spectral_run_samples_spectrally_by_default(spectral_run):
    model = load_run(spectral_run.path).model
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(solver="gm-sde", nfe=2, order=2, cond={"class_labels": torch.arange(4)})

    def draw(**extra):
        return gmflow.sample(model, noise, generator=torch.Generator().manual_seed(1), **kw, **extra)

    auto, on, off = draw(), draw(spectral=True), draw(spectral=False)
    assert torch.equal(auto, on) and not torch.equal(auto, off)
    plain = gmflow.sample(model.trunk, noise, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(plain, off)  # without the spectrum net: the trunk's per-pixel GM-SDE
