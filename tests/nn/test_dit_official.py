"""GMDiT against the official GM-DiT fixture (tests/fixtures/official_gmdit, see its README.md).

Compared: the checkpoint layout (strict keys, names and shapes), the fp32 forward and its
intermediates, u -> x0, four official 4-step sampling runs through ``gmflow.sample``, and the
conditioning and precision behaviour on the fixture's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gmflow
import gmflow.sampling.solvers.gm as gm_solvers
from gmflow import GaussianMixture
from gmflow.nn import GMDiT
from gmflow.sampling.solvers.gm_field import PreparedGM

FIXTURE = Path(__file__).parents[1] / "fixtures" / "official_gmdit"
TRANSFORMER = FIXTURE / "transformer"
GM_FIELDS = ("means", "logweights", "logstds")

# The README's state-dict table for the fixture (D = 64, p = 2, C = 4, K = 8, N = 10, 2 blocks).
_BLOCK = {
    "norm1.linear.weight": (384, 64),
    "norm1.linear.bias": (384,),
    **{f"attn1.to_{q}.{w}": (64, 64) if w == "weight" else (64,) for q in "qkv" for w in ("weight", "bias")},
    "attn1.to_out.0.weight": (64, 64),
    "attn1.to_out.0.bias": (64,),
    "ff.net.0.proj.weight": (256, 64),
    "ff.net.0.proj.bias": (256,),
    "ff.net.2.weight": (64, 256),
    "ff.net.2.bias": (64,),
}
OFFICIAL_SHAPES = {
    "pos_embed.proj.weight": (64, 4, 2, 2),
    "pos_embed.proj.bias": (64,),
    "emb.timestep_embedder.linear_1.weight": (64, 256),
    "emb.timestep_embedder.linear_1.bias": (64,),
    "emb.timestep_embedder.linear_2.weight": (64, 64),
    "emb.timestep_embedder.linear_2.bias": (64,),
    "emb.class_embedder.embedding_table.weight": (11, 64),
    **{f"transformer_blocks.{i}.{k}": s for i in range(2) for k, s in _BLOCK.items()},
    "proj_out_1.weight": (128, 64),
    "proj_out_1.bias": (128,),
    "proj_out_2.weight": (160, 64),
    "proj_out_2.bias": (160,),
    "gm_out.logstd_layers.1.weight": (1024, 64),
    "gm_out.logstd_layers.1.bias": (1024,),
    "gm_out.logstd_layers.3.weight": (1, 1024),
    "gm_out.logstd_layers.3.bias": (1,),
}


@pytest.fixture(scope="module")
def official() -> GMDiT:
    return GMDiT.from_pretrained(TRANSFORMER).requires_grad_(False)


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "io.safetensors")


@pytest.fixture(scope="module")
def traj() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "trajectories.safetensors")


def _inputs(io):
    return io["input.x_t"], io["input.timestep"] / 1000, io["input.class_labels"]


def _assert_gm_equal(a: GaussianMixture, b: GaussianMixture) -> None:
    for name in GM_FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ------------------------------------------------------------------------------ official layout
def test_fixture_loads_strictly_with_the_official_names_and_shapes(official):
    shapes = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert shapes == OFFICIAL_SHAPES and len(shapes) == 43
    assert sum(p.numel() for p in official.parameters()) == 258_081
    assert not official.training and official.event_shape == (4, 8, 8) and official.null_class == 10
    file_cfg = json.loads((TRANSFORMER / "config.json").read_text())
    assert official.config == {**{k: v for k, v in file_cfg.items() if not k.startswith("_")}, "head": "gm"}


def test_forward_and_intermediates_match_official(official, io):
    x, t, y = _inputs(io)
    torch.testing.assert_close(
        official.pos_embed.pos_embed, io["intermediate.pos_embed_buffer"], atol=1e-7, rtol=0
    )
    cond = official.conditioning(t, y)
    # 2.6e-6 apart on every CPU: the fixture's float32 sinusoid at angles up to 1000 carries its machine's
    # exp / sin ulps (ours are rounded from float64, the same everywhere)
    torch.testing.assert_close(cond, io["intermediate.cond_emb"], atol=5e-6, rtol=0)
    tokens = official.pos_embed(x)
    torch.testing.assert_close(tokens, io["intermediate.tokens_after_patch_embed"], atol=1e-5, rtol=0)
    seen = {}
    hooks = [
        official.proj_out_2.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o)),
        official.gm_out.register_forward_pre_hook(lambda m, i: seen.__setitem__("channels", i[0])),
    ]
    try:
        gm = official(x, t, class_labels=y)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(seen["tokens"], io["intermediate.proj_out_2_tokens"], atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["channels"], io["intermediate.gm_out_input"], atol=1e-5, rtol=0)
    assert isinstance(gm, GaussianMixture) and gm.dtype == torch.float32
    # 5e-6, tighter than the required 1e-5: the MLP-branch LayerNorm with eps 1e-6 instead of
    # norm_eps = 1e-5 moves the outputs by ~1e-5 (measured with the right eps: 1e-6 on one CPU, 2.4e-6 on
    # another, through the fixture's float32 sinusoid)
    for name in GM_FIELDS:
        torch.testing.assert_close(getattr(gm, name), io[f"output.{name}"], atol=5e-6, rtol=0)  # 2.4e-6 seen
    torch.testing.assert_close(gm.mean(), io["derived.u_mean"], atol=1e-5, rtol=0)


def test_u_to_x0_matches_official(official, io):
    x, t, y = _inputs(io)
    x0 = official(x, t, class_labels=y).u_to_x0(x, t)
    for name in GM_FIELDS:
        torch.testing.assert_close(getattr(x0, name), io[f"derived.x0_gm.{name}"], atol=1e-5, rtol=0)
    torch.testing.assert_close(x0.mean(), io["derived.x0_mean"], atol=1e-5, rtol=0)


def test_bf16_variant_gives_identical_outputs(official, io):
    bf16 = GMDiT.from_pretrained(TRANSFORMER, variant="bf16")
    for k, v in official.state_dict().items():
        assert torch.equal(bf16.state_dict()[k], v), k  # bf16-representable weights
    x, t, y = _inputs(io)
    _assert_gm_equal(bf16(x, t, class_labels=y), official(x, t, class_labels=y))
    with pytest.raises(FileNotFoundError, match="subfolder='transformer'"):
        GMDiT.from_pretrained(FIXTURE)
    pipe = GMDiT.from_pretrained(FIXTURE, subfolder="transformer", variant="bf16", dtype=torch.bfloat16)
    assert pipe.proj_out_2.weight.dtype == torch.bfloat16
    low = pipe(x, t, class_labels=y)  # a bf16 network still returns the GM in float32
    ref = official(x, t, class_labels=y)
    assert low.means.dtype == low.logweights.dtype == low.logstds.dtype == torch.float32
    assert (low.means - ref.means).abs().max() < 0.1  # the README measured 0.026


# ------------------------------------------------------------------------------ official trajectories
def _tilted(prep: PreparedGM, tilt) -> GaussianMixture:
    """The GM a solver uses: the prepared base GM, materialised after its tilt (if any)."""
    return prep.gm if tilt is None else prep.gm.tilt(tilt.zeta.reshape(-1), tilt.nu)


def _record_gm_steps(monkeypatch) -> list[GaussianMixture]:
    """Record the x0-GM each GM-ODE step integrates (after guidance and the second-order correction)."""
    used: list[GaussianMixture] = []
    integrate = gm_solvers.integrate

    def recording(field, *args):
        used.append(_tilted(field.prep, field.tilt))
        return integrate(field, *args)

    monkeypatch.setattr(gm_solvers, "integrate", recording)
    return used


@pytest.mark.parametrize(
    "run,kwargs,atol",
    [
        ("ode2", dict(solver="gm-ode", order=2, substeps=4, substep_method="euler"), 2e-6),
        ("euler", dict(solver="gm-ode", order=1, substeps=1, substep_method="euler"), 2e-6),
        ("euler", dict(solver="euler"), 2e-6),
        ("ode2_pg045", dict(solver="gm-ode", order=2, substeps=4, substep_method="euler", guided=True), 1e-5),
    ],
)
def test_official_ode_trajectories(official, traj, monkeypatch, run, kwargs, atol):
    """Official batch order under guidance is [uncond; cond], ours [cond; uncond]: outputs are compared."""
    kwargs = dict(kwargs)
    if kwargs.pop("guided", False):
        assert traj[f"{run}.class_labels_model_input"].tolist() == [10, 10, 3, 7]
        kwargs.update(
            uncond={"class_labels": torch.full((2,), 10)},
            guidance=gmflow.ProbabilisticGuidance(0.45, orthogonal=1.0),
        )
    used = _record_gm_steps(monkeypatch)
    out, states = gmflow.sample(
        official, traj[f"{run}.noise"], nfe=4, cond={"class_labels": torch.tensor([3, 7])},
        return_trajectory=True, **kwargs,
    )  # fmt: skip
    assert traj[f"{run}.t"].tolist() == [1000.0, 750.0, 500.0, 250.0]
    torch.testing.assert_close(states[:4], traj[f"{run}.x_t"], atol=atol, rtol=0)
    torch.testing.assert_close(out, traj[f"{run}.output"], atol=atol, rtol=0)
    if kwargs["solver"] == "gm-ode":
        assert len(used) == 4
        for name in GM_FIELDS:
            got = torch.stack([getattr(g, name) for g in used])
            # log-weights reach -13 (weights ~1e-6), where fp32 guidance maths differs relatively
            torch.testing.assert_close(got, traj[f"{run}.gm_x0_used.{name}"], atol=atol, rtol=1e-5)


class _RecordedNoise:
    """Stand-in for the ``torch`` module inside gmflow.sampling.solvers.gm: ``randn`` replays draws."""

    def __init__(self, draws):
        self._draws = iter(draws)
        self.count = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, shape, *, generator=None, device=None, dtype=None):
        z = next(self._draws)
        self.count += 1
        assert tuple(z.shape) == tuple(shape)
        return z.to(device=device, dtype=dtype)


def test_official_sde2_trajectory_with_recorded_draws(official, traj, monkeypatch):
    """GM-SDE order 2 through ``gmflow.sample`` with the official random draws injected.

    The official sampler draws, per step, the component index (multinomial, rows (b, h, w)), z for
    the x0 sample ``means[k] + s z``, then the transition noise (also at the last step, where its
    coefficient is 0; ours skips that draw). Here the x0 draw (``GaussianMixture.sample`` on the first
    step, ``PreparedGM.sample`` of the second-order tilt after it) is built from the recorded index
    and z, and the solver's ``torch.randn`` replays the recorded noise; the GM drawn from (after the
    second-order correction), the states and the output are compared.
    """
    used: list[GaussianMixture] = []

    def recorded_sample(self, generator=None):
        i = len(used)
        used.append(self)
        b, _, c, h, w = self.means.shape
        idx = traj[f"sde2.draw{3 * i:02d}.multinomial"].reshape(b, 1, 1, h, w).expand(b, 1, c, h, w)
        z = traj[f"sde2.draw{3 * i + 1:02d}.randn"]
        return (torch.gather(self.means, 1, idx) + self.logstds.exp() * z).squeeze(1)

    monkeypatch.setattr(GaussianMixture, "sample", recorded_sample)  # the first step: no extrapolation yet
    monkeypatch.setattr(
        PreparedGM, "sample", lambda prep, tilt, generator=None: recorded_sample(_tilted(prep, tilt))
    )
    noise = _RecordedNoise([traj[f"sde2.draw{3 * i + 2:02d}.randn"] for i in range(4)])
    monkeypatch.setattr(gm_solvers, "torch", noise)
    out, states = gmflow.sample(
        official, traj["sde2.noise"], solver="gm-sde", nfe=4, order=2,
        cond={"class_labels": torch.tensor([3, 7])}, return_trajectory=True,
    )  # fmt: skip
    assert len(used) == 4 and noise.count == 3  # no transition noise at the last step
    torch.testing.assert_close(states[:4], traj["sde2.x_t"], atol=2e-6, rtol=0)
    torch.testing.assert_close(out, traj["sde2.output"], atol=2e-6, rtol=0)
    for name in GM_FIELDS:
        got = torch.stack([getattr(g, name) for g in used])
        torch.testing.assert_close(got, traj[f"sde2.gm_x0_used.{name}"], atol=2e-6, rtol=1e-5)


def test_shapes_and_null_class_conditioning(official, io):
    x, t, _ = _inputs(io)
    null = official(x, t, class_labels=torch.full((2,), 10))
    _assert_gm_equal(official(x, t), null)
    assert null.means.shape == (2, 8, 4, 8, 8) and null.logweights.shape == (2, 8, 1, 8, 8)
    assert null.logstds.shape == (2, 1, 1, 1, 1)
    torch.testing.assert_close(null.logweights.exp().sum(1), torch.ones(2, 1, 8, 8))
    a, b = official(x, t, torch.tensor([1, 1])), official(x, t, torch.tensor([2, 2]))
    assert (a.means - b.means).abs().max() > 1e-3 and (a.logstds - b.logstds).abs().max() > 0
    # a scalar t and int32 labels are accepted
    b32 = official(x, 0.5, torch.tensor([1, 1], dtype=torch.int32))
    _assert_gm_equal(b32, official(x, torch.full((2,), 0.5), torch.tensor([1, 1])))


def test_bf16_autocast_keeps_gm_maths_in_fp32(official, io):
    x, t, y = _inputs(io)
    ref = official(x, t, class_labels=y)
    seen = []
    hook = official.gm_out.logstd_layers[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gm = official(x, t, class_labels=y)
    finally:
        hook.remove()
    assert seen == [torch.float32]  # the log-std MLP ran with autocast disabled
    assert gm.means.dtype == gm.logweights.dtype == gm.logstds.dtype == torch.float32
    torch.testing.assert_close(gm.logweights.exp().sum(1), torch.ones(2, 1, 8, 8))
    assert (gm.means - ref.means).abs().max() < 0.1
    assert (gm.logstds - ref.logstds).abs().max() < 1e-2
