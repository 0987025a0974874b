"""Test beds and presets of the Simple ReFlow ladder benchmark (:mod:`gmflow.bench.reflow`).

A test bed holds a data set with its evaluation reference, the teacher that makes the pairs, the
network every student starts from and the evaluation noise (one tensor per noise draw);
:func:`make_pairs` writes its pairs, :func:`make_gm_pairs` the GM-teacher variant's. The image beds'
teachers and evaluation protocol are :mod:`gmflow.bench.reflow_images`. A preset holds one
:class:`Sizes` per kind of bed (``toy`` for both 2-D beds, ``digits``, ``fmnist``); a bed the preset has
no sizes for is refused (``ConfigError``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..data import MissingDataError, load_dataset
from ..experiments import Toy2DConfig, Toy2DData, ToyModel, load_network, run_experiment
from ..metrics import in_support_fraction, reference_set, sliced_w2_mean
from ..reflow import PairDataset, generate_pairs
from ..train import FlowLoss, LoopConfig
from . import images_setup
from .reflow_images import IMAGE_BEDS, image_bed_metrics, image_reference, image_teacher_config

__all__ = ["BenchPreset", "DATASETS", "PRESETS", "Sizes", "bed_available", "bed_metrics", "eval_noise",
           "make_gm_pairs", "make_pairs", "setup_bed"]  # fmt: skip

DATASETS = ("checkerboard", "ring", "digits", "fmnist")


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
    trunk: tuple[str, ...] = ()  # DiT beds: --set overrides of the trunk (bench/images_setup.py)
    draws: int = 1  # evaluation noise draws (records carry `draw`; the report gives mean ± std)
    gm_teacher: bool = False  # DiT beds: also the GM-DiT teacher variant (gm-ode pairs, a velocity student)
    pair_solver: str = "dpm++2m"  # the FM teacher's backward / test pairs at pair_nfe (forward: heun, + 1)
    gm_pair_nfe: int | None = None  # the GM teacher's (gm-ode 2 backward, heun + 1 forward); None: pair_nfe

    @property
    def gm_pairs_nfe(self) -> int:
        """NFE of the GM teacher's backward pairs: ``gm_pair_nfe``, else ``pair_nfe``."""
        return self.pair_nfe if self.gm_pair_nfe is None else self.gm_pair_nfe


@dataclass(frozen=True)
class BenchPreset:
    """A ladder budget. The normaliser, ``t`` density and inference come from
    ``gmflow.experiments.recipe("simple", shape)``; the +hpf and +forward rungs use ``hpf_lambda`` and
    ``rho`` (the paper's improvements, measured even where the shipped recipe leaves them off).

    normalize: override of the recipe's normaliser for the ``+norm`` rung (``None``: the recipe's;
    ``"none"`` drops the rung), for the normaliser comparisons of docs/maths/reflow.md §13.
    projection_lambda, pool: the ``+projection`` branch (a measurement: the recipe has no projection).
    teacher_dropout, student_dropout: the digits UNet's (the fmnist DiT teacher has none; reflow_images).
    classifier_epochs, classifier_limit: overrides of the image classifier's training (``None``: the
    recipe's, i.e. the classifier the image benchmark caches too).
    """

    description: str
    toy: Sizes | None = None
    digits: Sizes | None = None
    fmnist: Sizes | None = None
    datasets: tuple[str, ...] = ("checkerboard", "ring", "digits")
    nfes: tuple[int, ...] = (1, 2, 4, 9)
    normalize: str | None = None
    hpf_lambda: float = 10.0  # the +hpf rung (the brief's value; the shipped image recipe has 0)
    rho: float = 0.4  # the +forward rung's forward-pair ratio (the shipped image recipe has 0)
    projection_lambda: float = 1.0 / 9.0  # x0 <- 0.9 x0 + 0.1 y (alpha = lambda / (1 + lambda) = 0.1)
    pool: float = 1.0
    guidance: float = 1.6
    teacher_dropout: float = 0.13
    student_dropout: float = 0.05
    weak_frac: float = 0.1
    classifier_epochs: int | None = None
    classifier_limit: int | None = None
    image_sweeps: bool = False  # inference sweeps on image beds too (always on 2-D)

    def __post_init__(self) -> None:
        for kind in ("toy", "digits", "fmnist"):
            s = getattr(self, kind)
            dit = kind in IMAGE_BEDS and IMAGE_BEDS[kind].arch == "dit"
            if isinstance(s, Sizes) and s.gm_teacher and not dit:
                raise ConfigError(f"{kind}.gm_teacher: the {kind!r} bed has no GM-DiT twin (DiT beds only)")

    def sizes(self, name: str) -> Sizes:
        """The budget of test bed ``name``; ``ConfigError`` if this preset has none for it."""
        s = self.toy if name in ("checkerboard", "ring") else getattr(self, name, None)
        if not isinstance(s, Sizes):
            raise ConfigError(f"--datasets: this preset has no sizes for the {name!r} test bed")
        return s


