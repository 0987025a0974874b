"""Sample a pretrained GM-DiT end to end, from a pipeline folder in the official layout.

    python examples/pretrained_pipeline.py                      # CPU, the repository's random-weight fixture
    python examples/pretrained_pipeline.py --folder /data/gmflow_imagenet_k8_ema --device cuda --bf16 \\
        --labels jay magpie --steps 32                           # a local copy of the released model

Three routes, one figure (``--out/grid.png``, one row each) and a table:

1. core (no diffusers): ``gmflow.pretrained.load`` + ``gmflow.sample`` (GM-ODE 2, probabilistic guidance),
   latents decoded by the folder's VAE;
2. ``GMDiTPipeline`` with ``GMFlowODEScheduler`` (GM-ODE 2, ``num_inference_substeps`` 4): the same images;
3. ``GMDiTPipeline`` with ``GMFlowSDEScheduler`` (GM-SDE 2, spectral sampling with the spectrum net).

It then saves the pipeline with ``save_pretrained``, reloads it and checks that route 2 gives identical
images. The fixture's weights (and its tiny VAE) are random: its 8 x 8 "images" are coloured noise.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import gmflow
from gmflow import pretrained
from gmflow.diffusers import GMDiTPipeline, GMFlowSDEScheduler

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official_gmdit"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", type=Path, default=FIXTURE, help="pipeline folder (default: the fixture)")
    p.add_argument("--labels", nargs="+", default=["class3", "7", "tiny class 1"], help="class ids or names")
    p.add_argument("--steps", type=int, default=8, help="network steps of the GM-ODE (the SDE uses half)")
    p.add_argument("--guidance", type=float, default=0.45, help="probabilistic guidance scale in [0, 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 weights (variant) and transformer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/pretrained_pipeline"))
    return p.parse_args()


def to_pil_row(images: torch.Tensor, scale: int) -> Image.Image:
    """(B, C, H, W) in [0, 1] -> one PIL row, nearest-upscaled by ``scale``."""
    b, c, h, w = images.shape
    row = images.permute(2, 0, 3, 1).reshape(h, b * w, c).mul(255).round().byte().cpu().numpy()
    img = Image.fromarray(row.squeeze(-1) if c == 1 else row)
    return img.resize((b * w * scale, h * scale), Image.NEAREST)


def main() -> None:
    a = parse_args()
    labels = [int(s) if s.isdigit() else s for s in a.labels]
    variant, dtype = ("bf16", torch.bfloat16) if a.bf16 else (None, torch.float32)
    rows, table = [], []

    # 1. core: load + gmflow.sample, decode with the VAE of the diffusers pipeline below
    pm = pretrained.load(a.folder, variant=variant, device=a.device, dtype=dtype)
    y = torch.tensor(pm.label_ids(labels), device=a.device)
    g = torch.Generator(a.device).manual_seed(a.seed)
    noise = torch.randn(len(y), *pm.transformer.event_shape, generator=g, device=a.device)
    t0 = time.perf_counter()
    latents = gmflow.sample(
        pm.transformer, noise, solver="gm-ode", nfe=a.steps, order=2, substeps=4,
        cond={"class_labels": y}, uncond={"class_labels": torch.full_like(y, pm.null_class)},
        guidance=gmflow.ProbabilisticGuidance(a.guidance) if a.guidance > 0 else None,
    )  # fmt: skip
    table.append(("core gmflow.sample, GM-ODE 2", a.steps, time.perf_counter() - t0))

    # 2. the diffusers pipeline, GM-ODE 2 on the same noise
    pipe = GMDiTPipeline.from_pretrained(a.folder, variant=variant, torch_dtype=dtype).to(a.device)
    pipe.set_progress_bar_config(disable=True)
    rows.append(pipe.decode(latents, "pt"))
    ode = dict(class_labels=labels, guidance_scale=a.guidance, num_inference_steps=a.steps,
               num_inference_substeps=4, order=2, latents=noise, output_type="pt")  # fmt: skip
    t0 = time.perf_counter()
    rows.append(pipe(**ode).images)
    table.append(("GMDiTPipeline, GMFlowODEScheduler, order 2", a.steps, time.perf_counter() - t0))
    same = torch.equal(pipe(**{**ode, "output_type": "latent"}).images, latents)

    # 3. GM-SDE 2 with spectral sampling (the pipeline's spectrum net), half the steps
    sde = GMDiTPipeline(pipe.transformer, pipe.spectrum_net, pipe.vae,
                        GMFlowSDEScheduler.from_config(pipe.scheduler.config), pipe.id2label)  # fmt: skip
    sde.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    steps = max(1, a.steps // 2)
    g = torch.Generator(a.device).manual_seed(a.seed)
    out = sde(
        labels, guidance_scale=a.guidance, num_inference_steps=steps, order=2, generator=g, output_type="pt"
    )
    rows.append(out.images)
    table.append(("GMDiTPipeline, GMFlowSDEScheduler, order 2, spectral", steps, time.perf_counter() - t0))

    # save_pretrained -> from_pretrained reproduces route 2
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, variant=variant)
        again = GMDiTPipeline.from_pretrained(tmp, variant=variant, torch_dtype=dtype).to(a.device)
        again.set_progress_bar_config(disable=True)
        reloaded = torch.equal(again(**ode).images, rows[1])

    a.out.mkdir(parents=True, exist_ok=True)
    scale = max(1, 128 // rows[0].shape[-1])
    strips = [to_pil_row(r, scale) for r in rows]
    grid = Image.new(strips[0].mode, (strips[0].width, sum(s.height for s in strips)))
    for i, s in enumerate(strips):
        grid.paste(s, (0, i * s.height))
    grid.save(a.out / "grid.png")
    summary = {
        "folder": str(a.folder), "labels": labels, "class_ids": y.tolist(), "device": a.device,
        "bf16": a.bf16, "core_equals_pipeline": same, "save_reload_identical": reloaded,
        "runs": [{"route": r, "nfe": n, "seconds": round(s, 3)} for r, n, s in table],
    }  # fmt: skip
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'route':<56} {'NFE':>4} {'seconds':>8}")
    for r, n, s in table:
        print(f"{r:<56} {n:>4} {s:>8.2f}")
    print(f"core latents == pipeline latents: {same}; save -> reload identical: {reloaded}")
    print(f"rows (core, pipeline ODE, pipeline SDE) -> {a.out / 'grid.png'}")
    if not (same and reloaded):
        raise SystemExit("mismatch between the routes (see above)")


if __name__ == "__main__":
    main()
