"""GM-DiT: a class-conditional DiT whose head predicts a pixel-wise Gaussian mixture over u (GMFlow §3.1).

Layout, parameter names and config keys are those of the official GM-DiT transformer, so its
checkpoint folders load with strict keys (:meth:`GMDiT.from_pretrained`). Shapes for hidden size
``D = num_attention_heads * attention_head_dim``, patch ``p``, channels ``C``, components ``K``,
``N = num_embeds_ada_norm`` classes, image ``S x S`` (``S = sample_size``), ``T = (S/p)^2`` tokens::

    tau    = 1000 t                                       network time (t in [0, 1], t = 1 noise), float
    e_t    = [cos(tau f), sin(tau f)],  f_i = exp(-ln(1e4) i / 128), i < 128      (B, 256), fp32 angles
    c      = linear_2(SiLU(linear_1(e_t))) + table[y]     (B, D); table (N + 1, D), row N = null class
    h      = Conv_pxp(x_t) as row-major tokens + P        (B, T, D); P fixed 2-D sin-cos, first D/2 = column

    block (adaLN-Zero), [sh_a, sc_a, g_a, sh_m, sc_m, g_m] = norm1.linear(SiLU(c)):
        h = h + g_a * Attn(LN_1e-6(h) (1 + sc_a) + sh_a)                 (heads x head_dim, bias)
        h = h + g_m * MLP(LN_norm_eps(h) (1 + sc_m) + sh_m)              (GELU-tanh, 4D wide)

    [sh, sc] = proj_out_1(SiLU(c));  h = proj_out_2(LN_1e-6(h) (1 + sc) + sh)      (B, T, p^2 C_out)
    unpatchify: (B, S/p, S/p, p, p, C_out) -> permute (0, 5, 1, 3, 2, 4) -> (B, C_out, S, S)

Heads (``head`` in the config):

* ``"gm"``: ``C_out = K (C + 1)``. Channel ``k C + c`` is the mean of component ``k``, channel ``c``
  -> ``means (B, K, C, S, S)``; the last ``K`` channels are logits, log-softmax over K ->
  ``logweights (B, K, 1, S, S)``; ``log s = logstd_layers(c.detach())`` =
  ``Linear(1024, 1)(SiLU(Linear(D, 1024)(SiLU(c))))`` -> ``logstds (B, 1, 1, 1, 1)``, one std per
  sample depending on t and y but not on x_t (or ``constant_logstd``). Returns a
  :class:`~gmflow.GaussianMixture` over u; ``x0 = x_t - t u`` (:meth:`~gmflow.GaussianMixture.u_to_x0`).
* ``"velocity"``: ``C_out = C``; returns u ``(B, C, S, S)``. The flow-matching twin: identical trunk.

Precision: the time sinusoid is computed in float32; the head output is cast to at least float32
before the split and the log-softmax, and the log-std MLP runs with autocast disabled, so the GM is
float32 under bf16 autocast (float64 for a float64 model).

Label dropout (classifier-free training): ``class_dropout_prob`` replaces labels by the null class
in train mode with the *global* RNG, as the official model does. The project's objectives keep it at
0 and apply :func:`gmflow.nn.drop_labels` to the batch's labels with the per-step generator instead,
which keeps runs bit-reproducible across resumption and ranks.
"""

from __future__ import annotations

import math
import os
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..gm import GaussianMixture
from .dit_blocks import CombinedEmbedding, DiTBlock, GMOutput, PatchEmbed, xavier_
from .embeddings import time_vector
from .heads import _at_least_fp32
from .pretrained import (
    PretrainedMixin,
    write_folder,
)

__all__ = ["GMDiT", "OFFICIAL_CLASS_NAME"]

OFFICIAL_CLASS_NAME = "_GMDiTTransformer2DModel"

_DEFAULTS: dict[str, Any] = dict(  # the paper's ImageNet GM-DiT (K = 8, 28 layers, D = 1152)
    num_gaussians=8,
    constant_logstd=None,
    logstd_inner_dim=1024,
    gm_num_logstd_layers=2,
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=None,
    num_layers=28,
    dropout=0.0,
    norm_num_groups=32,
    attention_bias=True,
    sample_size=32,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    upcast_attention=False,
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
    norm_eps=1e-5,
    class_dropout_prob=0.0,
    head="gm",
)
_INT_KEYS = (
    "num_gaussians", "logstd_inner_dim", "gm_num_logstd_layers", "num_attention_heads", "attention_head_dim",
    "in_channels", "num_layers", "sample_size", "patch_size", "num_embeds_ada_norm", "norm_num_groups",
)  # fmt: skip
_GELU = {"gelu-approximate": "tanh", "gelu": "none"}
_FIXED = {"norm_type": ("ada_norm_zero",), "norm_elementwise_affine": (False,), "upcast_attention": (False,)}


