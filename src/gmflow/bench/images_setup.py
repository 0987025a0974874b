"""What the parts of ``gmflow bench images`` share: the presets of the trained models and the scorer.

* :data:`PRESETS` / :class:`ImagesPreset`: the main benchmark's settings; its class-conditional GM-DiT
  (``DIR/models/gmflow``) is also the model of the guidance part.
* :func:`model_configs`: the GMFlow run and its flow-matching twin (identical trunk, budget, recipe).
* :func:`guidance_for` / :func:`class_sample`: the guidance object of a sweep cell and the class-
  conditional (optionally guided) draw every part uses.
* :class:`Scorer`: scores sample sets against the held-out **test** split with the data set's cached
  classifier (FD, precision / recall, class accuracy on clipped samples; the over-saturation
  measures of :mod:`gmflow.metrics.saturation` on the samples *before* clipping). The test split's
  features and pixel statistics are computed once.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import apply_sets
from ..data import load_dataset
from ..experiments import get_preset
from ..guidance import CFG, ProbabilisticGuidance
from ..io import atomic_write_json, atomic_write_text
from ..metrics import (
    ImageClassifier,
    PixelStats,
    get_classifier,
    image_metrics,
    knn_radii,
    pixel_stats,
    saturation_metrics,
)
from ..sampling import sample
from ..train import flow_objective
from ..viz import image_grid

__all__ = ["ImagesPreset", "PRESETS", "Scorer", "UNGUIDED", "class_sample", "guidance_for", "make_scorer",
           "grid_noise", "mean_sd", "model_configs", "pinned", "save_grid", "step_parts",
           "write_report"]  # fmt: skip

UNGUIDED = {"cfg": 1.0, "probabilistic": 0.0}  # the scale of each guidance kind that means "no guidance"


@dataclass(frozen=True)
class ImagesPreset:
    """One benchmark setting: data, trunk, budget, evaluation grid and the headline comparison."""

    description: str
    data: str
    steps: int
    batch_size: int
    trunk: tuple[str, ...]  # --set overrides of the GM-DiT trunk (shared by both models)
    nfes: tuple[int, ...]
    n_eval: int  # samples per cell
    headline: tuple[int, int]  # (GMFlow NFE, FM NFE) of the headline comparison
    draws: int = 3  # noise draws of the headline rows
    lr: float = 3e-4
    warmup_steps: int = 200
    components: int = 8
    classifier_epochs: int | None = None  # None: the classifier's default
    ema_rampup: float | None = None  # EMA half-life / images seen; None: the experiment's (0.05)


# The quick preset's trunk: 96 wide (3 heads x 32), 2 layers. At width 64 the GM head (K (C + 1) p^2 = 256
# outputs per token) starves the GM model (docs/RESULTS.md §12c); 96 x 2 costs ~0.9x of 64 x 4 per step.
QUICK_TRUNK = ("model.patch_size=4", "model.num_layers=2", "model.num_heads=3", "model.head_dim=32")
# The 4-layer 64-wide trunk the quick preset had before; the quick ddpm / nll / ladder parts and the
# ReFlow Fashion-MNIST teacher keep it (their measured numbers rest on it).
NARROW_TRUNK = ("model.patch_size=4", "model.num_layers=4", "model.num_heads=2", "model.head_dim=32")
FULL_TRUNK = ("model.patch_size=4", "model.num_layers=6", "model.num_heads=2", "model.head_dim=32")
SMOKE_TRUNK = ("model.patch_size=2", "model.num_layers=1", "model.num_heads=2", "model.head_dim=8",
               "model.logstd_inner_dim=16")  # fmt: skip

PRESETS: dict[str, ImagesPreset] = {
    # Idle 2-core training steps (interleaved medians) on the slower / faster machine seen: quick trunk
    # (96 x 2) FM 130-133 / 54-72 ms, GMFlow 150-160 / 64-84 ms; full trunk (64 x 6) FM 202-218 / 99-126 ms,
    # GMFlow 215-231 / 108-140 ms. lr: FM's best measured rate per trunk (quick 1e-2, full 5e-3; the full
    # preset at 1e-2 is worse for both models, lr 1e-3 left both under-trained, docs/RESULTS.md §12d).
    # Measured end to end (§12, §12b) on the faster machine: quick 5.5 min (GMFlow NFE 4 FD 71.8 vs FM
    # NFE 8 78.2), full 43.5 min (GMFlow NFE 6 34.8 vs FM NFE 24 22.9; FM class accuracy at NFE 32 84.9 %
    # over 3 draws); lr 1e-3, slower machine: 14.3 / ~88 min. ema_rampup: the full preset's 0.025 is FM's
    # best measured average (0.05 gave FM 84.5 % over 10 draws, 0.08 83.6 %, docs/RESULTS.md §12d).
    "quick": ImagesPreset(
        "<= 15 min on 2 idle cores: a 2-layer 96-wide GM-DiT (patch 4) on Fashion-MNIST 32x32, 2000 steps",
        data="fmnist32", steps=2000, batch_size=64, trunk=QUICK_TRUNK, nfes=(2, 4, 8, 16), n_eval=500,
        headline=(4, 8), lr=1e-2,
    ),
    "full": ImagesPreset(
        "<= 90 min on 2 idle cores: a 6-layer 64-wide GM-DiT (patch 4) on Fashion-MNIST 32x32, 8000 steps",
        data="fmnist32", steps=8000, batch_size=64, trunk=FULL_TRUNK, nfes=(2, 4, 6, 8, 16, 24, 32),
        n_eval=1000, headline=(6, 24), warmup_steps=500, lr=5e-3, ema_rampup=0.025,
    ),
    # Seconds-long end-to-end run for tests (not meaningful as a benchmark).
    "smoke": ImagesPreset(
        "smoke test: a one-layer GM-DiT on 8x8 digits, a few steps",
        data="digits8", steps=4, batch_size=16, trunk=SMOKE_TRUNK, nfes=(2, 4), n_eval=100, headline=(2, 4),
        draws=2, warmup_steps=1, components=4, classifier_epochs=1,
    ),
}  # fmt: skip


def model_configs(
    pr: Any, out: Path, seed: int, *, sets: Sequence[str] = (), root: str = "models"
) -> dict[str, Any]:
    """The two runs: ``gmflow`` (GM head, K components) and ``fm`` (velocity twin), same trunk/recipe.

    ``pr`` has the fields ``data, trunk, components, steps, batch_size, lr, warmup_steps, ema_rampup``
    (e.g. an :class:`ImagesPreset`); ``sets`` are further ``--set`` overrides of both runs, which live in
    ``out / root / {gmflow,fm}``.
    """
    ema = [] if pr.ema_rampup is None else [f"loop.ema_rampup={pr.ema_rampup}"]
    common = [
        f"data.name={pr.data}", *pr.trunk, f"model.num_components={pr.components}",
        f"loop.steps={pr.steps}", f"loop.batch_size={pr.batch_size}", f"loop.lr={pr.lr}",
        f"loop.warmup_steps={pr.warmup_steps}", *ema, f"loop.seed={seed}", "loop.ckpt_every=500",
        "loop.log_every=50", *sets,
    ]  # fmt: skip
    return {
        name: apply_sets(get_preset(preset), [*common, f"loop.out_dir={out / root / name}"])
        for name, preset in (("fm", "fmnist-fm"), ("gmflow", "fmnist-gmdit"))
    }


def pinned(pr: ImagesPreset, trunk: tuple[str, ...] | None, lr: float | None) -> ImagesPreset:
    """``pr`` with the trunk and learning rate a part's preset pins (None: ``pr``'s own); parts whose
    measured numbers rest on an earlier main recipe keep it this way."""
    return replace(pr, trunk=trunk or pr.trunk, lr=lr or pr.lr)


def guidance_for(
    kind: str, scale: float | None, orthogonal: float | None
) -> CFG | ProbabilisticGuidance | None:
    """``"cfg"`` -> :class:`~gmflow.CFG` ``w``, ``"probabilistic"`` -> :class:`~gmflow.ProbabilisticGuidance`
    ``w~`` (both with projection weight ``orthogonal``); ``"none"`` -> no guidance."""
    if kind == "cfg":
        return CFG(scale, orthogonal=orthogonal)
    if kind == "probabilistic":
        return ProbabilisticGuidance(scale, orthogonal=orthogonal)
    return None


def class_sample(
    model, noise: Tensor, labels: Tensor, num_classes: int, *, guidance, **solver: Any
) -> Tensor:
    """Samples of the classes ``labels`` from ``noise``; a guided call's unconditional half uses the
    null class ``num_classes`` (one doubled batch). ``solver``: keywords of :func:`gmflow.sample`."""
    uncond = {"class_labels": torch.full_like(labels, num_classes)}
    return sample(model, noise, cond={"class_labels": labels}, uncond=uncond, guidance=guidance, **solver)


@dataclass(frozen=True, eq=False)
class Scorer:
    """Scores ``(N, C, H, W)`` sample sets against one reference set (the test split)."""

    classifier: ImageClassifier
    reference: Tensor
    features: Tensor  # classifier features of the reference (M, F)
    radii: Tensor  # their k-NN radii (M,), k = 3 (precision)
    pixels: PixelStats  # saturation statistics of the reference
    num_classes: int

    @property
    def classifier_id(self) -> str | None:
        """The classifier's cache entry (its name holds the training hash); ``None`` if not cached."""
        path = getattr(self.classifier, "cache_path", None)
        return None if path is None else Path(path).name

    def __call__(
        self, x: Tensor, labels: Tensor | None = None, *, saturation: bool = False
    ) -> dict[str, Any]:
        """``fd, precision, recall, classifier_score`` (+ ``class_acc`` given ``labels``), ``nonfinite``
        and, when ``saturation``, the saturation measures of the finite samples before clipping.

        Non-finite values are replaced (NaN -> 0, +-Inf -> +-1) for the classifier metrics only.
        """
        finite = torch.isfinite(x.flatten(1)).all(1)
        clean = torch.nan_to_num(x, 0.0, 1.0, -1.0)
        m = image_metrics(
            clean, self.reference, self.classifier, labels=labels, reference_features=self.features,
            reference_radii=self.radii,
        )  # fmt: skip
        keys = ("fd", "precision", "recall", "classifier_score", "class_acc")
        out: dict[str, Any] = {k: m[k] for k in keys if k in m}
        out["nonfinite"] = int((~finite).sum())
        if saturation and bool(finite.any()):
            sat = saturation_metrics(x[finite], self.pixels)
            out.update({k: v for k, v in sat.items() if not k.startswith("ref_")})
        return out


