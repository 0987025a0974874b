"""GM-DiT pipeline folders in the official layout: :func:`load` and :func:`save`, without diffusers.

Layout (the one the official ``GMDiTPipeline.save_pretrained`` writes, plus ``id2label``)::

    model_index.json        {"_class_name": "GMDiTPipeline", "transformer": [module, class],
                             "spectrum_net": ..., "scheduler": ..., "vae": ...,
                             "id2label": {"0": "tench, Tinca tinca", ...}}
    transformer/            config.json + diffusion_pytorch_model[.<variant>].safetensors     GMDiT
    spectrum_net/           the same (optional)                                              SpectrumMLP
    scheduler/scheduler_config.json                                                          SchedulerConfig
    vae/                    a diffusers AutoencoderKL folder (optional; loaded by gmflow.diffusers)

Components are identified by their subfolder. The ``[module, class]`` entries of ``model_index.json``
are neither imported nor checked (official folders name classes of the official code base, such as
``_GMDiTTransformer2DModel``); an entry only says whether the component is there (``[null, null]``: not
there). Only JSON and safetensors files are read: a folder whose weights are pickles (``.bin``, ``.pt``,
...) is refused, never unpickled. Weights load with strict keys (:func:`gmflow.nn.pretrained.load_strict`).

:func:`save` writes the components first and ``model_index.json`` last, each file atomically, with the
official entries, so that a folder without ``model_index.json`` is one whose save did not finish.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import __version__
from ..io import atomic_write_bytes, atomic_write_json
from ..nn import GMDiT, SpectralDenoiser, SpectrumMLP
from ..nn.pretrained import CONFIG_NAME, weights_name
from .labels import label_ids, parse_id2label
from .scheduler import SCHEDULER_CONFIG_NAME, SchedulerConfig

__all__ = [
    "COMPONENTS",
    "MODEL_INDEX_NAME",
    "Pretrained",
    "check_weights",
    "load",
    "read_model_index",
    "save",
]

MODEL_INDEX_NAME = "model_index.json"
COMPONENTS = ("transformer", "spectrum_net", "scheduler", "vae")
PIPELINE_CLASS_NAME = "GMDiTPipeline"
# the official code base's entries (what its loader imports), written on save
_OFFICIAL_ENTRIES = {
    "transformer": ["lib.models.architecture.gmflow", "_GMDiTTransformer2DModel"],
    "spectrum_net": ["lib.models.architecture.gmflow", "_SpectrumMLP"],
    "ode": ["lib.models.diffusions.schedulers.flow_euler_ode", "FlowEulerODEScheduler"],
    "sde": ["lib.models.diffusions.schedulers", "GMFlowSDEScheduler"],
}
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class SavesPretrained(Protocol):
    """A diffusers model (the VAE): ``save_pretrained(folder, variant=..., safe_serialization=True)``."""

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None: ...


@dataclass
class Pretrained:
    """What :func:`load` returns: the networks, the scheduler config and the class names.

    ``vae`` is the path of the ``vae/`` subfolder (a diffusers ``AutoencoderKL``; ``None`` if the
    pipeline has none): the core package does not need diffusers, :mod:`gmflow.diffusers` loads it.
    """

    transformer: GMDiT
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    spectrum_net: SpectrumMLP | None = None
    id2label: dict[int, str] = field(default_factory=dict)
    vae: Path | None = None

    @property
    def num_classes(self) -> int:
        return self.transformer.num_classes

    @property
    def null_class(self) -> int:
        """The unconditional class id (``num_classes``)."""
        return self.transformer.null_class

    def label_ids(self, labels: Any) -> list[int]:
        """Class ids of ``labels``: ids and/or ``id2label`` names (:func:`gmflow.pretrained.label_ids`)."""
        return label_ids(labels, self.num_classes, self.id2label)


# ---------------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not readable JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_model_index(folder: Path) -> tuple[set[str], Any]:
    """The components present in ``folder/model_index.json`` and its raw ``id2label``."""
    path = folder / MODEL_INDEX_NAME
    if not path.is_file():
        hint = " (a model folder: use GMDiT.from_pretrained)" if (folder / CONFIG_NAME).is_file() else ""
        raise FileNotFoundError(f"no {MODEL_INDEX_NAME} in {str(folder)!r}{hint}")
    index = _read_json(path)
    present = set()
    for key, entry in index.items():
        if key.startswith("_") or key == "id2label":
            continue
        if key not in COMPONENTS:
            raise ValueError(
                f"{str(path)!r}: unknown component {key!r} (a GM-DiT pipeline has {', '.join(COMPONENTS)})"
            )
        if not (isinstance(entry, list) and len(entry) == 2):
            raise ValueError(f"{str(path)!r}: {key!r} must be a [module, class] pair or [null, null]")
        if entry[0] is not None:
            present.add(key)
            if not (folder / key).is_dir():
                raise FileNotFoundError(f"{str(path)!r} lists {key!r} but {str(folder / key)!r} is missing")
    if "transformer" not in present:
        raise ValueError(f"{str(path)!r} has no transformer")
    return present, index.get("id2label")


def check_weights(sub: Path, variant: str | None) -> None:
    """FileNotFoundError / ValueError that say what the subfolder holds instead of the wanted weights."""
    name = weights_name(variant)
    if (sub / name).is_file():
        return
    files = sorted(p.name for p in sub.iterdir() if p.is_file()) if sub.is_dir() else []
    found = [f for f in files if f.endswith(".safetensors")]
    pickles = [f for f in files if f.endswith(_PICKLES)]
    if not found and pickles:
        raise ValueError(
            f"{str(sub)!r} holds only pickled weights ({', '.join(pickles)}); gmflow reads safetensors only "
            "and never unpickles (convert them with safetensors.torch.save_file)"
        )
    hint = ""
    if variant is None and weights_name("bf16") in found:
        hint = "; pass variant='bf16'"
    raise FileNotFoundError(
        f"no {name} in {str(sub)!r} (found: {', '.join(found) or 'no safetensors'}){hint}"
    )


def _component(cls: type, folder: Path, name: str, variant: str | None, device: Any, dtype: Any) -> Any:
    sub = folder / name
    check_weights(sub, variant)
    try:
        return cls.from_pretrained(sub, variant=variant, device=device, dtype=dtype)
    except ValueError as e:
        msg = str(e)  # weight errors name their file; config errors get it prefixed
        raise ValueError(msg if str(sub) in msg else f"{str(sub / CONFIG_NAME)!r}: {msg}") from None


def load(
    folder: str | os.PathLike,
    *,
    variant: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Pretrained:
    """Load a GM-DiT pipeline folder (layout in the module docstring).

    ``variant="bf16"`` reads ``diffusion_pytorch_model.bf16.safetensors`` of every component. The
    transformer is moved to ``device`` and ``dtype`` (default float32; e.g. ``torch.bfloat16`` on a
    GPU); the spectrum net stays float32 (GM maths runs in fp32). No ``scheduler/`` means the default
    :class:`SchedulerConfig` (GM-ODE, 1000, shift 1). Errors name the file and what does not fit.
    """
    folder = Path(folder)
    present, raw_labels = read_model_index(folder)
    transformer = _component(GMDiT, folder, "transformer", variant, device, dtype)
    if transformer.head != "gm":
        raise ValueError(f"{str(folder / 'transformer')!r} holds a velocity GMDiT, not a GM-DiT (head 'gm')")
    spectrum = None
    if "spectrum_net" in present:
        spectrum = _component(SpectrumMLP, folder, "spectrum_net", variant, device, torch.float32)
    scheduler = SchedulerConfig()
    if "scheduler" in present:
        path = folder / "scheduler" / SCHEDULER_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {SCHEDULER_CONFIG_NAME} in {str(folder / 'scheduler')!r}")
        scheduler = SchedulerConfig.from_dict(_read_json(path), where=repr(str(path)))
    where = f"id2label in {str(folder / MODEL_INDEX_NAME)!r}"
    id2label = parse_id2label(raw_labels, transformer.num_classes, where)
    vae = folder / "vae" if "vae" in present else None
    return Pretrained(transformer, scheduler, spectrum, id2label, vae)


# ---------------------------------------------------------------------------------------------- writing
def _copy_vae(src: Path, dst: Path, variant: str | None) -> list[str]:
    """Copy ``config.json`` and the variant's safetensors of a VAE folder; returns its model_index entry."""
    config = _read_json(src / CONFIG_NAME)
    check_weights(src, variant)
    if src.resolve() != dst.resolve():
        for name in (weights_name(variant), CONFIG_NAME):
            atomic_write_bytes(dst / name, (src / name).read_bytes())
    return ["diffusers", str(config.get("_class_name", "AutoencoderKL"))]


