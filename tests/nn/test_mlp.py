"""Tests for gmflow.nn: embeddings, heads and the toy MLP denoiser."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gmflow.gm import GaussianMixture
from gmflow.nn import (
    FourierPositionEmbedding,
    GMHead,
    PositionEmbedding2D,
    TimestepEmbedding,
    ToyMLP,
    VelocityHead,
    timestep_embedding,
)


def _inputs(b: int = 6, c: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, dtype=dtype) * 3, torch.rand(b, generator=g, dtype=dtype)


def _gm_nll(gm: GaussianMixture, u: torch.Tensor) -> torch.Tensor:
    """Mean GM negative log-likelihood of u (B, C), written out independently of gm.py."""
    c = u.shape[1]
    sq = (u[:, None, :] - gm.means).square().sum(-1, keepdim=True)  # (B, K, 1)
    comp = gm.logweights - 0.5 * sq * torch.exp(-2 * gm.logstds) - c * gm.logstds
    return -(torch.logsumexp(comp, dim=1).mean() - 0.5 * c * math.log(2 * math.pi))


# ------------------------------------------------------------------------------------ embeddings
def test_timestep_embedding_hand_values():
    emb = TimestepEmbedding(256)
    out = emb(torch.tensor([0.0, 1.0]))
    assert out.shape == (2, 256) and out.dtype == torch.float32
    # t = 0: cos block first (flip_sin_to_cos) -> ones, then sin block -> zeros.
    torch.testing.assert_close(out[0, :128], torch.ones(128))
    torch.testing.assert_close(out[0, 128:], torch.zeros(128))
    assert not torch.allclose(out[0], out[1])
    # t = 1 -> timestep 1000; entry i of each block uses f_i = exp(-ln(1e4) * i / (128 - 1)).
    for i in (0, 1, 5, 127):
        f = math.exp(-math.log(10000.0) * i / 127)
        assert out[1, i].item() == pytest.approx(math.cos(1000.0 * f), abs=2e-4)
        assert out[1, 128 + i].item() == pytest.approx(math.sin(1000.0 * f), abs=2e-4)
    # lowest frequency is exactly 1 / max_period because of freq_shift = 1
    assert out[1, 255].item() == pytest.approx(math.sin(0.1), abs=1e-6)


def test_timestep_embedding_options_and_fp64():
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    out = timestep_embedding(t, 7, flip_sin_to_cos=False, freq_shift=0.0)
    assert out.shape == (2, 7) and out.dtype == torch.float64
    assert torch.all(out[:, -1] == 0)  # odd dim padded
    f1 = math.exp(-math.log(10000.0) * 1 / 3)
    assert out[0, 1].item() == pytest.approx(math.sin(250.0 * f1), abs=1e-12)
    with pytest.raises(ValueError):
        timestep_embedding(torch.zeros(2, 1))


def test_position_embedding_layout_and_values():
    pe = PositionEmbedding2D()
    assert pe.out_dim == 256
    p = pe.periods(dtype=torch.float64)
    assert p[0].item() == pytest.approx(5e-3) and p[-1].item() == pytest.approx(50.0)
    torch.testing.assert_close(
        p[1:] / p[:-1], torch.full((63,), (50 / 5e-3) ** (1 / 63), dtype=torch.float64)
    )
    x = torch.tensor([[0.3, -1.7]], dtype=torch.float64)
    out = pe(x)
    assert out.shape == (1, 256) and out.dtype == torch.float64
    # sines coordinate-major, then cosines: column d * 64 + j (sin), 128 + d * 64 + j (cos)
    for d, j in ((0, 0), (1, 10), (1, 63)):
        a = 2 * math.pi * x[0, d].item() / p[j].item()
        assert out[0, d * 64 + j].item() == pytest.approx(math.sin(a), abs=1e-9)
        assert out[0, 128 + d * 64 + j].item() == pytest.approx(math.cos(a), abs=1e-9)
    assert FourierPositionEmbedding(in_dim=3, n_freqs=5).out_dim == 30
    with pytest.raises(ValueError):
        pe(torch.zeros(4, 3))


# ------------------------------------------------------------------------------------------ heads
def test_gm_head_layout_is_component_major():
    head = GMHead(16, 3, 4)
    h = torch.randn(5, 16)
    gm = head(h)
    flat = head.means(h)
    for k, c in ((0, 0), (1, 2), (3, 1)):
        torch.testing.assert_close(gm.means[:, k, c], flat[:, k * 3 + c])


def test_gm_head_logstd_options():
    h = torch.randn(4, 8)
    gm = GMHead(8, 2, 3, constant_logstd=-1.5)(h)
    torch.testing.assert_close(gm.logstds, torch.full((4, 1, 1), -1.5))
    assert not any("logstd" in n for n, _ in GMHead(8, 2, 3, constant_logstd=0.0).named_parameters())

    # separate conditioning input with stop-gradient (paper's GM-DiT), through an MLP
    head = GMHead(8, 2, 3, logstd_in_features=5, logstd_hidden=7, detach_logstd=True)
    with torch.no_grad():
        head.logstd.net[-1].weight.normal_()
    cond = torch.randn(4, 5, requires_grad=True)
    feats = h.clone().requires_grad_(True)
    gm = head(feats, cond)
    assert gm.logstds.shape == (4, 1, 1)
    gm.logstds.sum().backward()
    assert cond.grad is None and feats.grad is None
    assert head.logstd.net[-1].weight.grad is not None
    # without detach the gradient reaches the conditioning features
    head2 = GMHead(8, 2, 3, logstd_in_features=5, logstd_hidden=7)
    with torch.no_grad():
        head2.logstd.net[-1].weight.normal_()
    cond2 = torch.randn(4, 5, requires_grad=True)
    head2(h, cond2).logstds.sum().backward()
    assert cond2.grad is not None and cond2.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="logstd_features"):
        head2(h)
    with pytest.raises(ValueError, match="logstd_features"):
        GMHead(8, 2, 3)(h, cond2)


def test_velocity_head():
    head = VelocityHead(8, 3)
    out = head(torch.randn(4, 8))
    assert out.shape == (4, 3) and out.dtype == torch.float32
    assert torch.all(head.proj.bias == 0)


# ---------------------------------------------------------------------------------------- ToyMLP
@pytest.mark.parametrize("k", [1, 8, 64])
def test_toy_mlp_shapes_and_init(k):
    torch.manual_seed(0)
    model = ToyMLP(num_components=k, width=64, depth=2)
    x, t = _inputs()
    gm = model(x, t)
    assert isinstance(gm, GaussianMixture)
    assert gm.means.shape == (6, k, 2) and gm.logweights.shape == (6, k, 1) and gm.logstds.shape == (6, 1, 1)
    torch.testing.assert_close(gm.logweights, torch.full((6, k, 1), -math.log(k)))
    torch.testing.assert_close(gm.logstds, torch.zeros(6, 1, 1))
    if k > 1:  # components start distinct
        assert (gm.means[:, 0] - gm.means[:, 1]).abs().min() > 0


def test_toy_mlp_param_count_matches_official():
    model = ToyMLP()  # channels 2, width 512, depth 5, K = 64
    assert sum(p.numel() for p in model.parameters()) == 1_412_289
    trunk = sum(p.numel() for p in model.trunk.parameters())
    assert trunk == 5 * (512 * 512 + 512)
    assert model.trunk[0].in_features == 256 + 256


def test_toy_mlp_init_statistics():
    torch.manual_seed(0)
    model = ToyMLP()
    w = model.trunk[2].weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.02)
    assert torch.all(model.trunk[0].bias == 0)
    assert torch.all(model.head.logits.weight == 0) and torch.all(model.head.logstd.net.weight == 0)
    assert model.head.means.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)


def test_gradients_reach_all_params():
    torch.manual_seed(0)
    model = ToyMLP(num_components=8, width=32, depth=3)
    x, t = _inputs(16)
    u = torch.randn(16, 2)
    loss = _gm_nll(model(x, t), u)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_velocity_model():
    model = ToyMLP(head="velocity", width=32, depth=2)
    x, t = _inputs()
    out = model(x, t)
    assert isinstance(out, torch.Tensor) and out.shape == (6, 2)
    assert sum(p.numel() for p in ToyMLP(head="velocity").parameters()) == 5 * (512 * 512 + 512) + 512 * 2 + 2


def test_scalar_t_broadcasts():
    model = ToyMLP(num_components=4, width=32, depth=2)
    x, _ = _inputs()
    ref = model(x, torch.full((6,), 0.3))
    for t in (0.3, torch.tensor(0.3)):
        torch.testing.assert_close(model(x, t).means, ref.means)


def test_bf16_autocast_returns_fp32_gm():
    torch.manual_seed(0)
    model = ToyMLP(num_components=8, width=64, depth=2)
    x, t = _inputs()
    ref = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gm = model(x, t)
        assert model.trunk(torch.randn(2, 512)).dtype == torch.bfloat16  # the trunk does run in bf16
    for tensor in (gm.means, gm.logweights, gm.logstds):
        assert tensor.dtype == torch.float32
    torch.testing.assert_close(gm.logweights.exp().sum(1), torch.ones(6, 1))
    torch.testing.assert_close(gm.means, ref.means, atol=0.1, rtol=0.05)
    loss = _gm_nll(gm, torch.randn(6, 2))
    loss.backward()
    assert model.trunk[0].weight.grad is not None and model.trunk[0].weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ToyMLP(head="velocity", width=16, depth=1)(x, t).dtype == torch.float32


def test_fp64_path():
    torch.manual_seed(0)
    model = ToyMLP(num_components=8, width=64, depth=2)
    x, t = _inputs()
    ref = model(x, t)
    gm = model.double()(x.double(), t.double())
    for tensor in (gm.means, gm.logweights, gm.logstds):
        assert tensor.dtype == torch.float64
    torch.testing.assert_close(gm.means.float(), ref.means, atol=1e-4, rtol=1e-4)
    assert ToyMLP(head="velocity", width=16, depth=1).double()(x.double(), 0.5).dtype == torch.float64


def test_logstd_from_time_depends_on_t_only():
    torch.manual_seed(0)
    model = ToyMLP(num_components=4, width=32, depth=2, logstd_from="time")
    with torch.no_grad():
        model.head.logstd.net[-1].weight.normal_()
    x, _ = _inputs()
    t = torch.full((6,), 0.4)
    ls = model(x, t).logstds
    torch.testing.assert_close(ls, ls[:1].expand(6, 1, 1))
    assert not torch.allclose(model(x, torch.full((6,), 0.9)).logstds, ls)


def test_bad_inputs():
    model = ToyMLP(num_components=4, width=16, depth=1)
    x, t = _inputs()
    with pytest.raises(TypeError, match="x_t"):
        model(x.numpy(), t)
    with pytest.raises(TypeError, match="x_t"):
        model(x.long(), t)
    with pytest.raises(ValueError, match="x_t"):
        model(x[:, :1], t)
    with pytest.raises(ValueError, match="x_t"):
        model(x[:, :, None, None], t)
    with pytest.raises(ValueError, match="t must"):
        model(x, t[:3])
    with pytest.raises(ValueError, match="t must"):
        model(x, t[:, None])
    with pytest.raises(TypeError, match="t must"):
        model(x, "0.5")
    with pytest.raises(ValueError, match="head"):
        ToyMLP(head="mixture")


def test_config_round_trip():
    torch.manual_seed(0)
    model = ToyMLP(channels=3, num_components=5, width=48, depth=3, pos_freqs=8, time_dim=32)
    cfg = json.loads(json.dumps(model.to_config()))
    assert cfg == model.config
    clone = ToyMLP.from_config(cfg)
    clone.load_state_dict(model.state_dict())
    x, t = _inputs(c=3)
    a, b = model(x, t), clone(x, t)
    for name in ("means", "logweights", "logstds"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert ToyMLP(**cfg).config == cfg


def test_fp32_head_ignores_autocast():
    torch.manual_seed(0)
    head = GMHead(32, 2, 8, fp32=True)
    h = torch.randn(4, 32)
    with torch.no_grad():
        head.logits.weight.normal_()
    ref = head(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gm = head(h)
        low = GMHead(32, 2, 8)
        low.load_state_dict(head.state_dict())
        gm_low = low(h)
    assert torch.equal(gm.means, ref.means) and torch.equal(gm.logweights, ref.logweights)
    assert gm_low.means.dtype == torch.float32 and not torch.equal(gm_low.means, ref.means)
