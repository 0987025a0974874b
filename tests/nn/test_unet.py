"""Tests for gmflow.nn.unet.SmallUNet: shapes, GM init, dropout, config, dtypes, validation, classes."""

from __future__ import annotations

import json
import math

import pytest
import torch

import gmflow
from gmflow.gm import GaussianMixture
from gmflow.nn.unet import SmallUNet

SMALL = dict(base=16, time_dim=32)  # keeps every test fast


def _inputs(b=4, c=1, size=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, size, size, generator=g, dtype=dtype), torch.rand(b, generator=g, dtype=dtype)


@pytest.mark.parametrize(
    "cfg,size",
    [
        (dict(), 16),
        (dict(), 8),
        (dict(mults=(1, 2, 2), num_res=2), 16),
        (dict(mults=(1,), channels=3), 12),
    ],
)
def test_velocity_shapes(cfg, size):
    torch.manual_seed(0)
    m = SmallUNet(**{**SMALL, **cfg})
    x, t = _inputs(c=m.channels, size=size)
    u = m(x, t)
    assert isinstance(u, torch.Tensor) and u.shape == x.shape and u.dtype == torch.float32
    assert torch.isfinite(u).all()


@pytest.mark.parametrize("k,c", [(8, 1), (3, 2)])
def test_gm_shapes_and_init(k, c):
    torch.manual_seed(0)
    m = SmallUNet(**SMALL, channels=c, head="gm", num_components=k)
    x, t = _inputs(b=5, c=c)
    gm = m(x, t)
    assert isinstance(gm, GaussianMixture)
    assert gm.means.shape == (5, k, c, 16, 16)
    assert gm.logweights.shape == (5, k, 1, 16, 16)
    assert gm.logstds.shape == (5, 1, 1, 1, 1)
    # paper init: uniform weights and s = 1 ...
    torch.testing.assert_close(gm.logweights, torch.full_like(gm.logweights, -math.log(k)))
    assert torch.equal(gm.logstds, torch.zeros_like(gm.logstds))
    # ... but distinct component means
    assert (gm.means - gm.means.mean(1, keepdim=True)).abs().mean() > 1e-3


def test_gm_logweights_normalised_after_training_step():
    torch.manual_seed(0)
    m = SmallUNet(**SMALL, head="gm", num_components=4)
    x, t = _inputs()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    gm = m(x, t)
    (gm.means.square().mean() + gm.logweights[:, 0].mean() + gm.logstds.square().sum()).backward()
    opt.step()
    gm = m(x, t)
    assert not torch.allclose(gm.logweights, torch.full_like(gm.logweights, -math.log(4)))
    torch.testing.assert_close(gm.logweights.exp().sum(1), torch.ones(4, 1, 16, 16))


def test_logstd_depends_on_time_only_and_is_detached():
    torch.manual_seed(0)
    m = SmallUNet(**SMALL, head="gm", num_components=2)
    with torch.no_grad():  # make the log-std head non-trivial
        for p in m.logstd.parameters():
            p.normal_(0, 0.5)
    x, _ = _inputs(b=3)
    t = torch.tensor([0.2, 0.2, 0.7])
    gm = m(x, t)
    s = gm.logstds.flatten()
    assert torch.allclose(s[0], s[1]) and not torch.allclose(s[0], s[2])  # same t -> same s
    gm.logstds.sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in m.time_mlp.parameters())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in m.logstd.parameters())


def test_all_parameters_receive_gradients():
    torch.manual_seed(0)
    m = SmallUNet(**SMALL, mults=(1, 2, 2))
    x, t = _inputs()
    m(x, t).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing


def test_time_conditioning_changes_output():
    torch.manual_seed(0)
    m = SmallUNet(**SMALL)
    x, _ = _inputs(b=2)
    assert not torch.allclose(m(x, 0.1), m(x, 0.9))


