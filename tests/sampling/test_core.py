"""Solvers: exactness with the GMM oracle, honest baselines against independent references, errors."""

import math

import pytest
import torch

import gmflow
from gmflow import GaussianMixture, ring_gmm, sample
from gmflow.data.gmm import GaussianMixtureData
from gmflow.metrics import sliced_w2_mean
from gmflow.sampling.solvers.gm import SecondOrder
from gmflow.sampling.solvers.gm_field import PreparedGM

D = torch.float64


@pytest.fixture(scope="module")
def ring_ref():
    ring = ring_gmm()
    g = torch.Generator().manual_seed(0)
    ref = ring.sample(20000, generator=g)
    floor = sliced_w2_mean(ring.sample(20000, generator=g), ref)
    return ring, ref, floor


@pytest.mark.parametrize(
    "solver,order,nfe",
    [
        ("gm-sde", 1, 1),
        ("gm-sde", 2, 1),
        ("gm-sde", 1, 2),
        ("gm-sde", 2, 2),
        ("gm-ode", 1, 2),
        ("gm-ode", 2, 2),
    ],
)
def test_gm_solvers_with_exact_posterior_reach_the_floor(ring_ref, solver, order, nfe):
    ring, ref, floor = ring_ref
    g = torch.Generator().manual_seed(100 + nfe * 10 + order)
    x = sample(ring, torch.randn(20000, 2, generator=g), solver=solver, nfe=nfe, order=order, generator=g)
    assert sliced_w2_mean(x, ref) <= 1.6 * floor


def test_euler_nfe2_is_far_from_the_floor(ring_ref):
    ring, ref, floor = ring_ref
    g = torch.Generator().manual_seed(7)
    x = sample(ring, torch.randn(20000, 2, generator=g), solver="euler", nfe=2)
    assert sliced_w2_mean(x, ref) > 3 * floor


@pytest.mark.parametrize("solver,order", [("gm-sde", 1), ("gm-sde", 2), ("gm-ode", 2)])
def test_image_shaped_data(solver, order):
    """(B, C, H, W): every pixel an independent ring-GMM draw; pooled pixels match the data."""
    ring = ring_gmm(spatial_shape=(8, 8))
    g = torch.Generator().manual_seed(3)
    x = sample(ring, torch.randn(400, 2, 8, 8, generator=g), solver=solver, nfe=2, order=order, generator=g)
    assert x.shape == (400, 2, 8, 8)
    pooled = x.permute(0, 2, 3, 1).reshape(-1, 2)
    ref = ring.sample(400, generator=g).permute(0, 2, 3, 1).reshape(-1, 2)
    floor = sliced_w2_mean(ring.sample(400, generator=g).permute(0, 2, 3, 1).reshape(-1, 2), ref)
    assert sliced_w2_mean(pooled, ref) <= 2.0 * floor


def _second_order_gm(so, gm, x, t, t_next):
    """Run ``SecondOrder`` on ``gm`` and materialise its output GM (the GM itself on the first step)."""
    tilt = so(PreparedGM(gm), None, x, t, t_next)
    return gm if tilt is None else gm.tilt(tilt.zeta.reshape(-1), tilt.nu)


def test_second_order_is_identity_for_the_exact_posterior():
    """With the exact posterior, the re-anchored previous GM equals the current one: no extrapolation."""
    data = GaussianMixtureData(torch.randn(4, 2, dtype=D), 0.5)
    x1 = torch.randn(16, 2, dtype=D)
    so = SecondOrder()
    t1, t2, t3 = 1.0, 0.6, 0.3
    gm1 = data.posterior_x0(x1, torch.full((16,), t1, dtype=D))
    assert so(PreparedGM(gm1), None, x1, t1, t2) is None  # the first step only fills the cache
    x2 = torch.randn(16, 2, dtype=D)
    gm2 = data.posterior_x0(x2, torch.full((16,), t2, dtype=D))
    out = _second_order_gm(so, gm2, x2, t2, t3)
    assert torch.allclose(out.means, gm2.means, atol=1e-9)
    assert torch.allclose(out.logweights, gm2.logweights, atol=1e-9)


