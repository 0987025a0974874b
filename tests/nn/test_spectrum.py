"""SpectrumMLP: the official fixture (strict keys, fp32 forward), folders, config, output normalisation,
frequency cropping for smaller images, and input checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gmflow.nn import SpectrumMLP
from gmflow.nn.spectrum import crop_frequencies

FIXTURE = Path(__file__).parents[1] / "fixtures" / "official_gmdit"
NET = FIXTURE / "spectrum_net"
OFFICIAL_SHAPES = {
    "mlp.0.weight": (64, 2),
    "mlp.0.bias": (64,),
    "mlp.2.weight": (8, 64),
    "mlp.2.bias": (8,),
    "mlp.4.weight": (256, 8),
    "mlp.4.bias": (256,),
}


@pytest.fixture(scope="module")
def official() -> SpectrumMLP:
    return SpectrumMLP.from_pretrained(NET)


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "io_spectrum_net.safetensors")


def test_fixture_loads_with_the_official_layout(official):
    assert official.config == {"base_size": [4, 8, 8], "layers": [64, 8]}
    assert {k: tuple(v.shape) for k, v in official.state_dict().items()} == OFFICIAL_SHAPES
    assert not official.training


@pytest.mark.parametrize("variant", [None, "bf16"])
def test_fixture_forward_matches_official_fp32(official, io, variant):
    net = official if variant is None else SpectrumMLP.from_pretrained(NET, variant=variant)
    with torch.no_grad():
        lps = net(io["input.mean"], io["input.var"])
    assert lps.dtype == torch.float32 and lps.shape == (2, 4, 8, 8)
    assert (lps - io["output.log_var"]).abs().max() <= 1e-5


def test_features_are_mean_variance_and_unbiased_spatial_variance(official, io):
    m, v = io["input.mean"], io["input.var"]
    f = official.features(m, v)
    hw = m.shape[-1] * m.shape[-2]
    spatial = ((m - m.mean((-2, -1), keepdim=True)) ** 2).sum((-2, -1)) / (hw - 1)
    assert torch.allclose(f[:, 0], v.mean((1, 2, 3)))
    assert torch.allclose(f[:, 1], spatial.mean(1))
    # a per-sample (spatially averaged) variance gives the same spectrum
    with torch.no_grad():
        a = official(m, v)
        b = official(m, v.mean((2, 3), keepdim=True))
    assert torch.allclose(a, b, atol=1e-6)


def test_save_pretrained_round_trip(official, io, tmp_path):
    official.save_pretrained(tmp_path / "net")
    cfg = json.loads((tmp_path / "net" / "config.json").read_text())
    assert cfg == {"_class_name": "_SpectrumMLP", "base_size": [4, 8, 8], "layers": [64, 8]}
    assert set(load_file(tmp_path / "net" / "diffusion_pytorch_model.safetensors")) == set(OFFICIAL_SHAPES)
    again = SpectrumMLP.from_pretrained(tmp_path / "net")
    with torch.no_grad():
        m, v = io["input.mean"], io["input.var"]
        assert torch.equal(again(m, v), official(m, v))
    official.save_pretrained(tmp_path / "net", variant="bf16")
    assert SpectrumMLP.from_pretrained(tmp_path / "net", variant="bf16").mlp[4].weight.dtype == torch.float32


def test_pipeline_folder_needs_the_subfolder():
    with pytest.raises(FileNotFoundError, match="subfolder='spectrum_net'"):
        SpectrumMLP.from_pretrained(FIXTURE)
    assert SpectrumMLP.from_pretrained(FIXTURE, subfolder="spectrum_net").config["layers"] == [64, 8]


def test_strict_loading_names_what_does_not_fit(tmp_path, official):
    SpectrumMLP(base_size=[4, 8, 8], layers=[32, 8]).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({"base_size": [4, 8, 8], "layers": [64, 8]}))
    with pytest.raises(ValueError, match=r"shape mismatches \[mlp\.0\.bias \(32,\) vs \(64,\)"):
        SpectrumMLP.from_pretrained(tmp_path / "a")
    SpectrumMLP(base_size=[4, 8, 8], layers=[64, 8, 8]).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text(json.dumps(official.config))
    with pytest.raises(ValueError, match=r"unexpected keys \[mlp\.6\.bias, mlp\.6\.weight\]"):
        SpectrumMLP.from_pretrained(tmp_path / "b")


def test_config_round_trip_and_validation():
    net = SpectrumMLP(base_size=(1, 6, 5), layers=(16,))
    assert net.config == {"base_size": [1, 6, 5], "layers": [16]}
    assert SpectrumMLP.from_config({**net.config, "_class_name": "x"}).config == net.config
    assert SpectrumMLP().config == {"base_size": [4, 32, 32], "layers": [64, 8]}
    with pytest.raises(ValueError, match="unknown SpectrumMLP config keys: depth"):
        SpectrumMLP(depth=3)
    with pytest.raises(ValueError, match="base_size must be 3 ints >= 1"):
        SpectrumMLP(base_size=[4, 8])
    with pytest.raises(ValueError, match="layers must be a non-empty list of ints >= 1"):
        SpectrumMLP(layers=[64, 0])
    with pytest.raises(TypeError, match="config must be a dict"):
        SpectrumMLP.from_config([1, 2])


def test_init_is_flat_and_outputs_have_unit_mean_power():
    torch.manual_seed(0)
    mean, var = torch.randn(3, 2, 6, 5), torch.rand(3, 1, 6, 5) + 0.1
    net = SpectrumMLP(base_size=[2, 6, 5], layers=[8, 4])
    assert torch.equal(net(mean, var), torch.zeros(3, 2, 6, 5))  # zero last layer: flat spectrum
    torch.nn.init.normal_(net.mlp[-1].weight)
    with torch.no_grad():
        lps = net(mean, var)
    assert lps.abs().max() > 0.1
    assert torch.allclose(lps.exp().mean((-2, -1)), torch.ones(3, 2), atol=1e-5)


@pytest.mark.parametrize("size", [(8, 8), (5, 7), (4, 2), (1, 3)])
def test_smaller_images_keep_the_same_signed_frequencies(size):
    torch.manual_seed(1)
    net = SpectrumMLP(base_size=[2, 8, 8], layers=[8])
    torch.nn.init.normal_(net.mlp[-1].weight)
    h, w = size
    mean, var = torch.randn(2, 2, h, w), torch.rand(2, 1, 1, 1)
    with torch.no_grad():
        lps = net(mean, var)
        raw = net.mlp(net.features(mean, var)).reshape(2, 2, 8, 8)
    assert lps.shape == (2, 2, h, w)
    assert torch.allclose(torch.logsumexp(lps.flatten(2), -1), torch.full((2, 2), math.log(h * w)), atol=1e-5)
    # lps[i, j] is the base output at the same signed frequency (i, j) (up to the per-channel shift)
    for i in range(h):
        for j in range(w):
            ki = i if i < (h + 1) // 2 else i - h
            kj = j if j < (w + 1) // 2 else j - w
            want = raw[..., ki % 8, kj % 8] - raw[..., 0, 0]
            assert torch.allclose(lps[..., i, j] - lps[..., 0, 0], want, atol=1e-5)


def test_crop_frequencies_is_identity_on_the_base_grid_and_rejects_larger_grids():
    x = torch.randn(2, 3, 4, 6)
    assert torch.equal(crop_frequencies(x, (4, 6)), x)
    with pytest.raises(ValueError, match=r"size must be at most the base grid \(4, 6\), got \(5, 6\)"):
        crop_frequencies(x, (5, 6))


def test_bad_inputs_name_the_argument(official):
    m, v = torch.zeros(2, 4, 8, 8), torch.ones(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"mean must have shape \(B, 4, H, W\)"):
        official(torch.zeros(2, 3, 8, 8), v)
    with pytest.raises(ValueError, match=r"mean must have shape \(B, 4, H, W\)"):
        official(torch.zeros(4, 8, 8), v)
    with pytest.raises(ValueError, match=r"image size \(9, 8\) must have H <= 8, W <= 8"):
        official(torch.zeros(2, 4, 9, 8), torch.ones(2, 1, 9, 8))
    with pytest.raises(ValueError, match="at least 2 pixels"):
        official(torch.zeros(2, 4, 1, 1), torch.ones(2, 1, 1, 1))
    with pytest.raises(ValueError, match=r"var must have shape \(2, 1, 8, 8\) or \(2, 1, 1, 1\)"):
        official(m, torch.ones(2, 4, 8, 8))
    with pytest.raises(TypeError, match="var must be a floating-point"):
        official(m, torch.ones(2, 1, 8, 8, dtype=torch.int64))
