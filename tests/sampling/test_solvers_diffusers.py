"""Our flow-matching baselines against diffusers' schedulers on a shared velocity model and grid.

* ``euler`` vs ``FlowMatchEulerDiscreteScheduler`` (``x' = x + (sigma' - sigma) v``; its default grid is
  ``linspace(1, 1/1000, N)`` shifted, then 0; the model is fed ``timestep / 1000`` = sigma).
* ``dpm++2m`` vs ``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")``:
  grid ``sigma_i = 0.999 (1 - i/N)`` shifted by ``flow_shift``, then 0. Its ``timesteps`` are
  ``int(1000 sigma)`` (only an index), so the model is fed ``sigmas[i]``. Final-step order rule:
  diffusers lowers the last step to first order when ``lower_order_final`` and fewer than 15 steps,
  and *always* when ``final_sigmas_type="zero"`` (the only setting whose grid ends at t = 0, the
  default); ours is always first order on the last step (t' = 0), so the two agree for N < 15 and
  N >= 15 alike, with ``lower_order_final`` on or off.

The shared model is the exact velocity field of a ring GMM on 2 x 4 x 4 "images" (nonlinear, O(3)).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason='needs the optional extra: pip install "gmflow[diffusers]"')

from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

import gmflow  # noqa: E402
from gmflow import ring_gmm  # noqa: E402

# diffusers' DPM scheduler builds its (unused) VP sigmas with numpy in a way numpy 2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
RING = ring_gmm(spatial_shape=(4, 4))
NOISE = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))


def _velocity(x, t):
    return RING.velocity(x, t)


def _loop(scheduler, model_time) -> torch.Tensor:
    """A plain diffusers sampling loop (after ``set_timesteps``); ``model_time(s, i, timestep)`` -> t."""
    x = NOISE
    for i, timestep in enumerate(scheduler.timesteps):
        t = torch.full((x.shape[0],), float(model_time(scheduler, i, timestep)))
        x = scheduler.step(_velocity(x, t), timestep, x).prev_sample
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [4, 8, 20])
def test_euler_matches_flow_match_euler_discrete(shift, n):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)  # diffusers' grid, fed to ours
    ref = _loop(sched, lambda s, i, ts: ts / 1000)
    ours = gmflow.sample(_velocity, NOISE, solver="euler", nfe=n, times=sched.sigmas.double())
    assert (ours - ref).abs().max() <= 1e-5
    # our grid, fed to diffusers as custom sigmas (shift 1: diffusers shifts custom sigmas too)
    times = gmflow.time_grid(n, "shift", shift=shift)
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=times[:-1].float().numpy())
    torch.testing.assert_close(sched.sigmas.double(), times, atol=1e-7, rtol=0)
    ref = _loop(sched, lambda s, i, ts: s.sigmas[i])
    ours = gmflow.sample(_velocity, NOISE, solver="euler", nfe=n, times=sched.sigmas.double())
    assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [5, 14, 15, 25])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpm_solver_pp_2m_matches_diffusers_multistep(shift, n, lower_order_final):
    sched = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
        lower_order_final=lower_order_final, solver_order=2,
    )  # fmt: skip
    sched.set_timesteps(n)
    grid = sched.sigmas.double()
    assert grid[-1] == 0 and len(grid) == n + 1
    ref = _loop(sched, lambda s, i, ts: s.sigmas[i])  # its int timesteps are no model time
    ours = gmflow.sample(_velocity, NOISE, solver="dpm++2m", nfe=n, times=grid)
    assert (ours - ref).abs().max() <= 1e-5
    # the comparison can fail: first-order steps on the same grid are far off
    euler = gmflow.sample(_velocity, NOISE, solver="euler", nfe=n, times=grid)
    assert (euler - ref).abs().max() > 1e-2
