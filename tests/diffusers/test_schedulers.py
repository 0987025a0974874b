"""GMFlowSDEScheduler / GMFlowODEScheduler: config round trips, the official time convention, the official
scheduler steps (tests/fixtures/official_gmdit/scheduler_steps.safetensors), step-for-step equality
with ``gmflow.sample``, and a GM head on a diffusers UNet2DModel (the README's example)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers", reason='needs the optional extra: pip install "gmflow[diffusers]"')

from diffusers import UNet2DModel  # noqa: E402

import gmflow  # noqa: E402
from gmflow import GaussianMixture  # noqa: E402
from gmflow.diffusers import GMFlowODEScheduler, GMFlowSDEScheduler  # noqa: E402
from gmflow.nn import GMDiT, LogStdHead, SpectrumMLP, timestep_embedding  # noqa: E402
from gmflow.train import FlowLoss, flow_loss  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "fixtures" / "official_gmdit"
GM_FIELDS = ("means", "logweights", "logstds")
SCHEDULERS = (GMFlowSDEScheduler, GMFlowODEScheduler)


@pytest.fixture(scope="module")
def dit() -> GMDiT:
    return GMDiT.from_pretrained(FIXTURE / "transformer").requires_grad_(False)


@pytest.fixture(scope="module")
def steps() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "scheduler_steps.safetensors")


def _gm(d: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name: d[f"{prefix}.{name}"] for name in GM_FIELDS}


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("cls", SCHEDULERS)
def test_config_round_trips(cls, tmp_path):
    s = cls(num_train_timesteps=1000, shift=3.0)
    assert dict(s.config)["shift"] == 3.0 and s.schedule.kind == (
        "sde" if cls is GMFlowSDEScheduler else "ode"
    )
    for other in SCHEDULERS:  # each takes the other's config (the official way to switch solvers)
        t = other.from_config(s.config)
        assert (t.config.num_train_timesteps, t.config.shift) == (1000, 3.0)
    official = {"_class_name": "FlowEulerODEScheduler", "_diffusers_version": "0.42.1",
                "num_train_timesteps": 1000, "shift": 1.0}  # fmt: skip
    assert cls.from_config(official).config.shift == 1.0
    s.save_config(tmp_path)
    assert cls.from_pretrained(tmp_path).config.shift == 3.0
    with pytest.raises(
        ValueError, match=rf"^{cls.__name__}.from_config: unknown scheduler config key 'use_karras_sigmas'"
    ):
        cls.from_config({**official, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="shift must be a finite float > 0, got -2"):
        cls(shift=-2)


def test_timesteps_are_the_official_float32_grid():
    s = GMFlowODEScheduler()
    s.set_timesteps(16)
    want = 1000 * (1 - torch.arange(16, dtype=torch.float32) / 16)
    assert s.timesteps.dtype == torch.float32 and torch.equal(s.timesteps, want)
    assert torch.equal(s.sigmas, torch.cat([want / 1000, torch.zeros(1)])) and len(s) == 1000
    s = GMFlowSDEScheduler(shift=3.0)
    s.set_timesteps(4)
    u = 1 - torch.arange(5, dtype=torch.float64) / 4
    torch.testing.assert_close(s.sigmas, (3 * u / (1 + 2 * u)).float(), atol=0, rtol=0)
    s.set_timesteps(sigmas=[0.9, 0.4])
    assert s.timesteps.tolist() == [900.0, 400.0] and s.solver.times == [0.9, 0.4, 0.0]
    with pytest.raises(ValueError, match="sigmas has 2 values for num_inference_steps=3"):
        s.set_timesteps(3, sigmas=[0.9, 0.4])
    with pytest.raises(ValueError, match="times must decrease strictly to 0"):
        s.set_timesteps(sigmas=[0.4, 0.9])


# ------------------------------------------------------------------------------ the official steps
def test_official_sde_step(steps, monkeypatch):
    """750 -> 500 from the official transformer dict; x0 draw injected, noise from generator seed 12."""
    x0 = steps["sde.x0_sample"]
    monkeypatch.setattr(GaussianMixture, "sample", lambda self, generator=None: x0)
    s = GMFlowSDEScheduler(num_train_timesteps=1000, shift=1.0)
    s.set_timesteps(4)
    assert torch.equal(s.timesteps, steps["sde.grid_timesteps"]) and torch.equal(
        s.sigmas, steps["sde.grid_sigmas"]
    )
    s.set_timesteps(sigmas=s.sigmas[1:-1])  # start at 750
    out = s.step(
        _gm(steps, "sde.u_gm"),
        steps["sde.timestep"],
        steps["sde.x_t"],
        generator=torch.Generator().manual_seed(12),
    )
    torch.testing.assert_close(out.prev_sample, steps["sde.prev_sample"], atol=1e-6, rtol=0)
    assert s.step_index == 1 and s.timesteps[1] == steps["sde.timestep_next"]


def test_official_ode_step_with_four_substeps(steps):
    s = GMFlowODEScheduler()
    s.set_timesteps(sigmas=[0.75, 0.5], substeps=4, substep_method="euler")
    prev = s.step(_gm(steps, "sde.u_gm"), 750.0, steps["ode.x_t"]).prev_sample  # the same GM at 750
    torch.testing.assert_close(prev, steps["ode.prev_sample"], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ scheduler == gmflow.sample
CASES = {
    "ode1": (GMFlowODEScheduler, dict(order=1, substeps=4), dict(solver="gm-ode", order=1, substeps=4)),
    "ode2": (GMFlowODEScheduler, dict(order=2, substeps=4), dict(solver="gm-ode", order=2, substeps=4)),
    "sde1": (GMFlowSDEScheduler, dict(order=1), dict(solver="gm-sde", order=1)),
    "sde2": (GMFlowSDEScheduler, dict(order=2), dict(solver="gm-sde", order=2)),
    "sde2-mean": (
        GMFlowSDEScheduler,
        dict(order=2, output_mode="mean"),
        dict(solver="gm-sde", order=2, output_mode="mean"),
    ),
    "sde2-spectral": (
        GMFlowSDEScheduler,
        dict(order=2, spectrum_net=True),
        dict(solver="gm-sde", order=2, spectral=True),
    ),
}


def _run(dit, sched, noise, y, exact_time: bool, seed: int = 21):
    g = torch.Generator().manual_seed(seed)
    x, states = noise, [noise]
    for timestep in sched.timesteps:
        t = sched.t if exact_time else float(timestep) / sched.config.num_train_timesteps
        gm = dit(x, torch.full((x.shape[0],), t), class_labels=y)
        x = sched.step(gm, timestep, x, generator=g).prev_sample
        states.append(x)
    return torch.stack(states)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shift,nfe", [(1.0, 4), (3.0, 6)])
def test_scheduler_loop_equals_gmflow_sample_step_for_step(dit, case, shift, nfe):
    cls, opts, kw = CASES[case]
    opts, kw = dict(opts), dict(kw)
    if opts.get("spectrum_net"):
        net = SpectrumMLP.from_pretrained(FIXTURE / "spectrum_net")
        opts["spectrum_net"], kw["spectral"] = net, net
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([3, 7])
    _, want = gmflow.sample(
        dit, noise, nfe=nfe, cond={"class_labels": y}, times=gmflow.time_grid(nfe, "shift", shift=shift),
        generator=torch.Generator().manual_seed(21), return_trajectory=True, **kw,
    )  # fmt: skip
    sched = cls(shift=shift)
    sched.set_timesteps(nfe, **opts)
    assert torch.equal(_run(dit, sched, noise, y, exact_time=True), want)  # bit-identical
    sched.set_timesteps(nfe, **opts)  # diffusers-style: the model at timestep / 1000 (float32)
    err = (_run(dit, sched, noise, y, exact_time=False) - want).abs().max()
    assert err <= 1e-6, float(err)


def test_step_errors(dit):
    s = GMFlowODEScheduler()
    x = torch.zeros(1, 4, 8, 8)
    gm = dit(x, torch.ones(1))
    with pytest.raises(RuntimeError, match=r"call set_timesteps\(\) before stepping"):
        s.step(gm, 1000.0, x)
    s.set_timesteps(2)
    with pytest.raises(ValueError, match=r"expected timestep 1000 \(step 0 of 2\), got 500.0"):
        s.step(gm, 500.0, x)
    with pytest.raises(
        TypeError, match="takes a GaussianMixture over u, its dict or a GMPrediction, got Tensor"
    ):
        s.step(torch.zeros_like(x), 1000.0, x)
    with pytest.raises(ValueError, match="model_output dict lacks logstds"):
        s.step({"means": gm.means, "logweights": gm.logweights}, 1000.0, x)
    x = s.step(gm, torch.tensor(1000.0), x).prev_sample
    x = s.step(dit(x, torch.full((1,), 0.5)), s.timesteps[1], x, return_dict=False)[0]
    with pytest.raises(RuntimeError, match="every step is taken"):
        s.step(gm, 500.0, x)
    with pytest.raises(ValueError, match="output_mode must be 'sample' or 'mean'"):
        GMFlowSDEScheduler().set_timesteps(4, output_mode="median")


# ---------------------------------------------------------------------------- a GM head on a diffusers model
class GMUNet(torch.nn.Module):
    """The README's example: a diffusers UNet2DModel whose output channels are a K-component GM over u."""

    def __init__(self, channels: int, k: int, **unet_kwargs):
        super().__init__()
        self.k, self.c = k, channels
        self.unet = UNet2DModel(in_channels=channels, out_channels=k * (channels + 1), **unet_kwargs)
        self.logstd = LogStdHead(64, hidden=256)

    def forward(self, x_t, t):
        out = self.unet(x_t, 1000 * t).sample
        b, _, h, w = out.shape
        means = out[:, : self.k * self.c].reshape(b, self.k, self.c, h, w)
        logweights = out[:, self.k * self.c :].reshape(b, self.k, 1, h, w).float().log_softmax(1)
        logstds = self.logstd(timestep_embedding(t, 64)).reshape(b, 1, 1, 1, 1)
        return GaussianMixture(means.float(), logweights, logstds)


def test_gm_head_on_a_diffusers_unet_trains_and_samples():
    torch.manual_seed(0)
    model = GMUNet(
        1, 4, sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for step in range(2):
        loss = flow_loss(model, x0, FlowLoss(kind="transition"), torch.Generator().manual_seed(step)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    model.eval()
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    sched = GMFlowSDEScheduler()
    sched.set_timesteps(4, order=2)
    g, x = torch.Generator().manual_seed(3), noise
    with torch.no_grad():
        for timestep in sched.timesteps:
            x = sched.step(model(x, torch.full((4,), sched.t)), timestep, x, generator=g).prev_sample
    want = gmflow.sample(
        model, noise, solver="gm-sde", nfe=4, order=2, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(x, want)
