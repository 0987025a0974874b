"""Sample-quality metrics: toy 2-D (sliced-W2, MMD, checkerboard support/mass) and digits images (FD, P/R)."""

from gmflow.metrics.images import (
    DigitClassifier,
    frechet_distance,
    get_classifier,
    image_metrics,
    knn_precision_recall,
)
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
    "DigitClassifier",
    "frechet_distance",
    "get_classifier",
    "image_metrics",
    "knn_precision_recall",
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
