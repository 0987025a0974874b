"""Pretrained GM-DiT pipelines in the official folder layout, without diffusers.

Example::

    import torch, gmflow
    from gmflow import pretrained

    folder = "path/to/gmflow_imagenet_k8_ema"    # a local copy of the released pipeline folder
    pm = pretrained.load(folder, variant="bf16", device="cuda", dtype=torch.bfloat16)
    y = torch.tensor(pm.label_ids(["jay", "magpie"]), device="cuda")
    noise = torch.randn(2, *pm.transformer.event_shape, device="cuda")
    latents = gmflow.sample(
        pm.transformer, noise, solver="gm-ode", nfe=32, order=2, substeps=4, substep_method="euler",
        cond={"class_labels": y}, uncond={"class_labels": torch.full_like(y, pm.null_class)},
        guidance=gmflow.ProbabilisticGuidance(0.45),
    )
    pretrained.save(pm, "my_copy")              # the same layout; bit-identical on reload

Decoding latents with the folder's VAE, schedulers and a ``DiffusionPipeline``: :mod:`gmflow.diffusers`
(``pip install "gmflow[diffusers]"``).
"""

from .folder import COMPONENTS, MODEL_INDEX_NAME, Pretrained, load, read_model_index, save
from .labels import label_ids, label_names, parse_id2label
from .scheduler import (
    SCHEDULER_CLASSES,
    SCHEDULER_CONFIG_NAME,
    SCHEDULER_KEYS,
    SchedulerConfig,
    check_scheduler_keys,
)

__all__ = [
    "COMPONENTS",
    "MODEL_INDEX_NAME",
    "SCHEDULER_CLASSES",
    "SCHEDULER_CONFIG_NAME",
    "SCHEDULER_KEYS",
    "Pretrained",
    "SchedulerConfig",
    "check_scheduler_keys",
    "label_ids",
    "label_names",
    "load",
    "parse_id2label",
    "read_model_index",
    "save",
]
