"""gmflow.experiments.reflow: ReflowConfig, recipes, student preparation, train_reflow, resuming a run."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from gmflow.config import ConfigError
from gmflow.data import ring_gmm
from gmflow.experiments import (
    RECIPES,
    ReflowConfig,
    load_network,
    load_run,
    recipe,
    run_experiment,
    set_dropout,
    train_reflow,
)
from gmflow.experiments.reflow import ReflowSampling
from gmflow.nn import SmallUNet, ToyMLP
from gmflow.reflow import PairDataset, PairMixing, ReflowError, ReflowLoss, generate_pairs, reflow_objective
from gmflow.train import LoopConfig


def _net(head: str = "velocity", width: int = 32) -> ToyMLP:
    torch.manual_seed(0)
    return ToyMLP(2, width, 2, head=head, num_components=4, time_dim=16, pos_freqs=4)


def _cfg(steps: int = 1, **loss) -> ReflowConfig:
    return ReflowConfig(loss=ReflowLoss(**loss), loop=LoopConfig(steps=steps, batch_size=16, warmup_steps=0))


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "item, key",
    [
        ("pairs.rho=1.5", "pairs.rho"),
        ("pairs.rho=-0.1", "pairs.rho"),
        ("pairs.projection_lambda=-1", "pairs.projection_lambda"),
        ("pairs.projection_block=0", "pairs.projection_block"),
        ("loss.normalize=true", "loss.normalize"),
        ("loss.norm_floor=0", "loss.norm_floor"),
        ("loss.time_max=0.00001", "loss.time_max"),
        ("pairs.projection_pool=0.5", "pairs.projection_pool"),
        ("pairs.projection_method=hungarian", "pairs.projection_method"),
        ("sampling.kappa=0", "sampling.kappa"),
        ("sampling.r=0", "sampling.r"),
        ("sampling.r=1.2", "sampling.r"),
        ("sampling.solver=gm-sde", "sampling.solver"),
        ("sampling.grid=log", "sampling.grid"),
        ("loss.weight=x", "loss.weight"),
        ("loss.time_sampler=beta", "loss.time_sampler"),
        ("loss.hpf_radius=0", "loss.hpf_radius"),
        ("loss.time_eps=1", "loss.time_eps"),
        ("student_dropout=1", "student_dropout"),
        ("data=mnist", "data"),
        ("loop.steps=0", "loop.steps"),
    ],
)
def test_config_validation_names_the_field(item, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        ReflowConfig().with_sets([item]).validate()


def test_config_round_trip_and_recipes():
    extra = ReflowConfig(
        student_dropout=0.05, data="digits16", pairs=PairMixing(rho=0.3, projection_lambda=1.0)
    )
    for cfg in (*RECIPES.values(), extra.with_sets(["loss.norm_floor=1e-9", "loop.out_dir=runs/x"])):
        assert ReflowConfig.from_dict(cfg.to_dict()) == cfg.validate()
    two, simple = RECIPES["2rf"], RECIPES["simple"]
    assert two == ReflowConfig() and (two.loss.normalize, two.loss.weight, two.pairs.rho) == (
        "none",
        "velocity",
        0.0,
    )
    assert (two.loop.optimizer, two.loop.steps) == ("adam", 2000) and two.sampling.sample_kwargs() == {
        "solver": "euler",
        "grid": "uniform",
        "kappa": 20.0,
    }
    assert (simple.loss.normalize, simple.loss.time_sampler, simple.loss.hpf_lambda) == (
        "sample",
        "pow10",
        0.0,
    )
    assert simple.pairs.rho == 0.0  # images: no HPF distance and no forward pairs, by measurement
    assert simple.sampling.sample_kwargs() == {
        "solver": "dpm-solver-2",
        "grid": "sigmoid",
        "kappa": 5.0,
        "r": 0.4,
    }
    # per data type: images keep the per-sample normaliser, vectors get the learned one and forward pairs
    assert recipe("simple", (1, 16, 16)) == simple and recipe("simple") == simple
    vec = recipe("simple", (2,))
    assert (vec.loss.hpf_lambda, vec.loss.normalize, vec.loss.time_sampler) == (0.0, "learned", "pow10")
    assert vec.pairs.rho == 0.4
    assert RECIPES["simple"].loss.normalize == "sample"  # the table itself is not modified
    assert recipe("2rf", (2,)) == two
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipe("nope")
    assert ReflowConfig.resume_ignore == {"teacher", "pairs.backward", "pairs.forward"} | {
        f"sampling.{k}" for k in ("solver", "grid", "kappa", "r", "guidance_scale")
    }
    assert ReflowSampling().guidance_scale == 1.0


def test_build_and_dataset_need_their_paths():
    with pytest.raises(ConfigError, match="teacher and pairs.backward"):
        ReflowConfig().build()
    cfg = ReflowConfig(teacher="t", pairs=PairMixing(backward="b", rho=0.5))
    with pytest.raises(ConfigError, match="^pairs.forward: rho=0.5 > 0"):
        cfg.build()
    cfg = ReflowConfig(teacher="t", pairs=PairMixing(backward="b", projection_lambda=1.0))
    with pytest.raises(ConfigError, match="^data: projection_lambda > 0"):
        cfg.build()
    with pytest.raises(ConfigError, match="^data: this ReFlow run records no data set"):
        ReflowConfig().dataset()
    assert ReflowConfig(data="digits8").dataset("test").tensor().shape[1:] == (1, 8, 8)
    assert ReflowConfig(data="ring").real_data().sample(3).shape == (3, 2)
    assert ReflowConfig(data="digits8").real_data().shape[1:] == (1, 8, 8)  # the train split as a tensor


def test_set_dropout_on_unet_and_mlp():
    teacher = SmallUNet(1, 8, (1, 2), dropout=0.13, image_size=8)
    student = copy.deepcopy(teacher)
    set_dropout(student, 0.05)
    assert student.dropout == 0.05 and student.config["dropout"] == 0.05 and teacher.dropout == 0.13
    with pytest.raises(ReflowError, match="no dropout"):
        set_dropout(_net(), 0.1)
    set_dropout(_net(), 0.0)  # nothing to set, nothing asked


# ------------------------------------------------------------------------------------- train_reflow
@pytest.mark.parametrize("normalize", ["none", "sample", "learned"])
def test_reflow_training_decreases_the_loss(ring_pairs, normalize):
    pairs = PairDataset(ring_pairs / "bwd", ring_pairs / "fwd", rho=0.4)
    teacher = _net()
    x0, x1 = pairs.sample(512, generator=torch.Generator().manual_seed(3))
    plain = reflow_objective(ReflowLoss())

    def eval_loss(m) -> float:
        with torch.no_grad():
            return float(plain(m, (x0, x1), torch.Generator().manual_seed(4)).mean())

    cfg = ReflowConfig(
        loss=ReflowLoss(normalize=normalize, time_sampler="pow10"),
        pairs=PairMixing(rho=0.4),
        loop=LoopConfig(steps=60, batch_size=256, lr=3e-3, warmup_steps=5, ema="none"),
    )
    res = train_reflow(cfg, teacher, pairs, progress=False)
    # the normalised loss optimises E log l, which lowers the plain loss more slowly
    assert eval_loss(res.model) < (0.7 if normalize == "none" else 0.85) * eval_loss(teacher)
    assert res.step == 60 and res.model is not teacher
    # the teacher is never modified
    assert torch.equal(teacher.state_dict()["trunk.0.weight"], _net().state_dict()["trunk.0.weight"])


def test_train_reflow_records_the_pairs_and_resumes(ring_pairs, tmp_path):
    pairs = PairDataset(ring_pairs / "bwd")
    d = tmp_path / "run"
    cfg = ReflowConfig(data="ring", loop=LoopConfig(steps=2, batch_size=16, warmup_steps=0, out_dir=str(d)))
    train_reflow(cfg, _net(), pairs, progress=False)
    rec = json.loads((d / "config.json").read_text())
    assert (rec["experiment"], rec["data"], rec["config"]["teacher"]) == ("reflow", "ring", None)
    assert rec["pairs"]["backward"]["nfe"] == 12 and "forward" not in rec["pairs"]
    res = train_reflow(cfg.with_sets(["loop.steps=3", "sampling.solver=heun"]), _net(), pairs, progress=False)
    assert (res.resumed_from, res.step) == (2, 3)
    with pytest.raises(ConfigError, match="loss.time_sampler: 'uniform' -> 'pow10'"):
        train_reflow(cfg.with_sets(["loss.time_sampler=pow10"]), _net(), pairs, progress=False)
    generate_pairs(
        ring_gmm(), tmp_path / "other", direction="backward", n=64, solver="dpm++2m", nfe=6, progress=False
    )
    other = PairDataset(tmp_path / "other")  # other pairs: refused although no config key changed
    with pytest.raises(ConfigError, match="pairs.backward.nfe: 12 -> 6"):
        train_reflow(cfg.with_sets(["loop.steps=4"]), _net(), other, progress=False)


def test_gm_student_trains_on_the_gm_mean(ring_pairs):
    res = train_reflow(_cfg(steps=2), _net("gm"), PairDataset(ring_pairs / "bwd"), progress=False)
    assert res.step == 2 and torch.isfinite(torch.tensor(res.last_loss))


def test_teacher_student_and_pair_mismatch(ring_pairs, tmp_path):
    pairs = PairDataset(ring_pairs / "bwd")
    with pytest.raises(ReflowError, match="student.*shape"):
        train_reflow(_cfg(), _net(width=32), pairs, student=_net(width=16), progress=False)
    with pytest.raises(ReflowError, match="student is a SmallUNet but teacher_model a ToyMLP"):
        train_reflow(_cfg(), _net(), pairs, student=SmallUNet(1, 8, (1,), image_size=8), progress=False)
    with pytest.raises(ReflowError, match="teacher_model must be an nn.Module"):
        train_reflow(_cfg(), ring_gmm(), pairs, progress=False)
    with pytest.raises(ReflowError, match="pairs must be a gmflow.reflow.PairDataset"):
        train_reflow(_cfg(), _net(), pairs.backward, progress=False)
    generate_pairs(
        lambda x, t: -x,
        tmp_path / "img",
        direction="backward",
        n=8,
        solver="euler",
        nfe=1,
        event_shape=(1, 4, 4),
        teacher_id="img",
        progress=False,
    )
    with pytest.raises(ReflowError, match="pairs: event shape"):
        train_reflow(_cfg(), _net(), PairDataset(tmp_path / "img"), progress=False)
    with pytest.raises(ConfigError, match="^loss.hpf_lambda: the HPF loss needs image pairs"):
        train_reflow(_cfg(hpf_lambda=1.0), _net(), pairs, progress=False)
    with pytest.raises(ReflowError, match="pairs.rho=0.4 differs from cfg.pairs.rho=0.0"):
        train_reflow(
            _cfg(), _net(), PairDataset(ring_pairs / "bwd", ring_pairs / "fwd", rho=0.4), progress=False
        )
    with pytest.raises(ReflowError, match="student_dropout=0.1: the teacher model .ToyMLP. has no dropout"):
        train_reflow(ReflowConfig(student_dropout=0.1, loop=_cfg().loop), _net(), pairs, progress=False)


def test_student_receives_the_teacher_weights(ring_pairs):
    teacher, student = _net(), _net()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    res = train_reflow(
        ReflowConfig(loop=LoopConfig(steps=1, batch_size=8, lr=1e-12, ema="none")),
        teacher,
        PairDataset(ring_pairs / "bwd"),
        student=student,
        progress=False,
    )
    assert res.model is student
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(student.state_dict()[k], v, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------------- run configs
def test_resume_from_the_run_config(reflow_run, copy_run, digits_pairs, tmp_path):
    """Resuming a recorded ReFlow run: inference settings and paths may change, training keys may not."""
    d = copy_run(reflow_run.path)
    cfg = load_run(d).config.with_sets([f"loop.out_dir={d}"])
    for sets, key in [
        (["loss.hpf_lambda=2"], "loss.hpf_lambda"),
        (["pairs.rho=0.5"], "pairs.rho"),
        (["student_dropout=0.1"], "student_dropout"),
        (["data=digits8"], "data"),
        (["loop.lr=1e-3"], "loop.lr"),
    ]:
        with pytest.raises(ConfigError, match=f"different config .*{key}: "):
            run_experiment(cfg.with_sets(sets), progress=False)
    moved = tmp_path / "bwd-moved"
    moved.mkdir()
    for p in digits_pairs[0].iterdir():
        (moved / p.name).write_bytes(p.read_bytes())
    ok = cfg.with_sets(
        [
            "loop.steps=4",
            "sampling.solver=dpm-solver-2",
            "sampling.grid=sigmoid",
            "sampling.guidance_scale=1.6",
            f"pairs.backward={moved}",
            "loop.log_every=1",
        ]
    )
    res = run_experiment(ok, progress=False)
    assert (res.resumed_from, res.step) == (3, 4)
    rec = json.loads((d / "config.json").read_text())
    assert rec["config"]["sampling"]["solver"] == "dpm-solver-2" and rec["config"]["pairs"][
        "backward"
    ] == str(moved)
    assert load_network(d).config == load_network(reflow_run.path).config


def test_learned_normaliser_run_saves_loads_and_resumes(ring_pairs, tmp_path):
    from gmflow.nn import WithLogLoss

    pairs = PairDataset(ring_pairs / "bwd")
    d = tmp_path / "learned"
    loop = LoopConfig(steps=3, batch_size=16, warmup_steps=0, out_dir=str(d))
    cfg = ReflowConfig(loss=ReflowLoss(normalize="learned"), loop=loop)
    res = train_reflow(cfg, _net(), pairs, progress=False)
    assert isinstance(res.model, WithLogLoss) and float(res.model.log_loss.initialized) == 1.0
    net = load_network(d)
    assert isinstance(net, WithLogLoss) and isinstance(net.net, ToyMLP)
    x, t = torch.randn(4, 2), torch.full((4,), 0.5)
    torch.testing.assert_close(net(x, t), net.net(x, t))  # samplers see the plain network
    run = load_run(d)  # what `gmflow sample` / `eval` read: the denoiser's shape, head and classes
    assert run.network is run.model.net and (run.event_shape, run.head, run.num_classes) == (
        (2,),
        "velocity",
        0,
    )
    again = train_reflow(cfg.with_sets(["loop.steps=4"]), _net(), pairs, progress=False)
    assert (again.resumed_from, again.step) == (3, 4)
