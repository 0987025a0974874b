"""Image test beds of the Simple ReFlow ladder (:mod:`gmflow.bench.reflow`): digits and Fashion-MNIST.

======  ========  ==========================================================================================
bed     data      teacher: flow matching on the **train** split, trained once in ``OUT/teachers/<bed>``
======  ========  ==========================================================================================
digits  digits16  :class:`~gmflow.nn.SmallUNet` (base ``width``, dropout ``teacher_dropout``), 16x16
fmnist  fmnist32  an **unconditional** DiT of the image benchmark's trunk family (``trunk`` of the bed's
                  sizes: the quick trunk, patch 4, 4 layers, 2 heads x 32), 32x32: the ``fmnist-fm``
                  recipe (logit-normal t, ramp-up EMA) with ``model.conditional=false``, no label
                  dropout, no dropout (:func:`image_teacher_config`)
======  ========  ==========================================================================================

Every student starts from the teacher's EMA weights. The ``+dropout`` rung needs a teacher with
dropout (the paper's rule: the student's rate is *below* the teacher's); the fmnist teacher has none,
because at its budget (about four epochs) it is under-fitted rather than over-fitted, so the rule
gives rate 0 and the rung would repeat ``+hpf``: it is left out of that bed (:attr:`ImageBed.dropout_rung`).
The DiT itself honours ``student_dropout`` (:meth:`gmflow.nn.GMDiT.set_dropout`).

Evaluation protocol (docs/maths/reflow.md §15), the same for every image bed (:func:`image_reference`):

* reference: the **test** split. It never feeds the teacher or the classifier (both train on the
  train split), the pairs (forward pairs invert training images) or the projection (training images);
* each cell scores ``n = min(n_eval, len(test))`` samples (digits: all 360 test images' worth;
  fmnist: ``n_eval``) with the data set's cached classifier (:func:`~gmflow.bench.images_setup.make_scorer`,
  the classifier the image benchmark uses): FD and k-NN (k = 3) precision / recall against the reference;
* floor: the FD of ``n`` training images (a seeded subset) against the reference, a perfect sampler
  scored with the cells' sample count;
* memorisation (:func:`memorisation`, first noise draw): each sample's distance to its nearest
  training image against that of ``n`` test images (a seeded subset).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import apply_sets
from ..data import load_dataset
from ..experiments import ImageData, ImageModel, ImagesConfig, get_preset, recipe
from ..reflow import reflow_objective
from ..sampling import sample
from ..train import LoopConfig
from . import images_setup
from .images_ddpm import UNCONDITIONAL

__all__ = ["IMAGE_BEDS", "ImageBed", "estimate", "image_bed_metrics", "image_reference",
           "image_teacher_config", "memorisation", "NearestTrain"]  # fmt: skip


@dataclass(frozen=True)
class ImageBed:
    """What distinguishes one image bed: its data set, teacher architecture and pair storage."""

    data: str  # gmflow data set (train / test splits)
    shape: tuple[int, int, int]
    arch: str  # "unet" (SmallUNet) or "dit" (unconditional DiT, the bed's sizes.trunk)
    dropout_rung: bool  # the teacher has dropout, so the +dropout rung (a smaller rate) is run
    shard_size: int  # pairs per shard file = teacher batch of the pair solver


#: 256 per teacher call at 32x32: a quick-trunk DiT forward costs more per sample in larger batches
#: (measured on one thread: 1.1 ms at 256, 1.5 ms at 512, 2.5 ms at 4096).
IMAGE_BEDS: dict[str, ImageBed] = {
    "digits": ImageBed("digits16", (1, 16, 16), "unet", dropout_rung=True, shard_size=4096),
    "fmnist": ImageBed("fmnist32", (1, 32, 32), "dit", dropout_rung=False, shard_size=256),
}


def image_teacher_config(
    name: str, s: Any, loop: LoopConfig, dropout: float, *, gm: bool = False
) -> ImagesConfig:
    """The teacher run of image bed ``name`` with sizes ``s`` (``width``, ``trunk``, ``lr``) and ``loop``.

    digits: a SmallUNet (base ``s.width``, dropout ``dropout``) with ``loop`` as given. fmnist: the
    ``fmnist-fm`` preset made unconditional, with the trunk ``s.trunk`` and ``loop``'s steps, batch,
    learning rate, warm-up, seed, checkpointing and output directory (its EMA stays the preset's).
    ``gm``: its GM-DiT twin instead, ``fmnist-gmdit`` (K = 8, transition loss lambda 0.5) with the
    same trunk, loop and changes (the GM-teacher variant; DiT beds only).
    """
    bed = IMAGE_BEDS[name]
    if bed.arch == "unet":
        if gm:
            raise ValueError(f"gm_teacher: the {name!r} bed has no GM-DiT twin (DiT beds only)")
        model = ImageModel(base=s.width, mults=(1, 2), dropout=dropout)
        return ImagesConfig(data=ImageData(bed.data), model=model, loop=loop)
    keys = ("steps", "batch_size", "lr", "warmup_steps", "seed", "out_dir", "ckpt_every", "log_every")
    return apply_sets(
        get_preset("fmnist-gmdit" if gm else "fmnist-fm"),
        [f"data.name={bed.data}", *s.trunk, *UNCONDITIONAL, *(f"loop.{k}={getattr(loop, k)}" for k in keys)],
    )


class NearestTrain:
    """RMS-per-pixel distance to the nearest training image. The train set's squared norms are computed
    once (every cell's memorisation check searches it); the images stay in their dtype and are promoted
    to float64 one chunk at a time (a float64 copy of 60k Fashion-MNIST images would be ~490 MB)."""

    def __init__(self, train: Tensor, chunk: int = 4096) -> None:
        self.train = train.flatten(1)
        self.sq = torch.cat([b.double().square().sum(1) for b in self.train.split(chunk)])
        self.chunk = chunk

    def __call__(self, x: Tensor) -> Tensor:
        """``(N,)`` float64: ``min_j ||x_i - train_j|| / sqrt(pixels)``."""
        a = x.flatten(1).double()
        a2 = a.square().sum(1, keepdim=True)
        best = torch.full((len(a),), torch.inf, dtype=torch.float64)
        for b, b2 in zip(self.train.split(self.chunk), self.sq.split(self.chunk)):
            best = torch.minimum(best, (a2 - 2 * a @ b.double().T + b2).min(1).values)
        return (best.clamp_min(0) / a.shape[1]).sqrt()


def memorisation(x: Tensor, nearest: NearestTrain, nn_test: Tensor) -> dict[str, float]:
    """Samples' nearest-training-image distances against the test images' (the same statistic).

    ``nn_ratio`` = median NN distance of the samples / that of the test images (about 1 for a model
    that generalises like fresh data, well below 1 when it reproduces training images);
    ``copy_frac`` = fraction of samples closer to a training image than the closest 1 % of test images.
    """
    d = nearest(x.clamp(-1, 1))
    q = float(torch.quantile(nn_test, 0.01))
    return {"nn_ratio": float(d.median() / nn_test.median()), "copy_frac": float((d < q).double().mean())}


def image_reference(data: str, scorer: Any, n_eval: int, seed: int) -> dict[str, Any]:
    """The evaluation protocol of an image bed (module docstring): reference, floor, memorisation baseline.

    ``scorer`` is the data set's :class:`~gmflow.bench.images_setup.Scorer` (its ``reference`` is the
    test split). Returns ``train`` (the train split), ``ref``, ``n_eval = min(n_eval, len(ref))``,
    ``floor`` (FD of ``n_eval`` seeded training images against ``ref``), ``nearest`` (a
    :class:`NearestTrain` of ``train``) and ``nn_test`` (its distances for ``n_eval`` seeded test images).
    """
    train = load_dataset(data, "train").tensor()
    ref = scorer.reference
    n = min(int(n_eval), len(ref))
    g = torch.Generator().manual_seed(seed + 11)
    sub = train[torch.randperm(len(train), generator=g)[:n]]
    floor = scorer(sub)["fd"]
    test_sub = ref[torch.randperm(len(ref), generator=g)[:n]]
    nearest = NearestTrain(train)
    return dict(train=train, ref=ref, n_eval=n, floor=floor, nearest=nearest, nn_test=nearest(test_sub))


def image_bed_metrics(bed: dict, x: Tensor, draw: int) -> dict[str, Any]:
    """FD / precision / recall of samples ``x`` against the held-out test split, the floor, and (first
    draw only: it costs as much as the rest) the memorisation check."""
    m = bed["scorer"](x)
    rec: dict[str, Any] = {"nonfinite": m["nonfinite"], "fd": m["fd"], "fd_floor": bed["floor"]}
    rec.update(precision=m["precision"], recall=m["recall"])
    if draw == 0:
        rec.update(memorisation(torch.nan_to_num(x, 0.0, 1.0, -1.0), bed["nearest"], bed["nn_test"]))
    return rec


def _median_ms(fn, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])  # the first call warms up


def _step_ms(cfg: ImagesConfig, pair_objective: Any, s: Any, steps: int) -> tuple[Any, float, float]:
    """``(model, teacher step ms, ReFlow step ms)`` of a fresh network of ``cfg`` (AdamW steps)."""
    model, objective, batches = cfg.build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train = cfg.dataset("train").tensor()

    def step(i: int, pair: bool) -> None:
        g = torch.Generator().manual_seed(i)
        if pair:  # a ReFlow batch: (x0, x1) pairs
            x0 = train[torch.randint(0, len(train), (s.reflow_batch,), generator=g)]
            loss = pair_objective(model, (x0, torch.randn(x0.shape, generator=g)), g).mean()
        else:
            loss = objective(model, batches(i, 0, 1, g), g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    teacher = _median_ms(lambda i: step(i, False), steps)
    return model.eval(), teacher, _median_ms(lambda i: step(i, True), steps)


def estimate(name: str, pr: Any, variants: Sequence[str], rungs: int, *, steps: int = 5) -> dict[str, float]:
    """Seconds the image bed ``name`` of preset ``pr`` needs on this machine now, from a few measured
    steps: teacher and ReFlow training steps, a teacher call on ``shard_size`` samples (one NFE of
    pair generation or sampling), one scoring and one memorisation check of ``n_eval`` samples.

    Counts: teacher steps; backward + test pairs at ``pair_nfe`` and forward pairs at ``pair_nfe + 1``
    evaluations; ``rungs`` training rungs at ``reflow_steps``; sampling of every evaluated variant
    (``variants``) at every NFE and draw (``full`` twice: main + guide), a score per cell and a
    memorisation check per cell of the first draw; diagnostics (3 models, 16 NFE on ``n_diag``).
    With ``gm_teacher``: the GM-DiT's steps, its pairs at ``gm_pairs_nfe`` (gm-ode order 2 backward,
    heun forward), one more student and two more variants. Excludes a classifier that is not yet
    cached, data loading and figures.
    """
    s, bed = pr.sizes(name), IMAGE_BEDS[name]
    loop = LoopConfig(steps=s.teacher_steps, batch_size=s.batch, lr=s.lr)
    robj = reflow_objective(recipe("simple", bed.shape).loss)
    model, teacher_ms, reflow_ms = _step_ms(
        image_teacher_config(name, s, loop, pr.teacher_dropout), robj, s, steps
    )
    noise = torch.randn(bed.shard_size, *bed.shape)

    def eval_ms(m: Any, **kw: Any) -> float:  # ms per sample and network evaluation
        return _median_ms(lambda i: sample(m, noise, nfe=2, **kw), 1) / bed.shard_size / 2

    call = eval_ms(model, solver="euler")
    scorer = images_setup.make_scorer(bed.data, pr.classifier_epochs, limit=pr.classifier_limit)
    ref = image_reference(bed.data, scorer, s.n_eval, 0)
    x = ref["ref"][: ref["n_eval"]]
    score_ms = _median_ms(lambda i: scorer(x), 1)
    memo_ms = _median_ms(lambda i: memorisation(x, ref["nearest"], ref["nn_test"]), 1)
    n, cells = ref["n_eval"], len(pr.nfes) * s.draws
    evals_per_sample = sum(pr.nfes) * (len(variants) + ("full" in variants))  # full: main + guide
    out = {
        "teacher_s": s.teacher_steps * teacher_ms,
        "pairs_s": ((s.n_bwd + s.n_diag) * s.pair_nfe + s.n_fwd * (s.pair_nfe + 1)) * call,
        "rungs_s": rungs * s.reflow_steps * reflow_ms,
        "sampling_s": s.draws * n * evals_per_sample * call,
        "scoring_s": len(variants) * cells * score_ms,
        "memorisation_s": len(variants) * len(pr.nfes) * memo_ms,
        "diagnostics_s": 3 * 16 * s.n_diag * call,
    }
    unit = dict(teacher_step_ms=teacher_ms, reflow_step_ms=reflow_ms, eval_ms_per_sample=call,
                score_ms=score_ms, memorisation_ms=memo_ms)  # fmt: skip
    if s.gm_teacher:
        gm, gm_ms, _ = _step_ms(image_teacher_config(name, s, loop, 0.0, gm=True), robj, s, steps)
        gm_call = eval_ms(gm, solver="gm-ode", order=2)
        out["gm_teacher_s"] = s.teacher_steps * gm_ms
        out["gm_pairs_s"] = s.n_bwd * s.gm_pairs_nfe * gm_call + s.n_fwd * (s.gm_pairs_nfe + 1) * call
        out["gm_student_s"] = s.reflow_steps * reflow_ms
        out["gm_eval_s"] = s.draws * n * sum(pr.nfes) * (gm_call + call) + 2 * cells * score_ms
        out["gm_eval_s"] += 2 * len(pr.nfes) * memo_ms
        unit.update(gm_step_ms=gm_ms, gm_ode_ms_per_sample=gm_call)
    out = {k: v / 1e3 for k, v in out.items()}
    return {**out, "total_s": sum(out.values()), **unit}
