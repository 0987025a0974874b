"""gmflow.reflow.objective: the ReFlow objective (by hand) and the pair batches (mixing, projection)."""

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
    hpf_operator,
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
    norm = reflow_objective(ReflowLoss(normalize=True))(net, (x0, x1), torch.Generator().manual_seed(5))
    assert torch.allclose(norm, torch.ones(64), atol=1e-5)


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
    lam, sigma = 4.0, 0.8
    loss = ReflowLoss(hpf_lambda=lam, hpf_sigma=sigma, weight="none", time_sampler="u_shaped")
    got = reflow_objective(loss)(net, (x0, x1), torch.Generator().manual_seed(9))
    t = _t(6, "u_shaped", 9)
    tb = t[:, None, None, None]
    d = (1 - tb) * x0 + tb * x1 - tb * net((1 - tb) * x0 + tb * x1, t)  # the denoiser D
    e = d - x0
    want = (e.square() + lam * hpf_operator(e, sigma).square()).flatten(1).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # normalize: value 1, gradient of log l
    norm = reflow_objective(ReflowLoss(**{**loss.__dict__, "normalize": True}))
    n = norm(net, (x0, x1), torch.Generator().manual_seed(9))
    assert torch.allclose(n, torch.ones(6), atol=1e-6)
    ga = torch.autograd.grad(n.sum(), list(net.parameters()))
    gb = torch.autograd.grad(want.log().sum(), list(net.parameters()))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_bad_batches():
    obj = reflow_objective(ReflowLoss())
    with pytest.raises(ValueError, match=r"tuple \(x0, x1\) or a stacked tensor"):
        obj(_net(), torch.randn(4, 2), None)


# -------------------------------------------------------------------------------------------- batches
def test_batch_fn_mixing_and_projection(ring_pairs):
    pairs = PairDataset(ring_pairs / "bwd", ring_pairs / "fwd")
    g = torch.Generator().manual_seed(0)
    fwd_x0 = {tuple(v.tolist()) for v in pairs.forward[0]}
    b = reflow_batch_fn(pairs, PairMixing(rho=1.0), 32)(1, 0, 1, g)
    assert b.shape == (32, 2, 2)
    assert all(tuple(v.tolist()) in fwd_x0 for v in b[:, 0])
    real = torch.randn(500, 2) * 0.01 + 7.0  # far from the ring: projected x0 must land on these
    mixing = PairMixing(projection_alpha=1.0)
    b = reflow_batch_fn(pairs, mixing, 32, real_data=real)(1, 0, 1, torch.Generator().manual_seed(0))
    assert (b[:, 0] - 7.0).abs().max() < 0.1
    bwd_x1 = {tuple(v.tolist()) for v in pairs.backward[1]}
    assert all(tuple(v.tolist()) in bwd_x1 for v in b[:, 1])  # x1 untouched
    with pytest.raises(ReflowError, match="real_data"):
        reflow_batch_fn(pairs, mixing, 32)
    with pytest.raises(ReflowError, match="no forward pairs"):
        reflow_batch_fn(PairDataset(ring_pairs / "bwd"), PairMixing(rho=0.5), 32)


def test_projection_pool_draws_from_a_sampler(ring_pairs):
    from gmflow.data import ring_gmm

    pairs = PairDataset(ring_pairs / "bwd")
    mixing = PairMixing(projection_alpha=0.5, projection_pool=2.0, projection_method="sinkhorn")
    fn = reflow_batch_fn(pairs, mixing, 16, real_data=ring_gmm())
    a = fn(1, 0, 1, torch.Generator().manual_seed(4))
    assert a.shape == (16, 2, 2) and torch.isfinite(a).all()
    assert torch.equal(a, fn(1, 0, 1, torch.Generator().manual_seed(4)))
    plain = reflow_batch_fn(pairs, PairMixing(), 16)(1, 0, 1, torch.Generator().manual_seed(4))
    assert torch.equal(a[:, 1], plain[:, 1]) and not torch.equal(a[:, 0], plain[:, 0])


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
