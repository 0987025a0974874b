"""gmflow.pretrained.SchedulerConfig: the official scheduler_config.json keys, grids and errors."""

from __future__ import annotations

import pytest
import torch

from gmflow import time_grid
from gmflow.pretrained import SchedulerConfig, check_scheduler_keys


def test_official_configs_and_round_trip():
    ode = SchedulerConfig.from_dict({"_class_name": "FlowEulerODEScheduler", "_diffusers_version": "0.42.1",
                                     "num_train_timesteps": 1000, "shift": 1.0})  # fmt: skip
    assert ode == SchedulerConfig() and ode.to_dict()["_class_name"] == "FlowEulerODEScheduler"
    sde = SchedulerConfig.from_dict({"_class_name": "GMFlowSDEScheduler", "shift": 3})
    assert (sde.kind, sde.num_train_timesteps, sde.shift) == ("sde", 1000, 3.0)
    assert SchedulerConfig.from_dict(sde.to_dict()) == sde
    assert SchedulerConfig.from_dict({"_class_name": "GMFlowODEScheduler"}).kind == "ode"


def test_grid_is_the_shifted_uniform_grid():
    assert torch.equal(
        SchedulerConfig().times(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(SchedulerConfig(shift=3.0).times(8), time_grid(8, "shift", shift=3.0))
    u = 1 - torch.arange(9, dtype=torch.float64) / 8
    torch.testing.assert_close(SchedulerConfig(shift=3.0).times(8), 3 * u / (1 + 2 * u), atol=1e-15, rtol=0)


@pytest.mark.parametrize(
    "config,pattern",
    [
        (
            {"shift": 1.0, "flow_shift": 3.0},
            r"^cfg: unknown scheduler config key 'flow_shift' \(expected num_train_timesteps, shift\)$",
        ),
        ({"a": 1, "b": 2}, r"^cfg: unknown scheduler config keys 'a', 'b'"),
        ({"num_train_timesteps": 0}, r"^cfg: num_train_timesteps must be an int >= 1, got 0$"),
        ({"num_train_timesteps": 1000.0}, r"num_train_timesteps must be an int >= 1, got 1000.0$"),
        ({"shift": -1}, r"^cfg: shift must be a finite float > 0, got -1$"),
        ({"shift": True}, r"shift must be a finite float > 0, got True$"),
        ({"_class_name": "DDIMScheduler"}, r"^cfg: _class_name 'DDIMScheduler' is not a GMFlow scheduler"),
    ],
)
def test_bad_configs_raise_one_line_errors(config, pattern):
    with pytest.raises(ValueError, match=pattern):
        SchedulerConfig.from_dict(config, where="cfg")
    with pytest.raises(ValueError, match="scheduler kind must be 'ode' or 'sde'"):
        SchedulerConfig("ddim")
    check_scheduler_keys({"_anything": 1, "shift": 2.0}, "cfg")  # metadata keys are allowed