def test_scalar_t_matches_vector_t():
    torch.manual_seed(0)
    m = SmallUNet(**SMALL)
    x, _ = _inputs(b=3)
    ref = m(x, torch.full((3,), 0.3))
    torch.testing.assert_close(m(x, 0.3), ref)
    torch.testing.assert_close(m(x, torch.tensor(0.3)), ref)


def test_dropout_setter():
    torch.manual_seed(0)
    m = SmallUNet(**SMALL, dropout=0.0).train()
    x, t = _inputs()
    assert torch.equal(m(x, t), m(x, t))  # no dropout: deterministic in train mode
    m.set_dropout(0.3)
    assert m.dropout == 0.3 and m.config["dropout"] == 0.3
    assert all(mod.p == 0.3 for mod in m.modules() if isinstance(mod, torch.nn.Dropout))
    a, b = m(x, t), m(x, t)
    assert not torch.equal(a, b)  # dropout active in train mode
    m.eval()
    assert torch.equal(m(x, t), m(x, t))  # and inactive in eval mode
    m.train().set_dropout(0.0)
    assert torch.equal(m(x, t), m(x, t))
    with pytest.raises(ValueError):
        m.set_dropout(1.0)
    with pytest.raises(ValueError):
        SmallUNet(dropout=-0.1)


@pytest.mark.parametrize("head", ["velocity", "gm"])
def test_config_round_trip_identical_outputs(head):
    torch.manual_seed(0)
    m = SmallUNet(**SMALL, head=head, num_components=3, mults=(1, 2), dropout=0.1).eval()
    m.set_dropout(0.05)
    cfg = json.loads(json.dumps(m.to_config()))
    assert cfg == m.config and cfg["dropout"] == 0.05 and cfg["mults"] == [1, 2]
    m2 = SmallUNet.from_config(cfg).eval()
    m2.load_state_dict(m.state_dict())
    x, t = _inputs()
    a, b = m(x, t), m2(x, t)
    if head == "gm":
        for name in ("means", "logweights", "logstds"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    else:
        assert torch.equal(a, b)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in m2.parameters())


def test_default_parameter_counts():
    assert sum(p.numel() for p in SmallUNet().parameters()) == 427_265
    assert sum(p.numel() for p in SmallUNet(head="gm").parameters()) == 448_241


def test_bf16_autocast_gm_is_float32():
    torch.manual_seed(0)
    m = SmallUNet(**SMALL, head="gm", num_components=4)
    x, t = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gm = m(x, t)
        u = SmallUNet(**SMALL)(x, t)
    assert gm.means.dtype == gm.logweights.dtype == gm.logstds.dtype == torch.float32
    assert u.dtype == torch.float32
    torch.testing.assert_close(gm.logweights.exp().sum(1), torch.ones(4, 1, 16, 16))
    ref = m(x, t)  # bf16 result is close to the fp32 one
    assert (gm.means - ref.means).abs().max() < 0.1


def test_float64_model():
    torch.manual_seed(0)
    m = SmallUNet(**SMALL, head="gm", num_components=2).double()
    x, t = _inputs(dtype=torch.float64)
    gm = m(x, t)
    assert gm.means.dtype == gm.logstds.dtype == torch.float64