_SMOKE_TRUNK = ("model.patch_size=4", "model.num_layers=1", "model.num_heads=2", "model.head_dim=8")

# The fmnist budget, from `gmflow bench reflow --preset fmnist --estimate` (5 measured steps / calls each)
# run niced on ONE thread of the loaded machine (load ~3): teacher step (batch 64) 240-250 ms, ReFlow
# step 190-300 ms (take 240), GM-DiT step 270-290 ms, a teacher call 1.35 ms per sample (batch 256),
# gm-ode order 2 1.8-2.2 ms, a scoring of 1000 samples 0.8 s, a memorisation check 4 s. Minutes:
#   FM teacher 4000 steps 16 | pairs 50k bwd x 16 + 10k fwd x 17 + 500 test x 16 NFE 22 | 6 rungs x 1200
#   steps 29 | sampling 11 variants x NFE (1+2+4+9) x 1000 x 3 draws (full: + guide) 12 | scoring 120
#   cells 1.5 | memorisation 40 cells 2.6 | diagnostics 0.5 | GM-DiT teacher 4000 steps 19 | GM pairs
#   (gm-ode 2, 8 NFE) 15 | GM student 1200 steps 5 | GM rows 3  ->  ~125 min on one loaded thread.
# Two idle threads: / 1.8 -> ~69 min; / 1.5 (the teacher step is 160 ms on 2 idle threads) -> ~83 min;
# plus ~2 min of data loading and figures (the fmnist32 classifier is the image benchmark's cached one;
# training it once adds a few minutes). Measured end to end (docs/RESULTS.md §17): 35.3 min on 2 cores of
# the faster machine (teacher step ~60 ms); with the former dpm++2m 8-NFE pairs ~80 min on the slower
# machine (teacher step 139 ms, GM-DiT 182 ms, rungs 145-177 ms), so ~86 min there with these. Pairs:
# heun at 16 NFE is the teacher's best pair solver tried (FD 90.9; dpm++2m 8 / 16 / 32: 105.8 / 100.1 /
# 103.1): every student gains ~10 % FD over the 8-NFE pairs; shipped recipe -10.9 % vs 2-RF at NFE 9.
_FMNIST = Sizes(4000, 1200, 64, 64, 5e-3, 3e-4, 50000, 10000, 16, 1000, 500, trunk=images_setup.NARROW_TRUNK,
                draws=3, gm_teacher=True, pair_solver="heun", gm_pair_nfe=8)  # fmt: skip
# `--preset smoke --datasets fmnist`: a one-layer 16-wide DiT, 2 draws (160 > 128 classifier features)
_FMNIST_SMOKE = Sizes(4, 3, 16, 16, 1e-3, 1e-3, 48, 32, 2, 160, 32, trunk=_SMOKE_TRUNK, draws=2,
                      gm_teacher=True)  # fmt: skip

