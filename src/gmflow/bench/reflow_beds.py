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

__all__ = ["BenchPreset", "DATASETS", "PRESETS", "Sizes", "bed_metrics", "digits_available",
           "digits_reference", "make_pairs", "memorisation", "setup_bed"]  # fmt: skip

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
    """A ladder budget; the Simple ReFlow knobs come from ``gmflow.experiments.recipe("simple", shape)``.

    normalize: override of the recipe's normaliser for the ``+norm`` rung (``None``: the recipe's;
    ``"none"`` drops the rung), for the normaliser comparisons of docs/maths/reflow.md §13.
    projection_lambda, pool: the ``+projection`` branch (a measurement: the recipe has no projection).
    """

    description: str
    toy: Sizes
    digits: Sizes
    datasets: tuple[str, ...] = ("checkerboard", "ring", "digits")
    nfes: tuple[int, ...] = (1, 2, 4, 9)
    normalize: str | None = None
    projection_lambda: float = 1.0 / 9.0  # x0 <- 0.9 x0 + 0.1 y (alpha = lambda / (1 + lambda) = 0.1)
    pool: float = 1.0
    guidance: float = 1.6
    teacher_dropout: float = 0.13
    student_dropout: float = 0.05
    weak_frac: float = 0.1
    classifier_epochs: int = 15
    image_sweeps: bool = False  # inference sweeps on digits too (always on 2-D)


PRESETS: dict[str, BenchPreset] = {
    # Measured: docs/RESULTS.md §10 (issue 12 definitions; 2-D beds).
    "quick": BenchPreset(
        "<= 10 min on 2 idle cores: 3x128 MLPs, a base-16 UNet, short runs",
        toy=Sizes(1500, 600, 512, 512, 2e-3, 5e-4, 20000, 10000, 32, 5000, 2000),
        digits=Sizes(500, 100, 64, 64, 2e-3, 5e-4, 1000, 500, 12, 200, 200, width=16),
    ),
    # Measured before issue 12 (docs/RESULTS.md §7, old definitions, FD against the training split).
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


def digits_reference(clf: Any, seed: int) -> dict[str, Any]:
    """The digits evaluation protocol: held-out reference, equal-count floor, memorisation baseline.

    ``ref`` is the **test** split (never used for pairs, projection, teacher or classifier training);
    ``train`` the train split. ``floor`` is the FD of ``len(ref)`` train images (a seeded subset)
    against ``ref``, the score of a perfect sampler evaluated with as many samples as the reference
    holds. ``nn_test`` are the distances of the test images to their nearest training image (RMS
    per pixel), the baseline of :func:`memorisation`.
    """
    train = load_dataset("digits16", split="train").tensor()
    ref = load_dataset("digits16", split="test").tensor()
    g = torch.Generator().manual_seed(seed + 11)
    sub = train[torch.randperm(len(train), generator=g)[: len(ref)]]
    floor = frechet_distance(clf.features(sub), clf.features(ref))
    return dict(train=train, ref=ref, floor=floor, nn_test=_nn_distance(ref, train))


def _nn_distance(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """RMS-per-pixel distance of each ``x`` to its nearest ``train`` image, ``(N,)``."""
    a, b = x.flatten(1).double(), train.flatten(1).double()
    d2 = (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp_min(0)
    return (d2.min(1).values / a.shape[1]).sqrt()


def memorisation(x: torch.Tensor, train: torch.Tensor, nn_test: torch.Tensor) -> dict[str, float]:
    """Samples' nearest-training-image distances against the test images' (the same statistic).

    ``nn_ratio`` = median NN distance of the samples / that of the test images (about 1 for a model
    that generalises like fresh data, well below 1 when it reproduces training images);
    ``copy_frac`` = fraction of samples closer to a training image than the closest 1 % of test images.
    """
    d = _nn_distance(x.clamp(-1, 1), train)
    q = float(torch.quantile(nn_test, 0.01))
    return {"nn_ratio": float(d.median() / nn_test.median()), "copy_frac": float((d < q).double().mean())}


def setup_bed(name: str, pr: BenchPreset, out: Path, seed: int, progress: bool) -> dict[str, Any]:
    """A test bed: data, reference set and floor, teacher and student-init networks, evaluation noise.

    Digits: :func:`digits_reference` (test-split reference, as many samples as reference images);
    2-D: fresh reference draws of the known distribution (:func:`~gmflow.metrics.reference_set`).
    """
    if name == "digits":
        data = load_dataset("digits16")
        clf = get_classifier(16, cache_dir=out / "classifier", epochs=pr.classifier_epochs)
        bed = dict(data=data, sizes=pr.digits, clf=clf, shape=(1, 16, 16), **digits_reference(clf, seed))
        bed["fwd_data"] = bed["train"][: pr.digits.n_fwd]
        bed["real"] = bed["train"]  # projection target
        n_eval = len(bed["ref"])
    else:
        data = load_dataset(name)
        s = pr.toy
        ref, floor = reference_set(data, s.n_eval)
        bed = dict(data=data, sizes=s, ref=ref, floor=floor, shape=(2,), fwd_data=data, real=data)
        n_eval = s.n_eval
    net = _train_teacher(name, bed, pr, out, seed, progress)
    bed["init"] = net  # the network every student starts from
    bed["teacher"] = data if name == "ring" else net  # exact GM teacher for the ring
    bed["noise"] = torch.randn(n_eval, *bed["shape"], generator=torch.Generator().manual_seed(seed + 7))
    return bed


def bed_metrics(name: str, bed: dict, x: torch.Tensor) -> dict[str, Any]:
    """The test bed's metric record of samples ``x`` (sliced-W2 on 2-D; FD / precision / recall against
    the held-out test split and the memorisation check on digits)."""
    finite = torch.isfinite(x.flatten(1)).all(1)
    rec: dict[str, Any] = {"nonfinite": int((~finite).sum())}
    if name == "digits":
        xs = torch.nan_to_num(x, 0.0, 1.0, -1.0)
        m = image_metrics(xs, bed["ref"], bed["clf"])
        rec.update(fd=m["fd"], fd_floor=bed["floor"], precision=m["precision"], recall=m["recall"])
        rec.update(memorisation(xs, bed["train"], bed["nn_test"]))
        return rec
    xf = x[finite]
    sw2 = sliced_w2_mean(xf, bed["ref"]) if len(xf) >= 2 else math.inf
    rec.update(sw2=sw2, sw2_floor=bed["floor"], sw2_ratio=sw2 / bed["floor"])
    if name == "checkerboard":
        rec["in_support"] = in_support_fraction(x)
    return rec


def make_pairs(name: str, bed: dict, out: Path, seed: int, progress: bool):
    """Backward, forward and test pairs of a test bed (resumable pair directories).

    The forward pairs invert ``bed["fwd_data"]`` (digits: training images only; the test split is the
    evaluation reference and never enters a pair). The "test" pairs are teacher pairs from other noise.
    """
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
