"""gmflow.reflow.objective: the objective (by hand), normalisers, batches and the fixed projection."""

from __future__ import annotations

import pytest
import torch

from gmflow.flow import sample_time
from gmflow.gm import GaussianMixture
from gmflow.nn import SmallUNet, ToyMLP
from gmflow.reflow import (
    PairDataset,
    PairMixing,
    ReflowError,
    ReflowLoss,
    error_distance,
    reflow_batch_fn,
    reflow_objective,
)


def _net(head: str = "velocity", width: int = 32) -> ToyMLP:
    torch.manual_seed(0)
    return ToyMLP(2, width, 2, head=head, num_components=4, time_dim=16, pos_freqs=4)


def _t(n: int, kind: str, seed: int) -> torch.Tensor:
    """The objective's time draw: ``sample_time`` from a fresh generator (the first draw of a step)."""
    return sample_time(n, kind, generator=torch.Generator().manual_seed(seed), eps=1e-4)


def test_objective_matches_velocity_and_denoiser_mse(ring_pairs):
    pairs = PairDataset(ring_pairs / "bwd")
    x0, x1 = pairs.sample(64, generator=torch.Generator().manual_seed(0))
    net = _net()

    def ref(weight: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(5)
        t = torch.rand(64, generator=g, dtype=torch.float64).clamp(1e-4, 1.0).float()[:, None]
        x_t = (1 - t) * x0 + t * x1
        u = net(x_t, t[:, 0])
        if weight == "velocity":
            return (u - (x1 - x0)).square().mean(1)
        return (x_t - t * u - x0).square().mean(1)

    for weight in ("velocity", "none"):
        obj = reflow_objective(ReflowLoss(weight=weight))
        got = obj(net, torch.stack([x0, x1], 1), torch.Generator().manual_seed(5))
        assert got.shape == (64,)
        assert torch.allclose(got, ref(weight), rtol=1e-4, atol=1e-6)
        tup = obj(net, (x0, x1), torch.Generator().manual_seed(5))  # tuple batches work too
        assert torch.allclose(tup, got)
    norm = reflow_objective(ReflowLoss(normalize="sample"))(net, (x0, x1), torch.Generator().manual_seed(5))
    v = ref("velocity")
    torch.testing.assert_close(norm, v / v.clamp_min(1e-4), rtol=1e-4, atol=1e-6)


def test_gm_student_uses_the_gm_mean(ring_pairs):
    """For a GM head the velocity is the mixture mean ``sum_k A_k mu_k`` (not a component, not a sample)."""
    pairs = PairDataset(ring_pairs / "bwd")
    x0, x1 = pairs.sample(16, generator=torch.Generator().manual_seed(1))
    net = _net("gm")
    loss = reflow_objective(ReflowLoss(time_sampler="pow10"))(net, (x0, x1), torch.Generator().manual_seed(2))
    t = _t(16, "pow10", 2)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
    out = net(x_t, t)
    assert isinstance(out, GaussianMixture)
    want = ((x1 - x0) - out.mean()).square().mean(1)
    torch.testing.assert_close(loss, want)
    assert not torch.allclose(want, ((x1 - x0) - out.means[:, 0]).square().mean(1))  # the test can tell
    loss.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_hpf_distance_and_normalised_gradient_on_images():
    torch.manual_seed(0)
    net = SmallUNet(1, 8, (1,), image_size=8, time_dim=16)
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    lam, radius = 4.0, 0.3
    loss = ReflowLoss(hpf_lambda=lam, hpf_radius=radius, weight="none", time_sampler="u_shaped")
    got = reflow_objective(loss)(net, (x0, x1), torch.Generator().manual_seed(9))
    t = _t(6, "u_shaped", 9)
    tb = t[:, None, None, None]
    d = (1 - tb) * x0 + tb * x1 - tb * net((1 - tb) * x0 + tb * x1, t)  # the denoiser D
    want = error_distance(d - x0, hpf_lambda=lam, radius=radius)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(want, (d - x0).square().flatten(1).mean(1), rtol=1e-2)  # the HPF acts
    # per-sample normalisation: value 1, gradient of log l (every l is above the floor here)
    assert want.min() > 1e-3
    norm = reflow_objective(ReflowLoss(**{**loss.__dict__, "normalize": "sample"}))
    n = norm(net, (x0, x1), torch.Generator().manual_seed(9))
    assert torch.allclose(n, torch.ones(6), atol=1e-6)
    ga = torch.autograd.grad(n.sum(), list(net.parameters()))
    gb = torch.autograd.grad(want.log().sum(), list(net.parameters()))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_learned_normalisation_objective():
    from gmflow.nn import LogLossNet, WithLogLoss

    net = WithLogLoss(_net(), LogLossNet((2,), width=16, time_dim=8))
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)
    obj = reflow_objective(ReflowLoss(normalize="learned", time_sampler="pow10", time_max=0.9))
    plain = reflow_objective(ReflowLoss(time_sampler="pow10", time_max=0.9))(
        net, (x0, x1), torch.Generator().manual_seed(1)
    )
    assert float(net.log_loss.initialized) == 0.0
    got = obj(net, (x0, x1), torch.Generator().manual_seed(1))
    # the first call sets the side net's level to log mean l; its output is then that constant
    assert float(net.log_loss.initialized) == 1.0
    level = plain.detach().mean()
    fit = plain / level - 1.0 - torch.log(plain / level)
    torch.testing.assert_close(got, plain / level + fit, rtol=1e-4, atol=1e-6)
    got.mean().backward()
    assert net.log_loss.mlp[-1].weight.grad.abs().sum() > 0 and net.net.head.proj.weight.grad is not None
    with pytest.raises(ReflowError, match="WithLogLoss"):
        obj(_net(), (x0, x1), None)