PRESETS: dict[str, BenchPreset] = {
    # Measured: docs/RESULTS.md §10 / §17b (issue 12 definitions): 4.6 min on 2 idle cores.
    "quick": BenchPreset(
        "<= 10 min on 2 idle cores: 3x128 MLPs, a base-16 UNet, short runs",
        toy=Sizes(1500, 600, 512, 512, 2e-3, 5e-4, 20000, 10000, 32, 5000, 2000),
        digits=Sizes(500, 100, 64, 64, 2e-3, 5e-4, 1000, 500, 12, 360, 200, width=16),
    ),
    # Measured before issue 12 (docs/RESULTS.md §7, old definitions, FD against the training split).
    "full": BenchPreset(
        "about an hour on 2 cores: 4x256 MLPs and 6x longer teachers on 2-D, a longer-trained base-16 "
        "UNet on digits, more pairs and samples",
        toy=Sizes(6000, 3000, 1024, 1024, 1e-3, 3e-4, 100000, 30000, 64, 20000, 5000, width=256, depth=4),
        digits=Sizes(3000, 500, 128, 128, 2e-3, 5e-4, 8192, 1437, 24, 1000, 500, width=16),
        image_sweeps=True,
    ),
    # Measured: 38-80 min on 2 cores by machine (docs/RESULTS.md §17; the budget above `_FMNIST`).
    "fmnist": BenchPreset(
        "<= 90 min on 2 idle cores: an unconditional quick-trunk DiT (4 layers, 64 wide, patch 4) on "
        "Fashion-MNIST 32x32, 50k backward + 10k forward pairs, 3 noise draws, a GM-DiT teacher variant",
        fmnist=_FMNIST,
        datasets=("fmnist",),
    ),
    # Seconds-long end-to-end run for tests (not meaningful as a benchmark).
    "smoke": BenchPreset(
        "smoke test (seconds; not meaningful)",
        toy=Sizes(20, 10, 128, 128, 1e-3, 1e-3, 256, 128, 4, 400, 100, width=32, depth=2),
        digits=Sizes(4, 3, 16, 16, 1e-3, 1e-3, 96, 96, 2, 360, 80, width=8),
        fmnist=_FMNIST_SMOKE,
        datasets=("checkerboard", "ring"),
        nfes=(1, 2),
        classifier_epochs=1,
        classifier_limit=512,
    ),
}


def bed_available(name: str) -> str | None:
    """``None`` if test bed ``name`` can run, else why not (digits: scikit-learn missing; fmnist: the
    Fashion-MNIST IDX files missing)."""
    try:
        if name == "digits":
            import sklearn  # noqa: F401 - optional dependency of the digits data set
        elif name in IMAGE_BEDS:
            load_dataset(IMAGE_BEDS[name].data, "test")
    except (ImportError, MissingDataError) as e:
        return str(e)
    return None


def _loop(s: Sizes, out_dir: Path, seed: int) -> LoopConfig:
    """The teachers' optimisation: AdamW, 5 % warm-up, power EMA (the toy presets' recipe)."""
    return LoopConfig(
        steps=s.teacher_steps, batch_size=s.batch, lr=s.lr, warmup_steps=max(1, s.teacher_steps // 20),
        seed=seed, out_dir=str(out_dir), ckpt_every=max(1, s.teacher_steps // 4), log_every=50,
    )  # fmt: skip


def _train_teacher(name: str, pr: BenchPreset, out: Path, seed: int, progress: bool, gm: bool = False):
    """The FM network of a test bed (teacher, or the ring's student init), trained once and cached;
    ``gm``: the GM-DiT twin of an image bed's DiT teacher (``OUT/teachers/<bed>-gm``)."""
    d = out / "teachers" / ("ring-init" if name == "ring" else name + ("-gm" if gm else ""))
    s = pr.sizes(name)
    if name in IMAGE_BEDS:
        cfg = image_teacher_config(name, s, _loop(s, d, seed), pr.teacher_dropout, gm=gm)
    else:
        model = ToyModel(head="velocity", width=s.width, depth=s.depth, time_dim=64, pos_freqs=16)
        cfg = Toy2DConfig(data=Toy2DData(name), model=model, loss=FlowLoss(kind="fm"), loop=_loop(s, d, seed))
    run_experiment(cfg, progress=progress, verbose=progress)
    return load_network(d)


def eval_noise(n: int, shape: tuple[int, ...], seed: int, draws: int) -> list[torch.Tensor]:
    """The evaluation noise of each draw, ``draws x (n, *shape)``; draw 0 is the single draw of old runs."""
    return [
        torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed + 7 + 7919 * d))
        for d in range(draws)
    ]


def setup_bed(name: str, pr: BenchPreset, out: Path, seed: int, progress: bool) -> dict[str, Any]:
    """A test bed: data, reference set and floor, teacher and student-init networks, evaluation noise.

    Image beds: :func:`~gmflow.bench.reflow_images.image_reference` (the test split as reference, the
    data set's cached classifier); 2-D: fresh reference draws of the known distribution
    (:func:`~gmflow.metrics.reference_set`).
    """
    s = pr.sizes(name)
    if name in IMAGE_BEDS:
        ib = IMAGE_BEDS[name]
        data = load_dataset(ib.data)
        scorer = images_setup.make_scorer(ib.data, pr.classifier_epochs, limit=pr.classifier_limit)
        bed = dict(
            data=data,
            sizes=s,
            scorer=scorer,
            shape=ib.shape,
            **image_reference(ib.data, scorer, s.n_eval, seed),
        )
        bed["fwd_data"] = bed["train"][: s.n_fwd]  # forward pairs invert training images only
        bed["real"] = bed["train"]  # projection target
    else:
        data = load_dataset(name)
        ref, floor = reference_set(data, s.n_eval)
        bed = dict(
            data=data, sizes=s, ref=ref, floor=floor, shape=(2,), fwd_data=data, real=data, n_eval=s.n_eval
        )
    net = _train_teacher(name, pr, out, seed, progress)
    bed["init"] = net  # the network every student starts from
    bed["teacher"] = data if name == "ring" else net  # exact GM teacher for the ring
    bed["noise"] = eval_noise(bed["n_eval"], bed["shape"], seed, s.draws)
    return bed


