"""Sinusoidal embeddings for time and for low-dimensional positions, and the class-label table.

The sinusoidal embeddings are parameter-free. Both compute in at least float32 (float64 if the
input is float64), whatever the prevailing autocast: ``1000 * t`` and ``2 pi x / 5e-3`` are large
angles, and bf16 would destroy them. Frequencies are recomputed on every call (no buffers), so
``model.to(dtype)`` never quantises them.

:class:`ClassEmbedding` is a learned ``(N + 1, D)`` table for ``N`` classes whose last row (id ``N``)
is the null class of classifier-free and probabilistic guidance; :func:`drop_labels` is the label
dropout that teaches the null row.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor, nn

__all__ = [
    "ClassEmbedding",
    "FourierPositionEmbedding",
    "PositionEmbedding2D",
    "TimestepEmbedding",
    "drop_labels",
    "timestep_embedding",
]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (ints, bf16, fp16, fp32) computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def timestep_embedding(
    t: Tensor,
    dim: int = 256,
    *,
    scale: float = 1000.0,
    max_period: float = 10000.0,
    freq_shift: float = 1.0,
    flip_sin_to_cos: bool = True,
) -> Tensor:
    """Sinusoidal embedding of ``scale * t`` (Diffusers ``Timesteps`` convention).

    With ``half = dim // 2`` and ``tau = scale * t``::

        f_i = exp(-ln(max_period) * i / (half - freq_shift)),   i = 0 .. half - 1
        emb = [cos(tau f_0), ..., cos(tau f_{half-1}), sin(tau f_0), ..., sin(tau f_{half-1})]

    (``flip_sin_to_cos=False`` puts the sines first.) An odd ``dim`` is zero-padded by one column.

    Args:
        t: ``(B,)`` times in [0, 1] (t = 1 is noise).
    Returns:
        ``(B, dim)`` in float32 (float64 if ``t`` is float64).
    """
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    if half < 1 or half - freq_shift <= 0:
        raise ValueError(f"dim={dim} is too small for freq_shift={freq_shift}")
    dtype = _compute_dtype(t)
    i = torch.arange(half, device=t.device, dtype=dtype)
    # exp, sin and cos of the float32 arguments are evaluated in float64 and rounded: float32 kernels
    # differ by an ulp between CPUs, and angles up to 1000 turn an ulp of a frequency into ~1e-5
    # of a feature; rounded float64 values are the same on every machine
    freqs = torch.exp((-math.log(max_period) * i / (half - freq_shift)).double()).to(dtype)
    angles = ((scale * t.to(dtype))[:, None] * freqs[None, :]).double()
    sin, cos = torch.sin(angles).to(dtype), torch.cos(angles).to(dtype)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Module wrapper of :func:`timestep_embedding`; ``(B,) -> (B, dim)``, no parameters.

    Defaults reproduce the GMFlow toy model: 256 features of ``1000 * t``, cos first, freq shift 1.
    The DiT convention is ``freq_shift=0``.
    """

    def __init__(
        self,
        dim: int = 256,
        *,
        scale: float = 1000.0,
        max_period: float = 10000.0,
        freq_shift: float = 1.0,
        flip_sin_to_cos: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.out_dim = dim
        self.scale = scale
        self.max_period = max_period
        self.freq_shift = freq_shift
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, t: Tensor) -> Tensor:
        return timestep_embedding(
            t,
            self.dim,
            scale=self.scale,
            max_period=self.max_period,
            freq_shift=self.freq_shift,
            flip_sin_to_cos=self.flip_sin_to_cos,
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, freq_shift={self.freq_shift}"


class FourierPositionEmbedding(nn.Module):
    """Sin/cos features of each coordinate at ``n_freqs`` geometrically spaced periods.

    With periods ``p_j = min_period * (max_period / min_period) ** (j / (n_freqs - 1))``::

        a_{d,j} = 2 pi x_d / p_j
        emb = [sin(a_{0,0}), sin(a_{0,1}), ..., sin(a_{D-1,J-1}), cos(a_{0,0}), ..., cos(a_{D-1,J-1})]

    i.e. all sines (coordinate-major) then all cosines. ``(B, in_dim) -> (B, 2 * n_freqs * in_dim)``;
    256 features for the 2-D toy defaults.
    """

    def __init__(
        self, in_dim: int = 2, n_freqs: int = 64, *, min_period: float = 5e-3, max_period: float = 50.0
    ) -> None:
        super().__init__()
        if in_dim < 1 or n_freqs < 1:
            raise ValueError(f"in_dim and n_freqs must be >= 1, got {in_dim}, {n_freqs}")
        if not 0 < min_period <= max_period:
            raise ValueError(f"need 0 < min_period <= max_period, got {min_period}, {max_period}")
        self.in_dim = in_dim
        self.n_freqs = n_freqs
        self.min_period = min_period
        self.max_period = max_period
        self.out_dim = 2 * n_freqs * in_dim

    def periods(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(n_freqs,)`` geometric periods from ``min_period`` to ``max_period``."""
        if self.n_freqs == 1:
            return torch.full((1,), self.min_period, device=device, dtype=dtype)
        log_p = torch.linspace(
            math.log(self.min_period), math.log(self.max_period), self.n_freqs, device=device, dtype=dtype
        )
        return torch.exp(log_p)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must have shape (B, {self.in_dim}), got {tuple(x.shape)}")
        dtype = _compute_dtype(x)
        angles = (2 * math.pi) * x.to(dtype)[:, :, None] / self.periods(x.device, dtype)  # (B, D, J)
        return torch.cat([torch.sin(angles).flatten(1), torch.cos(angles).flatten(1)], dim=1)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, n_freqs={self.n_freqs}, "
            f"periods=[{self.min_period:g}, {self.max_period:g}]"
        )


class PositionEmbedding2D(FourierPositionEmbedding):
    """:class:`FourierPositionEmbedding` for 2-D points: ``(B, 2) -> (B, 4 * n_freqs)``."""

    def __init__(self, n_freqs: int = 64, *, min_period: float = 5e-3, max_period: float = 50.0) -> None:
        super().__init__(2, n_freqs, min_period=min_period, max_period=max_period)


def time_vector(t: Tensor | float, x_t: Tensor) -> Tensor:
    """``t`` (float, 0-d or ``(B,)`` tensor) as a ``(B,)`` tensor on ``x_t``'s device, at least fp32."""
    b = x_t.shape[0]
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    if isinstance(t, Real) and not isinstance(t, bool):
        return torch.full((b,), float(t), dtype=dtype, device=x_t.device)
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a float, a 0-d tensor or a (B,) tensor, got {type(t).__name__}")
    if t.ndim == 0:
        t = t.expand(b)
    elif t.shape != (b,):
        raise ValueError(f"t must have shape ({b},) to match x_t, or be a scalar; got {tuple(t.shape)}")
    return t.to(device=x_t.device, dtype=dtype)


def drop_labels(
    class_labels: Tensor, p: float, null_class: int, generator: torch.Generator | None = None
) -> Tensor:
    """Label dropout: each label becomes ``null_class`` with probability ``p``.

    ``keep_b = r_b >= p`` with ``r = torch.rand(B, generator=generator)`` on the labels' device: one
    draw of ``B`` uniforms, none when ``p == 0`` (the labels are returned unchanged). Training code
    calls it with the step's generator, so a resumed run drops exactly the same labels.
    """
    if not isinstance(class_labels, Tensor) or class_labels.ndim != 1:
        raise ValueError("class_labels must be a (B,) integer tensor")
    if not (isinstance(p, Real) and 0.0 <= float(p) < 1.0):
        raise ValueError(f"label dropout probability must be in [0, 1), got {p!r}")
    if p == 0:
        return class_labels
    r = torch.rand(class_labels.shape, generator=generator, device=class_labels.device)
    return torch.where(r >= p, class_labels, torch.full_like(class_labels, null_class))


class ClassEmbedding(nn.Module):
    """Learned class table with one extra null row: ``(B,) int -> (B, dim)``.

    ``embedding_table`` has ``num_classes + 1`` rows; id ``num_classes`` is the null class (the
    unconditional input of guidance). ``num_classes = 0`` leaves only the null row: a learned constant,
    i.e. an unconditional network. Init ``N(0, 0.02^2)`` (DiT). ``dropout_prob > 0`` applies
    :func:`drop_labels` in train mode, drawing from the *global* RNG (the official GM-DiT behaviour);
    the project's experiments keep it at 0 and drop labels in the objective with the step generator.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.0) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0 = unconditional), got {num_classes!r}")
        if not (isinstance(dropout_prob, Real) and 0.0 <= float(dropout_prob) < 1.0):
            raise ValueError(f"class dropout probability must be in [0, 1), got {dropout_prob!r}")
        self.num_classes = num_classes
        self.dropout_prob = float(dropout_prob)
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def labels(self, class_labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """Validated ``(batch,)`` int64 labels on ``device``; ``None`` means the null class for all.

        Checking the range costs one device sync (an out-of-range id would otherwise fail inside the
        embedding lookup without naming the argument).
        """
        if class_labels is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if not isinstance(class_labels, Tensor):
            raise TypeError(f"class_labels must be a (B,) integer tensor, got {type(class_labels).__name__}")
        if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
            raise TypeError(f"class_labels must be an integer tensor, got dtype {class_labels.dtype}")
        if tuple(class_labels.shape) != (batch,):
            raise ValueError(f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
        if batch:
            lo, hi = torch.aminmax(class_labels)
            if int(lo) < 0 or int(hi) > self.num_classes:
                raise ValueError(
                    f"class_labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class), "
                    f"got values in [{int(lo)}, {int(hi)}]"
                )
        return class_labels.to(device=device, dtype=torch.long)

    def forward(self, class_labels: Tensor) -> Tensor:
        if self.training and self.dropout_prob > 0:
            class_labels = drop_labels(class_labels, self.dropout_prob, self.num_classes)
        return self.embedding_table(class_labels)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes} (+1 null), dropout_prob={self.dropout_prob}"
