"""A small time- (and optionally class-) conditioned U-Net denoiser for tiny images (8x8 to 32x32).

``(x_t (B, C, H, W), t (B,), class_labels (B,) | None) -> u (B, C, H, W) | GaussianMixture`` over the
velocity u = eps - x0.

Architecture (DDPM-style, no attention)::

    e      = MLP(TimestepEmbedding(1000 t)) [+ table[y]]          (B, E),  E = time_dim
    h      = Conv3x3(x_t)                                         (B, base, H, W)
    down:  level l = 0..L-1: num_res ResBlocks to w_l = base*mults[l]; keep skip_l = h;
           a stride-2 Conv3x3 between levels
    mid:   one ResBlock at the lowest resolution
    up:    level l = L-1..0: ResBlock(concat(h, skip_l)) then num_res-1 ResBlocks, all to w_l;
           between levels Conv3x3 (w_l -> w_{l-1}) at the low resolution, then nearest 2x
    out    = Conv3x3(SiLU(GroupNorm(h)))                          (B, C_out, H, W)

With the defaults (C = 1, base 32, mults (1, 2), num_res 1, time_dim 128) the velocity model has
427,265 parameters and the GM model (K = 8) 448,241.

Class conditioning (``num_classes = N > 0``): a learned table ``(N + 1, E)``
(:class:`~gmflow.nn.ClassEmbedding`, init ``N(0, 0.02^2)``) is added to the time embedding; row ``N``
is the null class, used for ``class_labels=None`` and as the unconditional input of guidance. Label
dropout is the objective's job (:func:`gmflow.nn.drop_labels` with the step generator).
``num_classes = 0`` (default) builds exactly the unconditional network (same parameters, same random
draws at construction, same outputs).

ResBlock (FiLM time conditioning, "scale/shift")::

    h = Conv3x3(SiLU(GN(x)))
    [gamma, beta] = Linear(SiLU(e))
    h = Conv3x3(Dropout(SiLU(GN(h) * (1 + gamma) + beta)))
    out = Skip(x) + h                                             (Skip = 1x1 conv if widths differ)

Heads:

* ``"velocity"``: ``C_out = C``; returns u.
* ``"gm"`` (GMFlow paper Sec. 3.1, pixel-wise GM): ``C_out = K (C + 1)``. The first ``K C`` output
  channels are the means, component-major (channel ``k C + c``), viewed as ``(B, K, C, H, W)``; the
  last ``K`` are logits, log-softmax over K, as ``(B, K, 1, H, W)``. ``log s`` is one scalar per
  sample predicted from the *detached* time embedding by ``SiLU-Linear-SiLU-Linear``
  (:class:`~gmflow.nn.heads.LogStdHead`), shape ``(B, 1, 1, 1, 1)``. Init: the logit channels of
  the output conv and the last log-std Linear are zero, so the weights start uniform (1/K) and
  ``s = 1``; the mean channels keep the default init so the components start distinct.

GM outputs are float32 under bf16/fp16 autocast (float64 for a float64 model); the velocity head's
output is likewise at least float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from ..gm import GaussianMixture
from .embeddings import ClassEmbedding, TimestepEmbedding, time_vector
from .heads import LogStdHead, _at_least_fp32, kaiming_linear_

__all__ = ["SmallUNet"]


def _groups(channels: int, max_groups: int = 8) -> int:
    """Largest number of GroupNorm groups ``<= max_groups`` that divides ``channels``."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv residual block with FiLM time conditioning (see module docstring)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip: nn.Module = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        nn.init.zeros_(self.emb.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        gamma, beta = self.emb(nn.functional.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = nn.functional.silu(self.norm2(h) * (1 + gamma) + beta)
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 ``Conv3x3``: ``(B, ch, H, W) -> (B, ch, H/2, W/2)``."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """``Conv3x3`` at the low resolution (``in_ch -> out_ch``), then nearest 2x: ``(H, W) -> (2H, 2W)``.

    Convolving before upsampling costs 4x fewer MACs than the usual nearest-then-conv; the next
    ResBlock's convolutions smooth the blocky output.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.interpolate(self.conv(x), scale_factor=2.0, mode="nearest")