def make_scorer(data: str, classifier_epochs: int | None = None, **train: Any) -> Scorer:
    """The :class:`Scorer` of data set ``data`` against its test split (classifier cached by hash).

    ``classifier_epochs`` (``None``: the recipe's) and ``train`` (e.g. ``limit=256``) override the
    classifier's training options; with none the classifier is the one every benchmark shares.
    """
    test = load_dataset(data, "test")
    kw = {**({} if classifier_epochs is None else {"epochs": classifier_epochs}), **train}
    clf = get_classifier(data, **kw)  # trained once, cached (GMFLOW_CACHE, ~/.cache/gmflow)
    reference = test.tensor()
    feats = clf.features_and_logits(reference)[0]
    radii = knn_radii(feats, 3)
    return Scorer(clf, reference, feats, radii, pixel_stats(reference), int(test.num_classes))


def step_parts(cfgs: dict[Any, Any]) -> dict[Any, tuple]:
    """``{key: (model, optimizer, objective, batch_fn)}`` of each image config, for
    :func:`~gmflow.bench.common.interleaved_step_ms` (fresh models seeded 0, labelled batches)."""
    parts = {}
    for key, cfg in cfgs.items():
        data = cfg.dataset("train")
        torch.manual_seed(0)
        model = cfg.build_model(data)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def batch(i: int, g: torch.Generator, data=data, n=cfg.loop.batch_size):
            return data.sample(n, generator=g, return_labels=True)

        parts[key] = (model, opt, flow_objective(cfg.loss, null_label=data.num_classes), batch)
    return parts