def test_overfits_one_batch():
    """A few Adam steps of flow matching on one batch must lower the loss (the net can learn)."""
    torch.manual_seed(0)
    m = SmallUNet(**SMALL)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 1, 8, 8, generator=g).clamp(-1, 1)
    eps = torch.randn(16, 1, 8, 8, generator=g)
    t = torch.rand(16, generator=g)
    xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = (m(xt, t) - (eps - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize(
    "x_shape,t_shape,err",
    [
        ((2, 1, 16), (2,), ValueError),  # not 4-D
        ((2, 3, 16, 16), (2,), ValueError),  # wrong channels
        ((2, 1, 15, 16), (2,), ValueError),  # not divisible by 2
        ((2, 1, 16, 16), (3,), ValueError),  # t batch mismatch
        ((2, 1, 16, 16), (2, 1), ValueError),  # t not (B,)
    ],
)
def test_input_validation(x_shape, t_shape, err):
    m = SmallUNet(**SMALL)
    with pytest.raises(err):
        m(torch.randn(*x_shape), torch.rand(*t_shape))


def test_bad_inputs_types_and_constructor():
    m = SmallUNet(**SMALL)
    with pytest.raises(TypeError):
        m(torch.zeros(2, 1, 16, 16, dtype=torch.long), torch.rand(2))
    with pytest.raises(TypeError):
        m(torch.zeros(2, 1, 16, 16), "0.5")
    with pytest.raises(ValueError):
        SmallUNet(head="eps")
    with pytest.raises(ValueError):
        SmallUNet(mults=(1, 2, 2), image_size=6)
    with pytest.raises(ValueError):
        SmallUNet(mults=())
    with pytest.raises(ValueError):
        SmallUNet(head="gm", num_components=0)
    assert SmallUNet(image_size=8).event_shape == (1, 8, 8)


# ------------------------------------------------------------------------------ class conditioning
def test_unconditional_default_has_no_class_table():
    m = SmallUNet(**SMALL)
    assert m.num_classes == 0 and m.config["num_classes"] == 0
    assert not any("class" in k for k in m.state_dict())
    x, t = _inputs()
    with pytest.raises(ValueError, match="class_labels"):
        m(x, t, class_labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        SmallUNet(num_classes=-1)


@pytest.mark.parametrize("head", ["velocity", "gm"])
def test_class_conditioning(head):
    torch.manual_seed(0)
    uncond = SmallUNet(**SMALL, head=head, num_components=3)
    torch.manual_seed(0)
    m = SmallUNet(**SMALL, head=head, num_components=3, num_classes=5).eval()
    # the table is built last: every other parameter is the unconditional model's
    table = m.state_dict().pop("class_embed.embedding_table.weight")
    assert table.shape == (6, 32)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in uncond.state_dict().items())
    with torch.no_grad():
        m.class_embed.embedding_table.weight.normal_()  # make the classes clearly distinct
    x, t = _inputs(b=3)

    def flat(o):
        return (
            torch.cat([o.means.flatten(), o.logweights.flatten(), o.logstds.flatten()]) if head == "gm" else o
        )

    assert torch.equal(flat(m(x, t)), flat(m(x, t, torch.full((3,), 5))))  # None = the null class 5
    a, b = flat(m(x, t, torch.tensor([0, 1, 2]))), flat(m(x, t, torch.tensor([3, 4, 0])))
    assert (a - b).abs().max() > 1e-3
    for bad, err in [(torch.tensor([0, 1, 6]), ValueError), (torch.tensor([0, 1]), ValueError)]:
        with pytest.raises(err, match="class_labels"):
            m(x, t, bad)
    with pytest.raises(TypeError, match="class_labels"):
        m(x, t, torch.zeros(3))
    # config round trip
    cfg = json.loads(json.dumps(m.config))
    assert cfg["num_classes"] == 5
    m2 = SmallUNet.from_config(cfg).eval()
    m2.load_state_dict(m.state_dict())
    assert torch.equal(flat(m(x, t, torch.tensor([0, 1, 2]))), flat(m2(x, t, torch.tensor([0, 1, 2]))))


def test_class_conditional_guided_sampling():
    torch.manual_seed(0)
    m = SmallUNet(**SMALL, head="gm", num_components=3, num_classes=4, image_size=8).eval()
    y, null = torch.tensor([0, 3]), torch.full((2,), 4)
    out = gmflow.sample(
        m, torch.randn(2, 1, 8, 8), solver="gm-ode", nfe=2, cond={"class_labels": y},
        uncond={"class_labels": null}, guidance=gmflow.ProbabilisticGuidance(0.3),
    )  # fmt: skip
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
