"""SpectrumMLP: a log power spectrum from a step's Gaussian surrogate (GMFlow App. A.3).

Maths: docs/maths/spectral.md §4.

Layout, parameter names and config keys are those of the official spectrum net, so its checkpoint
folders (``spectrum_net/`` of an official pipeline) load with strict keys. For a surrogate
``N(m, v)`` of an x0-GM on ``(C, H, W)`` images (``m (B, C, H, W)``; ``v (B, 1, H, W)`` per pixel or
``(B, 1, 1, 1)`` per sample) and ``base_size = (C, Hb, Wb)``::

    f_1 = mean_{h,w} v                                  mean surrogate variance            (B,)
    f_2 = mean_c Var_{h,w}(m_c)                         unbiased spatial variance (/(HW-1)) (B,)
    y   = mlp([f_1, f_2])                               Linear(2, l_1) SiLU ... SiLU Linear(l_L, C Hb Wb)
    y   -> (B, C, Hb, Wb) -> keep the frequencies of an H x W grid:  rows  0..ceil(H/2)-1 and
           Hb-floor(H/2)..Hb-1, columns likewise (the same signed integer frequencies k, -k)
    lps = log_softmax over the H W frequencies of each channel + log(H W)          (B, C, H, W)

so ``mean_{h,w} exp(lps) = 1`` per channel: a flat spectrum (``lps = 0``) is white unit-variance
noise. Frequency ``(i, j)`` of ``lps`` is the real (Hartley) coefficient of the same index in
:func:`gmflow.spectral.hartley_to_field`; channel ``c`` belongs to the ``c``-th principal axis of the
GM (:func:`gmflow.kr.principal_axes`), not to image channel ``c``.

``base_size`` fixes ``C`` and the largest image: any ``H <= Hb``, ``W <= Wb`` (``H W >= 2``) works,
by cropping the base grid to the signed frequencies ``|k| <= H/2`` (set ``base_size`` to the data's
``(C, H, W)`` to use every output). The net does not see ``t``; the surrogate's spread carries it.
Init (official): Xavier-uniform weights, zero biases, last Linear zero, i.e. a flat spectrum.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .dit_blocks import xavier_
from .heads import _at_least_fp32
from .pretrained import (
    PretrainedMixin,
    write_folder,
)

__all__ = ["SpectrumMLP", "SPECTRUM_CLASS_NAME", "crop_frequencies"]

SPECTRUM_CLASS_NAME = "_SpectrumMLP"
_DEFAULTS: dict[str, Any] = dict(base_size=[4, 32, 32], layers=[64, 8])  # the paper's ImageNet net


def _int_list(cfg: dict[str, Any], key: str, length: int | None) -> list[int]:
    v = cfg[key]
    ok = isinstance(v, (list, tuple)) and (length is None or len(v) == length) and len(v) > 0
    ok = ok and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in v)
    if not ok:
        what = f"{length} ints >= 1" if length is not None else "a non-empty list of ints >= 1"
        raise ValueError(f"{key} must be {what}, got {v!r}")
    return [int(n) for n in v]


def crop_frequencies(spec: Tensor, size: tuple[int, int]) -> Tensor:
    """Keep the signed frequencies of an ``size = (H, W)`` grid from a ``(..., Hb, Wb)`` spectrum.

    Rows ``0..ceil(H/2)-1`` (frequencies ``0..ceil(H/2)-1``) and the last ``floor(H/2)`` rows
    (frequencies ``-floor(H/2)..-1``), columns likewise; the identity when ``size`` is the base size.
    """
    h, w = size
    hb, wb = spec.shape[-2:]
    if not (1 <= h <= hb and 1 <= w <= wb):
        raise ValueError(f"size must be at most the base grid {(hb, wb)}, got {(h, w)}")
    rows = list(range((h + 1) // 2)) + list(range(hb - h // 2, hb))
    cols = list(range((w + 1) // 2)) + list(range(wb - w // 2, wb))
    idx_r = torch.tensor(rows, device=spec.device)
    idx_c = torch.tensor(cols, device=spec.device)
    return spec.index_select(-2, idx_r).index_select(-1, idx_c)


class SpectrumMLP(PretrainedMixin, nn.Module):
    """Spectrum net of spectral GM sampling; equations in the module docstring.

    Keyword arguments are the official config keys: ``base_size = [C, Hb, Wb]`` and ``layers`` (hidden
    widths). Call: ``net(mean (B, C, H, W), var (B, 1, H, W) or (B, 1, 1, 1)) -> lps (B, C, H, W)``,
    at least float32.
    """

    pipeline_subfolder = "spectrum_net"

    def __init__(self, **config: Any) -> None:
        super().__init__()
        unknown = sorted(set(config) - set(_DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown SpectrumMLP config keys: {', '.join(unknown)} (expected {', '.join(_DEFAULTS)})"
            )
        cfg = {**_DEFAULTS, **config}
        cfg = {"base_size": _int_list(cfg, "base_size", 3), "layers": _int_list(cfg, "layers", None)}
        self._config = cfg
        self.base_size = tuple(cfg["base_size"])
        widths = [2, *cfg["layers"]]
        mods: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            mods += [nn.Linear(a, b), nn.SiLU()]
        mods.append(nn.Linear(widths[-1], math.prod(self.base_size)))
        self.mlp = nn.Sequential(*mods)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights, zero biases, zero last layer (the spectrum starts flat)."""
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                xavier_(m)
        nn.init.zeros_(self.mlp[-1].weight)

    @property
    def channels(self) -> int:
        return self.base_size[0]

    # ----------------------------------------------------------------------------------- config
    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: ``SpectrumMLP(**net.config)`` rebuilds the net."""
        return {k: list(v) for k, v in self._config.items()}

    # ----------------------------------------------------------------------------------- folders
    def save_pretrained(self, path: str | os.PathLike, *, variant: str | None = None) -> Path:
        """Write ``config.json`` (with the official ``_class_name``) + the weights atomically to ``path``."""
        cfg = {**self.config, "_class_name": SPECTRUM_CLASS_NAME}
        return write_folder(path, cfg, self.state_dict(), variant)

    # ----------------------------------------------------------------------------------- forward
    def _check(self, mean: Tensor, var: Tensor) -> None:
        for name, x in (("mean", mean), ("var", var)):
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point torch.Tensor")
        c, hb, wb = self.base_size
        if mean.dim() != 4 or mean.shape[1] != c:
            raise ValueError(
                f"mean must have shape (B, {c}, H, W) for base_size {self.base_size}, got {tuple(mean.shape)}"
            )
        b, _, h, w = mean.shape
        if h > hb or w > wb or h * w < 2:
            raise ValueError(
                f"mean's image size {(h, w)} must have H <= {hb}, W <= {wb} (base_size {self.base_size}) "
                "and at least 2 pixels"
            )
        if tuple(var.shape) not in ((b, 1, h, w), (b, 1, 1, 1)):
            raise ValueError(f"var must have shape {(b, 1, h, w)} or {(b, 1, 1, 1)}, got {tuple(var.shape)}")

    def features(self, mean: Tensor, var: Tensor) -> Tensor:
        """``[mean_{h,w} v, mean_c Var_{h,w}(m_c)]`` ``(B, 2)`` in at least float32 (unbiased variance)."""
        self._check(mean, var)
        m, v = _at_least_fp32(mean), _at_least_fp32(var)
        f1 = v.flatten(1).mean(1)
        f2 = m.flatten(2).var(dim=-1).mean(1)
        return torch.stack([f1, f2], dim=-1)

    def forward(self, mean: Tensor, var: Tensor) -> Tensor:
        """Log power spectrum ``(B, C, H, W)`` of the surrogate ``N(mean, var)``; mean power 1 per channel."""
        feats = self.features(mean, var)
        w = self.mlp[0].weight
        with torch.autocast(device_type=w.device.type, enabled=False):
            y = _at_least_fp32(self.mlp(feats.to(w.dtype)))
        y = crop_frequencies(y.reshape(-1, *self.base_size), tuple(mean.shape[-2:]))
        hw = y.shape[-2] * y.shape[-1]
        lps = torch.log_softmax(y.flatten(2), dim=-1) + math.log(hw)
        return lps.reshape(y.shape)

    def extra_repr(self) -> str:
        return f"base_size={list(self.base_size)}, layers={self._config['layers']}"
