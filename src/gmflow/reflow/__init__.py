"""Simple ReFlow: teacher pairs (generation, sharded store), mixing, projection, training, diagnostics.

Example::

    from gmflow import ring_gmm
    from gmflow.reflow import PairDataset, generate_pairs

    teacher = ring_gmm()  # exact GM teacher; a trained model works the same way
    generate_pairs(teacher, "pairs/bwd", direction="backward", n=100_000, solver="dpm++2m", nfe=32)
    generate_pairs(teacher, "pairs/fwd", direction="forward", n=20_000, data=teacher, solver="heun", nfe=33)
    ds = PairDataset("pairs/bwd", "pairs/fwd", rho=0.4)   # rerun generate_pairs to resume a killed run
    x0, x1 = ds.sample(256, generator=g)

    cfg = ReflowConfig(normalize=True, time_sampler="pow10", rho=0.4, steps=5000, out_dir="runs/srf")
    result = train_reflow(cfg, teacher_net, ds)   # student = copy of teacher_net; run again to resume
"""

from .dataset import PairDataset
from .diagnostics import one_step_error, per_t_relative_loss, straightness, velocity
from .losses import error_distance, hpf_operator, normalized, reflow_distance
from .pairs import generate_pairs, shard_seed, teacher_hash
from .projection import project_pairs
from .store import PairError, PairManifest, ShardInfo, load_shard, read_manifest, shard_name
from .train import (
    RECIPES,
    ReflowConfig,
    ReflowError,
    apply_reflow_sets,
    reflow_batch_fn,
    reflow_objective,
    set_dropout,
    train_reflow,
)

__all__ = [
    "RECIPES",
    "ReflowConfig",
    "ReflowError",
    "apply_reflow_sets",
    "error_distance",
    "hpf_operator",
    "normalized",
    "reflow_batch_fn",
    "reflow_distance",
    "reflow_objective",
    "set_dropout",
    "train_reflow",
    "PairDataset",
    "PairError",
    "PairManifest",
    "ShardInfo",
    "generate_pairs",
    "load_shard",
    "one_step_error",
    "per_t_relative_loss",
    "project_pairs",
    "read_manifest",
    "shard_name",
    "shard_seed",
    "straightness",
    "teacher_hash",
    "velocity",
]
