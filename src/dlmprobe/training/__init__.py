"""Training of the built-in diffusion denoisers and their autoregressive twins."""

from dlmprobe.training.trainer import TrainConfig, autoregressive_loss, diffusion_loss, train

__all__ = ["TrainConfig", "autoregressive_loss", "diffusion_loss", "train"]