def save(
    model: GMDiT | SpectralDenoiser | Pretrained,
    folder: str | os.PathLike,
    *,
    spectrum_net: SpectrumMLP | None = None,
    scheduler: SchedulerConfig | dict[str, Any] | None = None,
    id2label: dict[int, str] | dict[str, str] | None = None,
    vae: str | os.PathLike | SavesPretrained | None = None,
    variant: str | None = None,
) -> Path:
    """Write a GM-DiT pipeline folder that :func:`load` (and the official loader's layout) reads.

    ``model``: a GM-head :class:`~gmflow.nn.GMDiT`, a :class:`~gmflow.nn.SpectralDenoiser` with a GM-DiT
    trunk (a ``model.spectral=true`` run; its spectrum net is the default ``spectrum_net``), or a
    :class:`Pretrained` whose parts are the defaults of the keyword arguments. ``scheduler``: a
    :class:`SchedulerConfig` or a scheduler config dict (default: GM-ODE, 1000, shift 1). ``vae``: a
    VAE folder to copy, or a diffusers model saved with its ``save_pretrained``. ``variant="bf16"`` /
    ``"fp16"`` casts and names every weight file (save twice to have both). Returns the folder.
    """
    if isinstance(model, Pretrained):
        spectrum_net = model.spectrum_net if spectrum_net is None else spectrum_net
        scheduler = model.scheduler if scheduler is None else scheduler
        id2label = model.id2label if id2label is None else id2label
        vae = model.vae if vae is None else vae
        model = model.transformer
    if isinstance(model, SpectralDenoiser):
        spectrum_net = model.spectrum_net if spectrum_net is None else spectrum_net
        model = model.trunk
    if not isinstance(model, GMDiT) or model.head != "gm":
        raise TypeError(f"model must be a GM-head GMDiT or a Pretrained, got {type(model).__name__}")
    if spectrum_net is not None and not isinstance(spectrum_net, SpectrumMLP):
        raise TypeError(f"spectrum_net must be a SpectrumMLP or None, got {type(spectrum_net).__name__}")
    if scheduler is None:
        scheduler = SchedulerConfig()
    elif isinstance(scheduler, dict):
        scheduler = SchedulerConfig.from_dict(scheduler)
    elif not isinstance(scheduler, SchedulerConfig):
        raise TypeError(f"scheduler must be a SchedulerConfig or a dict, got {type(scheduler).__name__}")
    labels = parse_id2label(id2label, model.num_classes)
    folder = Path(folder)

    index: dict[str, Any] = {"_class_name": PIPELINE_CLASS_NAME, "_gmflow_version": __version__}
    model.save_pretrained(folder / "transformer", variant=variant)
    index["transformer"] = _OFFICIAL_ENTRIES["transformer"]
    if spectrum_net is not None:
        spectrum_net.save_pretrained(folder / "spectrum_net", variant=variant)
    index["spectrum_net"] = _OFFICIAL_ENTRIES["spectrum_net"] if spectrum_net is not None else [None, None]
    atomic_write_json(folder / "scheduler" / SCHEDULER_CONFIG_NAME, scheduler.to_dict(), sort_keys=True)
    index["scheduler"] = _OFFICIAL_ENTRIES[scheduler.kind]
    if vae is None:
        index["vae"] = [None, None]
    elif isinstance(vae, (str, os.PathLike)):
        index["vae"] = _copy_vae(Path(vae), folder / "vae", variant)
    elif callable(getattr(vae, "save_pretrained", None)):
        vae.save_pretrained(str(folder / "vae"), variant=variant, safe_serialization=True)
        index["vae"] = [type(vae).__module__.split(".")[0], type(vae).__name__]
    else:
        raise TypeError(
            f"vae must be a folder, a model with save_pretrained, or None, got {type(vae).__name__}"
        )
    index["id2label"] = {str(i): names for i, names in labels.items()}
    atomic_write_json(folder / MODEL_INDEX_NAME, index)
    return folder
