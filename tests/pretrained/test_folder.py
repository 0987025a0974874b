"""gmflow.pretrained.load / save on the official GM-DiT fixture folder (tests/fixtures/official_gmdit):
strict loading reproduces the official outputs, the bf16 variant, bit-identical save -> load round
trips (the files we write are byte-identical to the official ones), our own models in the same
layout (also a trained one, reloaded in a fresh process), and one-line errors for damaged folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gmflow
from gmflow import pretrained
from gmflow.experiments import load_run
from gmflow.nn import GMDiT, SpectralDenoiser, SpectrumMLP
from gmflow.pretrained import Pretrained, SchedulerConfig

FIXTURE = Path(__file__).parents[1] / "fixtures" / "official_gmdit"
WEIGHTS = "diffusion_pytorch_model.safetensors"
BF16 = "diffusion_pytorch_model.bf16.safetensors"
GM_FIELDS = ("means", "logweights", "logstds")


@pytest.fixture(scope="module")
def pm() -> Pretrained:
    return pretrained.load(FIXTURE)


@pytest.fixture
def folder(tmp_path) -> Path:
    """A writable copy of the fixture's pipeline part (no io/trajectory files)."""
    dst = tmp_path / "pipe"
    for sub in ("transformer", "spectrum_net", "scheduler", "vae"):
        shutil.copytree(FIXTURE / sub, dst / sub)
    shutil.copy(FIXTURE / "model_index.json", dst / "model_index.json")
    return dst


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------ the official folder
def test_fixture_loads_and_reproduces_the_official_outputs(pm):
    assert isinstance(pm.transformer, GMDiT) and isinstance(pm.spectrum_net, SpectrumMLP)
    assert pm.scheduler == SchedulerConfig("ode", 1000, 1.0) and pm.vae == FIXTURE / "vae"
    assert pm.num_classes == 10 and pm.null_class == 10 and pm.id2label[3] == "class3, tiny class 3"
    assert not pm.transformer.training and pm.transformer.dtype == torch.float32
    io = load_file(FIXTURE / "io.safetensors")
    gm = pm.transformer(io["input.x_t"], io["input.timestep"] / 1000, class_labels=io["input.class_labels"])
    for name in GM_FIELDS:
        torch.testing.assert_close(getattr(gm, name), io[f"output.{name}"], atol=5e-6, rtol=0)  # 2.4e-6 seen
    spec = load_file(FIXTURE / "io_spectrum_net.safetensors")
    lps = pm.spectrum_net(spec["input.mean"], spec["input.var"])
    torch.testing.assert_close(lps, spec["output.log_var"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("run,guided", [("ode2", False), ("ode2_pg045", True)])
def test_loaded_model_samples_the_official_trajectories(pm, run, guided):
    traj = load_file(FIXTURE / "trajectories.safetensors")
    y = torch.tensor(pm.label_ids(["class3", 7]))
    kw = {}
    if guided:
        kw = dict(
            uncond={"class_labels": torch.full_like(y, pm.null_class)},
            guidance=gmflow.ProbabilisticGuidance(0.45),
        )
    out = gmflow.sample(
        pm.transformer, traj[f"{run}.noise"], solver="gm-ode", nfe=4, order=2, substeps=4,
        substep_method="euler", cond={"class_labels": y}, **kw,
    )  # fmt: skip
    torch.testing.assert_close(out, traj[f"{run}.output"], atol=1e-5 if guided else 2e-6, rtol=0)


def test_bf16_variant_loads_and_runs(pm):
    b = pretrained.load(FIXTURE, variant="bf16")
    _assert_same_state(b.transformer, pm.transformer)  # the fixture's weights are bf16-representable
    _assert_same_state(b.spectrum_net, pm.spectrum_net)
    low = pretrained.load(FIXTURE, variant="bf16", dtype=torch.bfloat16)
    assert low.transformer.dtype == torch.bfloat16 and low.spectrum_net.dtype == torch.float32
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    kw = dict(solver="gm-ode", nfe=4, order=2, substeps=4, cond={"class_labels": torch.tensor([3, 7])})
    out = gmflow.sample(low.transformer, noise, **kw)
    ref = gmflow.sample(pm.transformer, noise, **kw)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert 0 < (out - ref).abs().max() < 0.2  # bf16 network, fp32 GM maths


# ------------------------------------------------------------------------------ save -> load
@pytest.mark.parametrize("variant", [None, "bf16"])
def test_save_writes_the_official_bytes_and_round_trips_bit_identically(pm, tmp_path, variant):
    src = pretrained.load(FIXTURE, variant=variant)
    a = pretrained.save(src, tmp_path / "a", variant=variant)
    name = BF16 if variant else WEIGHTS
    for sub in ("transformer", "spectrum_net", "vae"):  # byte-identical to the official files
        assert (a / sub / name).read_bytes() == (FIXTURE / sub / name).read_bytes(), sub
    again = pretrained.load(a, variant=variant)
    _assert_same_state(again.transformer, pm.transformer)
    _assert_same_state(again.spectrum_net, pm.spectrum_net)
    assert (again.scheduler, again.id2label) == (pm.scheduler, pm.id2label)
    assert again.transformer.config == pm.transformer.config
    pretrained.save(again, tmp_path / "b", variant=variant)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # deterministic files
    index = json.loads((a / "model_index.json").read_text())
    official = json.loads((FIXTURE / "model_index.json").read_text())
    assert {k: index[k] for k in ("transformer", "spectrum_net", "scheduler", "vae", "id2label")} == {
        k: official[k] for k in ("transformer", "spectrum_net", "scheduler", "vae", "id2label")
    }


def test_our_own_models_in_the_same_layout(tmp_path):
    torch.manual_seed(0)
    dit = GMDiT(num_layers=1, num_attention_heads=2, attention_head_dim=8, sample_size=4, in_channels=2,
                num_gaussians=3, logstd_inner_dim=8, num_embeds_ada_norm=3)  # fmt: skip
    net = SpectrumMLP(base_size=[2, 4, 4], layers=[4])
    for p in [*dit.parameters(), *net.parameters()]:  # no zero-initialised layers
        torch.nn.init.normal_(p, std=0.1)
    sched = SchedulerConfig("sde", 1000, 3.0)
    pretrained.save(dit, tmp_path, spectrum_net=net, scheduler=sched, id2label={0: "cat", 1: "dog", 2: "fox"})
    pm = pretrained.load(tmp_path)
    _assert_same_state(pm.transformer, dit)
    _assert_same_state(pm.spectrum_net, net)
    assert pm.scheduler == sched and pm.vae is None and pm.label_ids(["fox", 0]) == [2, 0]
    cfg = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert cfg == {"_class_name": "GMFlowSDEScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == [None, None]
    x = torch.randn(2, 2, 4, 4)
    a, b = dit.eval()(x, 0.5, torch.tensor([0, 2])), pm.transformer(x, 0.5, torch.tensor([0, 2]))
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in GM_FIELDS)
    with pytest.raises(TypeError, match="model must be a GM-head GMDiT or a Pretrained, got GMDiT"):
        pretrained.save(GMDiT(num_layers=1, head="velocity"), tmp_path / "v")
    pretrained.save(SpectralDenoiser(dit, net), tmp_path / "s")  # a model.spectral=true run's network
    spec = pretrained.load(tmp_path / "s")
    _assert_same_state(spec.transformer, dit)
    _assert_same_state(spec.spectrum_net, net)


# ------------------------------------------------------------------------------ bad folders
def _edit_weights(folder: Path, edit) -> None:
    path = folder / "transformer" / WEIGHTS
    state = load_file(path)
    edit(state)
    save_file(state, path)


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _rename(state):
    state["proj_out_2.weight_renamed"] = state.pop("proj_out_2.weight")


def _only_pickles(folder: Path) -> None:
    sub = folder / "transformer"
    (sub / BF16).unlink()
    (sub / WEIGHTS).rename(sub / "diffusion_pytorch_model.bin")


def _reshape(state):
    state["proj_out_2.weight"] = state["proj_out_2.weight"][:-1]


BAD = {
    "missing key": (
        lambda f: _edit_weights(f, lambda s: s.pop("gm_out.logstd_layers.3.bias")),
        ValueError,
        r"transformer/diffusion_pytorch_model.safetensors' does not fit the GMDiT config: "
        r"missing keys \[gm_out.logstd_layers.3.bias\]$",
    ),
    "renamed key": (
        lambda f: _edit_weights(f, _rename),
        ValueError,
        r"missing keys \[proj_out_2.weight\]; unexpected keys \[proj_out_2.weight_renamed\]$",
    ),
    "wrong shape": (
        lambda f: _edit_weights(f, _reshape),
        ValueError,
        r"shape mismatches \[proj_out_2.weight \(159, 64\) vs \(160, 64\)\]$",
    ),
    "unknown scheduler key": (
        lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", lambda c: c.update(use_karras=True)),
        ValueError,
        r"scheduler_config.json': unknown scheduler config key 'use_karras' "
        r"\(expected num_train_timesteps, shift\)$",
    ),
    "bad scheduler value": (
        lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", lambda c: c.update(shift=0)),
        ValueError,
        r"scheduler_config.json': shift must be a finite float > 0, got 0$",
    ),
    "unknown scheduler class": (
        lambda f: _edit_json(
            f / "scheduler" / "scheduler_config.json", lambda c: c.update(_class_name="DDIM")
        ),
        ValueError,
        r"_class_name 'DDIM' is not a GMFlow scheduler",
    ),
    "unknown config key": (
        lambda f: _edit_json(f / "transformer" / "config.json", lambda c: c.update(num_heads=4)),
        ValueError,
        r"transformer/config.json': unknown GMDiT config keys: num_heads",
    ),
    "unknown component": (
        lambda f: _edit_json(f / "model_index.json", lambda c: c.update(text_encoder=["x", "Y"])),
        ValueError,
        r"unknown component 'text_encoder' \(a GM-DiT pipeline has transformer, spectrum_net",
    ),
    "id2label out of range": (
        lambda f: _edit_json(f / "model_index.json", lambda c: c["id2label"].update({"10": "null?"})),
        ValueError,
        r"id2label in .*: class id '10' is out of range for 10 classes$",
    ),
    "listed but missing": (
        lambda f: shutil.rmtree(f / "spectrum_net"),
        FileNotFoundError,
        r"lists 'spectrum_net' but .*spectrum_net' is missing$",
    ),
    "only pickles": (
        _only_pickles,
        ValueError,
        r"holds only pickled weights \(diffusion_pytorch_model.bin\); gmflow reads safetensors only",
    ),
    "variant only": (
        lambda f: (f / "transformer" / WEIGHTS).unlink(),
        FileNotFoundError,
        r"no diffusion_pytorch_model.safetensors in .*transformer' "
        r"\(found: diffusion_pytorch_model.bf16.safetensors\); pass variant='bf16'$",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_damaged_folders_raise_one_line_errors_naming_the_problem(folder, case):
    damage, exc, pattern = BAD[case]
    damage(folder)
    with pytest.raises(exc, match=pattern) as info:
        pretrained.load(folder)
    assert "\n" not in str(info.value)


def test_model_folder_and_label_errors(pm, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"no model_index.json in .* \(a model folder: use GMDiT.from_pretrained\)"
    ):
        pretrained.load(FIXTURE / "transformer")
    with pytest.raises(ValueError, match=r"^class label 10 is out of range: this model has 10 classes"):
        pm.label_ids([3, 10])  # the null class is no label
    with pytest.raises(ValueError, match="id2label: class id 5 is out of range for 3 classes"):
        pretrained.save(GMDiT(num_layers=1, num_embeds_ada_norm=3), tmp_path, id2label={5: "x"})


# ------------------------------------------------------------------------------ our own trained GM-DiT
_CHILD = """
import sys, torch, gmflow
from safetensors.torch import save_file
from gmflow import pretrained
from gmflow.experiments import load_run
torch.set_num_threads(1)
pm = pretrained.load(sys.argv[1])
y = torch.tensor(pm.label_ids(["digit 3", 7, "one"]))
noise = torch.randn(3, *pm.transformer.event_shape, generator=torch.Generator().manual_seed(5))
out = gmflow.sample(pm.transformer, noise, solver="gm-sde", nfe=4, order=2,
                    generator=torch.Generator().manual_seed(6), cond={"class_labels": y},
                    uncond={"class_labels": torch.full_like(y, pm.null_class)},
                    guidance=gmflow.ProbabilisticGuidance(0.3))
save_file({"images": out}, sys.argv[2])
"""


@pytest.mark.slow
def test_folder_of_our_trained_gm_dit_samples_identically_in_a_fresh_process(
    cond_run, tmp_path, subprocess_env
):
    """The images experiment (images-smoke: class-conditional GM-DiT, 8x8 digits) -> save -> a new process."""
    run = load_run(cond_run.path)
    names = {i: f"digit {i}" for i in range(10)} | {1: "digit 1, one"}
    pretrained.save(run.model, tmp_path / "digits", id2label=names, scheduler=SchedulerConfig("sde"))
    pm = pretrained.load(tmp_path / "digits")
    _assert_same_state(pm.transformer, run.model)
    y = torch.tensor(pm.label_ids(["digit 3", 7, "one"]))
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    want = gmflow.sample(
        run.model, noise, solver="gm-sde", nfe=4, order=2, generator=torch.Generator().manual_seed(6),
        cond={"class_labels": y}, uncond={"class_labels": torch.full_like(y, 10)},
        guidance=gmflow.ProbabilisticGuidance(0.3),
    )  # fmt: skip
    out = tmp_path / "child.safetensors"
    cmd = [sys.executable, "-c", _CHILD, str(tmp_path / "digits"), str(out)]
    subprocess.run(cmd, check=True, env=subprocess_env, timeout=600)
    assert torch.equal(load_file(out)["images"], want)
