"""GMDiT's own contract: model folders, config, init, conditioning, label dropout, the velocity twin,
dtypes and bad inputs (the official-fixture comparisons are in test_nn_dit_official.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import gmflow
from gmflow import GaussianMixture
from gmflow.experiments.network import build_model
from gmflow.nn import GMDiT, drop_labels

GM_FIELDS = ("means", "logweights", "logstds")
TINY = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=1,
    sample_size=8,
    patch_size=2,
    in_channels=1,
    num_gaussians=3,
    logstd_inner_dim=16,
    num_embeds_ada_norm=4,
)


@pytest.fixture
def tiny() -> GMDiT:
    torch.manual_seed(0)
    return GMDiT(**TINY).eval()


def _assert_gm_equal(a: GaussianMixture, b: GaussianMixture) -> None:
    for name in GM_FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ------------------------------------------------------------------------------ folders and config
@pytest.mark.parametrize("head,variant", [("gm", None), ("gm", "bf16"), ("velocity", None)])
def test_save_pretrained_round_trip(tmp_path, head, variant):
    torch.manual_seed(0)
    m = GMDiT(**TINY, head=head).eval()
    folder = m.save_pretrained(tmp_path / "model", variant=variant)
    weights = (
        "diffusion_pytorch_model.safetensors"
        if variant is None
        else "diffusion_pytorch_model.bf16.safetensors"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", weights]  # no temporary files left
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["_class_name"] == ("_GMDiTTransformer2DModel" if head == "gm" else "GMDiT")
    assert ("head" in cfg) == (head == "velocity")
    m2 = GMDiT.from_pretrained(folder, variant=variant)
    assert m2.config == m.config
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    if variant is None:
        a, b = m(x, t, torch.tensor([0, 4])), m2(x, t, torch.tensor([0, 4]))
        if head == "gm":
            _assert_gm_equal(a, b)
        else:
            assert torch.equal(a, b)
    else:
        for k, v in m.state_dict().items():
            assert torch.equal(m2.state_dict()[k], v.to(torch.bfloat16).float()), k


def test_strict_loading_errors(tmp_path):
    torch.manual_seed(0)
    folder = GMDiT(**TINY).save_pretrained(tmp_path / "m")
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("proj_out_1.bias")
    state["extra.weight"] = torch.zeros(1)
    state["proj_out_2.weight"] = torch.zeros(3, 3)
    save_file(state, weights)
    with pytest.raises(ValueError) as e:
        GMDiT.from_pretrained(folder)
    msg = str(e.value)
    assert (
        "\n" not in msg
        and "missing keys [proj_out_1.bias]" in msg
        and "unexpected keys [extra.weight]" in msg
    )
    assert "proj_out_2.weight (3, 3)" in msg
    with pytest.raises(FileNotFoundError, match="bf16"):
        GMDiT.from_pretrained(folder, variant="bf16")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GMDiT.from_pretrained(tmp_path)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        GMDiT.from_pretrained(folder)
    with pytest.raises(ValueError, match="variant"):
        GMDiT(**TINY).save_pretrained(tmp_path / "v", variant="int8")


@pytest.mark.parametrize(
    "key,value",
    [
        ("norm_type", "layer_norm"),
        ("activation_fn", "geglu"),
        ("upcast_attention", True),
        ("norm_elementwise_affine", True),
        ("out_channels", 3),
        ("patch_size", 3),
        ("num_layers", 0),
        ("class_dropout_prob", 1.0),
        ("constant_logstd", float("nan")),
        ("head", "eps"),
        ("num_embeds_ada_norm", -1),
        ("attention_head_dim", 3),
        ("not_a_key", 1),
    ],
)
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        GMDiT(**{**TINY, key: value})


def test_config_round_trip_and_build_model():
    torch.manual_seed(0)
    m = GMDiT(**TINY, constant_logstd=-1.0, activation_fn="gelu", attention_bias=False).eval()
    cfg = json.loads(json.dumps(m.config))
    m2 = build_model({"class": "GMDiT", "config": cfg}).eval()
    m2.load_state_dict(m.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    _assert_gm_equal(m(x, t), m2(x, t))
    assert torch.equal(m(x, t).logstds, torch.full((2, 1, 1, 1, 1), -1.0))
    assert GMDiT.from_config({"_class_name": "x", "_diffusers_version": "0", **cfg}).config == m.config


# ------------------------------------------------------------------------------ the model's contract
def test_init_blocks_are_identities_and_std_is_one():
    torch.manual_seed(0)
    m = GMDiT(**TINY)
    h, cond = torch.randn(2, 16, 16), torch.randn(2, 16)
    assert torch.equal(m.transformer_blocks[0](h, cond), h)
    gm = m(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert torch.equal(gm.logstds, torch.zeros(2, 1, 1, 1, 1))
    assert m.emb.class_embedder.embedding_table.weight.std() < 0.05


def test_velocity_twin_has_the_same_trunk():
    torch.manual_seed(0)
    gm, vel = GMDiT(**TINY), GMDiT(**TINY, head="velocity")
    trunk = {k: v.shape for k, v in gm.state_dict().items() if not k.startswith(("gm_out.", "proj_out_2."))}
    assert trunk == {k: v.shape for k, v in vel.state_dict().items() if not k.startswith("proj_out_2.")}
    assert vel.proj_out_2.weight.shape == (4 * 1, 16) and gm.proj_out_2.weight.shape == (4 * 3 * 2, 16)
    u = vel(torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 1, 4]))
    assert isinstance(u, torch.Tensor) and u.shape == (3, 1, 8, 8) and u.dtype == torch.float32
    y, null = torch.tensor([0, 1]), torch.full((2,), 4)
    out = gmflow.sample(vel.eval(), torch.randn(2, 1, 8, 8), solver="euler", nfe=2, cond={"class_labels": y},
                        uncond={"class_labels": null}, guidance=gmflow.CFG(2.0))  # fmt: skip
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_float64_model():
    torch.manual_seed(0)
    m = GMDiT(**TINY).double()
    gm = m(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64))
    assert gm.means.dtype == gm.logstds.dtype == torch.float64


def test_label_dropout():
    y = torch.arange(1000) % 10
    a = drop_labels(y, 0.3, 10, torch.Generator().manual_seed(0))
    assert torch.equal(a, drop_labels(y, 0.3, 10, torch.Generator().manual_seed(0)))
    dropped = a == 10
    assert 200 < int(dropped.sum()) < 400 and torch.equal(a[~dropped], y[~dropped])
    g = torch.Generator().manual_seed(0)
    assert drop_labels(y, 0.0, 10, g) is y  # p = 0 draws nothing
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="probability"):
        drop_labels(y, 1.0, 10)
    # the model's own class_dropout_prob acts in train mode only (global RNG)
    torch.manual_seed(0)
    m = GMDiT(**TINY, class_dropout_prob=0.5)
    t, labels = torch.full((64,), 0.5), torch.zeros(64, dtype=torch.long)
    m.eval()
    cond, null = m.conditioning(t, labels), m.conditioning(t)
    assert torch.equal(m.conditioning(t, labels), cond) and not torch.equal(cond[0], null[0])
    m.train()
    train = m.conditioning(t, labels)
    is_null = (train == null).all(1)
    assert ((train == cond).all(1) | is_null).all() and 10 < int(is_null.sum()) < 54


@pytest.mark.parametrize(
    "x_shape,labels,err,match",
    [
        ((2, 1, 16, 16), None, ValueError, "x_t"),  # wrong image size
        ((2, 3, 8, 8), None, ValueError, "x_t"),  # wrong channels
        ((2, 1, 8), None, ValueError, "x_t"),
        ((2, 1, 8, 8), torch.tensor([0, 5]), ValueError, "class_labels"),  # out of [0, 4]
        ((2, 1, 8, 8), torch.tensor([-1, 0]), ValueError, "class_labels"),
        ((2, 1, 8, 8), torch.tensor([0, 1, 2]), ValueError, "class_labels"),
        ((2, 1, 8, 8), torch.tensor([0.0, 1.0]), TypeError, "class_labels"),
        ((2, 1, 8, 8), [0, 1], TypeError, "class_labels"),
    ],
)
def test_bad_inputs(tiny, x_shape, labels, err, match):
    with pytest.raises(err, match=match):
        tiny(torch.randn(*x_shape), torch.rand(x_shape[0]), class_labels=labels)


def test_bad_input_types(tiny):
    with pytest.raises(TypeError, match="x_t"):
        tiny(torch.zeros(2, 1, 8, 8, dtype=torch.long), torch.rand(2))
    with pytest.raises(ValueError, match="t must have shape"):
        tiny(torch.zeros(2, 1, 8, 8), torch.rand(3))


def test_set_dropout_reaches_every_block_and_the_config():
    """Simple ReFlow's student_dropout on a DiT student: the rate of every block and the rebuilt config."""
    torch.manual_seed(0)
    m = GMDiT(**{**TINY, "head": "velocity", "num_embeds_ada_norm": 0}).train()
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: open the gates
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    assert torch.equal(m(x, t), m(x, t)) and m.dropout == 0.0  # no dropout: deterministic
    assert m.set_dropout(0.3) is m and m.dropout == 0.3 and m.config["dropout"] == 0.3
    drops = [d for d in m.modules() if isinstance(d, torch.nn.Dropout)]
    assert len(drops) == 2 * TINY["num_layers"] and all(d.p == 0.3 for d in drops)
    assert not torch.equal(m(x, t), m(x, t))
    assert torch.equal(m.eval()(x, t), m(x, t))
    assert GMDiT(**m.config).dropout == 0.3
    with pytest.raises(ValueError, match="dropout"):
        m.set_dropout(1.0)
