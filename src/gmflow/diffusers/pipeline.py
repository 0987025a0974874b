"""``GMDiTPipeline``: class-conditional GM-DiT sampling as a diffusers ``DiffusionPipeline``.

Per step ``i`` of the scheduler (GMFlow §3; docs/maths/solvers.md, docs/maths/guidance.md)::

    gm_c, gm_u = transformer([x; x], t_i, [y; null])          one batched call (gm_u only when guided)
    q = probabilistic_guidance(gm_c -> x0, mean(gm_u -> x0), w~, orthogonal)       GMFlow Eq. 8 (w~ > 0)
    x = scheduler.step(q, timestep_i, x)                      GM-ODE / GM-SDE, order 1 or 2

then ``images = VAE.decode(x / scaling_factor)`` (no VAE: ``x`` are the pixels in [-1, 1]), mapped to
[0, 1]. The model calls, guidance and GM maths are those of :func:`gmflow.sample` (the same
:class:`~gmflow.sampling.evaluator.Evaluator` and solvers). The transformer may be bf16; latents and
all GM maths stay float32. The null class is the transformer's (``num_classes``), not a fixed 1000.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..guidance import ProbabilisticGuidance
from ..nn import GMDiT, SpectrumMLP
from ..pretrained import label_ids, label_names, load, parse_id2label, save
from ..pretrained.folder import check_weights
from ..sampling.evaluator import Evaluator
from .schedulers import GMFlowODEScheduler, GMFlowScheduler, GMFlowSDEScheduler

__all__ = ["GMDiTPipeline", "OUTPUT_TYPES"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_SCHEDULERS = {"ode": GMFlowODEScheduler, "sde": GMFlowSDEScheduler}


class GMDiTPipeline(DiffusionPipeline):
    """Class-conditional GM-DiT pipeline (official layout and call), on gmflow's solvers.

    Components: ``transformer`` (:class:`~gmflow.nn.GMDiT`, GM head), ``spectrum_net``
    (:class:`~gmflow.nn.SpectrumMLP`, used by the GM-SDE in ``output_mode="sample"``), ``vae``
    (``AutoencoderKL``), ``scheduler`` (:class:`GMFlowODEScheduler` by default, or
    :class:`GMFlowSDEScheduler`) and ``id2label`` (class id -> comma-separated names).
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["spectrum_net", "vae", "scheduler"]

    def __init__(
        self,
        transformer: GMDiT,
        spectrum_net: SpectrumMLP | None = None,
        vae: AutoencoderKL | None = None,
        scheduler: GMFlowScheduler | None = None,
        id2label: dict[int, str] | dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(transformer, GMDiT) or transformer.head != "gm":
            raise TypeError(
                f"transformer must be a GM-head gmflow.nn.GMDiT, got {type(transformer).__name__}"
            )
        if spectrum_net is not None and not isinstance(spectrum_net, SpectrumMLP):
            raise TypeError(f"spectrum_net must be a SpectrumMLP or None, got {type(spectrum_net).__name__}")
        scheduler = GMFlowODEScheduler() if scheduler is None else scheduler
        self.register_modules(
            transformer=transformer, spectrum_net=spectrum_net, vae=vae, scheduler=scheduler
        )
        self.id2label = parse_id2label(id2label, transformer.num_classes)
        self.labels = label_names(self.id2label)  # name -> id, as diffusers' DiTPipeline

    # ------------------------------------------------------------------ folders
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        variant: str | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> GMDiTPipeline:
        """Load a local pipeline folder (official layout; :func:`gmflow.pretrained.load`).

        Components are found by subfolder; ``torch_dtype`` applies to the transformer and the VAE (the
        spectrum net stays float32); ``variant="bf16"`` reads the ``.bf16.safetensors`` files. Nothing is
        downloaded: pass the path of a folder (e.g. a local copy of ``Lakonik/gmflow_imagenet_k8_ema``).
        """
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{str(pretrained_model_name_or_path)!r} is not a local folder: GMDiTPipeline loads pipeline "
                "folders from disk (copy the released folder locally and pass its path)"
            )
        pm = load(folder, variant=variant, dtype=torch_dtype)
        vae = None
        if pm.vae is not None:
            check_weights(pm.vae, variant)
            vae = AutoencoderKL.from_pretrained(
                pm.vae,
                variant=variant,
                torch_dtype=torch_dtype,
                use_safetensors=True,
                low_cpu_mem_usage=False,
            )
        cfg = pm.scheduler
        scheduler = _SCHEDULERS[cfg.kind](num_train_timesteps=cfg.num_train_timesteps, shift=cfg.shift)
        return cls(pm.transformer, pm.spectrum_net, vae, scheduler, pm.id2label)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        variant: str | None = None,
        safe_serialization: bool = True,
    ) -> Path:
        """Write the folder in the official layout (:func:`gmflow.pretrained.save`); safetensors only."""
        if not safe_serialization:
            raise ValueError("safe_serialization=False is not supported: gmflow writes safetensors only")
        return save(
            self.transformer,
            save_directory,
            spectrum_net=self.spectrum_net,
            scheduler=self._scheduler().schedule,
            id2label=self.id2label,
            vae=self.vae,
            variant=variant,
        )

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of label names (and/or ids) via ``id2label``; ValueError naming an unknown one."""
        return label_ids(label, self.transformer.num_classes, self.id2label)

    def _scheduler(self) -> GMFlowScheduler:
        if not isinstance(self.scheduler, GMFlowScheduler):
            raise TypeError(
                "GMDiTPipeline needs a GMFlowODEScheduler or GMFlowSDEScheduler, got "
                f"{type(self.scheduler).__name__} "
                "(e.g. pipe.scheduler = GMFlowSDEScheduler.from_config(pipe.scheduler.config))"
            )
        return self.scheduler

    # ------------------------------------------------------------------ sampling
    def _set_timesteps(
        self,
        scheduler: GMFlowScheduler,
        steps: int,
        substeps: int | None,
        substep_method: str | None,
        order: int,
        output_mode: str | None,
        device: torch.device,
    ) -> None:
        if isinstance(scheduler, GMFlowSDEScheduler):
            for name, val in (("num_inference_substeps", substeps), ("substep_method", substep_method)):
                if val is not None:
                    raise ValueError(f"{name} applies to GMFlowODEScheduler only")
            mode = "sample" if output_mode is None else output_mode
            net = self.spectrum_net if mode == "sample" else None
            scheduler.set_timesteps(steps, device=device, order=order, output_mode=mode, spectrum_net=net)
        else:
            if output_mode not in (None, "mean"):
                raise ValueError(
                    f"output_mode={output_mode!r} needs GMFlowSDEScheduler; the GM-ODE integrates "
                    "the GM mean (output_mode='mean')"
                )
            scheduler.set_timesteps(
                steps, device=device, order=order, substeps=substeps, substep_method=substep_method
            )

    def decode(self, latents: Tensor, output_type: str = "pil") -> Tensor | np.ndarray | list:
        """Latents ``(B, C, S, S)`` -> images in [0, 1] (``output_type`` as in :meth:`__call__`).

        ``VAE.decode(latents / scaling_factor (+ shift_factor))``; without a VAE the latents are the pixels
        in [-1, 1]. Also for latents sampled with :func:`gmflow.sample` (the core route).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type == "latent":
            return latents
        if self.vae is not None:
            z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            if getattr(self.vae.config, "shift_factor", None) is not None:
                z = z + self.vae.config.shift_factor
            images = self.vae.decode(z).sample
        else:
            images = latents  # a pixel-space model: x0 in [-1, 1]
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        return array if output_type == "np" else self.numpy_to_pil(array)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | Tensor,
        guidance_scale: float = 0.45,
        guidance_orthogonal: float = 1.0,
        num_inference_steps: int = 32,
        num_inference_substeps: int | None = None,
        substep_method: str | None = None,
        order: int = 2,
        output_mode: str | None = None,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per class label.

        Args:
            class_labels: ids in ``[0, num_classes)`` and/or names of ``id2label``.
            guidance_scale: probabilistic-guidance scale ``w~`` in [0, 1) (GMFlow Eq. 8); 0 = no guidance.
            guidance_orthogonal: weight of the orthogonal projection of the guidance direction.
            num_inference_steps: network steps (NFE; a guided step is one batched call).
            num_inference_substeps: GM-ODE sub-steps per step (default: that of ``substep_method``).
            substep_method: GM-ODE sub-step integrator, ``"pc3"`` (default, ``ceil(16 (t - t'))``
                sub-steps), ``"pc2"`` or ``"euler"`` (the official code's, ``ceil(128 / steps)``).
            order: 1 or 2 (second-order GM extrapolation, GMFlow App. A.2).
            output_mode: ``"mean"`` (the GM-ODE's, also accepted by the GM-SDE) or ``"sample"`` (GM-SDE
                only; the default there); ``None``: the scheduler's own.
            generator: a ``torch.Generator`` for the initial noise and the GM-SDE draws.
            latents: initial noise ``(B, C, S, S)`` (default: ``randn`` from ``generator``).
            output_type: ``"pil"``, ``"np"`` (B, H, W, C) or ``"pt"`` (B, C, H, W) images in [0, 1], or
                ``"latent"`` (the sampled latents).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be one torch.Generator or None, got {type(generator).__name__}")
        scheduler = self._scheduler()
        model = self.transformer
        ids = label_ids(class_labels, model.num_classes, self.id2label)
        device = self._execution_device
        y = torch.tensor(ids, dtype=torch.long, device=device)
        shape = (len(ids), *model.event_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif not isinstance(latents, Tensor) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"latents must have shape {shape} for {len(ids)} labels, got {got}")
        x = latents.to(device=device, dtype=torch.float32)
        guidance, uncond = None, None
        if guidance_scale != 0:
            guidance = ProbabilisticGuidance(guidance_scale, guidance_orthogonal)
            uncond = {"class_labels": torch.full_like(y, model.null_class)}
        self._set_timesteps(
            scheduler, num_inference_steps, num_inference_substeps, substep_method, order, output_mode, device
        )
        ev = Evaluator(
            model, torch.float32, cond={"class_labels": y}, uncond=uncond, guidance=guidance,
            solver=scheduler.solver.name,
        )  # fmt: skip
        for i, timestep in enumerate(self.progress_bar(scheduler.timesteps)):
            prediction = ev.x0_gm(x, scheduler.t, i)
            x = scheduler.step(prediction, timestep, x, generator=generator).prev_sample
        images = self.decode(x, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
