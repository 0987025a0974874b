"""Image benchmark, part ``nll``: GMFlow Table 3 (bits/dim vs K, K = 16 + spectral) on Fashion-MNIST.

    gmflow bench images --part nll --preset quick --out runs/images-quick   # run again to resume

Trains class-conditional GM-DiTs with K in {1, 2, 4, 8, 16} on the trunk (quick: the 4-layer 64-wide
one it was measured on), data and recipe of the ``gmflow bench images`` preset of the same name
(transition loss lambda = 0.5, logit-normal t, label dropout 0.1, EMA; a shorter budget, so that five
models fit), the K = 16 model with a spectrum net (``model.spectral=true``). Its trunk is trained
exactly as without the spectrum net (the spectral loss never reaches it, docs/maths/spectral.md §6),
so it gives both the ``K = 16`` row (its GM) and the ``K = 16 + spectral`` row (its spectral density,
Eq. 19) from the same draws. Reports

* bits/dim of the **test** split by Eq. 21 (:func:`gmflow.metrics.bits_per_dim`; t ~ U(0, 1) in
  ``num_t`` stratified draws, the true labels, uniformly dequantised 8-bit levels,
  docs/maths/evaluation.md §10), with standard errors;
* FD, precision / recall and class accuracy (test split, the cached classifier's features;
  :class:`~gmflow.bench.images_setup.Scorer`) of GM-SDE 2 at NFE ``nfe`` of the spectral model, with
  and without spectral sampling, over ``draws`` noise draws (the same noise for both);
* the spectrum the net learned against its target (the power of the KR-whitened test images, what
  the spectral loss fits) and the data's own power spectrum, radially averaged, at a few ``t``.

Writes to ``DIR/nll/``: ``results.json`` (one record per cell; re-running skips the scored cells and
the trained models), ``results.md``, ``bpd_vs_k.png`` and ``spectrum.png``; the five runs live in
``DIR/nll/models/k<K>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import apply_sets
from ..experiments import get_preset, load_network, run_experiment
from ..io import atomic_write_json
from ..metrics import bits_per_dim
from ..sampling import sample
from ..viz import metric_curves
from . import images_setup
from .common import interleaved_step_ms, start_run
from .images_nll_report import radial_spectra, results_markdown, spectrum_figure

__all__ = ["NLL_PRESETS", "NllPreset", "estimate", "model_configs", "run"]


@dataclass(frozen=True)
class NllPreset:
    """Budget and evaluation of the K sweep; data, batch, warm-up and (unless ``trunk`` / ``lr`` are set)
    trunk and lr come from the ``gmflow bench images`` preset ``base``."""

    description: str
    base: str
    steps: int
    n_test: int  # test images for bits/dim
    n_eval: int  # samples per FD cell
    components: tuple[int, ...] = (1, 2, 4, 8, 16)  # the last one is trained with a spectrum net
    num_t: int = 4
    nfe: int = 8
    draws: int = 3
    spectrum_t: tuple[float, ...] = (0.2, 0.5, 0.8)
    n_spectrum: int = 256
    trunk: tuple[str, ...] | None = None  # --set overrides of the trunk; None: the base preset's
    lr: float | None = None  # None: the base preset's


NLL_PRESETS: dict[str, NllPreset] = {
    # Budgets from `estimate` (a few measured steps per model) on a loaded machine, scaled to an idle
    # one by a toy-step calibration; the estimates scattered by +-40 % (docs/RESULTS.md). Measured: quick
    # 9.2 min idle (§11); full not run yet.
    "quick": NllPreset(
        "<= 15 min on 2 idle cores (estimated 12-14): a 4-layer 64-wide trunk (patch 4) on"
        " Fashion-MNIST 32x32, five models x 450 steps", base="quick", steps=450, n_test=2000, n_eval=500,
        trunk=images_setup.NARROW_TRUNK, lr=1e-3,  # measured with them (docs/RESULTS.md §12c, §12d)
    ),
    "full": NllPreset(
        "<= 90 min on 2 idle cores (estimated 45-86): the full trunk (6 layers, 64 wide, patch 4) on"
        " Fashion-MNIST 32x32, five models x 500 steps", base="full", steps=500, n_test=2000, n_eval=500,
    ),
    # Seconds-long end-to-end run for tests (not meaningful as a benchmark).
    "smoke": NllPreset(
        "smoke test: one-layer GM-DiTs on 8x8 digits, a few steps", base="smoke", steps=4, n_test=64,
        n_eval=100, num_t=2, nfe=4, draws=2, spectrum_t=(0.5,), n_spectrum=32,
    ),
}  # fmt: skip


def model_configs(pr: NllPreset, base: Any, out: Path, seed: int) -> dict[int, Any]:
    """``{K: ImagesConfig}``: GM-DiTs on ``base``'s trunk and recipe, the largest K with a spectrum net."""
    common = [
        f"data.name={base.data}", *base.trunk, f"loop.steps={pr.steps}", f"loop.batch_size={base.batch_size}",
        f"loop.lr={base.lr}", f"loop.warmup_steps={min(base.warmup_steps, pr.steps // 4 or 1)}",
        f"loop.seed={seed}", "loop.ckpt_every=500", "loop.log_every=50",
    ]  # fmt: skip
    top = max(pr.components)
    return {
        k: apply_sets(
            get_preset("fmnist-gmdit"),
            [
                *common,
                f"model.num_components={k}",
                f"model.spectral={str(k == top).lower()}",
                f"loop.out_dir={out / 'models' / f'k{k}'}",
            ],
        )  # fmt: skip
        for k in pr.components
    }


