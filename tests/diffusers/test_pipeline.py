"""GMDiTPipeline on the official fixture folder: it reproduces the official trajectories, equals
``gmflow.sample``, runs the bf16 variant, decodes latents, round-trips through save_pretrained, and
rejects bad input with one-line errors. A folder saved from our own trained GM-DiT samples identical
images in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers", reason='needs the optional extra: pip install "gmflow[diffusers]"')

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

import gmflow  # noqa: E402
import gmflow.sampling.solvers.gm as gm_solvers  # noqa: E402
from gmflow import GaussianMixture  # noqa: E402
from gmflow.diffusers import GMDiTPipeline, GMFlowODEScheduler, GMFlowSDEScheduler  # noqa: E402
from gmflow.experiments import load_run  # noqa: E402
from gmflow.sampling.solvers.gm_field import PreparedGM  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "fixtures" / "official_gmdit"
LABELS = [3, 7]


@pytest.fixture(scope="module")
def pipe() -> GMDiTPipeline:
    p = GMDiTPipeline.from_pretrained(FIXTURE)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def traj() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "trajectories.safetensors")


def _latent(pipe, **kw) -> torch.Tensor:
    return pipe(**{"class_labels": LABELS, "output_type": "latent", **kw}).images


# ------------------------------------------------------------------------------ official outputs
def test_loads_the_official_folder(pipe):
    assert isinstance(pipe.scheduler, GMFlowODEScheduler) and pipe.vae is not None
    assert pipe.get_label_ids(["class3"]) == [3] and pipe.labels["tiny class 7"] == 7
    assert pipe.transformer.dtype == torch.float32 and pipe.device.type == "cpu"


@pytest.mark.parametrize(
    "run,kw,atol",
    [
        ("ode2", dict(guidance_scale=0, num_inference_substeps=4, substep_method="euler", order=2), 2e-6),
        ("euler", dict(guidance_scale=0, num_inference_substeps=1, substep_method="euler", order=1), 2e-6),
        # official batch [uncond; cond] with null id 10; ours [cond; uncond], null = num_classes = 10
        (
            "ode2_pg045",
            dict(guidance_scale=0.45, num_inference_substeps=4, substep_method="euler", order=2),
            1e-5,
        ),
    ],
)
def test_reproduces_the_official_trajectories(pipe, traj, run, kw, atol):
    out = _latent(pipe, num_inference_steps=4, latents=traj[f"{run}.noise"], **kw)
    torch.testing.assert_close(out, traj[f"{run}.output"], atol=atol, rtol=0)


def test_reproduces_the_official_sde2_trajectory_with_its_draws(pipe, traj, monkeypatch):
    """The official draws (global RNG) are injected as in tests/nn/test_dit_official.py."""
    calls = []

    def recorded_sample(self, generator=None):
        i = len(calls)
        calls.append(i)
        b, _, c, h, w = self.means.shape
        idx = traj[f"sde2.draw{3 * i:02d}.multinomial"].reshape(b, 1, 1, h, w).expand(b, 1, c, h, w)
        return (
            torch.gather(self.means, 1, idx) + self.logstds.exp() * traj[f"sde2.draw{3 * i + 1:02d}.randn"]
        ).squeeze(1)

    draws = iter(traj[f"sde2.draw{3 * i + 2:02d}.randn"] for i in range(4))

    class Noise:
        def __getattr__(self, name):
            return getattr(torch, name)

        def randn(self, shape, *, generator=None, device=None, dtype=None):
            return next(draws).to(device=device, dtype=dtype)

    monkeypatch.setattr(GaussianMixture, "sample", recorded_sample)  # the first step: no extrapolation yet
    monkeypatch.setattr(  # later steps draw from the second-order tilt of the prepared GM
        PreparedGM,
        "sample",
        lambda prep, tilt, generator=None: recorded_sample(prep.gm.tilt(tilt.zeta.reshape(-1), tilt.nu)),
    )
    monkeypatch.setattr(gm_solvers, "torch", Noise())
    sde = GMDiTPipeline(
        pipe.transformer, None, pipe.vae, GMFlowSDEScheduler.from_config(pipe.scheduler.config)
    )
    sde.set_progress_bar_config(disable=True)
    out = _latent(
        sde,
        guidance_scale=0,
        num_inference_steps=4,
        order=2,
        output_mode="sample",
        latents=traj["sde2.noise"],
    )
    assert len(calls) == 4
    torch.testing.assert_close(out, traj["sde2.output"], atol=2e-6, rtol=0)


@pytest.mark.parametrize("spectral", [False, True])
def test_guided_sde_equals_gmflow_sample(pipe, traj, spectral):
    """Same maths as gmflow.sample: the generator makes the noise (seed 6 = the fixture's) then the draws."""
    sde = GMDiTPipeline(pipe.transformer, pipe.spectrum_net if spectral else None, None, GMFlowSDEScheduler())
    sde.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(6)
    out = _latent(sde, guidance_scale=0.45, num_inference_steps=4, order=2, generator=g)
    g = torch.Generator().manual_seed(6)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(noise, traj["ode2.noise"])
    y = torch.tensor(LABELS)
    want = gmflow.sample(
        pipe.transformer, noise, solver="gm-sde", nfe=4, order=2, generator=g, cond={"class_labels": y},
        uncond={"class_labels": torch.full_like(y, 10)}, guidance=gmflow.ProbabilisticGuidance(0.45),
        spectral=pipe.spectrum_net if spectral else False,
    )  # fmt: skip
    assert torch.equal(out, want)


# ------------------------------------------------------------------------------ precision, outputs, folders
def test_bf16_variant_runs_with_fp32_gm_maths(pipe):
    low = GMDiTPipeline.from_pretrained(FIXTURE, variant="bf16", torch_dtype=torch.bfloat16)
    low.set_progress_bar_config(disable=True)
    assert (
        low.transformer.dtype == low.vae.dtype == torch.bfloat16 and low.spectrum_net.dtype == torch.float32
    )
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    a, b = (
        _latent(low, num_inference_steps=4, latents=noise),
        _latent(pipe, num_inference_steps=4, latents=noise),
    )
    assert a.dtype == torch.float32 and 0 < (a - b).abs().max() < 0.2
    images = low(LABELS, num_inference_steps=2, latents=noise, output_type="pt").images
    assert images.dtype == torch.float32 and images.shape == (2, 3, 8, 8)


def test_output_types(pipe):
    kw = dict(class_labels=["class3", 7], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    pil = pipe(**kw).images
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    kw["generator"] = torch.Generator().manual_seed(0)
    arr = pipe(**kw, output_type="np").images
    assert arr.shape == (2, 8, 8, 3) and 0 <= arr.min() and arr.max() <= 1
    kw["generator"] = torch.Generator().manual_seed(0)
    pt = pipe(**kw, output_type="pt", return_dict=False)[0]
    torch.testing.assert_close(pt.permute(0, 2, 3, 1).numpy(), arr)


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "a")
    again = GMDiTPipeline.from_pretrained(tmp_path / "a")
    for name in ("transformer", "spectrum_net", "vae"):
        sa, sb = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert again.id2label == pipe.id2label and dict(again.scheduler.config) == dict(pipe.scheduler.config)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(
        _latent(again, num_inference_steps=3, latents=noise),
        _latent(pipe, num_inference_steps=3, latents=noise),
    )
    name = "diffusion_pytorch_model.safetensors"  # the same bytes as the official files
    for sub in ("transformer", "spectrum_net"):
        assert (tmp_path / "a" / sub / name).read_bytes() == (FIXTURE / sub / name).read_bytes()
    sde = GMDiTPipeline(pipe.transformer, scheduler=GMFlowSDEScheduler(shift=2.0))
    sde.save_pretrained(tmp_path / "b", variant="bf16")
    loaded = GMDiTPipeline.from_pretrained(tmp_path / "b", variant="bf16")
    assert isinstance(loaded.scheduler, GMFlowSDEScheduler) and loaded.scheduler.config.shift == 2.0
    assert loaded.vae is None and loaded.spectrum_net is None


BAD_CALLS = [
    (dict(class_labels=[3, 10]), ValueError, r"^class label 10 is out of range: this model has 10 classes"),
    (dict(class_labels=["class42"]), ValueError, r"^unknown class label 'class42'"),
    (dict(output_mode="sample"), ValueError, r"^output_mode='sample' needs GMFlowSDEScheduler"),
    (dict(output_type="jpeg"), ValueError, r"^output_type must be one of"),
    (
        dict(latents=torch.zeros(3, 4, 8, 8)),
        ValueError,
        r"^latents must have shape \(2, 4, 8, 8\) for 2 labels",
    ),
    (dict(guidance_scale=1.5), ValueError, r"^probabilistic guidance scale must be in \[0, 1\), got 1.5$"),
    (dict(order=3), ValueError, r"^order must be 1 or 2, got 3$"),
    (dict(generator=[torch.Generator()]), TypeError, r"^generator must be one torch.Generator or None"),
]


@pytest.mark.parametrize("kw,exc,pattern", BAD_CALLS)
def test_bad_calls_raise_one_line_errors(pipe, kw, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        pipe(**{"class_labels": LABELS, "num_inference_steps": 2, **kw})
    assert "\n" not in str(info.value)


def test_bad_components_and_folders(pipe, tmp_path):
    other = GMDiTPipeline(pipe.transformer, scheduler=GMFlowSDEScheduler())
    with pytest.raises(ValueError, match="num_inference_substeps applies to GMFlowODEScheduler only"):
        other(LABELS, num_inference_steps=2, num_inference_substeps=4)
    other.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(TypeError, match="GMDiTPipeline needs a GMFlowODEScheduler or GMFlowSDEScheduler"):
        other(LABELS, num_inference_steps=2)
    with pytest.raises(FileNotFoundError, match="'Lakonik/gmflow_imagenet_k8_ema' is not a local folder"):
        GMDiTPipeline.from_pretrained("Lakonik/gmflow_imagenet_k8_ema")
    with pytest.raises(TypeError, match="transformer must be a GM-head gmflow.nn.GMDiT"):
        GMDiTPipeline(pipe.vae)
    with pytest.raises(ValueError, match="safe_serialization=False is not supported"):
        pipe.save_pretrained(tmp_path, safe_serialization=False)


# ------------------------------------------------------------------------------ our own trained GM-DiT
_CHILD = """
import sys, torch
from safetensors.torch import save_file
from gmflow.diffusers import GMDiTPipeline
torch.set_num_threads(1)
pipe = GMDiTPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
out = pipe(["digit 3", 7, "digit 1"], guidance_scale=0.3, num_inference_steps=4, order=2,
           generator=torch.Generator().manual_seed(5), output_type="pt").images
save_file({"images": out.contiguous()}, sys.argv[2])
"""


@pytest.mark.slow
def test_folder_of_our_trained_gm_dit_samples_identical_images_in_a_fresh_process(
    cond_run, tmp_path, subprocess_env
):
    run = load_run(cond_run.path)  # images-smoke: a class-conditional GM-DiT on 8x8 digits
    pipe = GMDiTPipeline(run.model, id2label={i: f"digit {i}, {i}" for i in range(10)})
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "digits")
    images = pipe(["digit 3", 7, "digit 1"], guidance_scale=0.3, num_inference_steps=4, order=2,
                  generator=torch.Generator().manual_seed(5), output_type="pt").images  # fmt: skip
    assert images.shape == (3, 1, 8, 8)  # no VAE: the pixels themselves
    out = tmp_path / "child.safetensors"
    subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "digits"), str(out)],
        check=True,
        env=subprocess_env,
        timeout=600,
    )
    assert torch.equal(load_file(out)["images"], images)


@pytest.mark.slow
def test_example_script_runs_end_to_end(tmp_path, subprocess_env):
    script = Path(__file__).parents[2] / "examples" / "pretrained_pipeline.py"
    cmd = [sys.executable, str(script), "--steps", "2", "--out", str(tmp_path)]
    res = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["core_equals_pipeline"] and summary["save_reload_identical"]
    assert summary["class_ids"] == [3, 7, 1] and (tmp_path / "grid.png").stat().st_size > 0
