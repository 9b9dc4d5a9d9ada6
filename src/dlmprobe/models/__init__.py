"""Built-in diffusion denoisers and their autoregressive twins, as TransformerLens models."""

from dlmprobe.models.checkpoint import (
    CHECKPOINT_DIR,
    Checkpoint,
    build_native,
    load_model,
    load_native,
    random_model,
    resolve_checkpoint,
    save_checkpoint,
    shipped_checkpoints,
    to_bridge,
)
from dlmprobe.models.config import KINDS, ModelConfig

__all__ = [
    "CHECKPOINT_DIR",
    "KINDS",
    "Checkpoint",
    "ModelConfig",
    "build_native",
    "load_model",
    "load_native",
    "random_model",
    "resolve_checkpoint",
    "save_checkpoint",
    "shipped_checkpoints",
    "to_bridge",
]
