"""Output heads that turn a trunk's feature vector into a velocity or a GM over the velocity.

Both heads work on any trunk that produces one feature vector per sample, ``(B, F)``, and
predict vector data ``(B, C)``. Image-shaped outputs (``means (B, K, C, H, W)``, per-pixel
weights) belong to the image backbones, which lay out their own final projection; those can
still reuse :class:`LogStdHead` for the per-sample ``log s``.

Outputs are at least float32 (float64 when the head runs in float64): under bf16 autocast the
Linear layers may run in bf16, and their results are cast up before the log-softmax, because
all GM math runs in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..gm import GaussianMixture

__all__ = ["GMHead", "LogStdHead", "VelocityHead", "kaiming_linear_"]


def kaiming_linear_(layer: nn.Linear, *, zero_weight: bool = False) -> nn.Linear:
    """GMFlow toy init: Kaiming-normal weights (fan_in, ReLU gain: std = sqrt(2 / fan_in)), zero bias.

    ``zero_weight=True`` zeroes the weight as well (used for the logits and log-std outputs).
    """
    if zero_weight:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _at_least_fp32(x: Tensor) -> Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _Head(nn.Module):
    """Shared plumbing: optional autocast-free execution of the head's Linear layers."""

    def __init__(self, fp32: bool) -> None:
        super().__init__()
        self.fp32 = fp32

    def _run(self, layer: nn.Module, x: Tensor) -> Tensor:
        if not self.fp32:
            return layer(x)
        weight = next(layer.parameters())
        with torch.autocast(device_type=x.device.type, enabled=False):
            return layer(x.to(weight.dtype))


class LogStdHead(_Head):
    """Per-sample log-std ``log s``: ``(B, F) -> (B, 1)``.

    ``hidden=None``: a single ``Linear(F, 1)`` (toy head). ``hidden=H``: the paper's GM-DiT MLP
    ``SiLU -> Linear(F, H) -> SiLU -> Linear(H, 1)``, meant for a raw conditioning embedding.
    The last Linear is zero (weight and bias), so ``log s = 0``, i.e. ``s = 1``, at init.
    ``detach=True`` stops the gradient into the input features (the paper's stop-gradient).
    """

    def __init__(
        self, in_features: int, hidden: int | None = None, *, detach: bool = False, fp32: bool = False
    ) -> None:
        super().__init__(fp32)
        self.in_features = in_features
        self.hidden = hidden
        self.detach = detach
        if hidden is None:
            self.net: nn.Module = nn.Linear(in_features, 1)
        else:
            self.net = nn.Sequential(
                nn.SiLU(), nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, 1)
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        linears = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        for layer in linears[:-1]:
            kaiming_linear_(layer)
        kaiming_linear_(linears[-1], zero_weight=True)

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"log-std features must have shape (B, {self.in_features}), got {tuple(features.shape)}"
            )
        if self.detach:
            features = features.detach()
        return _at_least_fp32(self._run(self.net, features))


