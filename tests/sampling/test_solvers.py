"""Solver objects: registry, traits, per-evaluation stepping (reproduces ``sample()`` exactly), errors,
and the sampler's checks of non-finite model outputs."""

import argparse
import math
import re

import pytest
import torch

import gmflow.sampling.solvers.gm as gm_module
from gmflow import AutoGuidance, GaussianMixture, ring_gmm, sample
from gmflow.sampling import (
    DDPM,
    GMODE,
    GMSDE,
    SOLVERS,
    DPMSolver2,
    DPMSolverPP2M,
    Euler,
    GMPrediction,
    Heun,
    MeanPrediction,
    get_solver,
    num_steps,
)

D = torch.float64

# name: (class, needs_gm, stochastic, invertible, orders, options)
TRAITS = {
    "euler": (Euler, False, False, True, (1,), ()),
    "heun": (Heun, False, False, True, (1,), ()),
    "dpm-solver-2": (DPMSolver2, False, False, False, (1,), ("r",)),
    "dpm++2m": (DPMSolverPP2M, False, False, False, (1,), ()),
    "ddpm": (DDPM, False, True, False, (1,), ("variance",)),
    "gm-sde": (GMSDE, True, True, False, (1, 2), ("order", "spectrum_net", "output_mode")),
    "gm-ode": (GMODE, True, False, False, (1, 2), ("order", "substeps", "substep_method")),
}


def test_registry_maps_names_to_classes_in_the_documented_order():
    assert list(SOLVERS) == list(TRAITS)
    for name, (cls, *_rest) in TRAITS.items():
        assert name in SOLVERS and SOLVERS[name] is cls and get_solver(name) is cls and cls.name == name
    assert "rk4" not in SOLVERS
    with pytest.raises(TypeError):
        SOLVERS["rk4"] = Euler  # read-only
    with pytest.raises(ValueError, match=r"solver must be one of \('euler', 'heun', .*'gm-ode'\), got 'rk4'"):
        get_solver("rk4")


def test_registry_works_as_argparse_choices():
    p = argparse.ArgumentParser()
    p.add_argument("--solver", choices=SOLVERS)
    assert p.parse_args(["--solver", "dpm++2m"]).solver == "dpm++2m"
    with pytest.raises(SystemExit):
        p.parse_args(["--solver", "rk4"])


@pytest.mark.parametrize("name", list(TRAITS))
def test_traits(name):
    cls, needs_gm, stochastic, invertible, orders, options = TRAITS[name]
    assert (cls.needs_gm, cls.stochastic, cls.invertible, cls.orders, cls.options) == (
        needs_gm,
        stochastic,
        invertible,
        orders,
        options,
    )


def test_num_steps_spends_the_budget_as_documented():
    for nfe in range(1, 10):
        for name, cls in SOLVERS.items():
            want = nfe // 2 + 1 if name in ("heun", "dpm-solver-2") else nfe
            assert cls.num_steps(nfe) == num_steps(name, nfe) == want, (name, nfe)
    assert Heun.num_steps(9) == 5  # 4 Heun steps + 1 Euler step


def test_constructor_options_are_validated():
    with pytest.raises(ValueError, match="r must be in"):
        DPMSolver2(r=0.0)
    with pytest.raises(ValueError, match="variance must be"):
        DDPM(variance="medium")
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        GMSDE(order=3)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        GMODE(order=True)
    with pytest.raises(ValueError, match="substeps must be >= 1"):
        GMODE(substeps=0)
    with pytest.raises(TypeError, match="substeps must be an int"):
        GMODE(substeps=2.0)
    with pytest.raises(
        ValueError, match=r"substep_method must be one of \('euler', 'pc2', 'pc3'\), got 'rk4'"
    ):
        GMODE(substep_method="rk4")
    assert repr(GMODE(order=2, substeps=3)) == "GMODE(order=2, substeps=3, substep_method='pc3')"
    assert GMODE(substep_method="euler").substep_method == "euler"


