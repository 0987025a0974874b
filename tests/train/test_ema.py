"""gmflow.train.ema: the power (Karras) and ramp-up (StyleGAN) rules, float32 shadows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gmflow.train import EMA, ema_beta


def test_ema_power_rule_values():
    assert ema_beta(1, "power", gamma=7) == 0.0
    assert ema_beta(2, "power", gamma=7) == pytest.approx(0.5**8)
    assert ema_beta(3, "power", gamma=7) == pytest.approx((2 / 3) ** 8)
    lin = nn.Linear(1, 1, bias=False)
    ema = EMA(lin, "power", gamma=7)
    vals, expect = [3.0, 5.0, 11.0], None
    for i, v in enumerate(vals, start=1):
        lin.weight.data.fill_(v)
        beta = ema.update(lin)
        assert beta == pytest.approx(ema_beta(i, "power", gamma=7))
        expect = v if expect is None else beta * expect + (1 - beta) * v
        assert float(ema.shadow["weight"]) == pytest.approx(expect, rel=1e-6)
    assert float(ema.shadow["weight"]) == pytest.approx(
        (3.0 * 0.5**8 + 5.0 * (1 - 0.5**8)) * (2 / 3) ** 8 + 11.0 * (1 - (2 / 3) ** 8), rel=1e-6
    )
    out = ema.averaged_model(lin)
    assert float(out.weight) == pytest.approx(expect, rel=1e-6) and not out.weight.requires_grad


def test_ema_rampup_rule():
    b, hl = 4096, 500.0
    # early: half-life = rampup * nimg = 0.05 * i * b images
    assert ema_beta(1, "rampup", batch_size=b, halflife_kimg=hl, rampup=0.05) == pytest.approx(
        0.5 ** (1 / 0.05)
    )
    assert ema_beta(10, "rampup", batch_size=b, halflife_kimg=hl, rampup=0.05) == pytest.approx(
        0.5 ** (1 / 0.5)
    )
    # late: capped at halflife_kimg * 1000 images
    assert ema_beta(10**6, "rampup", batch_size=b, halflife_kimg=hl, rampup=0.05) == pytest.approx(
        0.5 ** (b / 5e5)
    )
    assert ema_beta(1, "rampup", batch_size=b, halflife_kimg=hl, rampup=None) == pytest.approx(
        0.5 ** (b / 5e5)
    )
    with pytest.raises(ValueError):
        EMA(nn.Linear(1, 1), "rampup")


def test_ema_keeps_float32_shadow_of_double_model():
    m = nn.Linear(2, 2).double()
    ema = EMA(m)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    ema.update(m)
    ema.copy_to(m)