def grid_noise(n: int, event: Sequence[int], seed: int) -> tuple[Tensor, torch.Generator]:
    """The noise ``(n, *event)`` of a run's sample grids (seed ``seed + 11``) and the solver's generator
    (seed ``seed + 12``): every grid of a run starts from the same noise."""
    noise = torch.randn(n, *event, generator=torch.Generator().manual_seed(seed + 11))
    return noise, torch.Generator().manual_seed(seed + 12)


def save_grid(x: Tensor, path: Path, nrow: int) -> Path:
    """Samples ``x (N, C, H, W)`` as a PNG grid, ``nrow`` per row (non-finite -> 0, clipped to [-1, 1])."""
    return image_grid(torch.nan_to_num(x, 0.0).clamp(-1, 1), path, nrow=nrow)


def mean_sd(v: Sequence[float]) -> str:
    """``"m ± sd"`` of the draws ``v`` (just ``"m"`` for one draw, ``"n/a"`` for none), two decimals."""
    if not v:
        return "n/a"
    return f"{statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def write_report(out: Path, tag: str, meta: dict[str, Any], text: str, figs: Sequence[Path]) -> None:
    """Write ``meta.json`` and ``results.md`` into ``out`` (atomically) and list what was written."""
    atomic_write_json(out / "meta.json", meta)
    atomic_write_text(out / "results.md", text)
    print(f"[{tag}] wrote {out / 'results.md'} and")
    for f in figs:
        print(f"  {f}")
