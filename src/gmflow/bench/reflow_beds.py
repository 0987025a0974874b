"""Test beds and presets of the Simple ReFlow ladder benchmark (:mod:`gmflow.bench.reflow`).

A test bed holds a data set with its evaluation reference, the teacher that makes the pairs, the
network every student starts from and the evaluation noise; :func:`make_pairs` writes its pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import load_dataset
from ..experiments import (
    ImageData,
    ImageModel,
    ImagesConfig,
    Toy2DConfig,
    Toy2DData,
    ToyModel,
    load_network,
    run_experiment,
)
from ..metrics import (
    frechet_distance,
    get_classifier,
    image_metrics,
    in_support_fraction,
    reference_set,
    sliced_w2_mean,
)
from ..reflow import PairDataset, generate_pairs
from ..train import FlowLoss, LoopConfig

__all__ = ["BenchPreset", "DATASETS", "PRESETS", "Sizes", "bed_metrics", "digits_available", "make_pairs",
           "setup_bed"]  # fmt: skip

DATASETS = ("checkerboard", "ring", "digits")


@dataclass(frozen=True)
class Sizes:
    """Budget of one test bed: teacher training, pairs, ReFlow training and evaluation."""

    teacher_steps: int
    reflow_steps: int
    batch: int
    reflow_batch: int
    lr: float
    reflow_lr: float
    n_bwd: int
    n_fwd: int
    pair_nfe: int
    n_eval: int
    n_diag: int  # held-out test pairs and diagnostic samples
    width: int = 128  # toy MLP width / UNet base
    depth: int = 3


@dataclass(frozen=True)
class BenchPreset:
    description: str
    toy: Sizes
    digits: Sizes
    datasets: tuple[str, ...] = ("checkerboard", "ring", "digits")
    nfes: tuple[int, ...] = (1, 2, 4, 9)
    rho: float = 0.4
    alpha: float = 0.1  # projection strength; larger values hurt more in our tests (see the module docstring)
    pool: float = 4.0  # real draws per projected pair
    kappa: float = 5.0
    r: float = 0.4
    guidance: float = 1.6
    hpf_lambda: float = 10.0
    teacher_dropout: float = 0.13
    student_dropout: float = 0.05
    weak_frac: float = 0.1
    classifier_epochs: int = 15
    image_sweeps: bool = False  # inference sweeps on digits too (always on 2-D)


PRESETS: dict[str, BenchPreset] = {
    # Measured (docs/RESULTS.md §5): full recipe vs 2-RF at NFE 1 / 2: digits FD -37 % / -23 %;
    # checkerboard sw2 +272 % / +114 % (unguided recipe -2.1 % / -0.7 %); ring +144 % / +10.6 %.
    "quick": BenchPreset(
        "<= 10 min on 2 idle cores: 3x128 MLPs, a base-16 UNet, short runs",
        toy=Sizes(1500, 600, 512, 512, 2e-3, 5e-4, 20000, 10000, 32, 5000, 2000),
        digits=Sizes(500, 100, 64, 64, 2e-3, 5e-4, 1000, 500, 12, 200, 200, width=16),
    ),
    # Measured (§7, 56 min): full recipe vs 2-RF at NFE 1 / 2: digits FD -57.4 % / -35.6 % (with
    # AutoGuidance, whose guide calls NFE does not count); checkerboard sw2 +12 % / +3.5 %; ring +48 / +27 %.
    "full": BenchPreset(
        "about an hour on 2 cores: 4x256 MLPs and 6x longer teachers on 2-D, a longer-trained base-16 "
        "UNet on digits, more pairs and samples",
        toy=Sizes(6000, 3000, 1024, 1024, 1e-3, 3e-4, 100000, 30000, 64, 20000, 5000, width=256, depth=4),
        digits=Sizes(3000, 500, 128, 128, 2e-3, 5e-4, 8192, 1437, 24, 1000, 500, width=16),
        image_sweeps=True,
    ),
    # Seconds-long end-to-end run for tests (not meaningful as a benchmark).
    "smoke": BenchPreset(
        "smoke test (seconds; not meaningful)",
        toy=Sizes(20, 10, 128, 128, 1e-3, 1e-3, 256, 128, 4, 400, 100, width=32, depth=2),
        digits=Sizes(4, 3, 16, 16, 1e-3, 1e-3, 96, 96, 2, 80, 80, width=8),
        datasets=("checkerboard", "ring"),
        nfes=(1, 2),
        classifier_epochs=1,
    ),
}


def digits_available() -> str | None:
    """``None`` if the digits test bed can run, else why not (scikit-learn missing)."""
    try:
        import sklearn  # noqa: F401 - optional dependency of the digits data set
    except ImportError as e:
        return str(e)
    return None


def _loop(s: Sizes, out_dir: Path, seed: int) -> LoopConfig:
    """The teachers' optimisation: AdamW, 5 % warm-up, power EMA (the toy presets' recipe)."""
    return LoopConfig(
        steps=s.teacher_steps, batch_size=s.batch, lr=s.lr, warmup_steps=max(1, s.teacher_steps // 20),
        seed=seed, out_dir=str(out_dir), ckpt_every=max(1, s.teacher_steps // 4), log_every=50,
    )  # fmt: skip


def _train_teacher(name: str, bed: dict, pr: BenchPreset, out: Path, seed: int, progress: bool):
    """The FM network of a test bed (teacher, or the ring's student init), trained once and cached."""
    d = out / "teachers" / ("ring-init" if name == "ring" else name)
    if name == "digits":
        s = pr.digits
        model = ImageModel(base=s.width, mults=(1, 2), dropout=pr.teacher_dropout)
        cfg = ImagesConfig(data=ImageData("digits16"), model=model, loop=_loop(s, d, seed))
    else:
        s = pr.toy
        model = ToyModel(head="velocity", width=s.width, depth=s.depth, time_dim=64, pos_freqs=16)
        cfg = Toy2DConfig(data=Toy2DData(name), model=model, loss=FlowLoss(kind="fm"), loop=_loop(s, d, seed))
    run_experiment(cfg, progress=progress, verbose=progress)
    return load_network(d)


def setup_bed(name: str, pr: BenchPreset, out: Path, seed: int, progress: bool) -> dict[str, Any]:
    """A test bed: data, reference set and floor, teacher and student-init networks, evaluation noise."""
    if name == "digits":
        data = load_dataset("digits16")
        clf = get_classifier(16, cache_dir=out / "classifier", epochs=pr.classifier_epochs)
        ref, test = data.tensor(), load_dataset("digits16", split="test").tensor()
        floor = frechet_distance(clf.features(ref), clf.features(test))
        bed = dict(data=data, sizes=pr.digits, ref=ref, floor=floor, clf=clf, shape=(1, 16, 16))
        bed["fwd_data"] = ref[: pr.digits.n_fwd]
    else:
        data = load_dataset(name)
        s = pr.toy
        ref, floor = reference_set(data, s.n_eval)
        bed = dict(data=data, sizes=s, ref=ref, floor=floor, shape=(2,), fwd_data=data)
    net = _train_teacher(name, bed, pr, out, seed, progress)
    bed["init"] = net  # the network every student starts from
    bed["teacher"] = data if name == "ring" else net  # exact GM teacher for the ring
    bed["noise"] = torch.randn(
        bed["sizes"].n_eval, *bed["shape"], generator=torch.Generator().manual_seed(seed + 7)
    )
    return bed


def bed_metrics(name: str, bed: dict, x: torch.Tensor) -> dict[str, Any]:
    """The test bed's metric record of samples ``x`` (sliced-W2 on 2-D, FD / precision / recall on digits)."""
    finite = torch.isfinite(x.flatten(1)).all(1)
    rec: dict[str, Any] = {"nonfinite": int((~finite).sum())}
    if name == "digits":
        m = image_metrics(torch.nan_to_num(x, 0.0, 1.0, -1.0), bed["ref"], bed["clf"])
        rec.update(fd=m["fd"], fd_floor=bed["floor"], precision=m["precision"], recall=m["recall"])
        return rec
    xf = x[finite]
    sw2 = sliced_w2_mean(xf, bed["ref"]) if len(xf) >= 2 else math.inf
    rec.update(sw2=sw2, sw2_floor=bed["floor"], sw2_ratio=sw2 / bed["floor"])
    if name == "checkerboard":
        rec["in_support"] = in_support_fraction(x)
    return rec


def make_pairs(name: str, bed: dict, out: Path, seed: int, progress: bool):
    """Backward, forward and held-out test pairs of a test bed (resumable pair directories)."""
    s, d = bed["sizes"], out / "pairs" / name
    teacher = bed["teacher"]
    common = dict(shard_size=4096, progress=progress)
    generate_pairs(teacher, d / "backward", direction="backward", n=s.n_bwd, solver="dpm++2m",
                   nfe=s.pair_nfe, event_shape=bed["shape"], seed=seed, **common)  # fmt: skip
    generate_pairs(teacher, d / "forward", direction="forward", n=s.n_fwd, solver="heun",
                   nfe=s.pair_nfe + 1, data=bed["fwd_data"], seed=seed, **common)  # fmt: skip
    generate_pairs(teacher, d / "test", direction="backward", n=s.n_diag, solver="dpm++2m",
                   nfe=s.pair_nfe, event_shape=bed["shape"], seed=seed + 1, **common)  # fmt: skip
    test = PairDataset(d / "test")
    return PairDataset(d / "backward", d / "forward"), test.backward