def estimate(pr: NllPreset, cfgs: dict[int, Any], steps: int = 3) -> dict[str, float]:
    """Seconds the preset needs, extrapolated from a few measured training steps and evaluations.

    Training: interleaved step medians of every model x ``pr.steps``; bits/dim: one call on 32 test
    images (``num_t = 1``) per model, scaled to ``n_test x num_t``; FD: GM-SDE 2 on 16 samples with
    and without spectral sampling, scaled to ``n_eval x draws``. Excludes the one-off classifier
    training (cached afterwards) and start-up.
    """
    parts = images_setup.step_parts({f"k{k}": cfg for k, cfg in cfgs.items()})
    nets = {k: parts[f"k{k}"][0].eval() for k in cfgs}
    ms = interleaved_step_ms(parts, steps, warmup=1)
    test = next(iter(cfgs.values())).dataset("test")
    x0, y = test.tensor()[:32], test.labels()[:32]
    bpd_s = 0.0
    for model in nets.values():
        t0 = time.perf_counter()
        bits_per_dim(model, x0, cond={"class_labels": y}, num_t=1, progress=False)
        bpd_s += (time.perf_counter() - t0) * pr.n_test * pr.num_t / len(x0)
    spec = nets[max(nets)]
    fd_s = 0.0
    for spectral in (False, True):
        t0 = time.perf_counter()
        sample(spec, torch.randn(16, *x0.shape[1:]), solver="gm-sde", nfe=pr.nfe, order=2, spectral=spectral,
               cond={"class_labels": y[:16]}, generator=torch.Generator().manual_seed(0))  # fmt: skip
        fd_s += (time.perf_counter() - t0) * pr.n_eval * pr.draws / 16
    train_s = pr.steps * sum(ms.values()) / 1e3
    return {"train_s": train_s, "bpd_s": bpd_s, "fd_s": fd_s, "total_s": train_s + bpd_s + fd_s,
            **{f"step_ms_{name}": v for name, v in ms.items()}}  # fmt: skip


def _bpd_records(pr, models, test, seed, records, out, progress) -> None:
    """One record per K (GM and, for the spectral model, its spectral density) not yet in ``records``."""
    done = {r["K"] for r in records if r["part"] == "bpd"}
    n = min(pr.n_test, len(test))
    x0, y = test.tensor()[:n], test.labels()[:n]
    for k in [k for k in pr.components if k not in done]:
        t0 = time.perf_counter()
        res = bits_per_dim(
            models[k], x0, cond={"class_labels": y}, num_t=pr.num_t, bin_width=test.bin_width,
            dequantize=True, generator=torch.Generator().manual_seed(seed * 1000003 + 7), progress=progress,
        )  # fmt: skip
        records.append({"part": "bpd", "K": k, **res.to_dict(), "seconds": time.perf_counter() - t0})
        atomic_write_json(out / "results.json", records)