def test_second_order_extrapolates_a_stale_model():
    """A GM that changed since the last step is pushed further along that change (Adams–Bashforth)."""
    data = GaussianMixtureData(torch.randn(4, 2, dtype=D), 0.5)
    x = torch.randn(16, 2, dtype=D)
    so = SecondOrder()
    gm1 = data.posterior_x0(x, torch.full((16,), 0.8, dtype=D))
    _second_order_gm(so, gm1, x, 0.8, 0.5)
    shifted = GaussianMixture(gm1.means + 0.05, gm1.logweights, gm1.logstds)
    out = _second_order_gm(so, shifted, x, 0.5, 0.2)
    d = shifted.mean() - gm1.reanchor(x, 0.8, x, 0.5).mean()
    change = out.mean() - shifted.mean()
    cos = (change * d).sum(1) / (change.norm(dim=1) * d.norm(dim=1))
    assert bool((cos > 0.5).all())


# ------------------------------------------------------------------ baselines vs independent references
class Linear:
    """A smooth velocity model u(x, t) = A(t) x + b(t) for reference comparisons."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(3, 3, generator=g, dtype=D) * 0.3
        self.b = torch.randn(3, generator=g, dtype=D)
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        tt = t[:, None]
        return x @ self.a.T * (1 + tt) + self.b * torch.cos(3 * tt)


def test_euler_matches_reference():
    m = Linear()
    x = torch.randn(5, 3, dtype=D)
    out = sample(m, x, solver="euler", nfe=4)
    ref = x.clone()
    for t, tn in [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)]:
        ref = ref + (tn - t) * m(ref, torch.full((5,), t, dtype=D))
    assert torch.allclose(out, ref, atol=1e-12)


def _kdiff_dpmpp_2m(model, x, ts):
    """Reference DPM-Solver++(2M) written in the VE parameterisation of k-diffusion style samplers:
    y = x / alpha, sigma_ve = t / (1 - t), denoised D, t_fn = -log sigma_ve."""
    y = x / (1 - ts[0])
    old = None
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        s, sn = t / (1 - t), tn / (1 - tn)
        xt = y * (1 - t)
        u = model(xt, torch.full((x.shape[0],), t, dtype=D))
        den = xt - t * u
        if sn == 0:
            y = den
            break
        h = -math.log(sn) + math.log(s)
        if old is None:
            y = (sn / s) * y - math.expm1(-h) * den
        else:
            h_last = -math.log(s) + math.log(ts[i - 1] / (1 - ts[i - 1]))
            r = h_last / h
            dd = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
            y = (sn / s) * y - math.expm1(-h) * dd
        old = den
    return y


def test_dpmpp2m_matches_independent_reference():
    m = Linear()
    x = torch.randn(5, 3, dtype=D)
    ts = [0.95, 0.8, 0.6, 0.4, 0.2, 0.0]
    out = sample(m, x, solver="dpm++2m", nfe=5, times=torch.tensor(ts))
    ref = _kdiff_dpmpp_2m(m, x, ts)
    assert torch.allclose(out, ref, atol=1e-10)


def _edm_heun(model, x, ts, n_second):
    """EDM Algorithm 1 (sigma = t, d = u): Heun correction on the first ``n_second`` intervals."""
    for i, (t, tn) in enumerate(zip(ts, ts[1:])):
        d = model(x, torch.full((x.shape[0],), t, dtype=D))
        x_next = x + (tn - t) * d
        if i < n_second:
            d2 = model(x_next, torch.full((x.shape[0],), tn, dtype=D))
            x_next = x + (tn - t) * 0.5 * (d + d2)
        x = x_next
    return x


@pytest.mark.parametrize("nfe", [5, 6, 7])
def test_heun_matches_edm_algorithm(nfe):
    m = Linear()
    x = torch.randn(5, 3, dtype=D)
    steps = nfe // 2 + 1
    ts = [1 - i / steps for i in range(steps + 1)]
    out = sample(m, x, solver="heun", nfe=nfe)
    assert torch.allclose(out, _edm_heun(m, x, ts, nfe - steps), atol=1e-12)


def test_dpm_solver2_matches_dpm_solver_pp_2s_reference():
    """DPM-Solver++(2S) in (alpha, sigma, lambda) form: u = (s_s/s_t) x - a_s (e^{-rh} - 1) D(x, t),
    D~ = (1 - 1/2r) D(x, t) + D(u, s)/2r, x' = (s_t'/s_t) x - a_t' (e^{-h} - 1) D~; last step x' = D."""
    m = Linear()
    x = torch.randn(5, 3, dtype=D)
    ts, r = [0.9, 0.6, 0.3, 0.0], 0.4
    out = sample(m, x, solver="dpm-solver-2", nfe=5, times=torch.tensor(ts, dtype=D), r=r)

    def den(y, t):
        return y - t * m(y, torch.full((5,), t, dtype=D))

    def lam(t):
        return math.log((1 - t) / t)

    ref = x
    for t, tn in zip(ts, ts[1:]):
        if tn == 0:
            ref = den(ref, t)
            continue
        h = lam(tn) - lam(t)
        s = 1 / (1 + math.exp(lam(t) + r * h))
        u = (s / t) * ref - (1 - s) * math.expm1(-r * h) * den(ref, t)
        dd = (1 - 1 / (2 * r)) * den(ref, t) + den(u, s) / (2 * r)
        ref = (tn / t) * ref - (1 - tn) * math.expm1(-h) * dd
    assert torch.allclose(out, ref, atol=1e-12)


def test_heun_and_dpm_solver2_nfe_accounting():
    for solver in ("heun", "dpm-solver-2"):
        for nfe in (1, 2, 5, 8, 9):
            m = Linear()
            sample(m, torch.randn(2, 3, dtype=D), solver=solver, nfe=nfe)
            assert m.calls == nfe, (solver, nfe)


def test_single_point_data_is_exact_for_first_and_second_order_solvers():
    x_star = torch.tensor([[1.5, -2.0, 0.5]], dtype=D)

    def model(x, t):  # exact velocity of a delta data set
        return (x - x_star) / t[:, None].clamp_min(1e-12)

    noise = torch.randn(4, 3, dtype=D)
    for solver in ("euler", "heun", "dpm-solver-2", "dpm++2m"):
        for nfe in (1, 2, 3):
            out = sample(model, noise, solver=solver, nfe=nfe, grid="sigmoid", kappa=5.0, r=0.4)
            assert torch.allclose(out, x_star.expand(4, 3), atol=1e-9), (solver, nfe)


def test_heun_is_second_order_accurate():
    """Error vs a fine Euler solution shrinks ~4x per halving of the step for Heun, ~2x for Euler."""
    data = GaussianMixtureData(torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=D), 0.7)
    noise = torch.randn(64, 2, dtype=D, generator=torch.Generator().manual_seed(0))
    ref = sample(data.velocity, noise, solver="euler", nfe=4096)
    e = {n: float((sample(data.velocity, noise, solver="heun", nfe=n) - ref).abs().max()) for n in (16, 32)}
    assert e[16] / e[32] > 3.0


def _posterior_coefs(t, tn):
    """DDPM posterior x_t' | x_t, x0 ~ N(c1 x_t + c2 x0, c3 I) for a = 1 - t, written out."""
    a, an = 1 - t, 1 - tn
    r = (tn / t) * a / an
    return (tn / t) ** 2 * a / an, (1 - r * r) * an, (1 - r * r) * tn**2, r


