"""Losses: FM L2, GM NLL and the transition loss, with their closed-form relations."""

import math

import torch

from gmflow import GaussianMixture, fm_loss, gm_nll_loss, transition_loss
from gmflow.data.gmm import GaussianMixtureData
from gmflow.flow import transition_pair

D = torch.float64


def test_k1_unit_std_gm_nll_is_fm_loss_up_to_constants():
    g = torch.Generator().manual_seed(0)
    b, c = 8, 3
    pred = torch.randn(b, c, 4, 4, generator=g, dtype=D, requires_grad=True)
    target = torch.randn(b, c, 4, 4, generator=g, dtype=D)
    gm = GaussianMixture(
        pred.unsqueeze(1), torch.zeros(b, 1, 1, 4, 4, dtype=D), torch.zeros(b, 1, 1, 1, 1, dtype=D)
    )
    nll = gm_nll_loss(gm, target)
    fm = fm_loss(pred, target)
    assert torch.allclose(nll, 0.5 * c * fm + 0.5 * c * math.log(2 * math.pi))
    (g1,) = torch.autograd.grad(nll, pred)
    (g2,) = torch.autograd.grad(fm, pred)
    assert torch.allclose(g1, 0.5 * c * g2)


def test_gm_nll_equals_negative_log_prob():
    g = torch.Generator().manual_seed(1)
    gm = GaussianMixture.from_logits(
        torch.randn(4, 5, 2, 3, generator=g, dtype=D),
        torch.randn(4, 5, 1, 3, generator=g, dtype=D),
        torch.randn(4, 1, 1, 1, generator=g, dtype=D) * 0.2,
    )
    x = torch.randn(4, 2, 3, dtype=D)
    per = gm_nll_loss(gm, x, reduction="none")
    assert torch.allclose(per, -gm.log_prob(x).mean(1))
    assert torch.allclose(gm_nll_loss(gm, x), per.mean())


def test_transition_loss_ratio_one_is_x0_nll():
    """lambda = 1: t_low = 0, the loss is the x0 NLL = u NLL + C log t per position."""
    data = GaussianMixtureData(torch.randn(3, 2, dtype=D), 0.3)
    x0 = data.sample(64, generator=torch.Generator().manual_seed(0), dtype=D)
    t = torch.rand(64, dtype=D).clamp_min(0.05)
    x_low, t_low, x_high = transition_pair(x0, t, 1.0, torch.Generator().manual_seed(1))
    gm_u = data.posterior_u(x_high, t)
    tl = transition_loss(gm_u, x_high, t, x_low, t_low, reduction="none")
    u = (x_high - x0) / t[:, None]
    nll_u = gm_nll_loss(gm_u, u, reduction="none")
    assert torch.allclose(tl, nll_u + 2 * torch.log(t), atol=1e-8)


def test_transition_loss_is_minimised_by_the_exact_posterior():
    """The exact posterior scores lower than a perturbed one (in expectation over many pairs)."""
    data = GaussianMixtureData(torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=D), 0.3)
    g = torch.Generator().manual_seed(0)
    x0 = data.sample(20000, generator=g, dtype=D)
    t = torch.rand(20000, generator=g, dtype=D).clamp_min(0.05)
    x_low, t_low, x_high = transition_pair(x0, t, 0.9, g)
    exact = data.posterior_u(x_high, t)
    worse = GaussianMixture(exact.means * 1.1, exact.logweights, exact.logstds + 0.1)
    assert transition_loss(exact, x_high, t, x_low, t_low) < transition_loss(worse, x_high, t, x_low, t_low)


def test_bf16_inputs_compute_in_fp32():
    gm = GaussianMixture(
        torch.zeros(2, 1, 2, dtype=torch.bfloat16),
        torch.zeros(2, 1, 1, dtype=torch.bfloat16),
        torch.zeros(2, 1, 1, dtype=torch.bfloat16),
    )
    out = gm_nll_loss(gm, torch.ones(2, 2))
    assert out.dtype == torch.float32


def test_fused_transition_loss_equals_explicit_composition():
    """The fused loss equals -log q(x_low | x_high) built from u_to_x0 + reverse_transition (images too)."""
    g = torch.Generator().manual_seed(3)
    gm = GaussianMixture.from_logits(
        torch.randn(5, 4, 3, 2, 2, generator=g, dtype=D),
        torch.randn(5, 4, 1, 2, 2, generator=g, dtype=D),
        torch.randn(5, 1, 1, 1, 1, generator=g, dtype=D) * 0.3,
    )
    x0 = torch.randn(5, 3, 2, 2, generator=g, dtype=D)
    t = torch.tensor([0.9, 0.5, 0.2, 1.0, 0.05], dtype=D)
    x_low, t_low, x_high = transition_pair(x0, t, 0.5, g)
    explicit = -gm.u_to_x0(x_high, t).reverse_transition(x_high, t, t_low).log_prob(x_low).mean((1, 2))
    assert torch.allclose(
        transition_loss(gm, x_high, t, x_low, t_low, reduction="none"), explicit, atol=1e-10
    )


def _leaves(g: torch.Generator, shape: tuple[int, ...]) -> list[torch.Tensor]:
    b, k, c, *s = shape
    means = torch.randn(shape, generator=g, dtype=D).requires_grad_()
    logits = torch.randn(b, k, 1, *s, generator=g, dtype=D).requires_grad_()
    logstds = (torch.randn(b, 1, 1, *[1] * len(s), generator=g, dtype=D) * 0.3).requires_grad_()
    return [means, logits, logstds]


def _loss_pairs(x0, x_high, t, x_low, t_low) -> dict:
    """(fused loss, explicit per-position NLL) of the transition loss and the GM NLL."""
    return {
        "transition": (
            lambda gm: transition_loss(gm, x_high, t, x_low, t_low, reduction="none"),
            lambda gm: -gm.u_to_x0(x_high, t).reverse_transition(x_high, t, t_low).log_prob(x_low),
        ),
        "nll": (lambda gm: gm_nll_loss(gm, x0, reduction="none"), lambda gm: -gm.log_prob(x0)),
    }


def test_hand_written_gm_loss_gradients_equal_autograd_of_the_explicit_formula():
    """The losses' custom backward (means, logits through log-softmax, log-std) vs autograd of log_prob."""
    g = torch.Generator().manual_seed(5)
    for shape in ((6, 4, 3, 2, 3), (7, 5, 2)):  # images and vectors
        leaves = _leaves(g, shape)
        x0 = torch.randn(shape[0], *shape[2:], generator=g, dtype=D)
        t = torch.rand(shape[0], generator=g, dtype=D) * 0.9 + 0.05
        x_low, t_low, x_high = transition_pair(x0, t, 0.5, g)
        weights = torch.rand(shape[0], generator=g, dtype=D)  # a non-uniform upstream gradient
        for name, (fused, explicit) in _loss_pairs(x0, x_high, t, x_low, t_low).items():
            got = torch.autograd.grad((fused(GaussianMixture.from_logits(*leaves)) * weights).sum(), leaves)
            ref_per = explicit(GaussianMixture.from_logits(*leaves))
            ref_per = ref_per.reshape(shape[0], -1).mean(1)
            ref = torch.autograd.grad((ref_per * weights).sum(), leaves)
            for a, b_, what in zip(got, ref, ("means", "logits", "logstds"), strict=True):
                torch.testing.assert_close(a, b_, atol=1e-10, rtol=1e-9, msg=f"{name} {shape} {what}")
