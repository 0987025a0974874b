"""Networks: embeddings, output heads (usable on any trunk), the toy 2-D MLP, the U-Net and GM-DiT."""

from .dit import GMDiT
from .embeddings import (
    ClassEmbedding,
    FourierPositionEmbedding,
    PositionEmbedding2D,
    TimestepEmbedding,
    drop_labels,
    timestep_embedding,
)
from .heads import GMHead, LogStdHead, VelocityHead, kaiming_linear_
from .mlp import ToyMLP
from .unet import SmallUNet

__all__ = [
    "ClassEmbedding",
    "FourierPositionEmbedding",
    "GMDiT",
    "GMHead",
    "LogStdHead",
    "PositionEmbedding2D",
    "SmallUNet",
    "TimestepEmbedding",
    "ToyMLP",
    "VelocityHead",
    "drop_labels",
    "kaiming_linear_",
    "timestep_embedding",
]
