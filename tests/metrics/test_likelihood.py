"""gmflow.metrics.bits_per_dim (GMFlow Eq. 21): the analytic K = 1 value on Gaussian data, the exact GM
posterior against worse models, the spectral term, the level offset, dequantisation and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from gmflow.data import GaussianMixtureData
from gmflow.gm import GaussianMixture
from gmflow.metrics import bits_per_dim
from gmflow.nn import SpectrumMLP

SD = 0.5
MEAN = torch.tensor([0.3, -0.2])


class ExactGaussian:
    """The exact K = 1 model of data N(MEAN, SD^2 I) per pixel, in closed form.

    ``p(x0 | x_t) = N((t^2 m + a sd^2 x_t) / D, sd^2 t^2 / D)``, ``D = t^2 + a^2 sd^2``, ``a = 1 - t``;
    as a GM over ``u = (x_t - x0) / t``: mean ``(x_t - E[x0 | x_t]) / t``, std ``sd / sqrt(D)``.
    """

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> GaussianMixture:
        tt = t.view(-1, 1, 1, 1)
        a, m = 1 - tt, MEAN.view(1, 2, 1, 1).to(x_t.dtype)
        d = tt.square() + a.square() * SD**2
        u_mean = (x_t - (tt.square() * m + a * SD**2 * x_t) / d) / tt
        logstd = (math.log(SD) - 0.5 * torch.log(d)).view(-1, 1, 1, 1, 1)
        return GaussianMixture(u_mean.unsqueeze(1), torch.zeros_like(u_mean[:, :1]).unsqueeze(1), logstd)


def _analytic_bpd(eps: float = 1e-4) -> float:
    """``E_t[1/2 log(2 pi e v_t)] / ln 2``, ``v_t = sd^2 t^2 / D``, t ~ U(0, 1) clamped at ``eps``."""
    n = 400000
    t = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).clamp_min(eps)
    v = SD**2 * t.square() / (t.square() + (1 - t).square() * SD**2)
    return float((0.5 * torch.log(2 * math.pi * math.e * v)).mean()) / math.log(2)


def _gauss_data(n: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (MEAN.view(1, 2, 1, 1) + SD * torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)).double()


def test_k1_model_on_gaussian_data_gives_the_analytic_value():
    want = _analytic_bpd()
    res = bits_per_dim(ExactGaussian(), _gauss_data(), num_t=4, generator=torch.Generator().manual_seed(1))
    assert (res.n, res.dims, res.num_t, res.bpd_spectral) == (2048, 128, 4, None)
    assert abs(res.bpd - want) < 4 * res.stderr and res.stderr < 0.01, (res.bpd, want, res.stderr)
    # the level offset: bits of levels spaced bin_width apart = density bits - log2(bin_width)
    binned = bits_per_dim(ExactGaussian(), _gauss_data(), num_t=4, bin_width=2 / 255,
                          generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert binned.bpd == pytest.approx(
        res.bpd + math.log2(127.5), abs=1e-9
    ) and binned.stderr == pytest.approx(res.stderr)


def test_the_exact_gm_posterior_beats_worse_models():
    """Cross-entropy >= entropy: the exact posterior of GM data has the lowest NLL, then its K = 1
    surrogate; a model with its std doubled is worse still (same t and noise for all three)."""
    data = GaussianMixtureData(torch.tensor([[-1.0], [0.2], [1.0]]), 0.1, spatial_shape=(4, 4))
    x0 = data.sample(1024, generator=torch.Generator().manual_seed(0))

    def surrogate(x_t, t):
        g = data(x_t, t).to_gaussian()
        return GaussianMixture(g.mean.unsqueeze(1), torch.zeros_like(g.mean[:, :1]).unsqueeze(1),
                               (0.5 * g.var.log()).mean((1, 2, 3), keepdim=True).unsqueeze(1))  # fmt: skip

    def wide(x_t, t):
        gm = data(x_t, t)
        return GaussianMixture(gm.means, gm.logweights, gm.logstds + math.log(2.0))

    got = [bits_per_dim(m, x0, num_t=4, generator=torch.Generator().manual_seed(1)).bpd
           for m in (data, surrogate, wide)]  # fmt: skip
    assert got[0] < got[1] and got[0] < got[2], got


def test_spectral_term_flat_spectrum_changes_nothing_and_a_net_is_picked_up():
    data = GaussianMixtureData(torch.tensor([[-0.5], [0.5]]), 0.3, spatial_shape=(8, 8))
    x0 = data.sample(64, generator=torch.Generator().manual_seed(0))
    flat = SpectrumMLP(base_size=[1, 8, 8], layers=[4])  # zero last layer: lps = 0
    kw = dict(num_t=2, progress=False)
    res = bits_per_dim(data, x0, spectral=flat, generator=torch.Generator().manual_seed(1), **kw)
    assert res.bpd_spectral == pytest.approx(res.bpd, abs=1e-9) and res.stderr_spectral is not None
    with torch.no_grad():
        flat.mlp[-1].bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    data.spectrum_net = flat  # found as model.spectrum_net (spectral=None)
    auto = bits_per_dim(data, x0, generator=torch.Generator().manual_seed(1), **kw)
    assert auto.bpd == pytest.approx(res.bpd) and auto.bpd_spectral != pytest.approx(auto.bpd, abs=1e-6)
    off = bits_per_dim(data, x0, spectral=False, generator=torch.Generator().manual_seed(1), **kw)
    assert off.bpd_spectral is None and off.bpd == pytest.approx(res.bpd)


def test_batches_and_dequantisation():
    data = GaussianMixtureData(torch.tensor([[0.0]]), 0.4, spatial_shape=(2, 2))
    x0 = data.sample(40, generator=torch.Generator().manual_seed(0))
    a = bits_per_dim(data, x0, num_t=2, batch_size=40, generator=torch.Generator().manual_seed(1))
    b = bits_per_dim(data, x0, num_t=2, batch_size=40, generator=torch.Generator().manual_seed(1))
    assert a == b  # deterministic in the generator
    c = bits_per_dim(data, x0, num_t=2, batch_size=7, generator=torch.Generator().manual_seed(1))
    assert math.isfinite(c.bpd) and c.n == 40  # other batches: other draws, same estimate up to noise
    assert abs(c.bpd - a.bpd) < 5 * math.hypot(a.stderr, c.stderr)
    d = bits_per_dim(data, x0, num_t=2, batch_size=40, bin_width=0.01, dequantize=True,
                     generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert d.dequantize and d.bin_width == 0.01 and d.bpd != a.bpd - math.log2(0.01)


def _model(x_t, t):
    return GaussianMixture(torch.zeros_like(x_t).unsqueeze(1), torch.zeros_like(x_t[:, :1]).unsqueeze(1),
                           torch.zeros(x_t.shape[0], 1, 1, 1, 1))  # fmt: skip


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(x0=[1.0]), TypeError, "x0 must be a floating-point"),
        (dict(x0=torch.zeros(4)), ValueError, r"x0 must have shape \(N, \*event\)"),
        (dict(x0=torch.full((2, 1, 2, 2), math.nan)), ValueError, "NaN"),
        (dict(cond={"class_labels": torch.zeros(3)}), ValueError, "first dimension 2"),
        (dict(cond=[1]), TypeError, "cond must be a dict"),
        (dict(num_t=0), ValueError, "num_t must be an int >= 1"),
        (dict(batch_size=1.5), ValueError, "batch_size"),
        (dict(bin_width=0.0), ValueError, "bin_width"),
        (dict(dequantize=True), ValueError, "needs bin_width"),
        (dict(time_eps=1.0), ValueError, "time_eps"),
        (dict(spectral=True), ValueError, "spectrum_net attribute"),
        (dict(spectral="flat"), TypeError, "spectral must be"),
        (dict(model=lambda x, t: x), TypeError, "GaussianMixture"),
    ],
)
def test_bad_input_is_an_error_naming_the_argument(kw, err, match):
    args = {"model": _model, "x0": torch.zeros(2, 1, 2, 2), **kw}
    with pytest.raises(err, match=match):
        bits_per_dim(args.pop("model"), args.pop("x0"), **args)
