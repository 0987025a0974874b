"""Data sets: toy 2-D distributions, GMM oracles with exact posteriors, sklearn digits (images), by name."""

from gmflow.data.digits import Digits
from gmflow.data.gmm import GaussianMixtureData, ring_gmm
from gmflow.data.registry import DATASETS, load_dataset
from gmflow.data.toy2d import TOY2D_NAMES, Checkerboard, SwissRoll, Toy2D, TwoMoons, make_toy2d

__all__ = [
    "DATASETS",
    "load_dataset",
    "Digits",
    "GaussianMixtureData",
    "ring_gmm",
    "TOY2D_NAMES",
    "Checkerboard",
    "SwissRoll",
    "Toy2D",
    "TwoMoons",
    "make_toy2d",
]
