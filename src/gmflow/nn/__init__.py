"""Networks: embeddings, output heads (usable on any trunk) and the toy 2-D MLP denoiser."""

from .embeddings import FourierPositionEmbedding, PositionEmbedding2D, TimestepEmbedding, timestep_embedding
from .heads import GMHead, LogStdHead, VelocityHead, kaiming_linear_
from .mlp import ToyMLP
from .unet import SmallUNet

__all__ = [
    "FourierPositionEmbedding",
    "GMHead",
    "LogStdHead",
    "PositionEmbedding2D",
    "SmallUNet",
    "TimestepEmbedding",
    "ToyMLP",
    "VelocityHead",
    "kaiming_linear_",
    "timestep_embedding",
]