def test_ddpm_small_and_gm_sde_with_delta_gm_are_the_same_update_on_different_draws():
    """DDPM (small variance) on the mean is GM-SDE with a K = 1, s -> 0 GM: both are
    x' = c1 x + c2 x0^ + sqrt(c3) n; they differ only in the draws (GM-SDE first draws x0^ from the
    GM: one uniform for the component, one normal for its tiny std). Both match a hand-written loop."""
    data = GaussianMixtureData(torch.randn(3, 2, dtype=D), 0.4)

    def delta(x, t):
        m = data.velocity(x, t)
        return GaussianMixture(
            m.unsqueeze(1),
            torch.zeros(x.shape[0], 1, 1, dtype=D),
            torch.full((x.shape[0], 1, 1), -40.0, dtype=D),
        )

    noise = torch.randn(8, 2, dtype=D)
    ts = [1.0, 0.75, 0.5, 0.25, 0.0]

    def reference(gm_draws: bool):
        g = torch.Generator().manual_seed(1)
        x = noise
        for t, tn in zip(ts, ts[1:]):
            x0 = x - t * data.velocity(x, torch.full((8,), t, dtype=D))
            if gm_draws:
                torch.rand(8, 1, generator=g, dtype=D)  # the (only) component
                x0 = x0 + math.exp(-40.0) * t * torch.randn(8, 2, generator=g, dtype=D)
            c1, c2, c3, _ = _posterior_coefs(t, tn)
            x = c1 * x + c2 * x0
            if tn > 0:
                x = x + math.sqrt(c3) * torch.randn(8, 2, generator=g, dtype=D)
        return x

    a = sample(data.velocity, noise, solver="ddpm", nfe=4, generator=torch.Generator().manual_seed(1))
    b = sample(delta, noise, solver="gm-sde", nfe=4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, reference(False), atol=1e-12, rtol=0)
    assert torch.allclose(b, reference(True), atol=1e-12, rtol=0)
    assert not torch.allclose(a, b)  # the draw streams differ
    m_a = sample(data.velocity, noise, solver="ddpm", nfe=1)
    m_b = sample(delta, noise, solver="gm-sde", nfe=1)
    assert torch.allclose(m_a, m_b, atol=1e-9)  # single step to t = 0 is deterministic for both


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_step_std_follows_the_documented_formula(variance):
    """Delta data (D = x*): after one step x' - (c1 x + c2 x*) is exactly std * n, with
    small: std = sqrt(1 - r^2) t'; large: std = sqrt(1 - r^2) t sqrt((a'^2 + t'^2) / (a^2 + t^2))."""
    x_star = torch.tensor([[1.5, -2.0]], dtype=D)

    def model(x, t):
        return (x - x_star) / t[:, None]

    noise = torch.randn(64, 2, dtype=D)
    t, tn = 0.8, 0.5
    _, traj = sample(
        model,
        noise,
        solver="ddpm",
        nfe=2,
        times=torch.tensor([t, tn, 0.0], dtype=D),
        variance=variance,
        generator=torch.Generator().manual_seed(0),
        return_trajectory=True,
    )
    n = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    c1, c2, _, r = _posterior_coefs(t, tn)
    a, an = 1 - t, 1 - tn
    if variance == "small":
        std = math.sqrt(1 - r * r) * tn
    else:
        std = math.sqrt(1 - r * r) * t * math.sqrt((an**2 + tn**2) / (a**2 + t**2))
    assert torch.allclose(traj[1], c1 * noise + c2 * x_star + std * n, atol=1e-12, rtol=0)
    assert torch.allclose(traj[2], x_star.expand(64, 2), atol=1e-12)  # last step: no noise, D = x*