def test_time_is_clamped_to_time_max():
    g = torch.Generator().manual_seed(0)
    t = sample_time(10_000, "pow10", generator=g, eps=0.01, t_max=80 / 81, dtype=torch.float64)
    assert float(t.max()) == pytest.approx(80 / 81) and float(t.min()) >= 0.01
    assert float((t == t.max()).float().mean()) > 0.005  # the clamp is hit: 10^t puts mass near 1
    with pytest.raises(ValueError, match="t_max"):
        sample_time(4, t_max=1.5)


def test_bad_batches():
    obj = reflow_objective(ReflowLoss())
    with pytest.raises(ValueError, match=r"tuple \(x0, x1\) or a stacked tensor"):
        obj(_net(), torch.randn(4, 2), None)


# -------------------------------------------------------------------------------------------- batches
def test_batch_fn_mixing(ring_pairs):
    pairs = PairDataset(ring_pairs / "bwd", ring_pairs / "fwd")
    g = torch.Generator().manual_seed(0)
    fwd_x0 = {tuple(v.tolist()) for v in pairs.forward[0]}
    b = reflow_batch_fn(pairs, PairMixing(rho=1.0), 32)(1, 0, 1, g)
    assert b.shape == (32, 2, 2)
    assert all(tuple(v.tolist()) in fwd_x0 for v in b[:, 0])
    with pytest.raises(ReflowError, match="no forward pairs"):
        reflow_batch_fn(PairDataset(ring_pairs / "bwd"), PairMixing(rho=0.5), 32)
    with pytest.raises(ReflowError, match="real_data"):
        reflow_batch_fn(pairs, PairMixing(projection_lambda=1.0), 32)


