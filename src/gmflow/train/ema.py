"""Exponential moving average of model weights (float32 shadow copy).

At update ``i = 1, 2, ...``: ``ema <- beta_i ema + (1 - beta_i) theta`` with

* ``kind="power"`` (Karras et al. 2022, the GMFlow toy config):
  ``beta_i = (1 - 1/i)^(gamma + 1)``, so ``beta_1 = 0`` (the EMA starts at the weights) and the
  average covers roughly the last ``1/(gamma + 1)`` fraction of training;
* ``kind="rampup"`` (StyleGAN/EDM, the GMFlow ImageNet config): with ``nimg = i * batch_size``,
  half-life ``H = min(halflife_kimg * 1000, rampup * nimg)`` images (no ramp-up when ``rampup`` is
  None) and ``beta_i = 0.5^(batch_size / H)``.

Only floating-point trainable parameters are averaged; buffers are taken from the live model.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["EMA", "ema_beta"]


def ema_beta(
    i: int,
    kind: str = "power",
    *,
    gamma: float = 7.0,
    batch_size: int | None = None,
    halflife_kimg: float = 30000.0,
    rampup: float | None = 0.05,
) -> float:
    """Decay ``beta_i`` of update ``i >= 1`` (see the module docstring)."""
    if i < 1:
        raise ValueError(f"EMA update index starts at 1, got {i}")
    if kind == "power":
        return (1.0 - 1.0 / i) ** (gamma + 1.0)
    if kind == "rampup":
        if batch_size is None or batch_size < 1:
            raise ValueError("kind='rampup' needs batch_size >= 1")
        h = halflife_kimg * 1000.0
        if rampup is not None:
            h = min(h, rampup * i * batch_size)
        return 0.5 ** (batch_size / max(h, 1e-8))
    raise ValueError(f"EMA kind must be 'power' or 'rampup', got {kind!r}")


class EMA:
    """Float32 EMA of ``model``'s trainable parameters.

    Example::

        ema = EMA(model, kind="power", gamma=7)
        for batch in data:
            ...; opt.step(); ema.update(model)
        ema.copy_to(eval_model)
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str = "power",
        gamma: float = 7.0,
        *,
        batch_size: int | None = None,
        halflife_kimg: float = 30000.0,
        rampup: float | None = 0.05,
    ) -> None:
        ema_beta(1, kind, gamma=gamma, batch_size=batch_size or 1, halflife_kimg=halflife_kimg, rampup=rampup)
        if kind == "rampup" and (batch_size is None or batch_size < 1):
            raise ValueError("kind='rampup' needs batch_size >= 1")
        self.kind = kind
        self.gamma = float(gamma)
        self.batch_size = batch_size
        self.halflife_kimg = float(halflife_kimg)
        self.rampup = rampup
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().to(torch.float32).clone() for name, p in self._params(model)
        }

    @staticmethod
    def _params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]

    def beta(self, i: int | None = None) -> float:
        """Decay used at update ``i`` (default: the next update)."""
        return ema_beta(
            self.num_updates + 1 if i is None else i,
            self.kind,
            gamma=self.gamma,
            batch_size=self.batch_size,
            halflife_kimg=self.halflife_kimg,
            rampup=self.rampup,
        )

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One EMA step towards ``model``'s current parameters; returns the beta used."""
        beta = self.beta()
        params = self._params(model)
        if [n for n, _ in params] != list(self.shadow):
            raise ValueError("model parameters do not match the EMA's (different architecture?)")
        shadow = list(self.shadow.values())
        src = [p.detach().to(torch.float32) for _, p in params]
        torch._foreach_lerp_(shadow, src, 1.0 - beta)
        self.num_updates += 1
        return beta

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Write the EMA weights into ``model`` (cast to its parameter dtypes); returns ``model``."""
        params = dict(self._params(model))
        missing = set(self.shadow) - set(params)
        if missing:
            raise ValueError(f"model lacks EMA parameters: {sorted(missing)[:3]}")
        for name, s in self.shadow.items():
            params[name].copy_(s)
        return model

    def averaged_model(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` (in eval mode, no grads) holding the EMA weights."""
        m = copy.deepcopy(model)
        self.copy_to(m)
        m.eval().requires_grad_(False)
        return m

    def model_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """``model.state_dict()`` with the averaged parameters (float32) in place of the live ones."""
        return {k: self.shadow.get(k, v).detach() for k, v in model.state_dict().items()}

    def state_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "gamma": self.gamma,
            "batch_size": self.batch_size,
            "halflife_kimg": self.halflife_kimg,
            "rampup": self.rampup,
            "num_updates": self.num_updates,
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore ``num_updates`` and (if present) the shadow weights; hyper-parameters stay as built."""
        self.num_updates = int(state["num_updates"])  # type: ignore[arg-type]
        shadow = state.get("shadow")
        if shadow is not None:
            self.load_shadow(shadow)  # type: ignore[arg-type]

    @torch.no_grad()
    def load_shadow(self, tensors: dict[str, Tensor]) -> None:
        """Load averaged weights from a mapping name -> tensor (extra entries, e.g. buffers, ignored)."""
        missing = [k for k in self.shadow if k not in tensors]
        if missing:
            raise ValueError(f"EMA weights lack parameters: {missing[:3]}")
        for k, s in self.shadow.items():
            if tensors[k].shape != s.shape:
                raise ValueError(
                    f"EMA weight {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(s.shape)}"
                )
            s.copy_(tensors[k])
