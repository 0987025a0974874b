"""Pair generation, resume, verified loading, rho-mixing and OT projection (exact ring-GMM teacher)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from gmflow import ring_gmm, sample
from gmflow.reflow import (
    PairDataset,
    PairError,
    generate_pairs,
    load_shard,
    project_pairs,
    read_manifest,
    shard_name,
    teacher_hash,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster on a loaded machine and matches the subprocess of the kill test."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def ring():
    return ring_gmm()


def _load_all(d: Path) -> tuple[torch.Tensor, torch.Tensor]:
    m = read_manifest(d)
    parts = [load_shard(d, s, m.event_shape) for s in m.shards]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _quick(teacher, d, **kw):
    args = dict(direction="backward", n=100, shard_size=32, solver="euler", nfe=2, progress=False)
    return generate_pairs(teacher, d, **{**args, **kw})


# ------------------------------------------------------------------------------------------ distributions
def test_backward_pairs_land_on_the_data(ring, tmp_path):
    m = generate_pairs(
        ring,
        tmp_path,
        direction="backward",
        n=2048,
        shard_size=1024,
        solver="dpm++2m",
        nfe=32,
        progress=False,
    )
    assert m.complete and m.count == 2048 and m.event_shape == (2,) and not m.stochastic
    assert m.teacher_id and m.teacher_id.startswith("GaussianMixtureData:sha256:")
    x0, x1 = _load_all(tmp_path)
    assert x0.dtype == torch.float32 and x0.shape == x1.shape == (2048, 2)
    c = ring.centers.float()
    j = torch.cdist(x0, c).argmin(1)
    frac = torch.bincount(j, minlength=8).double() / len(j)
    assert (frac - 0.125).abs().max() < 0.04  # binomial sd 0.0073
    for k in range(8):
        r = x0[j == k] - c[k]
        assert r.mean(0).abs().max() < 0.08
        assert (r.std(0) - 0.25).abs().max() < 0.05
    assert x1.mean(0).abs().max() < 0.1 and (x1.var(0) - 1).abs().max() < 0.1  # the seeded noise


def test_forward_pairs_invert_to_gaussian_noise(ring, tmp_path):
    m = generate_pairs(
        ring, tmp_path, direction="forward", n=1024, shard_size=512, solver="heun", nfe=128, data=ring,
        progress=False,
    )  # fmt: skip
    assert m.data_id and m.complete
    x0, x1 = _load_all(tmp_path)
    assert x1.mean(0).abs().max() < 0.1  # sd of the mean ~0.03
    assert (x1.var(0) - 1).abs().max() < 0.12  # sd of the variance ~0.045
    assert x0.norm(dim=1).sub(4).abs().mean() < 0.4  # real data on the ring


def test_forward_round_trip_error_shrinks_with_nfe(ring, tmp_path):
    errs = []
    for nfe in (8, 32, 128):
        d = tmp_path / f"nfe{nfe}"
        generate_pairs(
            ring, d, direction="forward", n=256, shard_size=256, solver="heun", nfe=nfe, data=ring,
            progress=False,
        )  # fmt: skip
        x0, x1 = _load_all(d)
        back = sample(ring, x1, solver="heun", nfe=nfe)
        errs.append(float((back - x0).square().sum(1).mean().sqrt()))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.01, errs  # measured ~2e-3 at heun nfe 128


def test_forward_from_a_tensor_walks_the_data_in_order(ring, tmp_path):
    data = ring.sample(50, generator=torch.Generator().manual_seed(3))
    m = generate_pairs(
        ring, tmp_path, direction="forward", n=40, shard_size=16, solver="euler", nfe=4, data=data,
        progress=False,
    )  # fmt: skip
    assert [s.count for s in m.shards] == [16, 16, 8]
    x0, _ = _load_all(tmp_path)
    assert torch.equal(x0, data[:40])
    with pytest.raises(ValueError, match="n=60"):
        generate_pairs(ring, tmp_path / "x", direction="forward", n=60, solver="euler", nfe=4, data=data)


def test_bad_arguments(ring, tmp_path):
    with pytest.raises(ValueError, match="forward pairs integrate"):
        generate_pairs(ring, tmp_path, direction="forward", n=8, solver="dpm++2m", nfe=4, data=ring)
    with pytest.raises(ValueError, match="direction"):
        generate_pairs(ring, tmp_path, direction="sideways", n=8)
    with pytest.raises(ValueError, match="data="):
        generate_pairs(ring, tmp_path, direction="forward", n=8, solver="heun", nfe=4)
    with pytest.raises(ValueError, match="solver_kwargs"):
        _quick(ring, tmp_path, solver_kwargs={"guidance": 2.0})
    with pytest.raises(ValueError, match="event_shape"):
        _quick(lambda x, t: x, tmp_path)  # no event_shape to infer
    with pytest.raises(ValueError, match="increase"):
        generate_pairs(
            ring, tmp_path, direction="forward", n=8, solver="euler", nfe=2, data=ring,
            solver_kwargs={"times": [1.0, 0.5, 0.0]},
        )  # fmt: skip


def test_gm_ode_records_its_substep_method(ring, tmp_path):
    """The resolved sub-step method is part of the settings: a store is never resumed with another one."""
    m = _quick(ring, tmp_path / "a", n=8, solver="gm-ode", solver_kwargs={"substeps": 2})
    assert m.solver_kwargs == {"substeps": 2, "substep_method": "pc3"}
    x0, x1 = _load_all(tmp_path / "a")
    assert torch.allclose(
        x0, sample(ring, x1, solver="gm-ode", nfe=2, substeps=2, substep_method="pc3"), atol=1e-6
    )
    with pytest.raises(PairError, match="solver_kwargs"):
        _quick(
            ring,
            tmp_path / "a",
            n=8,
            solver="gm-ode",
            solver_kwargs={"substeps": 2, "substep_method": "euler"},
        )
    assert _quick(ring, tmp_path / "b", n=8).solver_kwargs == {}  # other solvers record nothing extra


def test_stochastic_solver_is_recorded_and_seeded(ring, tmp_path):
    kw = dict(n=64, shard_size=32, solver="gm-sde", nfe=4)
    m = _quick(ring, tmp_path / "a", **kw)
    _quick(ring, tmp_path / "b", **kw)
    _quick(ring, tmp_path / "c", **kw, seed=1)
    assert m.stochastic and read_manifest(tmp_path / "a").stochastic
    a, b, c = (_load_all(tmp_path / s)[0] for s in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------ resume
_CHILD = """
import sys, time, torch
torch.set_num_threads(1)
from gmflow import ring_gmm
from gmflow.reflow import generate_pairs
ring = ring_gmm()
def slow(x, t):
    time.sleep(0.03)
    return ring(x, t)
