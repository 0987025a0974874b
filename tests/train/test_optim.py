"""gmflow.train.optim: warm-up factor, parameter groups, gradient-norm clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gmflow.train import (
    LoopConfig,
    build_optimizer,
    grad_norm_and_clip,
    parameter_groups,
    train,
    warmup_factor,
)


def test_warmup_factor():
    assert warmup_factor(0, 1000) == pytest.approx(0.001)
    assert warmup_factor(500, 1000) == pytest.approx(0.5005)
    assert warmup_factor(1000, 1000) == warmup_factor(5000, 1000) == 1.0
    assert warmup_factor(0, 0) == 1.0


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)])
def test_build_optimizer_never_decays_biases(name, cls):
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1))
    model[2].weight.requires_grad_(False)  # frozen parameters are left out
    opt = build_optimizer(model, LoopConfig(optimizer=name, lr=0.01, betas=(0.8, 0.9), weight_decay=0.1))
    assert type(opt) is cls
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [model[0].weight.shape]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 4  # 2 biases + LayerNorm weight and bias
    assert all(g["lr"] == 0.01 and g["betas"] == (0.8, 0.9) for g in opt.param_groups)


def test_grad_norm_and_clip():
    lin = nn.Linear(2, 2)
    lin.weight.grad = torch.full((2, 2), 3.0)
    lin.bias.grad = torch.full((2,), 4.0)
    total = math.sqrt(4 * 9 + 2 * 16)
    assert grad_norm_and_clip(list(lin.parameters()), math.inf) == pytest.approx(total)
    assert torch.equal(lin.weight.grad, torch.full((2, 2), 3.0))  # no clipping: untouched
    assert grad_norm_and_clip(list(lin.parameters()), 100.0) == pytest.approx(total)
    assert torch.equal(lin.weight.grad, torch.full((2, 2), 3.0))  # below the bound: untouched
    assert grad_norm_and_clip(list(lin.parameters()), 1.0) == pytest.approx(total)  # pre-clip norm
    clipped = torch.cat([lin.weight.grad.flatten(), lin.bias.grad])
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(lin.weight.grad / lin.bias.grad[0], torch.full((2, 2), 0.75))  # direction kept
    lin.bias.grad = torch.full((2,), math.inf)
    assert grad_norm_and_clip(list(lin.parameters()), 1.0) == math.inf  # non-finite: not scaled
    assert grad_norm_and_clip([nn.Parameter(torch.zeros(1))], 1.0) == 0.0  # no gradients at all


class _TwoGroups(nn.Module):
    """A model offering the optimizer-groups hook: ``a`` at the loop's lr, ``b`` at its own."""

    def __init__(self, groups=None) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)
        self._groups = groups

    def optimizer_groups(self):
        if self._groups is not None:
            return self._groups(self)
        return [{"params": list(self.a.parameters())}, {"params": list(self.b.parameters()), "lr": 0.5}]

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_optimizer_groups_hook_sets_per_group_lr_and_decay():
    model = _TwoGroups()
    opt = build_optimizer(model, LoopConfig(lr=0.01, weight_decay=0.1))
    got = [(len(g["params"]), g["lr"], g["weight_decay"]) for g in opt.param_groups]
    assert got == [(1, 0.01, 0.1), (1, 0.01, 0.0), (1, 0.5, 0.1), (1, 0.5, 0.0)]  # decay / no decay per group
    assert opt.param_groups[2]["params"][0] is model.b.weight
    assert [len(g["params"]) for g in parameter_groups(nn.Linear(2, 2))] == [2]  # no hook: one group


@pytest.mark.parametrize(
    "groups, match",
    [
        (lambda m: [], "non-empty list"),
        (lambda m: [{"params": list(m.parameters()), "momentum": 0.9}], "only lr, params, weight_decay"),
        (lambda m: [{"params": list(m.a.parameters())}], "every trainable parameter"),
        (lambda m: [{"params": list(m.parameters())}, {"params": [m.a.weight]}], "in two groups"),
    ],
)
def test_bad_optimizer_groups_are_errors(groups, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(_TwoGroups(groups), LoopConfig())


def test_each_group_is_clipped_by_its_own_norm():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    assert grad_norm_and_clip([[a], [b]], 1.0) == pytest.approx(math.sqrt(25 + 0.25))  # norm over all groups
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8]))  # clipped to norm 1
    assert torch.equal(b.grad, torch.tensor([0.3, 0.4]))  # below the bound: untouched by a's norm


def test_the_loop_trains_each_group_at_its_lr():
    model = _TwoGroups()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))

    def objective(m, batch, g):
        return m(batch).square().sum(1)

    loop = LoopConfig(steps=1, batch_size=8, lr=1e-3, warmup_steps=0, ema="none", optimizer="adam")
    train(loop, model, objective, lambda *a: x, progress=False)
    step = {k: float((v - before[k]).abs().max()) for k, v in model.state_dict().items()}
    # Adam's first step moves every coordinate by about its lr
    assert step["a.weight"] == pytest.approx(1e-3, rel=1e-3) and step["b.weight"] == pytest.approx(
        0.5, rel=1e-3
    )