def test_gm_ode_default_substeps_follow_the_step_length(monkeypatch):
    """pc3: ceil(16 (t - t')) sub-steps per step, so a warped grid spends them on its long steps."""
    counts = []
    integrate = gm_module.integrate

    def counting(field, x, t, t_next, n, method):
        counts.append((method, n))
        return integrate(field, x, t, t_next, n, method)

    monkeypatch.setattr(gm_module, "integrate", counting)
    ring = ring_gmm()
    noise = torch.randn(8, 2, dtype=D)
    times = [1.0, 0.9, 0.2, 0.0]
    sample(ring, noise, solver="gm-ode", nfe=3, times=torch.tensor(times))
    assert counts == [("pc3", 2), ("pc3", 12), ("pc3", 4)]
    counts.clear()
    sample(ring, noise, solver="gm-ode", nfe=3, times=torch.tensor(times), substep_method="euler")
    assert counts == [("euler", 43)] * 3
    counts.clear()
    sample(ring, noise, solver="gm-ode", nfe=3, times=torch.tensor(times), substeps=5)
    assert counts == [("pc3", 5)] * 3


def test_gm_sde_mean_mode_is_the_ddpm_step_on_the_gm_mean():
    ring = ring_gmm()
    noise = torch.randn(64, 2, dtype=D, generator=torch.Generator().manual_seed(0))

    def run(solver, **kw):
        return sample(ring, noise, solver=solver, nfe=4, generator=torch.Generator().manual_seed(3), **kw)

    mean1 = run("gm-sde", output_mode="mean")
    torch.testing.assert_close(mean1, run("ddpm"), atol=1e-12, rtol=0)  # same noise draws, x0 = GM mean
    assert not torch.allclose(run("gm-sde"), mean1)  # "sample" (default) draws x0 from the GM
    # the exact posterior: the second-order extrapolation vanishes (the re-anchored GM is the current one)
    torch.testing.assert_close(run("gm-sde", output_mode="mean", order=2), mean1, atol=1e-9, rtol=0)
    assert repr(GMSDE(output_mode="mean")) == "GMSDE(order=1, spectrum_net=None, output_mode='mean')"
    with pytest.raises(ValueError, match="output_mode must be 'sample' or 'mean', got 'median'"):
        GMSDE(output_mode="median")
    with pytest.raises(ValueError, match="spectrum_net applies to output_mode='sample' only"):
        GMSDE(output_mode="mean", spectrum_net=lambda m, v: m)
    with pytest.raises(ValueError, match="output_mode applies to solver='gm-sde' only, got solver='gm-ode'"):
        run("gm-ode", output_mode="mean")


# ------------------------------------------------------------------ driving step() by hand
def _predict(model, x, t, needs_gm):
    """One evaluation written out without the sampler's evaluator (no guidance)."""
    tv = torch.full((x.shape[0],), t, dtype=x.dtype)
    if needs_gm:
        return GMPrediction(model(x, tv).u_to_x0(x, tv), None)
    u = model(x, tv)
    return MeanPrediction(x - tv.reshape(-1, *([1] * (x.dim() - 1))) * u, u)


def _drive(solver, model, noise, nfe, seed, **grid):
    solver.set_timesteps(nfe, **grid)
    g = torch.Generator().manual_seed(seed)
    x, calls, traj = noise, [], [noise]
    while not solver.done:
        i, t = solver.step_index, solver.timestep
        x = solver.step(_predict(model, x, t, solver.needs_gm), t, x, generator=g)
        calls.append(t)
        if solver.step_index > i:
            traj.append(x)
    return x, calls, torch.stack(traj)


CASES = [
    ("euler", {}),
    ("heun", {}),
    ("dpm-solver-2", {"r": 0.3}),
    ("dpm++2m", {}),
    ("ddpm", {"variance": "small"}),
    ("ddpm", {"variance": "large"}),
    ("gm-sde", {"order": 1}),
    ("gm-sde", {"order": 2}),
    ("gm-ode", {"order": 1}),
    ("gm-ode", {"order": 2, "substeps": 3}),
    ("gm-ode", {"order": 2, "substeps": 3, "substep_method": "euler"}),
    ("gm-ode", {"order": 1, "substep_method": "pc2"}),
]