class GMHead(_Head):
    """Gaussian-mixture head over the velocity (paper Sec. 3.1, toy head of the official code).

    q(u | x_t) = sum_k A_k N(u; mu_k, s^2 I), with, from features ``h`` of shape ``(B, F)``:

    * ``mu = Linear(F, K C)(h)`` viewed as ``(B, K, C)`` (component-major: column ``k C + c``);
    * ``log A = log_softmax_K(Linear(F, K)(h))`` as ``(B, K, 1)``;
    * ``log s = Linear(F, 1)(h)`` as ``(B, 1, 1)`` -- one scalar per sample, or a constant
      (``constant_logstd``), or predicted from a separate input ``logstd_features`` of width
      ``logstd_in_features`` (e.g. the time embedding), optionally through an MLP
      (``logstd_hidden``) and with stop-gradient (``detach_logstd``).

    Init: all Linear layers Kaiming-normal (fan_in, ReLU gain) with zero bias; the logits and
    log-std output weights are zero, so at init the weights are uniform (1/K) and s = 1.
    Vector data only: returns means ``(B, K, C)``, logweights ``(B, K, 1)``, logstds ``(B, 1, 1)``.
    """

    def __init__(
        self,
        in_features: int,
        channels: int,
        num_components: int,
        *,
        constant_logstd: float | None = None,
        logstd_in_features: int | None = None,
        logstd_hidden: int | None = None,
        detach_logstd: bool = False,
        fp32: bool = False,
    ) -> None:
        super().__init__(fp32)
        if min(in_features, channels, num_components) < 1:
            raise ValueError(
                f"in_features, channels and num_components must be >= 1, "
                f"got {in_features}, {channels}, {num_components}"
            )
        if constant_logstd is not None and (logstd_in_features is not None or logstd_hidden is not None):
            raise ValueError("constant_logstd excludes logstd_in_features / logstd_hidden")
        self.in_features = in_features
        self.channels = channels
        self.num_components = num_components
        self.constant_logstd = None if constant_logstd is None else float(constant_logstd)
        self.logstd_in_features = logstd_in_features
        self.means = nn.Linear(in_features, num_components * channels)
        self.logits = nn.Linear(in_features, num_components)
        self.logstd: LogStdHead | None = None
        if constant_logstd is None:
            self.logstd = LogStdHead(
                in_features if logstd_in_features is None else logstd_in_features,
                logstd_hidden,
                detach=detach_logstd,
                fp32=fp32,
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        kaiming_linear_(self.means)
        kaiming_linear_(self.logits, zero_weight=True)
        if self.logstd is not None:
            self.logstd.reset_parameters()

    def forward(self, features: Tensor, logstd_features: Tensor | None = None) -> GaussianMixture:
        """``features (B, F)`` [, ``logstd_features (B, F')``] -> ``GaussianMixture`` over u."""
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"features must have shape (B, {self.in_features}), got {tuple(features.shape)}")
        b, k, c = features.shape[0], self.num_components, self.channels
        if (logstd_features is not None) != (self.logstd_in_features is not None):
            raise ValueError(
                "logstd_features must be given exactly when the head was built with logstd_in_features"
            )
        fused = (
            self.logstd is not None
            and logstd_features is None
            and self.logstd.hidden is None
            and not self.logstd.detach
        )
        if fused:
            # one matmul for means, logits and log-std (same parameters, fewer passes over features)
            lin = self.logstd.net
            weight = torch.cat([self.means.weight, self.logits.weight, lin.weight])
            bias = torch.cat([self.means.bias, self.logits.bias, lin.bias])
            if self.fp32:
                with torch.autocast(device_type=features.device.type, enabled=False):
                    out = torch.nn.functional.linear(features.to(weight.dtype), weight, bias)
            else:
                out = torch.nn.functional.linear(features, weight, bias)
            out = _at_least_fp32(out)
            means = out[:, : k * c].reshape(b, k, c)
            logweights = torch.log_softmax(out[:, k * c : k * c + k], dim=1).unsqueeze(2)
            return GaussianMixture(means, logweights, out[:, k * c + k :].reshape(b, 1, 1))
        means = _at_least_fp32(self._run(self.means, features)).reshape(b, k, c)
        logits = _at_least_fp32(self._run(self.logits, features))
        logweights = torch.log_softmax(logits, dim=1).unsqueeze(2)
        if self.logstd is None:
            logstds = means.new_full((b, 1, 1), self.constant_logstd)
        else:
            src = features if logstd_features is None else logstd_features
            if src.shape[0] != b:
                raise ValueError(f"logstd_features has batch {src.shape[0]}, features has {b}")
            logstds = self.logstd(src).reshape(b, 1, 1)
        return GaussianMixture(means, logweights, logstds)

    def extra_repr(self) -> str:
        s = f"channels={self.channels}, num_components={self.num_components}"
        if self.constant_logstd is not None:
            s += f", constant_logstd={self.constant_logstd}"
        return s


class VelocityHead(_Head):
    """Plain flow-matching head: ``u = Linear(F, C)(h)``, ``(B, F) -> (B, C)``, Kaiming init, zero bias."""

    def __init__(self, in_features: int, channels: int, *, fp32: bool = False) -> None:
        super().__init__(fp32)
        self.in_features = in_features
        self.channels = channels
        self.proj = nn.Linear(in_features, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        kaiming_linear_(self.proj)

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"features must have shape (B, {self.in_features}), got {tuple(features.shape)}")
        return _at_least_fp32(self._run(self.proj, features))
