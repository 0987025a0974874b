"""gmflow.train.objectives: flow-matching objectives (and the spectral loss of models with a spectrum net),
FlowLoss validation, batches and step seeds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gmflow.config import ConfigError
from gmflow.data import make_toy2d
from gmflow.flow import interpolate, sample_time, transition_pair
from gmflow.gm import GaussianMixture
from gmflow.nn import GMDiT, SpectralDenoiser, SpectrumMLP, ToyMLP
from gmflow.spectral import spectral_loss
from gmflow.train import FlowLoss, dataset_batch_fn, flow_loss, flow_objective, step_generator, step_seed


def _toy(head: str = "gm") -> ToyMLP:
    torch.manual_seed(0)
    return ToyMLP(2, 32, 2, head=head, num_components=4, time_dim=16, pos_freqs=4)


def test_step_seed_is_stable_and_distinct():
    assert step_seed(0, 1, 0) == step_seed(0, 1, 0)
    assert len({step_seed(s, k, r) for s in range(3) for k in range(3) for r in range(3)}) == 27
    assert 0 <= step_seed(2**40, 10**9, 7) < 2**63
    a = torch.rand(3, generator=step_generator(1, 2, 0))
    assert torch.equal(a, torch.rand(3, generator=step_generator(1, 2, 0)))


@pytest.mark.parametrize("kind, head", [("fm", "velocity"), ("gm_nll", "gm"), ("transition", "gm")])
def test_objectives_return_finite_per_sample_losses(kind, head):
    model = _toy(head)
    loss = FlowLoss(kind=kind, time_sampler="logit_normal").validate(head)
    g = step_generator(0, 1, 0)
    x0 = dataset_batch_fn(make_toy2d("checkerboard"), 64)(1, 0, 1, g)
    per = flow_objective(loss)(model, x0, g)
    assert per.shape == (64,) and torch.isfinite(per).all()
    per.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fm_objective_is_the_velocity_mse_with_t_then_noise():
    """The documented draw order (t, then eps) and the per-sample FM loss, by hand."""
    model = _toy("velocity")
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    loss = FlowLoss(kind="fm", time_sampler="uniform")
    got = flow_loss(model, x0, loss, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    t = sample_time(16, "uniform", generator=g, eps=loss.time_eps)
    eps = torch.randn(16, 2, generator=g)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    want = (model(x_t, t) - (eps - x0)).square().mean(1)
    torch.testing.assert_close(got, want)


def test_objective_head_mismatch_is_a_clear_error():
    x0 = torch.randn(8, 2)
    with pytest.raises(TypeError, match="velocity"):
        flow_objective(FlowLoss(kind="fm"))(_toy("gm"), x0, None)
    for kind in ("transition", "gm_nll"):
        with pytest.raises(TypeError, match="GaussianMixture"):
            flow_objective(FlowLoss(kind=kind))(_toy("velocity"), x0, None)


@pytest.mark.parametrize(
    "change, head, key",
    [
        (dict(kind="l1"), "gm", "kind"),
        (dict(kind="fm"), "gm", "kind"),  # fm needs a velocity head
        (dict(kind="transition"), "velocity", "kind"),  # transition needs a GM head
        (dict(trans_ratio=0.0), "gm", "trans_ratio"),
        (dict(trans_ratio=1.5), "gm", "trans_ratio"),
        (dict(time_sampler="beta"), "gm", "time_sampler"),
        (dict(time_scale=0.0), "gm", "time_scale"),
        (dict(time_eps=1.0), "gm", "time_eps"),
    ],
)
def test_flow_loss_validation_names_the_field(change, head, key):
    with pytest.raises(ConfigError, match=f"^loss.{key}:"):
        dataclasses.replace(FlowLoss(), **change).validate(head)


def test_dataset_batch_fn_splits_the_global_batch():
    fn = dataset_batch_fn(make_toy2d("ring"), 64)
    a = fn(1, 0, 2, step_generator(0, 1, 0))
    assert a.shape == (32, 2)
    assert torch.equal(a, fn(1, 0, 2, step_generator(0, 1, 0)))  # the generator decides the batch
    assert not torch.equal(a, fn(1, 1, 2, step_generator(0, 1, 1)))
    with pytest.raises(ValueError, match="not divisible"):
        fn(1, 0, 3, step_generator(0, 1, 0))


def test_gm_head_returns_a_gm():
    out = _toy("gm")(torch.zeros(3, 2), torch.full((3,), 0.5))
    assert isinstance(out, GaussianMixture) and out.num_components == 4


def _spectral_model() -> SpectralDenoiser:
    torch.manual_seed(0)
    trunk = GMDiT(in_channels=1, sample_size=8, patch_size=2, num_layers=1, num_attention_heads=2,
                  attention_head_dim=8, num_gaussians=3, logstd_inner_dim=16)  # fmt: skip
    net = SpectrumMLP(base_size=[1, 8, 8], layers=[8])
    with torch.no_grad():  # a non-flat spectrum, so that its loss has a gradient through every layer
        net.mlp[-1].weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return SpectralDenoiser(trunk, net)


@pytest.mark.parametrize("kind", ["transition", "gm_nll"])
def test_the_spectral_loss_trains_only_the_spectrum_net_and_the_gm_loss_only_the_trunk(kind):
    model = _spectral_model()
    x0 = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    loss = FlowLoss(kind=kind, time_sampler="logit_normal")
    total = flow_loss(model, x0, loss, torch.Generator().manual_seed(3), spectral_weight=0.7)
    plain = flow_loss(model.trunk, x0, loss, torch.Generator().manual_seed(3))  # the same t and noise
    # the spectral term by hand: the trunk's GM at the network input, its x0-GM and the clean batch
    g = torch.Generator().manual_seed(3)
    t = sample_time(6, "logit_normal", generator=g, eps=loss.time_eps)
    if kind == "transition":
        x_in = transition_pair(x0, t, loss.trans_ratio, g)[2]
    else:
        x_in = interpolate(x0, torch.randn(x0.shape, generator=g), t)
    spec = spectral_loss(model.spectrum_net, model.trunk(x_in, t).u_to_x0(x_in, t), x0, reduction="none")
    torch.testing.assert_close(total, plain + 0.7 * spec)
    trunk = list(model.trunk.parameters())
    grads = torch.autograd.grad(total.mean(), [*trunk, *model.spectrum_net.parameters()])
    want = torch.autograd.grad(plain.mean(), trunk)
    for a, b in zip(grads, want):  # the trunk's gradient is the GM loss's alone
        assert torch.equal(a, b)
    spec_grads = torch.autograd.grad(spec.mean(), list(model.spectrum_net.parameters()))
    for a, b in zip(grads[len(trunk) :], spec_grads):  # the spectrum net's is the spectral loss's
        torch.testing.assert_close(a, 0.7 * b)
    assert all(float(b.abs().max()) > 0 for b in spec_grads)
    assert all(gr is None for gr in torch.autograd.grad(
        plain.mean(), list(model.spectrum_net.parameters()), allow_unused=True))  # fmt: skip
