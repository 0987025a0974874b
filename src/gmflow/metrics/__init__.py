"""Sample-quality metrics (toy 2-D now; image metrics later)."""

from gmflow.metrics.toy2d import (
    cell_mass_chi2,
    cell_mass_kl,
    cell_masses,
    checkerboard_metrics,
    histogram_kl,
    in_support_fraction,
    rbf_mmd,
    sliced_w2,
    sliced_w2_mean,
    sw2_floor,
)

__all__ = [
    "cell_mass_chi2",
    "cell_mass_kl",
    "cell_masses",
    "checkerboard_metrics",
    "histogram_kl",
    "in_support_fraction",
    "rbf_mmd",
    "sliced_w2",
    "sliced_w2_mean",
    "sw2_floor",
]