generate_pairs(slow, sys.argv[1], teacher_id="ring", progress=False, **{KW})
"""
_KW = dict(direction="backward", n=300, shard_size=64, solver="heun", nfe=8, event_shape=(2,))


def test_resume_after_sigkill_matches_an_uninterrupted_run(ring, tmp_path, subprocess_env):
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    code = _CHILD.replace("{KW}", repr(_KW))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(killed)], env=subprocess_env, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            man = killed / "manifest.json"
            if man.is_file() and json.loads(man.read_text())["shards"]:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.01)
        else:
            pytest.fail("no shard within 60 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    done = len(read_manifest(killed).shards)
    assert 1 <= done < 5, "the child finished before the kill; the test did not test resuming"

    m = generate_pairs(ring, killed, teacher_id="ring", progress=False, **_KW)
    generate_pairs(ring, ref, teacher_id="ring", progress=False, **_KW)
    assert m.complete and sum(s.count for s in m.shards) == 300
    assert read_manifest(killed).shards == read_manifest(ref).shards  # same bytes (sha256) per shard
    for a, b in zip(_load_all(killed), _load_all(ref)):
        assert torch.equal(a, b)
    assert not list(killed.glob(".*.tmp"))


def test_resume_regenerates_unlisted_and_damaged_shards(ring, tmp_path):
    kw = dict(n=100, shard_size=32, seed=5)
    _quick(ring, tmp_path / "ref", **kw)
    d = tmp_path / "d"
    m = _quick(ring, d, **kw)
    # a kill after a shard's rename but before its manifest commit: file present, not listed; plus a
    # stale temp file and a damaged listed shard
    man = json.loads((d / "manifest.json").read_text())
    man["shards"] = man["shards"][:2]
    (d / "manifest.json").write_text(json.dumps(man))
    (d / shard_name("backward", 2)).write_bytes(b"garbage")
    (d / f".{shard_name('backward', 3)}.abc.tmp").write_bytes(b"partial")
    p1 = d / shard_name("backward", 1)
    p1.write_bytes(p1.read_bytes()[:-4] + b"\0\0\0\0")
    m = _quick(ring, d, **kw)
    assert m.complete and read_manifest(d).shards == read_manifest(tmp_path / "ref").shards
    assert not list(d.glob(".*.tmp"))
    for a, b in zip(_load_all(d), _load_all(tmp_path / "ref")):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change, field",
    [({"nfe": 3}, "nfe"), ({"seed": 1}, "seed"), ({"solver": "heun"}, "solver"), ({"n": 96}, "n"),
     ({"teacher_id": "other"}, "teacher_id"), ({"shard_size": 16}, "shard_size")],
)  # fmt: skip
def test_resume_with_other_settings_names_the_field(ring, tmp_path, change, field):
    _quick(ring, tmp_path, n=64)
    with pytest.raises(PairError, match=rf"with {field}="):
        _quick(ring, tmp_path, **{"n": 64, **change})


def test_resume_with_another_teacher_or_shape(tmp_path):
    _quick(ring_gmm(), tmp_path / "a", n=32)
    with pytest.raises(PairError, match="teacher_id"):
        _quick(ring_gmm(radius=3.0), tmp_path / "a", n=32)
    _quick(ring_gmm(), tmp_path / "b", n=32, teacher_id="t")
    with pytest.raises(PairError, match="event_shape"):
        _quick(ring_gmm(spatial_shape=(2,)), tmp_path / "b", n=32, teacher_id="t")


def test_teacher_hash(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"raw")
    assert teacher_hash(tmp_path) == "sha256:" + hashlib.sha256(b"raw").hexdigest()
    (tmp_path / "ema.safetensors").write_bytes(b"ema")
    assert teacher_hash(tmp_path) == "sha256:" + hashlib.sha256(b"ema").hexdigest()
    assert teacher_hash(tmp_path, use_ema=False) == "sha256:" + hashlib.sha256(b"raw").hexdigest()
    with pytest.raises(PairError, match="not found"):
        teacher_hash(tmp_path / "nope")


# ------------------------------------------------------------------------------------------ loading
@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    ring = ring_gmm()
    root = tmp_path_factory.mktemp("pairs")
    kw = dict(shard_size=64, solver="euler", nfe=2, progress=False)
    generate_pairs(ring, root / "bwd", direction="backward", n=150, **kw)
    generate_pairs(ring, root / "fwd", direction="forward", n=100, data=ring, **kw)
    return root


def _member(x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Row i of x equals some row of pool exactly."""
    return (x[:, None] == pool[None]).all(-1).any(1)