@pytest.mark.parametrize("method,substeps", [("euler", 512), ("pc2", 64), ("pc3", 32)])
def test_gm_ode_substeps_converge_to_the_exact_ode(method, substeps):
    """GM-ODE with many substeps and the exact posterior solves the exact probability-flow ODE."""
    data = GaussianMixtureData(torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=D), 0.5)
    noise = torch.randn(32, 2, dtype=D, generator=torch.Generator().manual_seed(2))
    ref = sample(data.velocity, noise, solver="heun", nfe=1024)
    out = sample(data, noise, solver="gm-ode", nfe=1, substeps=substeps, substep_method=method)
    assert float((out - ref).abs().max()) < 5e-3


def test_trajectory_and_dtypes():
    ring = ring_gmm()
    noise = torch.randn(10, 2, dtype=D)
    out, traj = sample(ring, noise, solver="gm-ode", nfe=3, return_trajectory=True)
    assert out.dtype == D and traj.shape == (4, 10, 2) and torch.equal(traj[-1], out)
    assert torch.equal(traj[0], noise)


def test_bf16_model_output_is_upcast_for_gm_math():
    ring = ring_gmm()

    def model(x, t):
        gm = ring(x, t)
        return GaussianMixture(gm.means.bfloat16(), gm.logweights.bfloat16(), gm.logstds.bfloat16())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = sample(model, torch.randn(100, 2), solver="gm-sde", nfe=2, order=2)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


