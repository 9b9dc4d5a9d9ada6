"""Models behind one interface (:class:`ModelHandle`): the built-in denoisers and their autoregressive
twins, and Hugging Face diffusion and causal LMs (:func:`load_hf_model`)."""

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
    store_half,
    to_bridge,
)
from dlmprobe.models.config import KINDS, ModelConfig
from dlmprobe.models.handle import ModelHandle, from_checkpoint
from dlmprobe.models.huggingface import load_hf_model

__all__ = [
    "CHECKPOINT_DIR",
    "KINDS",
    "Checkpoint",
    "ModelConfig",
    "ModelHandle",
    "build_native",
    "from_checkpoint",
    "load_hf_model",
    "load_model",
    "load_native",
    "random_model",
    "resolve_checkpoint",
    "save_checkpoint",
    "shipped_checkpoints",
    "store_half",
    "to_bridge",
]
