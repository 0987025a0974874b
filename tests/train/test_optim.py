"""gmflow.train.optim: warm-up factor, parameter groups, gradient-norm clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gmflow.train import LoopConfig, build_optimizer, grad_norm_and_clip, warmup_factor


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