@pytest.mark.parametrize("shape", [(16, 2), (3, 2, 4, 4)])
@pytest.mark.parametrize("name,opts", CASES)
def test_manual_stepping_reproduces_sample_exactly(name, opts, shape):
    ring = ring_gmm(spatial_shape=shape[2:])
    cls = SOLVERS[name]
    model = ring if cls.needs_gm else ring.velocity
    noise = torch.randn(shape, dtype=D, generator=torch.Generator().manual_seed(1))
    for nfe in (1, 2, 5):
        grid = {"grid": "sigmoid", "kappa": 5.0}
        x, calls, traj = _drive(cls(**opts), model, noise, nfe, seed=3, **grid)
        assert len(calls) == nfe
        ref, ref_traj = sample(
            model,
            noise,
            solver=name,
            nfe=nfe,
            generator=torch.Generator().manual_seed(3),
            return_trajectory=True,
            **grid,
            **opts,
        )
        assert torch.equal(x, ref) and torch.equal(traj, ref_traj), (name, opts, nfe)


def test_two_evaluation_steps_keep_the_intermediate_state():
    """Heun, nfe = 5 on a uniform grid: 3 intervals, two Heun steps then one Euler step."""
    ring = ring_gmm()
    noise = torch.randn(8, 2, dtype=D)
    s = Heun()
    s.set_timesteps(5)
    assert s.times == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    x, calls, _ = _drive(s, ring.velocity, noise, 5, seed=0)
    assert calls == pytest.approx([1.0, 2 / 3, 2 / 3, 1 / 3, 1 / 3])
    # first call returns the Euler predictor x_e; the grid state comes with the second
    s.set_timesteps(5)
    t1 = torch.ones(8, dtype=D)
    u1 = ring.velocity(noise, t1)
    x_e = s.step(_predict(ring.velocity, noise, 1.0, False), 1.0, noise)
    assert s.step_index == 0 and s.timestep == pytest.approx(2 / 3)
    assert torch.allclose(x_e, noise - u1 / 3, atol=1e-14)
    x1 = s.step(_predict(ring.velocity, x_e, s.timestep, False), s.timestep, x_e)
    u2 = ring.velocity(x_e, torch.full((8,), 2 / 3, dtype=D))
    assert s.step_index == 1 and torch.allclose(x1, noise - (u1 + u2) / 6, atol=1e-14)


def test_dpm_solver2_evaluates_at_the_log_snr_midpoint():
    s = DPMSolver2(r=0.5)
    s.set_timesteps(3, times=[0.8, 0.2, 0.0])
    x = torch.randn(4, 2, dtype=D)
    x0 = torch.randn(4, 2, dtype=D)
    x_mid = s.step(MeanPrediction(x0, (x - x0) / 0.8), 0.8, x)
    lam = 0.5 * (torch.tensor(0.2 / 0.8).log() + torch.tensor(0.8 / 0.2).log())  # midpoint of log((1-t)/t)
    s1 = float(1 / (1 + lam.exp()))
    assert s.timestep == pytest.approx(s1) and s1 == pytest.approx(0.5)
    assert torch.allclose(x_mid, (s1 / 0.8) * x + (1 - s1 / 0.8) * x0, atol=1e-14)


def test_multistep_state_is_reset_by_set_timesteps():
    ring = ring_gmm()
    noise = torch.randn(8, 2, dtype=D)
    for s in (DPMSolverPP2M(), GMSDE(order=2)):
        model = ring if s.needs_gm else ring.velocity
        a, _, _ = _drive(s, model, noise, 4, seed=5)
        b, _, _ = _drive(s, model, noise, 4, seed=5)  # second run on the same object
        assert torch.equal(a, b)


def test_step_errors():
    s = Euler()
    x = torch.randn(4, 2)
    pred = MeanPrediction(x, x)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(pred, 1.0, x)
    s.set_timesteps(2)
    with pytest.raises(ValueError, match=r"expected the evaluation at t=1.0, got t=0.5"):
        s.step(pred, 0.5, x)
    with pytest.raises(TypeError, match="takes a MeanPrediction"):
        s.step((x, x), 1.0, x)
    gm = GaussianMixture(x.unsqueeze(1), torch.zeros(4, 1, 1), torch.zeros(4, 1, 1))
    g = GMSDE()
    g.set_timesteps(1)
    with pytest.raises(TypeError, match="takes a GMPrediction"):
        g.step(pred, 1.0, x)
    assert g.step(GMPrediction(gm, None), 1.0, x).shape == x.shape and g.done
    with pytest.raises(RuntimeError, match="every step is taken"):
        g.step(GMPrediction(gm, None), 0.0, x)


