"""``gmflow sample``: samples and figures from toy, image and ReFlow runs; one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gmflow.cli import main


def _sample(run, *args: str) -> int:
    return main(["sample", "--ckpt", str(run), *args])


def test_toy_samples_png_seeds_and_batches(toy_run, tmp_path):
    out = tmp_path / "s.npy"
    args = ["--solver", "gm-sde", "--nfe", "2", "--order", "2", "--n", "300", "--batch", "128"]
    assert _sample(toy_run.path, *args, "--out", str(out)) == 0
    x = np.load(out)
    assert x.shape == (300, 2) and np.isfinite(x).all()
    assert (tmp_path / "s.png").stat().st_size > 1000
    pt = tmp_path / "raw.pt"
    assert (
        _sample(
            toy_run.path,
            "--solver",
            "gm-ode",
            "--nfe",
            "1",
            "--substeps",
            "4",
            "--substep-method",
            "euler",
            "--n",
            "50",
            "--raw",
            "--out",
            str(pt),
            "--png",
            str(tmp_path / "raw.png"),
        )
        == 0
    )
    assert torch.load(pt, weights_only=True).shape == (50, 2) and (tmp_path / "raw.png").is_file()
    # same seed -> same samples; a deterministic solver gives them for any --batch
    again = tmp_path / "again.npy"
    assert _sample(toy_run.path, *args, "--out", str(again)) == 0
    np.testing.assert_array_equal(np.load(again), x)
    other = tmp_path / "other.npy"
    assert _sample(toy_run.path, *args, "--seed", "1", "--out", str(other)) == 0
    assert not np.array_equal(np.load(other), x)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for path, batch in ((a, "64"), (b, "100")):
        assert (
            _sample(
                toy_run.path,
                "--solver",
                "euler",
                "--nfe",
                "2",
                "--n",
                "200",
                "--batch",
                batch,
                "--out",
                str(path),
            )
            == 0
        )
    torch.testing.assert_close(torch.load(a), torch.load(b), rtol=1e-6, atol=1e-6)


def test_solver_order_and_nfe_default_to_the_runs_few_step_sampler(toy_run, velocity_run, copy_run):
    gm, vel = copy_run(toy_run.path, "gm"), copy_run(velocity_run.path, "vel")
    assert _sample(gm, "--n", "20") == 0 and _sample(vel, "--n", "20") == 0
    assert (gm / "samples_gm-ode_o2_nfe8.pt").is_file() and (vel / "samples_dpm++2m_nfe8.pt").is_file()
    assert _sample(gm, "--solver", "gm-sde", "--nfe", "2", "--n", "20") == 0  # order 2 unless told
    assert (gm / "samples_gm-sde_o2_nfe2.pt").is_file()
    assert _sample(vel, "--order", "2", "--n", "20") == 2  # dpm++2m has no order option


def test_default_output_goes_into_the_run(velocity_run, copy_run, capsys):
    d = copy_run(velocity_run.path)
    assert _sample(d, "--solver", "dpm++2m", "--nfe", "3", "--n", "20") == 0
    assert (d / "samples_dpm++2m_nfe3.pt").is_file() and (d / "samples_dpm++2m_nfe3.png").is_file()
    assert "wrote 20 samples" in capsys.readouterr().err


@pytest.mark.parametrize("fixture", ["digits_run", "reflow_run"])
def test_image_runs_give_image_tensors_and_a_grid(request, fixture, tmp_path, capsys):
    run = request.getfixturevalue(fixture).path
    out = tmp_path / "x.pt"
    assert _sample(run, "--solver", "euler", "--nfe", "2", "--n", "9", "--batch", "4", "--out", str(out)) == 0
    x = torch.load(out, weights_only=True)
    assert x.shape == (9, 1, 16, 16) and torch.isfinite(x).all()
    assert (tmp_path / "x.png").stat().st_size > 200
    assert f"wrote 9 samples to {out} and {tmp_path / 'x.png'}" in capsys.readouterr().err


def test_grid_options_sample_on_the_warped_grid(velocity_run, copy_run):
    """``--grid shift --shift s`` / ``--grid sigmoid`` give :func:`gmflow.sample` on that grid; the default
    output name records the grid."""
    from gmflow import sample
    from gmflow.experiments import load_run

    d = copy_run(velocity_run.path)
    common = ["--solver", "euler", "--nfe", "4", "--n", "16"]
    assert _sample(d, *common) == 0
    assert _sample(d, *common, "--grid", "shift", "--shift", "0.5") == 0
    assert _sample(d, *common, "--grid", "sigmoid") == 0
    uniform = torch.load(d / "samples_euler_nfe4.pt")
    shifted = torch.load(d / "samples_euler_nfe4_shift0.5.pt")
    sigmoid = torch.load(d / "samples_euler_nfe4_sigmoid20.pt")
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))  # the CLI's noise of --seed 0
    model = load_run(d).model
    with torch.no_grad():
        want = sample(model, noise, solver="euler", nfe=4, grid="shift", shift=0.5)
    torch.testing.assert_close(shifted, want)
    assert not torch.allclose(shifted, uniform) and not torch.allclose(sigmoid, uniform)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--shift", "0.5"], "--shift applies to --grid shift only"),
        (["--grid", "shift"], "--grid shift needs --shift"),
        (["--grid", "shift", "--shift", "-1"], "--shift must be a finite number > 0"),
        (["--grid", "shift", "--shift", "x"], "--shift must be a number"),
        (["--grid", "sigmoid", "--kappa", "0"], "--kappa must be a finite number > 0"),
        (["--grid", "shift", "--shift", "2", "--kappa", "3"], "--kappa applies to --grid sigmoid only"),
        (["--grid", "log"], "invalid choice"),
    ],
)
def test_grid_errors_are_one_line(velocity_run, tmp_path, capsys, extra, match):
    out = tmp_path / "x.pt"
    assert _sample(velocity_run.path, "--solver", "euler", "--nfe", "2", "--out", str(out), *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gmflow: error: ") and match in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--ckpt", "{missing}", "--solver", "euler", "--nfe", "2"], "does not exist"),
        (["--ckpt", "{run}", "--solver", "nope", "--nfe", "2"], "invalid choice"),
        (["--ckpt", "{run}", "--solver", "euler", "--nfe", "0"], "--nfe must be >= 1"),
        (["--ckpt", "{run}", "--solver", "euler", "--nfe", "2", "--order", "2"], "--order 2 applies"),
        (["--ckpt", "{run}", "--solver", "euler", "--nfe", "2", "--substeps", "3"], "--substeps applies"),
        (
            ["--ckpt", "{run}", "--solver", "gm-sde", "--nfe", "2", "--substep-method", "euler"],
            "--substep-method applies to --solver gm-ode only",
        ),
        (
            ["--ckpt", "{run}", "--solver", "gm-ode", "--nfe", "2", "--substep-method", "rk4"],
            "invalid choice",
        ),
        (["--ckpt", "{run}", "--solver", "euler", "--nfe", "2", "--out", "{tmp}/x.csv"], ".pt or .npy"),
        (
            ["--ckpt", "{run}", "--solver", "euler", "--nfe", "2", "--out", "{tmp}/no/dir/x.pt"],
            "cannot write",
        ),
        (["--ckpt", "{vel}", "--solver", "gm-sde", "--nfe", "2"], "needs a GM model"),
        (["--ckpt", "{img}", "--solver", "gm-ode", "--nfe", "2"], "needs a GM model"),
        (["--ckpt", "{corrupt}", "--solver", "euler", "--nfe", "2"], "corrupt"),
        (["--solver", "euler", "--nfe", "2"], "--ckpt"),
    ],
)
def test_sample_errors_exit_2(toy_run, velocity_run, digits_run, copy_run, tmp_path, capsys, args, match):
    corrupt = copy_run(toy_run.path, "corrupt")
    (corrupt / "ema.safetensors").write_bytes(b"\0" * 10)
    subs = {
        "{missing}": str(tmp_path / "missing"),
        "{run}": str(toy_run.path),
        "{vel}": str(velocity_run.path),
        "{img}": str(digits_run.path),
        "{corrupt}": str(corrupt),
        "{tmp}": str(tmp_path),
    }
    for k, v in subs.items():
        args = [a.replace(k, v) for a in args]
    assert main(["sample", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gmflow: error: "), err
    assert match in err


def test_class_grid_with_guidance_writes_samples_labels_and_a_row_per_class(cond_run, tmp_path):
    out, png = tmp_path / "g.pt", tmp_path / "g.png"
    args = ["--solver", "gm-sde", "--order", "2", "--nfe", "2", "--classes", "1,3-4", "--per-class", "5"]
    guide = ["--guidance", "probabilistic", "--scale", "0.3", "--orthogonal", "1"]
    assert _sample(cond_run.path, *args, *guide, "--out", str(out), "--png", str(png)) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["samples"].shape == (15, 1, 8, 8)
    assert saved["labels"].tolist() == [1] * 5 + [3] * 5 + [4] * 5
    w, h = Image.open(png).size
    assert h < w  # 3 rows of 5 images
    assert (
        _sample(
            cond_run.path, "--solver", "euler", "--nfe", "2", "--n", "12", "--out", str(tmp_path / "a.npy")
        )
        == 0
    )
    assert np.load(tmp_path / "a.labels.npy").tolist() == [i % 10 for i in range(12)]  # every class in turn


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--classes", "0-10"], "--classes: ids must lie in [0, 9]"),
        (["--classes", "a-b"], "--classes: expected ids"),
        (["--guidance", "cfg"], "--guidance cfg needs --scale"),
        (["--scale", "2"], "--scale / --orthogonal need --guidance"),
        (["--orthogonal", "1"], "--scale / --orthogonal need --guidance"),
        (["--guidance", "probabilistic", "--scale", "1.5"], "--scale/--orthogonal:"),
    ],
)
def test_class_and_guidance_errors_are_one_line(cond_run, tmp_path, capsys, extra, msg):
    code = _sample(cond_run.path, "--solver", "euler", "--nfe", "2", "--out", str(tmp_path / "x.pt"), *extra)
    err = capsys.readouterr().err
    assert code == 2 and msg in err and err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()


def test_classes_on_an_unconditional_run_is_an_error(toy_run, tmp_path, capsys):
    args = ["--solver", "euler", "--nfe", "1", "--classes", "0", "--out", str(tmp_path / "x.pt")]
    assert _sample(toy_run.path, *args) == 2
    assert "not class-conditional" in capsys.readouterr().err


def test_a_spectral_run_samples_spectrally_unless_no_spectral(spectral_run, tmp_path):
    from gmflow.cli.common import draw_samples
    from gmflow.experiments import load_run

    args = ["--solver", "gm-sde", "--order", "2", "--nfe", "2", "--n", "6", "--seed", "3"]
    assert _sample(spectral_run.path, *args, "--out", str(tmp_path / "on.pt")) == 0
    assert _sample(spectral_run.path, *args, "--no-spectral", "--out", str(tmp_path / "off.pt")) == 0
    on, off = (torch.load(tmp_path / f"{n}.pt", weights_only=True)["samples"] for n in ("on", "off"))
    run = load_run(spectral_run.path)
    kw = dict(labels=torch.arange(6) % 10, null_label=10, solver="gm-sde", nfe=2, order=2)
    want_on = draw_samples(run.model, (1, 8, 8), 6, 8192, 3, "cpu", "x", spectral=True, **kw)
    want_off = draw_samples(run.model, (1, 8, 8), 6, 8192, 3, "cpu", "x", spectral=False, **kw)
    assert torch.equal(on, want_on) and torch.equal(off, want_off) and not torch.equal(on, off)
    assert _sample(spectral_run.path, *args, "--no-spectral") == 0  # default name: no clash with the default
    assert (spectral_run.path / "samples_gm-sde_o2_nfe2_nospectral.pt").is_file()
    (spectral_run.path / "samples_gm-sde_o2_nfe2_nospectral.pt").unlink()  # leave the shared run as it was
    (spectral_run.path / "samples_gm-sde_o2_nfe2_nospectral.png").unlink()
