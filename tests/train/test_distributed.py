"""DDP: 2 gloo processes under torchrun give the single-process gradient of the same global batch (also
for a model with a spectrum net, whose spectral loss is computed outside DDP's forward), and a
2-process ``gmflow train`` run completes.

This file is also the torchrun worker: ``python -m torch.distributed.run ... test_distributed.py OUT_DIR``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmflow.experiments import Toy2DConfig, get_preset
from gmflow.nn import ToyMLP
from gmflow.train import flow_objective, read_manifest, step_generator

GLOBAL_BATCH = 64
SEED = 3


def _cfg() -> Toy2DConfig:
    return get_preset("toy-smoke").with_sets(
        [f"loop.batch_size={GLOBAL_BATCH}", "loss.time_sampler=logit_normal"]
    )


def _model() -> ToyMLP:
    torch.manual_seed(SEED)
    return ToyMLP(**_cfg().model_kwargs()).double()


def _global_batch() -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2


def _shard(rank: int, world: int) -> torch.Tensor:
    b = GLOBAL_BATCH // world
    return _global_batch()[rank * b : (rank + 1) * b]


def _spectral() -> tuple[torch.nn.Module, object, tuple[torch.Tensor, torch.Tensor]]:
    """The images-smoke-spectral network (fp64), its objective and a fixed global batch of 8."""
    cfg = get_preset("images-smoke-spectral")
    data = cfg.dataset("train")
    torch.manual_seed(SEED)
    model = cfg.build_model(data).double()
    x0, y = data.sample(8, generator=torch.Generator().manual_seed(7), return_labels=True)
    return model, flow_objective(cfg.loss, null_label=data.num_classes), (x0.double(), y)


def _worker(out_dir: str) -> int:
    """Under torchrun: (1) save the DDP gradient of the fixed global batch, (2) run ``gmflow train``
    inside the same process group (``train`` reuses a running group and leaves it to its owner)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gmflow.cli import main
    from gmflow.train import distributed

    out = Path(out_dir)
    with distributed("cpu") as info:
        model = _model()
        net = DDP(model)
        objective = flow_objective(_cfg().loss)
        loss = objective(net, _shard(info.rank, info.world_size), step_generator(SEED, 1, info.rank))
        loss.mean().backward()
        if info.rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters()}, out / "grads.pt")
        spec, objective, (x0, y) = _spectral()
        r, w = info.rank, info.world_size
        shard = (x0[r * 8 // w : (r + 1) * 8 // w], y[r * 8 // w : (r + 1) * 8 // w])
        net = DDP(spec, gradient_as_bucket_view=True)  # as the training loop wraps it
        objective(net, shard, step_generator(SEED, 1, r)).mean().backward()
        if info.rank == 0:
            torch.save({n: p.grad for n, p in spec.named_parameters()}, out / "spectral_grads.pt")
        train = ["train", "--preset", "toy-smoke", "--no-progress"]
        code = main([*train, "--out", str(out / "run"), "--set", "loop.steps=6", "loop.ckpt_every=3"])
        # an odd global batch cannot be split over 2 ranks: one-line error, exit 2, on every rank
        odd = main([*train, "--out", str(out / "odd"), "--set", "loop.batch_size=65"])
        return code if odd == 2 else 1


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, subprocess_env) -> tuple[Path, subprocess.CompletedProcess]:
    d = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        str(d),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=d, env=subprocess_env)
    if res.returncode != 0 and any(
        s in res.stderr for s in ("Address already in use", "RendezvousConnectionError", "Could not resolve")
    ):
        pytest.skip(f"torchrun could not start here: {res.stderr.strip().splitlines()[-1]}")
    return d, res


@pytest.mark.slow
def test_ddp_gradient_equals_single_process_gradient(ddp_run):
    d, res = ddp_run
    assert (d / "grads.pt").is_file(), res.stderr[-3000:]
    ddp_grads = torch.load(d / "grads.pt", weights_only=True)
    model = _model()
    objective = flow_objective(_cfg().loss)
    per = [objective(model, _shard(r, 2), step_generator(SEED, 1, r)) for r in range(2)]
    torch.cat(per).mean().backward()  # one process, the same global batch and noise
    assert set(ddp_grads) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert torch.allclose(ddp_grads[n], p.grad, rtol=1e-6, atol=1e-12), n


@pytest.mark.slow
def test_ddp_gradient_of_a_spectral_model_equals_single_process_gradient(ddp_run):
    d, res = ddp_run
    assert (d / "spectral_grads.pt").is_file(), res.stderr[-3000:]
    ddp_grads = torch.load(d / "spectral_grads.pt", weights_only=True)
    model, objective, (x0, y) = _spectral()
    per = [objective(model, (x0[r * 4 : (r + 1) * 4], y[r * 4 : (r + 1) * 4]), step_generator(SEED, 1, r))
           for r in range(2)]  # fmt: skip
    torch.cat(per).mean().backward()
    assert set(ddp_grads) == {n for n, _ in model.named_parameters()}
    assert any(n.startswith("spectrum_net.") and float(g.abs().max()) > 0 for n, g in ddp_grads.items())
    for n, p in model.named_parameters():  # the spectrum net's gradients are averaged like the trunk's
        assert torch.allclose(ddp_grads[n], p.grad, rtol=1e-6, atol=1e-12), n


@pytest.mark.slow
def test_two_process_gmflow_train(ddp_run):
    d, res = ddp_run
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_manifest(d / "run")["step"] == 6
    state = torch.load(d / "run" / "state.pt", weights_only=True)
    assert state["world_size"] == 2
    assert res.stderr.count("trained to step 6") == 1  # rank 0 reports once
    assert res.stderr.count("loop.batch_size: 65 is not divisible by the world size 2") == 2
    assert not (d / "odd" / "checkpoint.json").exists()


if __name__ == "__main__":
    raise SystemExit(_worker(sys.argv[1]))