def bed_metrics(name: str, bed: dict, x: torch.Tensor, draw: int = 0) -> dict[str, Any]:
    """The test bed's metric record of samples ``x`` of noise draw ``draw`` (sliced-W2 on 2-D; on image
    beds :func:`~gmflow.bench.reflow_images.image_bed_metrics`)."""
    if name in IMAGE_BEDS:
        return image_bed_metrics(bed, x, draw)
    finite = torch.isfinite(x.flatten(1)).all(1)
    rec: dict[str, Any] = {"nonfinite": int((~finite).sum())}
    xf = x[finite]
    sw2 = sliced_w2_mean(xf, bed["ref"]) if len(xf) >= 2 else math.inf
    rec.update(sw2=sw2, sw2_floor=bed["floor"], sw2_ratio=sw2 / bed["floor"])
    if name == "checkerboard":
        rec["in_support"] = in_support_fraction(x)
    return rec


def make_pairs(name: str, bed: dict, out: Path, seed: int, progress: bool):
    """Backward, forward and test pairs of a test bed (resumable pair directories).

    The forward pairs invert ``bed["fwd_data"]`` (image beds: training images only; the test split is
    the evaluation reference and never enters a pair). The "test" pairs are teacher pairs from other
    noise (diagnostics).
    """
    s, d = bed["sizes"], out / "pairs" / name
    teacher = bed["teacher"]
    shard = IMAGE_BEDS[name].shard_size if name in IMAGE_BEDS else 4096
    common = dict(shard_size=shard, progress=progress)
    generate_pairs(teacher, d / "backward", direction="backward", n=s.n_bwd, solver=s.pair_solver,
                   nfe=s.pair_nfe, event_shape=bed["shape"], seed=seed, **common)  # fmt: skip
    generate_pairs(teacher, d / "forward", direction="forward", n=s.n_fwd, solver="heun",
                   nfe=s.pair_nfe + 1, data=bed["fwd_data"], seed=seed, **common)  # fmt: skip
    generate_pairs(teacher, d / "test", direction="backward", n=s.n_diag, solver=s.pair_solver,
                   nfe=s.pair_nfe, event_shape=bed["shape"], seed=seed + 1, **common)  # fmt: skip
    test = PairDataset(d / "test")
    return PairDataset(d / "backward", d / "forward"), test.backward


def make_gm_pairs(name: str, bed: dict, pr: BenchPreset, out: Path, seed: int, progress: bool):
    """The GM-teacher variant of an image bed: ``(GM-DiT teacher, its pairs)``.

    The GM-DiT twin of the bed's teacher (same trunk, data and budget) is trained once; its backward
    pairs integrate **gm-ode order 2** at ``gm_pairs_nfe`` (the GM's own ODE solver), the same number of
    pairs as the FM teacher's; its forward pairs invert the same training images (heun on the GM's
    mean velocity, the only solvers that run upwards).
    """
    s, d = bed["sizes"], out / "pairs" / f"{name}-gm"
    gm = _train_teacher(name, pr, out, seed, progress, gm=True)
    common = dict(shard_size=IMAGE_BEDS[name].shard_size, progress=progress)
    generate_pairs(gm, d / "backward", direction="backward", n=s.n_bwd, solver="gm-ode", order=2,
                   nfe=s.gm_pairs_nfe, event_shape=bed["shape"], seed=seed, **common)  # fmt: skip
    generate_pairs(gm, d / "forward", direction="forward", n=s.n_fwd, solver="heun",
                   nfe=s.gm_pairs_nfe + 1, data=bed["fwd_data"], seed=seed, **common)  # fmt: skip
    return gm, PairDataset(d / "backward", d / "forward")
