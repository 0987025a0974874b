"""Toy 2-D data sets: checkerboard, two moons, Swiss roll (and the lead's ring GMM by name).

Every data set samples on the fly (no pre-drawn buffer) and is deterministic given a
``torch.Generator``. Random numbers are drawn on the generator's device (CPU when no generator is
given) in float32 (float64 if ``dtype=torch.float64``), then moved to ``device``/``dtype``. So the
same seed gives the same points on every device.

All sets live roughly in ``[-4, 4]^2``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .gmm import ring_gmm

__all__ = ["TOY2D_NAMES", "Checkerboard", "SwissRoll", "Toy2D", "TwoMoons", "make_toy2d"]

TOY2D_NAMES: tuple[str, ...] = ("checkerboard", "moons", "swissroll", "ring")


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) <= 0:
        raise ValueError(f"n must be a positive int, got n={n!r}")
    return int(n)


def _rng_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


class Toy2D:
    """Base class: subclasses implement ``_sample(n, generator, device, dtype)``."""

    name: str = "toy2d"
    dim: int = 2

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw ``n`` points, returned as a ``(n, 2)`` tensor on ``device`` with ``dtype``."""
        n = _check_n(n)
        rng_device = generator.device if generator is not None else torch.device("cpu")
        x = self._sample(n, generator, rng_device, _rng_dtype(dtype))
        return x.to(device=device if device is not None else rng_device, dtype=dtype)

    def __call__(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Shorthand for ``sample(n, generator=generator)`` (the ``sampler(n, generator)`` protocol)."""
        return self.sample(n, generator=generator)

    def _sample(self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype):
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Checkerboard(Toy2D):
    """Checkerboard of 8 uniform squares (Lipman et al. 2023; GMFlow paper Sec. 4.1).

    A 4x4 grid of cells of side 0.5 covers ``[-1, 1]^2``. Cell ``(i, j)`` (column ``i`` along x,
    row ``j`` along y, both 0..3 from the bottom-left) is kept iff ``i + j`` is even. A sample picks
    one of the 8 kept cells uniformly, then a uniform point inside it, and is multiplied by
    ``scale``. With ``scale=4`` the support is 8 squares of side 2 inside ``[-4, 4]^2`` and the
    density is ``1/32`` on the support.

    Cells are numbered 0..7 in row-major order over the kept cells (``j`` then ``i``), so cell 0 is
    the bottom-left square ``[-4,-2]x[-4,-2]`` and cell 7 the top-right ``[2,4]x[2,4]``.
    """

    name = "checkerboard"
    n_cells: int = 8
    _EDGE_TOL: float = 1e-6

    def __init__(self, scale: float = 4.0) -> None:
        if not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got scale={scale!r}")
        self.scale = float(scale)

    @staticmethod
    def cells() -> Tensor:
        """The 8 kept cells as a ``(8, 2)`` long tensor of ``(i, j)`` grid indices."""
        return torch.tensor([(i, j) for j in range(4) for i in range(4) if (i + j) % 2 == 0])

    def _sample(self, n, generator, device, dtype):
        cells = self.cells().to(device=device, dtype=dtype)
        k = torch.randint(0, self.n_cells, (n,), generator=generator, device=device)
        u = torch.rand(n, 2, generator=generator, device=device, dtype=dtype)
        return (-1.0 + 0.5 * (cells[k] + u)) * self.scale

    def cell_index(self, x: Tensor) -> Tensor:
        """Cell number in 0..7 for each point of ``x`` ``(n, 2)``; -1 outside the cells or non-finite.

        Cells are closed and widened by ``1e-6`` cell widths (``2e-6`` at ``scale=4``), so a sample that
        float rounding puts exactly on a cell edge (e.g. ``x = 4.0``) still counts as inside. A point
        on an edge shared by two kept cells (they touch only at corners) gets the lower-left cell's
        ``floor`` assignment.
        """
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"x must have shape (n, 2), got {tuple(x.shape)}")
        # numpy: a handful of vectorised ops, no intra-op thread pool (cheap even on a busy machine)
        a = x.detach().to(device="cpu", dtype=torch.float64).numpy()
        finite = np.isfinite(a).all(axis=1)
        g = (np.where(np.isfinite(a), a, 0.0) / self.scale + 1.0) / 0.5  # grid units, cell k = [k, k+1)
        tol = self._EDGE_TOL
        cand = np.floor(g[:, :, None] + np.array([0.0, -tol, tol]))  # (n, 2, 3): unperturbed first
        ok = (cand >= 0) & (cand <= 3)
        cand = np.clip(cand, 0, 3).astype(np.int64)
        lut = np.full((4, 4), -1, dtype=np.int64)
        c = self.cells().numpy()
        lut[c[:, 0], c[:, 1]] = np.arange(self.n_cells)
        combos = lut[cand[:, 0, :, None], cand[:, 1, None, :]]  # (n, 3, 3)
        combos = np.where(ok[:, 0, :, None] & ok[:, 1, None, :], combos, -1).reshape(len(a), 9)
        first = np.argmax(combos >= 0, axis=1)  # first valid combination (0 if none)
        idx = np.where(finite, combos[np.arange(len(a)), first], -1)
        return torch.from_numpy(idx)

    def in_support(self, x: Tensor) -> Tensor:
        """Boolean ``(n,)``: the point lies in one of the 8 squares (non-finite points are outside)."""
        return self.cell_index(x) >= 0


class TwoMoons(Toy2D):
    """Two interleaved half circles (as in scikit-learn's ``make_moons``), centred and scaled.

    Raw points: upper moon ``(cos a, sin a)``, lower moon ``(1 - cos a, 0.5 - sin a)``, with
    ``a ~ U(0, pi)`` and the moon chosen with probability 1/2; then Gaussian noise of std ``noise``
    (raw units) is added, the raw box centre ``(0.5, 0.25)`` is subtracted and the result is
    multiplied by ``scale``. With ``scale=2.5`` the data spans about ``[-3.75, 3.75] x [-1.9, 1.9]``.
    """

    name = "moons"

    def __init__(self, noise: float = 0.05, scale: float = 2.5) -> None:
        if not (noise >= 0 and math.isfinite(noise)):
            raise ValueError(f"noise must be a finite number >= 0, got noise={noise!r}")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a positive finite number, got scale={scale!r}")
        self.noise = float(noise)
        self.scale = float(scale)

    def _sample(self, n, generator, device, dtype):
        a = math.pi * torch.rand(n, generator=generator, device=device, dtype=dtype)
        lower = torch.rand(n, generator=generator, device=device, dtype=dtype) < 0.5
        eps = torch.randn(n, 2, generator=generator, device=device, dtype=dtype)
        x = torch.where(lower, 1.0 - torch.cos(a), torch.cos(a))
        y = torch.where(lower, 0.5 - torch.sin(a), torch.sin(a))
        pts = torch.stack([x - 0.5, y - 0.25], dim=1) + self.noise * eps
        return pts * self.scale


class SwissRoll(Toy2D):
    """2-D Swiss roll (the x-z slice of scikit-learn's ``make_swiss_roll``), scaled.

    Raw points: ``t = 1.5 pi (1 + 2 u)``, ``u ~ U(0, 1)``, point ``(t cos t, t sin t)`` plus
    Gaussian noise of std ``noise`` (raw units); the result is multiplied by ``scale``. ``t`` is
    uniform in angle, not in arc length (the outer turn is sparser). With ``scale=0.25`` the raw
    radius ``<= 4.5 pi`` maps to ``<= 3.53``.
    """

    name = "swissroll"

    def __init__(self, noise: float = 0.5, scale: float = 0.25) -> None:
        if not (noise >= 0 and math.isfinite(noise)):
            raise ValueError(f"noise must be a finite number >= 0, got noise={noise!r}")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a positive finite number, got scale={scale!r}")
        self.noise = float(noise)
        self.scale = float(scale)

    def _sample(self, n, generator, device, dtype):
        t = 1.5 * math.pi * (1.0 + 2.0 * torch.rand(n, generator=generator, device=device, dtype=dtype))
        eps = torch.randn(n, 2, generator=generator, device=device, dtype=dtype)
        pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) + self.noise * eps
        return pts * self.scale


def make_toy2d(name: str, **kwargs: Any):
    """Build a toy 2-D data set by name (one of :data:`TOY2D_NAMES`); ``kwargs`` go to its constructor.

    ``"ring"`` returns :func:`gmflow.data.gmm.ring_gmm` (8 Gaussians on a circle of radius 4).
    """
    key = str(name).strip().lower()
    if key == "checkerboard":
        return Checkerboard(**kwargs)
    if key == "moons":
        return TwoMoons(**kwargs)
    if key == "swissroll":
        return SwissRoll(**kwargs)
    if key == "ring":
        return ring_gmm(**kwargs)
    raise ValueError(f"unknown toy 2-D data set {name!r}; valid names: {', '.join(TOY2D_NAMES)}")
