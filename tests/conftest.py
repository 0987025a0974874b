"""Shared test set-up: one torch thread, a private classifier cache, and tiny trained runs.

Layout: the tests mirror the package. ``src/gmflow/<pkg>/<module>.py`` is tested in
``tests/<pkg>/test_<module>.py`` and a top-level module ``src/gmflow/<module>.py`` in
``tests/test_<module>.py``. Every test directory is a package (``__init__.py``), so equal basenames in
different directories (``tests/train/test_config.py`` and ``tests/test_config.py``) do not clash.

The run fixtures below are session-scoped and shared by several test files: treat their directories
as read-only (copy them with the ``copy_run`` fixture before resuming or damaging one).
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import gmflow
from gmflow.data import load_dataset, ring_gmm
from gmflow.experiments import ReflowConfig, get_preset, load_network, run_experiment
from gmflow.reflow import generate_pairs, teacher_hash
from gmflow.train import TrainResult

# 1 thread: tests are small-op bound, and on a shared machine multi-threaded torch can be 3-30x slower
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_gmflow_cache(tmp_path_factory):
    """The digits classifier is cached under $GMFLOW_CACHE: keep it out of $HOME (also for subprocesses)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GMFLOW_CACHE", str(tmp_path_factory.mktemp("gmflow-cache")))
        yield


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment of ``python -m gmflow`` / torchrun subprocesses: the gmflow under test (also when it
    is found through a relative PYTHONPATH and the subprocess runs elsewhere), one thread, no buffering."""
    src = str(Path(gmflow.__file__).resolve().parents[1])
    path = os.pathsep.join([src, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class TinyRun:
    """A finished run directory and what :func:`gmflow.experiments.run_experiment` returned."""

    path: Path
    result: TrainResult


@pytest.fixture
def copy_run(tmp_path):
    """``copy_run(src, name="copy")``: a copy of the run directory ``src`` (files only) in ``tmp_path``."""

    def copy(src: Path, name: str = "copy") -> Path:
        dst = tmp_path / name
        dst.mkdir(parents=True)
        for p in src.iterdir():
            if p.is_file():
                shutil.copy2(p, dst / p.name)
        return dst

    return copy


def _train(preset: str, out: Path, *sets: str) -> TinyRun:
    cfg = get_preset(preset).with_sets([*sets, f"loop.out_dir={out}"])
    return TinyRun(out, run_experiment(cfg, progress=False))


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> TinyRun:
    """toy-smoke (GM head, K = 8, checkerboard), 4 steps, checkpoint at the end."""
    return _train("toy-smoke", tmp_path_factory.mktemp("toy") / "run", "loop.steps=4")


@pytest.fixture(scope="session")
def velocity_run(tmp_path_factory) -> TinyRun:
    """toy-smoke with a velocity head and the flow-matching loss, 2 steps."""
    out = tmp_path_factory.mktemp("vel") / "run"
    return _train("toy-smoke", out, "loop.steps=2", "loss.kind=fm", "model.head=velocity")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> TinyRun:
    """A flow-matching SmallUNet (base 8) on 16x16 digits, 3 steps: the teacher of :func:`reflow_run`."""
    out = tmp_path_factory.mktemp("digits") / "run"
    return _train("digits-smoke", out, "data.name=digits16", "loop.steps=3", "loop.batch_size=16")


@pytest.fixture(scope="session")
def cond_run(tmp_path_factory) -> TinyRun:
    """A class-conditional GM-DiT on 8x8 digits (3 steps; not meant to be good)."""
    return _train("images-smoke", tmp_path_factory.mktemp("runs") / "cond", "loop.steps=3")


@pytest.fixture(scope="session")
def spectral_run(tmp_path_factory) -> TinyRun:
    """cond_run's GM-DiT with a spectrum net trained by the spectral loss (model.spectral=true), 3 steps."""
    return _train("images-smoke-spectral", tmp_path_factory.mktemp("runs") / "spectral", "loop.steps=3")