def test_dataset_mixes_forward_pairs_with_rate_rho(pair_dirs):
    ds = PairDataset(pair_dirs / "bwd", pair_dirs / "fwd", rho=0.25)
    assert len(ds) == 250 and ds.event_shape == (2,)
    assert ds.backward[0].shape == (150, 2) and ds.forward[1].shape == (100, 2)
    x0, x1 = ds.sample(4000, generator=torch.Generator().manual_seed(0))
    is_fwd, is_bwd = _member(x0, ds.forward[0]), _member(x0, ds.backward[0])
    assert bool((is_fwd ^ is_bwd).all())
    assert abs(is_fwd.double().mean().item() - 0.25) < 0.03  # 4 binomial sd
    # pairs stay pairs
    j = (x0[is_fwd, None] == ds.forward[0][None]).all(-1).double().argmax(1)
    assert torch.equal(x1[is_fwd], ds.forward[1][j])
    again = ds.sample(4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x0) and torch.equal(again[1], x1)
    only_b = PairDataset(pair_dirs / "bwd").sample(500, generator=torch.Generator().manual_seed(1))[0]
    assert _member(only_b, ds.backward[0]).all()


def test_dataset_argument_errors(pair_dirs, tmp_path):
    for rho in (-0.1, 1.5):
        with pytest.raises(ValueError, match="rho"):
            PairDataset(pair_dirs / "bwd", pair_dirs / "fwd", rho=rho)
    with pytest.raises(ValueError, match="forward_dir"):
        PairDataset(pair_dirs / "bwd", rho=0.3)
    with pytest.raises(PairError, match="backward_dir.*empty"):
        PairDataset(tmp_path)
    with pytest.raises(PairError, match="forward_dir.*holds backward pairs"):
        PairDataset(pair_dirs / "bwd", pair_dirs / "bwd")
    img = ring_gmm(spatial_shape=(3,))
    generate_pairs(
        img, tmp_path / "f3", direction="forward", n=8, solver="euler", nfe=1, data=img, progress=False
    )
    with pytest.raises(PairError, match="event shape"):
        PairDataset(pair_dirs / "bwd", tmp_path / "f3")
    _quick(ring_gmm(), tmp_path / "part", n=64)
    man = json.loads((tmp_path / "part" / "manifest.json").read_text())
    man["shards"] = man["shards"][:1]
    (tmp_path / "part" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(PairError, match="incomplete"):
        PairDataset(tmp_path / "part")
    assert len(PairDataset(tmp_path / "part", allow_partial=True)) == 32


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _rewrite_shard(d: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace shard 0 and make the manifest agree with it (so only the content checks can fire)."""
    blob = save(tensors)
    (d / shard_name("backward", 0)).write_bytes(blob)
    man = json.loads((d / "manifest.json").read_text())
    man["shards"][0].update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (d / "manifest.json").write_text(json.dumps(man))


def test_dataset_rejects_damaged_shards(pair_dirs, tmp_path):
    name = shard_name("backward", 1)
    d = _copy(pair_dirs / "bwd", tmp_path / "trunc")
    (d / name).write_bytes((d / name).read_bytes()[:-10])
    with pytest.raises(PairError, match=f"{name}.*truncated"):
        PairDataset(d)
    d = _copy(pair_dirs / "bwd", tmp_path / "tamper")
    raw = bytearray((d / name).read_bytes())
    raw[-3] ^= 0x01
    (d / name).write_bytes(bytes(raw))
    with pytest.raises(PairError, match=f"{name}.*sha256"):
        PairDataset(d)
    assert len(PairDataset(d, verify=False)) == 150  # content checks only
    d = _copy(pair_dirs / "bwd", tmp_path / "missing")
    (d / name).unlink()
    with pytest.raises(PairError, match=f"{name}.*missing"):
        PairDataset(d)
    good = load_file(pair_dirs / "bwd" / shard_name("backward", 0))
    d = _copy(pair_dirs / "bwd", tmp_path / "notensor")
    _rewrite_shard(d, {"x0": good["x0"]})
    with pytest.raises(PairError, match="no tensor 'x1'"):
        PairDataset(d)
    d = _copy(pair_dirs / "bwd", tmp_path / "shape")
    _rewrite_shard(d, {"x0": good["x0"][:, :1].contiguous(), "x1": good["x1"]})
    with pytest.raises(PairError, match="x0 has shape"):
        PairDataset(d)
    d = _copy(pair_dirs / "bwd", tmp_path / "badjson")
    (d / "manifest.json").write_text("{")
    with pytest.raises(PairError, match="corrupt pair manifest"):
        PairDataset(d)


# ------------------------------------------------------------------------------------------ projection
def test_project_pairs_ot_and_sinkhorn():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(64, 2, 2, generator=g)
    gen = real[torch.randperm(64, generator=g)]
    x1 = torch.randn(64, 2, 2, generator=g)
    p0, p1 = project_pairs(gen, x1, real, alpha=1.0)
    assert torch.equal(p0, gen) and p1 is x1
    q0, q1 = project_pairs(gen + 0.3, x1, real, alpha=0.0)
    assert torch.equal(q0, gen + 0.3) and q1 is x1
    h0, _ = project_pairs(gen + 0.01, x1, real, alpha=0.5)  # matched reals are gen itself
    assert torch.allclose(h0, gen + 0.005, atol=1e-6)
    s0, _ = project_pairs(gen, x1, real, method="sinkhorn", epsilon=1e-3, iters=300)
    assert (s0 - gen).abs().max() < 1e-2
    # more reals than generated: each generated x0 gets a distinct real one
    many = torch.randn(100, 2, 2, generator=g)
    m0, _ = project_pairs(gen, x1, many)
    idx = torch.cdist(m0.flatten(1), many.flatten(1)).argmin(1)
    assert len(set(idx.tolist())) == 64 and torch.equal(m0, many[idx])
    with pytest.raises(ValueError, match="M >= B"):
        project_pairs(many, torch.zeros_like(many), gen)
    with pytest.raises(ValueError, match="method"):
        project_pairs(gen, x1, real, method="gan")


def test_project_pairs_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    x = torch.randn(4, 2)
    with pytest.raises(ImportError, match="pip install scipy"):
        project_pairs(x, x, x)
    assert project_pairs(x, x, x, method="sinkhorn")[0].shape == x.shape