class SmallUNet(nn.Module):
    """Small U-Net denoiser over the velocity; see the module docstring for the equations.

    Args:
        channels: image channels C.
        base: width of the first level; level ``l`` has ``base * mults[l]`` channels.
        mults: width multipliers; ``len(mults) - 1`` downsamplings, so H and W must be divisible by
            ``2 ** (len(mults) - 1)``.
        num_res: ResBlocks per level on the way down (``num_res + 1`` on the way up).
        time_dim: width of the sinusoidal time embedding and of its MLP.
        dropout: dropout probability inside every ResBlock (change later with :meth:`set_dropout`).
        head: ``"velocity"`` (returns u) or ``"gm"`` (returns a :class:`~gmflow.gm.GaussianMixture`).
        num_components: K for ``head="gm"``.
        image_size: nominal H = W (recorded in the config, validated for divisibility, exposed as
            :attr:`event_shape`); the network itself accepts any divisible size.
        num_classes: N > 0 adds class conditioning (N + 1 table rows, id N = null class); 0: none.
    """

    def __init__(
        self,
        channels: int = 1,
        base: int = 32,
        mults: Sequence[int] = (1, 2),
        num_res: int = 1,
        time_dim: int = 128,
        dropout: float = 0.0,
        head: str = "velocity",
        num_components: int = 8,
        image_size: int = 16,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        mults = tuple(int(m) for m in mults)
        if head not in ("gm", "velocity"):
            raise ValueError(f"head must be 'gm' or 'velocity', got {head!r}")
        if len(mults) < 1 or min(mults) < 1:
            raise ValueError(f"mults must be a non-empty sequence of ints >= 1, got {mults}")
        if min(channels, base, time_dim, image_size, num_res) < 1:
            raise ValueError("channels, base, time_dim, image_size and num_res must all be >= 1")
        if head == "gm" and num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        self.factor = 2 ** (len(mults) - 1)
        if image_size % self.factor:
            raise ValueError(f"image_size={image_size} is not divisible by 2**(len(mults)-1)={self.factor}")
        _check_p(dropout)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0 = unconditional), got {num_classes!r}")
        self._config: dict[str, Any] = dict(
            channels=int(channels),
            base=int(base),
            mults=list(mults),
            num_res=int(num_res),
            time_dim=int(time_dim),
            dropout=float(dropout),
            head=head,
            num_components=int(num_components),
            image_size=int(image_size),
            num_classes=num_classes,
        )
        self.channels = int(channels)
        self.image_size = int(image_size)
        self.head = head
        self.num_components = int(num_components)

        self.time_embed = TimestepEmbedding(time_dim)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(channels, base, 3, padding=1)

        widths = [base * m for m in mults]
        ch = base
        skip_ch: list[int] = []
        self.down = nn.ModuleList()
        for lvl, w in enumerate(widths):
            for _ in range(num_res):
                self.down.append(ResBlock(ch, w, time_dim, dropout))
                ch = w
            skip_ch.append(ch)
            if lvl < len(widths) - 1:
                self.down.append(Downsample(ch))
        self.mid = ResBlock(ch, ch, time_dim, dropout)
        self.up = nn.ModuleList()
        for lvl in reversed(range(len(widths))):
            for i in range(num_res):
                self.up.append(ResBlock(ch + (skip_ch[lvl] if i == 0 else 0), widths[lvl], time_dim, dropout))
                ch = widths[lvl]
            if lvl > 0:
                self.up.append(Upsample(ch, widths[lvl - 1]))
                ch = widths[lvl - 1]
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        out_ch = channels if head == "velocity" else num_components * (channels + 1)
        self.conv_out = nn.Conv2d(ch, out_ch, 3, padding=1)
        self.logstd: LogStdHead | None = None
        if head == "gm":
            with torch.no_grad():  # zero logit channels -> uniform weights at init
                self.conv_out.weight[num_components * channels :].zero_()
                self.conv_out.bias[num_components * channels :].zero_()
            self.logstd = LogStdHead(time_dim, time_dim, detach=True, fp32=True)
        for m in self.time_mlp:
            if isinstance(m, nn.Linear):
                kaiming_linear_(m)
        # built last, so that the other parameters draw the same random numbers as without classes
        self.class_embed = ClassEmbedding(num_classes, time_dim) if num_classes else None

    # ----------------------------------------------------------------------------------- config
    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: ``SmallUNet(**model.config)`` rebuilds the model.

        ``dropout`` follows :meth:`set_dropout`.
        """
        cfg = dict(self._config)
        cfg["mults"] = list(cfg["mults"])
        return cfg

    def to_config(self) -> dict[str, Any]:
        return self.config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SmallUNet:
        return cls(**config)

    @property
    def event_shape(self) -> torch.Size:
        """Nominal shape of one sample, ``(C, image_size, image_size)``."""
        return torch.Size((self.channels, self.image_size, self.image_size))

    @property
    def dropout(self) -> float:
        return self._config["dropout"]

    def set_dropout(self, p: float) -> SmallUNet:
        """Set the dropout probability of every ResBlock (Simple ReFlow fine-tunes with a smaller one)."""
        _check_p(p)
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = float(p)
        self._config["dropout"] = float(p)
        return self

    # ---------------------------------------------------------------------------------- forward
    def _check_inputs(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Validate ``x_t`` and return ``t`` as a float tensor of shape ``(B,)`` on ``x_t``'s device."""
        if not isinstance(x_t, Tensor):
            raise TypeError(f"x_t must be a torch.Tensor, got {type(x_t).__name__}")
        if not x_t.is_floating_point():
            raise TypeError(f"x_t must be a floating-point tensor, got dtype {x_t.dtype}")
        if x_t.ndim != 4 or x_t.shape[1] != self.channels:
            raise ValueError(f"x_t must have shape (B, {self.channels}, H, W), got {tuple(x_t.shape)}")
        h, w = x_t.shape[2:]
        if h % self.factor or w % self.factor or h == 0 or w == 0:
            raise ValueError(
                f"x_t spatial size {h}x{w} must be non-empty and divisible by 2**(len(mults)-1)={self.factor}"
            )
        return time_vector(t, x_t)

    @property
    def num_classes(self) -> int:
        """Number of classes N (0: unconditional); the null class is id N."""
        return self._config["num_classes"]

    def forward(
        self, x_t: Tensor, t: Tensor | float, class_labels: Tensor | None = None
    ) -> Tensor | GaussianMixture:
        """``x_t (B, C, H, W)``, ``t (B,)`` / scalar in [0, 1], ``class_labels (B,)`` int or None (null class)
        -> u ``(B, C, H, W)`` or its pixel-wise GM."""
        t = self._check_inputs(x_t, t)
        if self.class_embed is None and class_labels is not None:
            raise ValueError("class_labels given, but this SmallUNet is unconditional (num_classes=0)")
        wdtype = self.conv_in.weight.dtype
        temb = self.time_embed(t).to(wdtype)
        emb = self.time_mlp(temb)
        if self.class_embed is not None:
            emb = emb + self.class_embed(self.class_embed.labels(class_labels, x_t.shape[0], x_t.device))
        h = self.conv_in(x_t.to(wdtype))
        skips: list[Tensor] = []
        for m in self.down:
            if isinstance(m, ResBlock):
                h = m(h, emb)
            else:  # a level ends before each Downsample
                skips.append(h)
                h = m(h)
        skips.append(h)
        h = self.mid(h, emb)
        first = True  # the first ResBlock of each up level takes the level's skip
        for m in self.up:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, skips.pop()], dim=1) if first else h, emb)
                first = False
            else:
                h = m(h)
                first = True
        out = _at_least_fp32(self.conv_out(nn.functional.silu(self.norm_out(h))))
        if self.logstd is None:
            return out
        b, k, c = out.shape[0], self.num_components, self.channels
        sp = out.shape[2:]
        means = out[:, : k * c].reshape(b, k, c, *sp)
        logweights = torch.log_softmax(out[:, k * c :].reshape(b, k, 1, *sp), dim=1)
        logstds = self.logstd(emb).to(means.dtype).reshape(b, 1, 1, 1, 1)
        return GaussianMixture(means, logweights, logstds)

    def extra_repr(self) -> str:
        c = self._config
        return f"head={c['head']}, mults={tuple(c['mults'])}, base={c['base']}, dropout={c['dropout']}"


def _check_p(p: float) -> None:
    if not (isinstance(p, Real) and 0.0 <= float(p) < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {p!r}")