def _fd_records(pr, model, k, scorer, seed, records, out, progress) -> None:
    """GM-SDE 2 at NFE ``pr.nfe`` with / without spectral sampling, ``pr.draws`` noise draws (paired)."""
    done = {(r["spectral"], r["draw"]) for r in records if r["part"] == "fd"}
    labels = torch.arange(pr.n_eval) % scorer.num_classes
    reference = scorer.reference
    todo = [(s, d) for d in range(pr.draws) for s in (False, True) if (s, d) not in done]
    for spectral, draw in tqdm(todo, desc="fd", disable=None if progress else True):
        g = torch.Generator().manual_seed(seed * 1000003 + draw)
        noise = torch.randn(pr.n_eval, *reference.shape[1:], generator=g)
        t0 = time.perf_counter()
        x = sample(model, noise, solver="gm-sde", nfe=pr.nfe, order=2, spectral=spectral, generator=g,
                   cond={"class_labels": labels})  # fmt: skip
        ms = (time.perf_counter() - t0) * 1e3
        records.append(dict(
            part="fd", K=k, solver="gm-sde", order=2, nfe=pr.nfe, spectral=spectral, draw=draw,
            **scorer(x, labels), ms=ms,
        ))  # fmt: skip
        atomic_write_json(out / "results.json", records)


def run(args: argparse.Namespace) -> int:
    """``gmflow bench images --part nll`` (trunk and recipe of :data:`~gmflow.bench.images_setup.PRESETS`)."""
    pr, _, root = start_run(args, "images", NLL_PRESETS)
    base = images_setup.PRESETS[pr.base]
    base = images_setup.pinned(base, pr.trunk, pr.lr)
    out = root / "nll"
    out.mkdir(exist_ok=True)
    progress = not args.no_progress
    t_start = time.perf_counter()
    print(f"[bench images nll] preset {args.preset}: {pr.description}")
    cfgs = model_configs(pr, base, out, args.seed)
    est = estimate(pr, cfgs, steps=3 if args.preset != "smoke" else 1)
    print(
        f"[bench images nll] estimate on this machine now: training {est['train_s'] / 60:.1f} min, bits/dim "
        f"{est['bpd_s'] / 60:.1f} min, FD {est['fd_s'] / 60:.1f} min (total {est['total_s'] / 60:.1f} min)"
    )
    models = {}
    for k, cfg in cfgs.items():
        what = f"K={k}{' + spectral' if cfg.model.spectral else ''}"
        print(f"[bench images nll] training {what}: {pr.steps} steps")
        run_experiment(cfg, progress=progress, verbose=True)
        models[k] = load_network(cfg.loop.out_dir)
    test = cfgs[pr.components[0]].dataset("test")
    prev = out / "results.json"
    records = json.loads(prev.read_text()) if prev.is_file() else []
    _bpd_records(pr, models, test, args.seed, records, out, progress)
    scorer = images_setup.make_scorer(base.data, base.classifier_epochs)  # the classifier is cached
    top = max(pr.components)
    reference = scorer.reference
    _fd_records(pr, models[top], top, scorer, args.seed, records, out, progress)
    n = min(pr.n_spectrum, len(test))
    spectra = radial_spectra(models[top], reference[:n], test.labels()[:n], pr.spectrum_t,
                             torch.Generator().manual_seed(args.seed + 5))  # fmt: skip
    bpd_rows = [r for r in records if r["part"] == "bpd"]
    curve = [{"K": r["K"], "bpd": r["bpd"], "density": "GM"} for r in bpd_rows]
    curve += [{"K": r["K"], "bpd": r["bpd_spectral"], "density": "GM + spectral"} for r in bpd_rows
              if r["bpd_spectral"] is not None]  # fmt: skip
    figs = [
        metric_curves(curve, out / "bpd_vs_k.png", metric="bpd", x="K", group_keys=("density",), logy=False,
                      title=f"{base.data}: test bits/dim vs K (Eq. 21)"),
        spectrum_figure(spectra, out / "spectrum.png", title=f"{base.data}: spectrum net, K={top}"),
    ]  # fmt: skip
    minutes = (time.perf_counter() - t_start) / 60
    text = results_markdown(records, spectra, pr, args.preset, est, minutes)
    for line in text.splitlines():
        if line.startswith("- "):
            print(f"[bench images nll] {line[2:]}")
    meta = {"preset": args.preset, "seed": args.seed, "estimate": est, "config": dataclasses.asdict(pr),
            "spectra": spectra}  # fmt: skip
    images_setup.write_report(out, "bench images nll", meta, text, figs)
    return 0