def test_inversion_with_increasing_grid_roundtrips():
    data = GaussianMixtureData(torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=D), 0.6)
    x0 = data.sample(16, generator=torch.Generator().manual_seed(0), dtype=D)
    up = torch.linspace(0, 1, 201, dtype=D)
    z = sample(data.velocity, x0, solver="heun", nfe=399, times=up)
    back = sample(data.velocity, z, solver="heun", nfe=399)
    assert float((back - x0).abs().max()) < 1e-3


# ------------------------------------------------------------------ errors
def test_bad_inputs_raise_clear_errors():
    ring = ring_gmm()
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="solver must be one of"):
        sample(ring, x, solver="rk4", nfe=2)
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        sample(ring, x, solver="euler", nfe=0)
    with pytest.raises(TypeError, match="nfe must be an int"):
        sample(ring, x, solver="euler", nfe=2.0)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        sample(ring, x, solver="gm-sde", nfe=2, order=3)
    with pytest.raises(ValueError, match="order=2"):
        sample(ring, x, solver="euler", nfe=2, order=2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        sample(ring, torch.full((4, 2), float("nan")), solver="euler", nfe=2)
    with pytest.raises(TypeError, match="floating-point"):
        sample(ring, torch.zeros(4, 2, dtype=torch.long), solver="euler", nfe=2)
    with pytest.raises(ValueError, match="expected the velocity with the shape"):
        sample(lambda x, t: x[:, :1], x, solver="euler", nfe=2)
    with pytest.raises(ValueError, match="means"):
        sample(lambda x, t: ring(torch.randn(4, 2), t)[:2], x, solver="gm-sde", nfe=2)
    with pytest.raises(TypeError, match="float64 noise"):
        sample(lambda x, t: x.float(), x.double(), solver="euler", nfe=2)
    with pytest.raises(TypeError, match="floating-point velocity"):
        sample(lambda x, t: x.long(), x, solver="euler", nfe=2)
    with pytest.raises(TypeError, match="GaussianMixture"):
        sample(lambda x, t: x, x, solver="gm-sde", nfe=2)
    with pytest.raises(ValueError, match="times must have"):
        sample(ring, x, solver="euler", nfe=2, times=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="substeps applies to solver='gm-ode' only, got solver='gm-sde'"):
        sample(ring, x, solver="gm-sde", nfe=2, substeps=4)
    with pytest.raises(
        ValueError, match="substep_method applies to solver='gm-ode' only, got solver='euler'"
    ):
        sample(ring, x, solver="euler", nfe=2, substep_method="euler")
    with pytest.raises(ValueError, match="substep_method must be one of"):
        sample(ring, x, solver="gm-ode", nfe=2, substep_method="heun")
    with pytest.raises(ValueError, match="r must be"):
        sample(ring, x, solver="dpm-solver-2", nfe=2, r=0.0)
    with pytest.raises(ValueError, match="probabilistic guidance scale"):
        gmflow.ProbabilisticGuidance(1.0)


@pytest.mark.parametrize("solver, nfe", [("euler", 3), ("dpm-solver-2", 9), ("heun", 4), ("dpm++2m", 5)])
def test_network_evaluations_count_the_autoguidance_guide(solver, nfe):
    """NFE (main + guide): every network call, the guide model's included, is accounted for."""
    from gmflow import CFG, AutoGuidance
    from gmflow.sampling import network_evaluations

    calls = {"main": 0, "guide": 0}

    def counting(name, scale):
        def model(x, t, **cond):
            calls[name] += 1
            return scale * x

        return model

    guide = AutoGuidance(counting("guide", 0.5), 1.6)
    x = sample(counting("main", 1.0), torch.randn(4, 2), solver=solver, nfe=nfe, guidance=guide)
    assert torch.isfinite(x).all()
    assert calls == {"main": nfe, "guide": nfe}
    assert network_evaluations(nfe, guide) == {"main": nfe, "guide": nfe, "total": 2 * nfe}
    assert network_evaluations(nfe) == {"main": nfe, "guide": 0, "total": nfe}
    # CFG batches its unconditional half into the same call: no extra evaluation
    assert network_evaluations(nfe, CFG(2.0)) == {"main": nfe, "guide": 0, "total": nfe}