def test_grids_are_validated_by_the_solver():
    up = torch.tensor([0.0, 0.5, 1.0])
    Euler().set_timesteps(2, times=up)  # invertible: data -> noise
    Heun().set_timesteps(3, times=up)
    for cls in (DPMSolver2, DPMSolverPP2M, DDPM, GMSDE, GMODE):
        n = 3 if cls is DPMSolver2 else 2
        with pytest.raises(ValueError, match="decrease strictly to 0"):
            cls().set_timesteps(n, times=up)
    with pytest.raises(ValueError, match="times must have 3 entries"):
        Heun().set_timesteps(3, times=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="grid must be one of"):
        Euler().set_timesteps(2, grid="cosine")
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        Euler().set_timesteps(0)


# ------------------------------------------------------------------ non-finite model outputs
def _nan_below(t_cut, out, t):
    """``out`` with NaN everywhere for samples at time t < t_cut."""
    mask = (t < t_cut).reshape(-1, *([1] * (out.dim() - 1)))
    return torch.where(mask, torch.full_like(out, float("nan")), out)


def test_non_finite_velocity_names_solver_step_and_time():
    ring = ring_gmm()
    x = torch.randn(4, 2)

    def bad(x, t):
        return _nan_below(0.6, ring.velocity(x, t), t)

    with pytest.raises(
        ValueError, match=r"solver 'euler', step 2 \(t=0\.5\): model returned non-finite velocity"
    ):
        sample(bad, x, solver="euler", nfe=4)
    # heun, nfe = 5: evaluations at t = 1, 2/3 | 2/3, 1/3 | 1/3 -> the first NaN is step 1's second one
    with pytest.raises(ValueError, match=r"solver 'heun', step 1 \(t=0\.333333\)"):
        sample(bad, x, solver="heun", nfe=5)
    with pytest.raises(ValueError, match=r"solver 'euler', step 2 .*guide_model returned non-finite"):
        sample(ring.velocity, x, solver="euler", nfe=4, guidance=AutoGuidance(bad, 1.5))


@pytest.mark.parametrize("field", ["means", "logweights", "logstds"])
def test_non_finite_gm_output_names_the_field(field):
    ring = ring_gmm()
    x = torch.randn(4, 2)

    def bad(x, t):
        gm = ring(x, t)
        parts = {"means": gm.means, "logweights": gm.logweights, "logstds": gm.logstds}
        val = float("inf") if field == "logweights" else float("nan")
        parts[field] = torch.where(
            (t < 0.6).reshape(-1, *([1] * (parts[field].dim() - 1))),
            torch.full_like(parts[field], val),
            parts[field],
        )
        return GaussianMixture(**parts)

    for solver in ("gm-sde", "dpm++2m"):
        with pytest.raises(
            ValueError,
            match=rf"solver '{re.escape(solver)}', step 2 \(t=0\.5\): model returned non-finite {field}",
        ):
            sample(bad, x, solver=solver, nfe=4, generator=torch.Generator().manual_seed(0))


def test_zero_weight_components_are_accepted():
    """logweights = -inf is a component of weight zero, not an error: same samples as without it."""
    ring = ring_gmm()

    def padded(x, t):
        gm = ring(x, t)
        return GaussianMixture(
            torch.cat([gm.means, torch.zeros_like(gm.means[:, :1])], 1),
            torch.cat([gm.logweights, torch.full_like(gm.logweights[:, :1], -math.inf)], 1),
            gm.logstds,
        )

    x = torch.randn(16, 2, dtype=D)
    for order in (1, 2):
        ref = sample(ring, x, solver="gm-ode", nfe=3, order=order)
        assert torch.allclose(sample(padded, x, solver="gm-ode", nfe=3, order=order), ref, atol=1e-12)