def _int(cfg: dict[str, Any], key: str, lo: int) -> int:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{key} must be an int >= {lo}, got {v!r}")
    return v


def _prob(cfg: dict[str, Any], key: str) -> float:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, Real) or not 0.0 <= float(v) < 1.0:
        raise ValueError(f"{key} must be a float in [0, 1), got {v!r}")
    return float(v)


def _validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check every key; return the normalised, JSON-serialisable config."""
    out = dict(cfg)
    # norm_num_groups is unused by a DiT; it is checked and kept for the official config
    for key in _INT_KEYS:
        _int(cfg, key, 0 if key == "num_embeds_ada_norm" else 1)
    for key in ("dropout", "class_dropout_prob"):
        out[key] = _prob(cfg, key)
    for key, allowed in _FIXED.items():
        if cfg[key] not in allowed or isinstance(cfg[key], bool) != isinstance(allowed[0], bool):
            raise ValueError(
                f"{key}={cfg[key]!r} is not supported (supported: {', '.join(map(repr, allowed))})"
            )
    if cfg["activation_fn"] not in _GELU:
        raise ValueError(
            f"activation_fn={cfg['activation_fn']!r} is not supported (supported: {', '.join(_GELU)})"
        )
    if not isinstance(cfg["attention_bias"], bool):
        raise ValueError(f"attention_bias must be true or false, got {cfg['attention_bias']!r}")
    eps = cfg["norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, Real) or not 0.0 < float(eps) < 1.0:
        raise ValueError(f"norm_eps must be a float in (0, 1), got {eps!r}")
    out["norm_eps"] = float(eps)
    if cfg["out_channels"] not in (None, cfg["in_channels"]) or isinstance(cfg["out_channels"], bool):
        raise ValueError(f"out_channels must be null or equal to in_channels, got {cfg['out_channels']!r}")
    ls = cfg["constant_logstd"]
    if ls is not None:
        if isinstance(ls, bool) or not isinstance(ls, Real) or not math.isfinite(float(ls)):
            raise ValueError(f"constant_logstd must be null or a finite float, got {ls!r}")
        out["constant_logstd"] = float(ls)
    if cfg["sample_size"] % cfg["patch_size"]:
        raise ValueError(
            f"sample_size={cfg['sample_size']} must be divisible by patch_size={cfg['patch_size']}"
        )
    if (cfg["num_attention_heads"] * cfg["attention_head_dim"]) % 4:
        raise ValueError(
            "num_attention_heads * attention_head_dim must be divisible by 4 (2-D sin-cos table)"
        )
    if cfg["head"] not in ("gm", "velocity"):
        raise ValueError(f"head must be 'gm' or 'velocity', got {cfg['head']!r}")
    return out


class GMDiT(PretrainedMixin, nn.Module):
    """Class-conditional GM-DiT (or its velocity twin); equations in the module docstring.

    Keyword arguments are the official GM-DiT config keys (defaults: the paper's ImageNet model)
    plus ``head`` (``"gm"`` or ``"velocity"``). Unsupported values raise ValueError naming the key.

    Call: ``model(x_t (B, C, S, S), t (B,) in [0, 1], class_labels=(B,) int)``; ``class_labels=None``
    is the null class ``num_classes`` for every sample. ``num_embeds_ada_norm=0`` builds an
    unconditional DiT: the table holds only the null row (a learned constant added to the time
    embedding) and the model is called without labels.
    """

    pipeline_subfolder = "transformer"

    def __init__(self, **config: Any) -> None:
        super().__init__()
        unknown = sorted(set(config) - set(_DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown GMDiT config keys: {', '.join(unknown)} (expected {', '.join(_DEFAULTS)})"
            )
        cfg = _validate({**_DEFAULTS, **config})
        self._config = cfg
        d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        c, p, k = cfg["in_channels"], cfg["patch_size"], cfg["num_gaussians"]
        self.head = cfg["head"]
        self.hidden_size = d
        self.channels = c
        self.sample_size = cfg["sample_size"]
        self.patch_size = p
        self.num_gaussians = k
        self.out_channels = k * (c + 1) if self.head == "gm" else c

        self.pos_embed = PatchEmbed(self.sample_size, p, c, d)
        self.emb = CombinedEmbedding(cfg["num_embeds_ada_norm"], d, cfg["class_dropout_prob"])
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(
                d,
                cfg["num_attention_heads"],
                cfg["attention_head_dim"],
                bias=cfg["attention_bias"],
                dropout=cfg["dropout"],
                approximate=_GELU[cfg["activation_fn"]],
                norm_eps=cfg["norm_eps"],
            )
            for _ in range(cfg["num_layers"])
        )
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(d, 2 * d)
        self.proj_out_2 = nn.Linear(d, p * p * self.out_channels)
        self.gm_out: GMOutput | None = None
        if self.head == "gm":
            self.gm_out = GMOutput(
                c, k, d, cfg["logstd_inner_dim"], cfg["gm_num_logstd_layers"], cfg["constant_logstd"]
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: Xavier-uniform Linear/patch weights with zero bias, class table N(0, 0.02^2),
        and zero adaLN modulations, ``proj_out_1`` and last log-std Linear (blocks start as identities,
        s = 1)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                xavier_(m)
        xavier_(self.pos_embed.proj)
        self.emb.class_embedder.reset_parameters()
        zero = [blk.norm1.linear for blk in self.transformer_blocks] + [self.proj_out_1]
        if self.gm_out is not None and self.gm_out.logstd_layers is not None:
            zero.append(self.gm_out.logstd_layers[-1])
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------- config
    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: ``GMDiT(**model.config)`` rebuilds the model."""
        return dict(self._config)

    @property
    def dropout(self) -> float:
        """The dropout rate after the attention output projection and inside the MLP of every block."""
        return self._config["dropout"]

    def set_dropout(self, p: float) -> GMDiT:
        """Set every block's dropout rate (Simple ReFlow fine-tunes with a smaller one) and the config's."""
        self._config["dropout"] = _prob({"dropout": p}, "dropout")
        for m in self.transformer_blocks.modules():
            if isinstance(m, nn.Dropout):
                m.p = self._config["dropout"]
        return self

    @property
    def num_classes(self) -> int:
        """Number of classes N; the null class is id N."""
        return self._config["num_embeds_ada_norm"]

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def event_shape(self) -> torch.Size:
        """Shape of one sample, ``(C, S, S)``."""
        return torch.Size((self.channels, self.sample_size, self.sample_size))

    # ----------------------------------------------------------------------------------- folders
    def save_pretrained(self, path: str | os.PathLike, *, variant: str | None = None) -> Path:
        """Write ``config.json`` + ``diffusion_pytorch_model[.variant].safetensors`` (atomically) to ``path``.

        ``variant="bf16"`` / ``"fp16"`` casts the weights. The config carries the official
        ``_class_name`` for the GM head; ``head`` is written only for the velocity twin (the official
        class has no such key).
        """
        cfg = self.config
        if cfg["head"] == "gm":
            del cfg["head"]
            cfg["_class_name"] = OFFICIAL_CLASS_NAME
        else:
            cfg["_class_name"] = type(self).__name__
        return write_folder(path, cfg, self.state_dict(), variant)

    # ----------------------------------------------------------------------------------- forward
    def _check_inputs(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        if not isinstance(x_t, Tensor):
            raise TypeError(f"x_t must be a torch.Tensor, got {type(x_t).__name__}")
        if not x_t.is_floating_point():
            raise TypeError(f"x_t must be a floating-point tensor, got dtype {x_t.dtype}")
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != tuple(self.event_shape):
            c, s = self.channels, self.sample_size
            raise ValueError(f"x_t must have shape (B, {c}, {s}, {s}) for this GMDiT, got {tuple(x_t.shape)}")
        return time_vector(t, x_t)

    def conditioning(self, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Conditioning embedding ``c`` ``(B, D)`` for times ``t (B,)`` in [0, 1] and labels (None = null)."""
        y = self.emb.class_embedder.labels(class_labels, t.shape[0], t.device)
        return self.emb(t, y)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """``(B, T, p^2 C_out) -> (B, C_out, S, S)``."""
        b, g, p = tokens.shape[0], self.sample_size // self.patch_size, self.patch_size
        x = tokens.reshape(b, g, g, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, self.out_channels, g * p, g * p)

    def forward(
        self, x_t: Tensor, t: Tensor | float, class_labels: Tensor | None = None
    ) -> GaussianMixture | Tensor:
        """``x_t (B, C, S, S)``, ``t`` in [0, 1] -> u-space GM (head "gm") or velocity ``(B, C, S, S)``."""
        t = self._check_inputs(x_t, t)
        cond = self.conditioning(t, class_labels)
        h = self.pos_embed(x_t.to(self.pos_embed.proj.weight.dtype))
        for block in self.transformer_blocks:
            h = block(h, cond)
        shift, scale = self.proj_out_1(nn.functional.silu(cond)).chunk(2, dim=1)
        h = self.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
        out = _at_least_fp32(self.unpatchify(self.proj_out_2(h)))
        if self.gm_out is None:
            return out
        return self.gm_out(out, cond)

    def extra_repr(self) -> str:
        c = self._config
        return (
            f"head={c['head']}, K={c['num_gaussians']}, D={self.hidden_size}, layers={c['num_layers']}, "
            f"sample_size={c['sample_size']}, patch_size={c['patch_size']}, "
            f"classes={c['num_embeds_ada_norm']}"
        )
