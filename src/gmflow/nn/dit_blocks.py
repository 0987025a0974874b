"""Building blocks of :class:`~gmflow.nn.GMDiT`: patch embedding, conditioning, adaLN-Zero blocks, GM output.

Sub-module and parameter names follow the official GM-DiT layout (so its checkpoints load with
strict keys); the equations are in the :mod:`gmflow.nn.dit` module docstring.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..gm import GaussianMixture
from .embeddings import ClassEmbedding, TimestepEmbedding

__all__ = [
    "AdaLayerNormZero",
    "Attention",
    "CombinedEmbedding",
    "DiTBlock",
    "FeedForward",
    "GELUProj",
    "GMOutput",
    "PatchEmbed",
    "TimestepMLP",
    "logstd_mlp",
    "sincos_2d_table",
    "xavier_",
]

TIME_PROJ_DIM = 256  # width of the timestep sinusoid


def sincos_2d_table(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position table ``(grid * grid, dim)`` in float32, token ``n = h * grid + w``.

    With ``omega_i = 10000^(-i / (dim/4))``, ``i = 0 .. dim/4 - 1``, and
    ``e(p) = [sin(p omega), cos(p omega)]`` (``dim/2`` values), row ``n`` is ``[e(w), e(h)]``: the
    first half encodes the column. Computed in float64 (positions ``0 .. grid-1``, i.e.
    ``base_size = grid``, interpolation scale 1).
    """
    if dim % 4:
        raise ValueError(f"the hidden size must be divisible by 4 for the 2-D sin-cos table, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    ang = pos[:, None] * omega[None, :]  # (grid, dim/4)
    e = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)  # (grid, dim/2)
    hh, ww = torch.meshgrid(pos.long(), pos.long(), indexing="ij")
    return torch.cat([e[ww.reshape(-1)], e[hh.reshape(-1)]], dim=1).float()