def test_projected_coupling_is_fixed(ring_pairs):
    """The projection is computed once over the pair set: the same x0 for a pair at every step."""
    pairs = PairDataset(ring_pairs / "bwd")
    real = torch.randn(len(pairs.backward[0]), 2, generator=torch.Generator().manual_seed(0)) * 0.1 + 7.0
    proj = pairs.projected(real, lam=1e6, block=64, seed=1)
    x0p, x1p = proj.backward
    assert torch.equal(x1p, pairs.backward[1]) and (x0p - 7.0).abs().max() < 0.6  # far from the ring
    assert torch.equal(pairs.backward[0], PairDataset(ring_pairs / "bwd").backward[0])  # self untouched
    # a permutation-free match: each real sample is used once when pool = 1 and N reals = N pairs
    near = torch.cdist(x0p.double(), real.double()).argmin(1)
    assert len(set(near.tolist())) == len(near)
    half = pairs.projected(real, lam=1.0, block=64, seed=1).backward[0]
    torch.testing.assert_close(half, 0.5 * (pairs.backward[0] + x0p), rtol=1e-5, atol=1e-5)
    assert torch.equal(pairs.projected(real, lam=1.0, block=64, seed=1).backward[0], half)  # pure function
    fn = reflow_batch_fn(pairs, PairMixing(projection_lambda=1e6, projection_block=64), 16, real, seed=1)
    for step in (1, 2):
        b = fn(step, 0, 1, torch.Generator().manual_seed(step))
        idx = torch.cdist(b[:, 1].double(), x1p.double()).argmin(1)
        assert torch.equal(b[:, 0], x0p[idx])  # the batch's x0 is the pair's fixed projected x0


def test_projection_from_a_sampler(ring_pairs):
    from gmflow.data import ring_gmm

    pairs = PairDataset(ring_pairs / "bwd")
    a = pairs.projected(ring_gmm(), lam=1.0, method="sinkhorn", pool=2.0, block=32, seed=4).backward[0]
    assert a.shape == pairs.backward[0].shape and torch.isfinite(a).all()
    b = pairs.projected(ring_gmm(), lam=1.0, method="sinkhorn", pool=2.0, block=32, seed=4).backward[0]
    assert torch.equal(a, b) and not torch.equal(a, pairs.backward[0])
    with pytest.raises(ValueError, match="lam"):
        pairs.projected(ring_gmm(), lam=-1.0)


@pytest.mark.parametrize("rho, world_size", [(0.0, 1), (0.4, 1), (0.4, 2), (1.0, 1)])
def test_pair_draw_reproduces_the_batch_fn(ring_pairs, rho, world_size):
    """PairDataset.draw consumes the generator exactly as reflow_batch_fn (without projection) does."""
    pairs = PairDataset(ring_pairs / "bwd", ring_pairs / "fwd")
    fn = reflow_batch_fn(pairs, PairMixing(rho=rho), 64)
    g_batch, g_draw = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for step in range(3):  # the generators stay in step across calls
        batch = fn(step, 0, world_size, g_batch)
        x0, x1, is_fwd = pairs.draw(64 // world_size, rho, generator=g_draw)
        assert torch.equal(batch, torch.stack([x0, x1], dim=1))
    assert torch.equal(g_batch.get_state(), g_draw.get_state())
    fwd_x0 = {tuple(v.tolist()) for v in pairs.forward[0]}
    assert [tuple(v.tolist()) in fwd_x0 for v in x0] == is_fwd.tolist()
    if rho == 0.4:
        assert 0 < int(is_fwd.sum()) < len(is_fwd)


def test_pair_sample_is_draw_with_the_dataset_rho(ring_pairs):
    pairs = PairDataset(ring_pairs / "bwd", ring_pairs / "fwd", rho=0.4)
    x0, x1 = pairs.sample(50, generator=torch.Generator().manual_seed(2))
    d0, d1, _ = pairs.draw(50, 0.4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x0, d0) and torch.equal(x1, d1)
    with pytest.raises(ValueError, match="rho"):
        pairs.draw(4, 1.5)
    with pytest.raises(ValueError, match="n must be"):
        pairs.draw(0)
    with pytest.raises(ValueError, match="no forward_dir"):
        PairDataset(ring_pairs / "bwd").draw(4, 0.5)
