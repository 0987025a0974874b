"""Diffusers-style model folders: ``config.json`` + ``diffusion_pytorch_model[.<variant>].safetensors``.

Only safetensors files are read (never pickles). Loading is strict: every parameter and persistent
buffer of the model must be in the file with its shape, and the file may hold nothing else. Writing
is atomic per file (:mod:`gmflow.io`): the weights first, then ``config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from ..io import atomic_write_bytes, atomic_write_json

__all__ = [
    "CONFIG_NAME",
    "PretrainedMixin",
    "SAVE_VARIANTS",
    "load_strict",
    "read_config",
    "read_weights",
    "weights_name",
    "write_folder",
]

CONFIG_NAME = "config.json"
SAVE_VARIANTS = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PretrainedMixin:
    """What the folder-backed networks (GM-DiT, SpectrumMLP) share.

    ``device`` / ``dtype`` of the first parameter (as diffusers pipelines ask of their modules), the
    config round trip (``from_config`` ignores metadata keys such as ``_class_name``) and
    :meth:`from_pretrained`. A subclass sets ``pipeline_subfolder``, the folder an official pipeline
    keeps it in, and provides ``config`` and ``save_pretrained``.
    """

    pipeline_subfolder: str

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def to_config(self) -> dict[str, Any]:
        return self.config

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        """Build from a config dict; metadata keys starting with ``_`` (``_class_name``, ...) are ignored."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        return cls(**{k: v for k, v in config.items() if not k.startswith("_")})

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        variant: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ):
        """Load ``path[/subfolder]`` = ``config.json`` + ``diffusion_pytorch_model[.variant].safetensors``.

        Strict keys (ValueError listing missing / unexpected keys and shape mismatches). The weights
        are copied into a float32 model, then moved to ``device`` and ``dtype`` (default: float32).
        Returns the model in eval mode. ``_class_name`` is not checked: a folder is identified by
        its location (an official pipeline keeps the GM-DiT under ``transformer/``).
        """
        folder = Path(path) / subfolder if subfolder else Path(path)
        sub = cls.pipeline_subfolder
        if not (folder / CONFIG_NAME).is_file() and (folder / sub / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} is a pipeline folder, not a model folder; pass subfolder={sub!r}"
            )
        model = cls.from_config(read_config(folder))
        load_strict(model, read_weights(folder, variant), repr(str(folder / weights_name(variant))))
        return model.to(device=device, dtype=dtype).eval()


def weights_name(variant: str | None = None) -> str:
    """``diffusion_pytorch_model.safetensors`` or ``diffusion_pytorch_model.<variant>.safetensors``."""
    if variant is None:
        return "diffusion_pytorch_model.safetensors"
    if not isinstance(variant, str) or not variant or any(ch in variant for ch in "./\\"):
        raise ValueError(f"variant must be a short name such as 'bf16', got {variant!r}")
    return f"diffusion_pytorch_model.{variant}.safetensors"


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``folder/config.json``."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(folder)!r} (expected a model folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")
    return config


def read_weights(
    folder: str | os.PathLike, variant: str | None = None, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Tensors of ``folder/<weights_name(variant)>`` on ``device``, in the file's dtypes."""
    path = Path(folder) / weights_name(variant)
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {str(folder)!r}")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {e}") from None


def _listing(names: list[str], limit: int = 6) -> str:
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_strict(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line ValueError naming what does not fit.

    Values are copied into the model's parameters (cast to their dtype).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    problems = [
        f"{what} [{_listing(names)}]"
        for what, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if names
    ]
    if problems:
        raise ValueError(f"{where} does not fit the {type(model).__name__} config: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def write_folder(
    folder: str | os.PathLike, config: dict[str, Any], state: dict[str, Tensor], variant: str | None = None
) -> Path:
    """Write ``state`` (cast to the variant's dtype) and ``config`` into ``folder``; returns the folder."""
    if variant is not None and variant not in SAVE_VARIANTS:
        raise ValueError(f"variant must be None or one of {tuple(SAVE_VARIANTS)}, got {variant!r}")
    folder = Path(folder)
    dtype = SAVE_VARIANTS.get(variant)
    tensors = {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        tensors[k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
    # one metadata key: safetensors writes multi-key metadata in a random order
    atomic_write_bytes(folder / weights_name(variant), save(tensors, metadata={"format": "pt"}))
    atomic_write_json(folder / CONFIG_NAME, config, sort_keys=True)
    return folder