class PatchEmbed(nn.Module):
    """``Conv2d(C, D, p, stride p)``, tokens row-major, plus the sin-cos table: ``(B,C,H,W) -> (B,T,D)``.

    The table is a non-persistent buffer ``pos_embed`` of shape ``(1, T, D)`` (not in checkpoints).
    """

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        table = sincos_2d_table(dim, sample_size // patch_size).unsqueeze(0)
        self.register_buffer("pos_embed", table, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x).flatten(2).transpose(1, 2)
        return (h + self.pos_embed).to(h.dtype)


class TimestepMLP(nn.Module):
    """``Linear(256, D) -> SiLU -> Linear(D, D)`` on the timestep sinusoid."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class CombinedEmbedding(nn.Module):
    """Conditioning ``c = MLP(sinusoid(1000 t)) + table[y]``: ``t (B,), y (B,) -> (B, D)``.

    The sinusoid (cos half first, frequency shift 0) is computed in float32 from ``t`` in [0, 1].
    """

    def __init__(self, num_classes: int, dim: int, class_dropout_prob: float) -> None:
        super().__init__()
        self.time_proj = TimestepEmbedding(TIME_PROJ_DIM, scale=1000.0, freq_shift=0.0)
        self.timestep_embedder = TimestepMLP(TIME_PROJ_DIM, dim)
        self.class_embedder = ClassEmbedding(num_classes, dim, class_dropout_prob)

    def forward(self, t: Tensor, class_labels: Tensor) -> Tensor:
        proj = self.time_proj(t).to(self.timestep_embedder.linear_1.weight.dtype)
        return self.timestep_embedder(proj) + self.class_embedder(class_labels)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero modulation: ``linear(SiLU(c))`` -> 6 chunks; ``norm`` is the attention-branch LayerNorm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(norm(x) (1 + scale_msa) + shift_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(cond)).chunk(
            6, dim=1
        )
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class Attention(nn.Module):
    """Multi-head self-attention (``to_q/k/v``, ``to_out.0``), scale ``1/sqrt(head_dim)``, via SDPA."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool, dropout: float) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=True), nn.Dropout(dropout)])

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (
            f(x).reshape(b, n, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v)
        )
        h = nn.functional.scaled_dot_product_attention(q, k, v)
        h = h.transpose(1, 2).reshape(b, n, -1)
        return self.to_out[1](self.to_out[0](h))


class GELUProj(nn.Module):
    """``GELU(proj(x))``, tanh approximation or exact."""

    def __init__(self, dim: int, inner: int, approximate: str) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """``net = [GELUProj(D, 4D), Dropout, Linear(4D, D)]``."""

    def __init__(self, dim: int, approximate: str, dropout: float) -> None:
        super().__init__()
        self.net = nn.ModuleList(
            [GELUProj(dim, 4 * dim, approximate), nn.Dropout(dropout), nn.Linear(4 * dim, dim)]
        )

    def forward(self, x: Tensor) -> Tensor:
        for m in self.net:
            x = m(x)
        return x


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: gated attention residual, then gated MLP residual.

    The MLP branch's LayerNorm (``norm3``, eps ``norm_eps``) differs from the attention branch's
    (``norm1.norm``, eps 1e-6); neither has parameters.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        bias: bool,
        dropout: float,
        approximate: str,
        norm_eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.attn1 = Attention(dim, heads, head_dim, bias, dropout)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.ff = FeedForward(dim, approximate, dropout)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, cond)
        x = gate_msa.unsqueeze(1) * self.attn1(h) + x
        h = self.norm3(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return gate_mlp.unsqueeze(1) * self.ff(h) + x


def logstd_mlp(dim: int, inner: int, layers: int) -> nn.Sequential:
    """``[SiLU, Linear(D, inner), SiLU, Linear(inner, inner), ..., SiLU, Linear(., 1)]``.

    ``layers`` Linears in all; Linear ``j`` sits at index ``2 j + 1`` (``logstd_layers.1`` and
    ``.3`` for two layers).
    """
    mods: list[nn.Module] = []
    width = dim
    for j in range(layers):
        out = 1 if j == layers - 1 else inner
        mods += [nn.SiLU(), nn.Linear(width, out)]
        width = out
    return nn.Sequential(*mods)


class GMOutput(nn.Module):
    """Unpatchified ``(B, K(C+1), H, W)`` channels + conditioning ``(B, D)`` -> u-space GaussianMixture.

    Channels ``k C + c`` (``k < K``) are the means, the last ``K`` the logits (log-softmax over K, in
    at least float32). ``log s = logstd_layers(c.detach())`` runs with autocast disabled, or is the
    ``constant_logstd``.
    """

    def __init__(
        self, channels: int, num_gaussians: int, dim: int, inner: int, layers: int, constant: float | None
    ) -> None:
        super().__init__()
        self.channels = channels
        self.num_gaussians = num_gaussians
        self.constant_logstd = constant
        self.logstd_layers = None if constant is not None else logstd_mlp(dim, inner, layers)

    def forward(self, x: Tensor, cond: Tensor) -> GaussianMixture:
        b, _, h, w = x.shape
        k, c = self.num_gaussians, self.channels
        means = x[:, : k * c].reshape(b, k, c, h, w)
        logweights = torch.log_softmax(x[:, k * c :].reshape(b, k, 1, h, w), dim=1)
        if self.logstd_layers is None:
            logstds = torch.full((b, 1, 1, 1, 1), float(self.constant_logstd), dtype=x.dtype, device=x.device)
        else:
            wdtype = self.logstd_layers[1].weight.dtype
            with torch.autocast(device_type=x.device.type, enabled=False):
                logstds = self.logstd_layers(cond.detach().to(wdtype))
            logstds = logstds.to(x.dtype).reshape(b, 1, 1, 1, 1)
        return GaussianMixture(means, logweights, logstds)


def xavier_(layer: nn.Linear | nn.Conv2d) -> None:
    """Xavier-uniform weight (a conv viewed as ``(out, in * k * k)``), zero bias."""
    nn.init.xavier_uniform_(layer.weight.view(layer.weight.shape[0], -1))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
