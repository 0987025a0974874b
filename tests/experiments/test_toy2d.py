"""gmflow.experiments.toy2d (and the preset table): presets, validation naming the key, the run record."""

from __future__ import annotations

import pytest
import torch

from gmflow.config import ConfigError
from gmflow.experiments import PRESETS, Toy2DConfig, get_preset
from gmflow.gm import GaussianMixture
from gmflow.nn import ToyMLP


def test_presets_validate_and_official_minimal_recipe():
    toy = {"toy-gmflow", "toy-fm", "toy-official-minimal", "toy-smoke"}
    images = {"fmnist-gmdit", "fmnist-fm", "fmnist-gmdit-spectral", "mnist5k-gmdit", "mnist5k-fm"}
    images |= {"digits-smoke", "images-smoke", "images-smoke-spectral"}
    assert set(PRESETS) == toy | images
    for name, cfg in PRESETS.items():
        assert cfg.validate() is cfg, name
    m = get_preset("toy-official-minimal")
    assert (m.model.num_components, m.model.width, m.model.depth) == (64, 512, 5)
    lp = m.loop
    assert (lp.batch_size, lp.optimizer, lp.lr, lp.steps, m.loss.kind) == (4096, "adam", 2e-4, 5000, "gm_nll")
    assert (m.loss.time_sampler, lp.ema, lp.warmup_steps, lp.grad_clip) == ("uniform", "none", 0, 0.0)
    g = get_preset("toy-gmflow")
    assert (g.loss.kind, g.loss.trans_ratio, g.loop.optimizer, g.loop.weight_decay) == (
        "transition",
        0.9,
        "adamw",
        0.0,
    )
    assert (g.loop.ema, g.loop.ema_gamma, g.loop.batch_size) == ("power", 7.0, 4096)
    assert g.loop.warmup_steps > 0 and g.model.num_components == 64 and g == Toy2DConfig()
    fm = get_preset("toy-fm")
    assert (fm.model.head, fm.loss.kind) == ("velocity", "fm")


def test_get_preset_returns_copies_and_names_unknown_presets():
    get_preset("toy-smoke").model.width = 999
    get_preset("toy-smoke").loop.steps = 999
    assert PRESETS["toy-smoke"].model.width != 999 and PRESETS["toy-smoke"].loop.steps != 999
    with pytest.raises(ConfigError, match="unknown preset 'toy-smok'; did you mean toy-smoke"):
        get_preset("toy-smok")
    with pytest.raises(ConfigError, match="available: toy-gmflow"):
        get_preset("zzz")


@pytest.mark.parametrize(
    "sets, key",
    [
        (["model.num_components=0"], "model.num_components"),
        (["model.width=0"], "model.width"),
        (["model.depth=0"], "model.depth"),
        (["model.head=mlp"], "model.head"),
        (["model.logstd_from=data"], "model.logstd_from"),
        (["loss.trans_ratio=0"], "loss.trans_ratio"),
        (["loss.trans_ratio=1.5"], "loss.trans_ratio"),
        (["loss.kind=fm"], "loss.kind"),  # fm needs a velocity head
        (["model.head=velocity"], "loss.kind"),  # transition needs a GM head
        (["data.name=mnist"], "data.name"),
        (["loss.time_sampler=beta"], "loss.time_sampler"),
        (["loop.optimizer=sgd"], "loop.optimizer"),
        (["loop.steps=0"], "loop.steps"),
    ],
)
def test_validation_names_the_field(sets, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        get_preset("toy-smoke").with_sets(sets).validate()


def test_build_and_record():
    cfg = get_preset("toy-smoke").with_sets(["data.name=moons", "model.constant_logstd=-2"])
    model, objective, batch_fn = cfg.build()
    assert isinstance(model, ToyMLP) and model.config["num_components"] == 8
    assert model.config["constant_logstd"] == -2.0
    out = model(batch_fn(1, 0, 1, torch.Generator().manual_seed(0)), 0.5)
    assert isinstance(out, GaussianMixture) and out.num_components == 8
    assert cfg.kind == "toy2d" and cfg.data_name == "moons" and cfg.resume_ignore == frozenset()
    assert cfg.record() == {"experiment": "toy2d", "data": "moons", "config": cfg.to_dict()}
    # build() seeds the initialisation: equal configs give equal networks
    again, _, _ = cfg.build()
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), again.state_dict().values()))
