"""Build, save and load the built-in models as TransformerLens models.

Training runs on the plain torch module (TransformerLens' ``NativeModel``) for speed; loading wraps
it in a ``TransformerBridge``, so every activation has a TransformerLens hook name
(``blocks.{i}.hook_resid_post`` ...). Checkpoints are a folder with ``model.safetensors`` and
``config.json``: never pickle.

Example:
    >>> from dlmprobe.models import load_model
    >>> ckpt = load_model("arith-diffusion")   # a shipped checkpoint, or a folder path
    >>> logits = ckpt.model(tokens)            # (batch, pos, d_vocab)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
from transformer_lens.model_bridge.sources.native.init import initialize_native_model
from transformer_lens.model_bridge.sources.native.model import NativeModel

from dlmprobe.datasets import Task
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models.config import ModelConfig

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def bridge_config(config: ModelConfig, device: str = "cpu") -> TransformerBridgeConfig:
    cfg = TransformerBridgeConfig(
        n_layers=config.n_layers,
        d_model=config.d_model,
        n_heads=config.n_heads,
        d_head=config.d_head,
        d_mlp=config.d_mlp,
        n_ctx=config.n_ctx,
        d_vocab=config.d_vocab,
        act_fn="gelu",
        normalization_type="LN",
        attention_dir=config.attention_dir,
        seed=config.seed,
        device=device,
    )
    if config.positions == "rotary":  # read by TransformerLens's native model; learned is its default
        cfg.positional_embedding_type = "rotary"
        cfg.rotary_dim = config.d_head
    return cfg


def build_native(config: ModelConfig, init: bool = True) -> NativeModel:
    """The plain torch module of a built-in model, randomly initialised from ``config.seed``."""
    cfg = bridge_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        module = NativeModel(cfg)
        if init:
            initialize_native_model(module, cfg)
    return module


def to_bridge(module: NativeModel, config: ModelConfig) -> TransformerBridge:
    """Wrap a native module (in place) so it speaks TransformerLens hook names."""
    bridge = build_bridge_from_module(
        module,
        architecture="TransformerLensNative",
        tl_config=bridge_config(config),
        model_name=f"dlmprobe-{config.task}-{config.kind}",
    )
    bridge.eval()
    return bridge


@dataclass
class Checkpoint:
    """A loaded model with its config, task and provenance."""

    model: TransformerBridge
    config: ModelConfig
    task: Task
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def weights_sha256(self) -> str:
        if self.path is None:
            return ""
        return hashlib.sha256((self.path / WEIGHTS_FILE).read_bytes()).hexdigest()


def save_checkpoint(module: torch.nn.Module, config: ModelConfig, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``module``'s weights and ``config`` (plus free-form ``info``) into the folder ``path``.

    Files are written to a temporary name first, so an interrupted save leaves the old checkpoint.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp_weights, tmp_config = path / (WEIGHTS_FILE + ".tmp"), path / (CONFIG_FILE + ".tmp")
    save_file(state, str(tmp_weights))
    tmp_config.write_text(json.dumps({"model": config.to_dict(), "info": info or {}}, indent=2) + "\n")
    tmp_weights.replace(path / WEIGHTS_FILE)
    tmp_config.replace(path / CONFIG_FILE)
    return path


def shipped_checkpoints() -> list[str]:
    """Names of the checkpoints shipped with dlmprobe (``<task>-<kind>``)."""
    if not CHECKPOINT_DIR.is_dir():
        return []
    return sorted(p.name for p in CHECKPOINT_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A shipped checkpoint's name or a checkpoint folder, as a folder path."""
    path = Path(name_or_path)
    if (path / CONFIG_FILE).is_file():
        return path
    shipped = CHECKPOINT_DIR / str(name_or_path)
    if (shipped / CONFIG_FILE).is_file():
        return shipped
    raise FileNotFoundError(
        f"no checkpoint at {str(name_or_path)!r}: expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE} "
        f"or one of the shipped models {shipped_checkpoints()}"
    )


def read_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    try:
        data = json.loads((path / CONFIG_FILE).read_text())
        return ModelConfig.from_dict(data["model"]), data.get("info", {})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DlmprobeInputError(f"{path / CONFIG_FILE} is not a dlmprobe model config: {err}") from None


def load_native(name_or_path: str | Path) -> tuple[NativeModel, ModelConfig, dict[str, Any], Path]:
    """The plain torch module of a checkpoint (what training resumes from)."""
    path = resolve_checkpoint(name_or_path)
    config, info = read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {WEIGHTS_FILE}")
    module = build_native(config, init=False)
    try:
        state = load_file(str(weights))
        module.load_state_dict(state)
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise DlmprobeInputError(f"cannot load weights {weights}: expected tensors matching {config.to_dict()} ({err})") from None
    module.eval()
    return module, config, info, path


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a shipped model by name (``arith-diffusion``) or a checkpoint folder, as a TransformerBridge."""
    module, config, info, path = load_native(name_or_path)
    bridge = to_bridge(module, config)
    if torch.device(device) != torch.device("cpu"):
        bridge = bridge.to(device)
    return Checkpoint(bridge, config, config.build_task(), path, info)


def random_model(config: ModelConfig) -> Checkpoint:
    """A randomly initialised model of ``config``'s architecture (random-weights baselines, tests)."""
    return Checkpoint(to_bridge(build_native(config), config), config, config.build_task())