@pytest.fixture(scope="session")
def digits_pairs(tmp_path_factory, digits_run) -> tuple[Path, Path]:
    """``(backward, forward)`` pair directories of the digits teacher (32 pairs each, NFE 2)."""
    d = tmp_path_factory.mktemp("digits_pairs")
    teacher = load_network(digits_run.path)
    kw = dict(n=32, shard_size=16, nfe=2, teacher_id=teacher_hash(digits_run.path), progress=False)
    generate_pairs(teacher, d / "bwd", direction="backward", solver="euler", event_shape=(1, 16, 16), **kw)
    real = load_dataset("digits16", "train").tensor()[:32]
    generate_pairs(teacher, d / "fwd", direction="forward", solver="euler", data=real, **kw)
    return d / "bwd", d / "fwd"


@pytest.fixture(scope="session")
def ring_pairs(tmp_path_factory) -> Path:
    """``bwd`` (1024) and ``fwd`` (512) pair directories of the exact ring-GMM teacher."""
    d = tmp_path_factory.mktemp("ring_pairs")
    ring = ring_gmm()
    kw = dict(shard_size=512, progress=False)
    generate_pairs(ring, d / "bwd", direction="backward", n=1024, solver="dpm++2m", nfe=12, **kw)
    generate_pairs(ring, d / "fwd", direction="forward", n=512, solver="heun", nfe=13, data=ring, **kw)
    return d


@pytest.fixture(scope="session")
def reflow_run(tmp_path_factory, digits_run, digits_pairs) -> TinyRun:
    """A ReFlow student of the digits teacher ("simple" knobs: forward pairs, projection), 3 steps."""
    bwd, fwd = digits_pairs
    out = tmp_path_factory.mktemp("reflow") / "run"
    cfg = ReflowConfig(teacher=str(digits_run.path), data="digits16").with_sets(
        [
            f"pairs.backward={bwd}",
            f"pairs.forward={fwd}",
            "pairs.rho=0.25",
            "pairs.projection_lambda=1.0",
            "loss.normalize=sample",
            "loss.time_sampler=pow10",
            "loss.hpf_lambda=1",
            "loop.steps=3",
            "loop.batch_size=8",
            "loop.warmup_steps=1",
            f"loop.out_dir={out}",
        ]
    )
    return TinyRun(out, run_experiment(cfg, progress=False))


_IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B, np.dtype("i4"): 0x0C}
_IDX_CODES.update({np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E})


def _idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding of ``arr`` (header + big-endian data), written independently of gmflow.data.idx."""
    header = bytes([0, 0, _IDX_CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx_file(path: Path, data: bytes | np.ndarray) -> Path:
    """Write IDX bytes (or an array, encoded) to ``path``, gzip-compressed when the name ends in .gz."""
    raw = _idx_bytes(data) if isinstance(data, np.ndarray) else data
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.fixture
def idx_bytes():
    """``idx_bytes(array)``: the IDX encoding of an array (header + big-endian data)."""
    return _idx_bytes


@pytest.fixture
def write_idx():
    """``write_idx(path, bytes_or_array)``: write an IDX file (gzip when ``path`` ends in ``.gz``)."""
    return write_idx_file


@pytest.fixture
def fake_fmnist(tmp_path):
    """``make(n_train=40, n_test=20, gz=True, name="fm")``: a synthetic Fashion-MNIST directory.

    Image ``i`` of a split has label ``i % 10`` and random grey levels, except pixel (0, 0) = 255 and
    pixel (0, 1) = 0 (so both ends of the range occur); returns the directory.
    """

    def make(n_train: int = 40, n_test: int = 20, gz: bool = True, name: str = "fm") -> Path:
        d = tmp_path / name
        d.mkdir()
        rng = np.random.default_rng(0)
        ext = ".gz" if gz else ""
        for prefix, n in (("train", n_train), ("t10k", n_test)):
            x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
            x[:, 0, 0], x[:, 0, 1] = 255, 0
            write_idx_file(d / f"{prefix}-images-idx3-ubyte{ext}", x)
            write_idx_file(d / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))
        return d

    return make
