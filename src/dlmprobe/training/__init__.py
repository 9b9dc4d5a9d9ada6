"""Training of the built-in diffusion denoisers and their autoregressive twins."""

from dlmprobe.training.curve import PLATEAU_SPAN, PLATEAU_TOLERANCE, plateau_verdict, read_curve, recent_gain
from dlmprobe.training.trainer import TrainConfig, autoregressive_loss, diffusion_loss, train

__all__ = ["PLATEAU_SPAN", "PLATEAU_TOLERANCE", "TrainConfig", "autoregressive_loss", "diffusion_loss",
           "plateau_verdict", "read_curve", "recent_gain", "train"]
