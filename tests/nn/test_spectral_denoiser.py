"""gmflow.nn.SpectralDenoiser: a GM trunk + its spectrum net (forward, what samplers ask, config, layout,
optimizer groups, errors)."""

from __future__ import annotations

import pytest
import torch

from gmflow.nn import GMDiT, SmallUNet, SpectralDenoiser, SpectrumMLP


def _dit(**kw) -> GMDiT:
    cfg = dict(in_channels=1, sample_size=8, patch_size=2, num_layers=1, num_attention_heads=2,
               attention_head_dim=8, num_gaussians=3, logstd_inner_dim=16,
               num_embeds_ada_norm=10)  # fmt: skip
    return GMDiT(**{**cfg, **kw})


def _unet(**kw) -> SmallUNet:
    return SmallUNet(1, 8, (1, 2), time_dim=16, head="gm", num_components=3, image_size=8, **kw)


@pytest.mark.parametrize("trunk", [_dit, _unet])
def test_forward_is_the_trunks_and_samplers_find_what_they_need(trunk):
    torch.manual_seed(0)
    t_net = trunk()
    model = SpectralDenoiser(t_net, SpectrumMLP(base_size=[1, 8, 8], layers=[4]))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8])
    assert torch.equal(model(x, t).means, t_net(x, t).means)
    assert (model.head, tuple(model.event_shape), model.num_classes) == ("gm", (1, 8, 8), t_net.num_classes)
    assert model.null_class == model.num_classes
    assert isinstance(model.spectrum_net, SpectrumMLP)


def test_config_round_trip_and_the_parts_keep_their_own_layout():
    model = SpectralDenoiser(_dit(), SpectrumMLP(base_size=[1, 16, 16], layers=[4]), spectrum_lr=1e-3)
    cfg = model.config
    assert cfg["trunk"]["class"] == "GMDiT" and cfg["spectrum_net"]["base_size"] == [1, 16, 16]
    again = SpectralDenoiser.from_config(cfg)
    assert again.config == cfg and again.spectrum_lr is None  # the lr is a training setting, not the net's
    again.load_state_dict(model.state_dict(), strict=True)
    state = model.state_dict()
    trunk = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
    spec = {k.removeprefix("spectrum_net."): v for k, v in state.items() if k.startswith("spectrum_net.")}
    assert len(trunk) + len(spec) == len(state)
    _dit().load_state_dict(trunk, strict=True)  # the official GM-DiT names, unchanged
    SpectrumMLP(base_size=[1, 16, 16], layers=[4]).load_state_dict(spec, strict=True)


def test_optimizer_groups_are_the_trunk_then_the_spectrum_net_with_its_lr():
    model = SpectralDenoiser(_dit(), SpectrumMLP(base_size=[1, 8, 8], layers=[4]), spectrum_lr=0.5)
    a, b = model.optimizer_groups()
    assert [id(p) for p in a["params"]] == [id(p) for p in model.trunk.parameters()] and "lr" not in a
    assert [id(p) for p in b["params"]] == [id(p) for p in model.spectrum_net.parameters()] and b["lr"] == 0.5
    assert "lr" not in SpectralDenoiser(_dit(), SpectrumMLP(base_size=[1, 8, 8])).optimizer_groups()[1]


@pytest.mark.parametrize(
    "make, err, match",
    [
        (
            lambda: SpectralDenoiser(torch.nn.Linear(2, 2), SpectrumMLP(base_size=[1, 8, 8])),
            TypeError,
            "GMDiT",
        ),
        (
            lambda: SpectralDenoiser(_dit(head="velocity"), SpectrumMLP(base_size=[1, 8, 8])),
            ValueError,
            "GM head",
        ),
        (lambda: SpectralDenoiser(_dit(), torch.nn.Linear(2, 2)), TypeError, "SpectrumMLP"),
        (lambda: SpectralDenoiser(_dit(), SpectrumMLP(base_size=[2, 8, 8])), ValueError, "base_size"),
        (lambda: SpectralDenoiser(_dit(), SpectrumMLP(base_size=[1, 4, 8])), ValueError, "at least 8 x 8"),
        (
            lambda: SpectralDenoiser(_dit(), SpectrumMLP(base_size=[1, 8, 8]), spectrum_lr=0),
            ValueError,
            "> 0",
        ),
        (
            lambda: SpectralDenoiser.from_config({"trunk": {"class": "ToyMLP", "config": {}}}),
            ValueError,
            "trunk",
        ),
    ],
)
def test_parts_that_do_not_fit_are_errors(make, err, match):
    with pytest.raises(err, match=match):
        make()
