"""Networks: embeddings, output heads (usable on any trunk), the toy 2-D MLP, the U-Net, GM-DiT and the
spectrum net of spectral GM sampling (alone, or trained and saved with a GM denoiser: SpectralDenoiser),
the learned loss normaliser of Simple ReFlow."""

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
from .log_loss import LogLossNet, WithLogLoss
from .mlp import ToyMLP
from .spectral_denoiser import SpectralDenoiser
from .spectrum import SpectrumMLP
from .unet import SmallUNet

__all__ = [
    "ClassEmbedding",
    "FourierPositionEmbedding",
    "GMDiT",
    "GMHead",
    "LogLossNet",
    "LogStdHead",
    "PositionEmbedding2D",
    "SmallUNet",
    "SpectralDenoiser",
    "SpectrumMLP",
    "TimestepEmbedding",
    "ToyMLP",
    "VelocityHead",
    "WithLogLoss",
    "drop_labels",
    "kaiming_linear_",
    "timestep_embedding",
]
