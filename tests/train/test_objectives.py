"""gmflow.train.objectives: flow-matching objectives, FlowLoss validation, batches and step seeds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gmflow.config import ConfigError
from gmflow.data import make_toy2d
from gmflow.flow import sample_time
from gmflow.gm import GaussianMixture
from gmflow.nn import ToyMLP
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
