"""Build, save and load the built-in models as TransformerLens models.

Training runs on the plain torch module (TransformerLens' ``NativeModel``) for speed; loading wraps
it in a ``TransformerBridge``, so every activation has a TransformerLens hook name
(``blocks.{i}.hook_resid_post`` ...). Checkpoints are a folder with ``model.safetensors`` and
``config.json`` (which records the weights' sha256, checked on loading): never pickle.

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
from safetensors import SafetensorError
from safetensors.torch import load, save
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources._bridge_builder import (
    build_bridge_from_module,
)
from transformer_lens.model_bridge.sources.native.init import initialize_native_model
from transformer_lens.model_bridge.sources.native.model import NativeModel

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.files import (
    atomic_folder,
    atomic_write_bytes,
    atomic_write_text,
    load_json_object,
    one_line,
)
from dlmprobe.models.config import ModelConfig
from dlmprobe.tasks import Task

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


def weights_bytes(module: torch.nn.Module) -> bytes:
    """``module``'s weights as the bytes of a safetensors file (the same weights give the same bytes)."""
    return save({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()})


def save_checkpoint(module: torch.nn.Module, config: ModelConfig, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``module``'s weights and ``config`` (plus free-form ``info``) into the folder ``path``."""
    return write_checkpoint(path, weights_bytes(module), config, info)


def write_checkpoint(path: str | Path, weights: bytes, config: ModelConfig, info: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder from the bytes of its weights file; ``config.json`` records their sha256.

    A new folder appears whole (built beside it, then renamed into place). In an existing folder
    each file is replaced atomically, the weights first and ``config.json`` last: a save killed
    between the two leaves weights that do not match the recorded sha256, which loading reports.
    """
    path = Path(path)
    record = {"model": config.to_dict(), "info": info or {}, "weights_sha256": hashlib.sha256(weights).hexdigest()}
    text = json.dumps(record, indent=2) + "\n"
    if path.exists():
        atomic_write_bytes(path / WEIGHTS_FILE, weights)
        atomic_write_text(path / CONFIG_FILE, text)
    else:
        with atomic_folder(path) as tmp:
            (tmp / WEIGHTS_FILE).write_bytes(weights)
            (tmp / CONFIG_FILE).write_text(text)
    return path


def store_half(name_or_path: str | Path) -> Path:
    """Rewrite a checkpoint's weights as float16 (half the bytes); it still loads into a float32 model.

    The trained float32 weights' sha256 stays in ``info["trained_weights_sha256"]`` and
    ``info["stored_dtype"]`` says ``"float16"``; ``config.json`` records the new file's sha256, so
    loading verifies the stored weights. A checkpoint already stored as float16 is refused.
    """
    path = resolve_checkpoint(name_or_path)
    config, info, recorded = read_config(path)
    if info.get("stored_dtype") == "float16":
        raise DlmprobeInputError(f"{path} is already stored as float16")
    state = read_weights(path / WEIGHTS_FILE, recorded)
    if any(t.dtype != torch.float32 for t in state.values()):
        raise DlmprobeInputError(f"{path}: expected float32 weights to halve, found {sorted({str(t.dtype) for t in state.values()})}")
    half = save({k: v.to(torch.float16).contiguous() for k, v in state.items()})
    info = {**info, "stored_dtype": "float16",
            "trained_weights_sha256": recorded or hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest()}
    return write_checkpoint(path, half, config, info)


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


def read_config(path: Path) -> tuple[ModelConfig, dict[str, Any], str]:
    """A checkpoint folder's model config, its ``info`` and the recorded weights sha256 ("" if none).

    Checkpoints written before the sha256 was recorded have none and load unverified.
    """
    file = path / CONFIG_FILE
    data = load_json_object(file, {"model": dict}, optional={"info": dict, "weights_sha256": str})
    config = ModelConfig.from_dict(data["model"], where=f"{file} field 'model'")
    return config, data.get("info", {}), data.get("weights_sha256", "")


def read_weights(file: Path, recorded_sha256: str = "", verify: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; with ``verify``, first checked against ``recorded_sha256``.

    Any damage (a sha256 mismatch, a truncated or foreign file) is one DlmprobeInputError line.
    """
    try:
        data = file.read_bytes()
    except OSError as err:
        raise DlmprobeInputError(f"{file}: cannot read it ({one_line(err.strerror or err)})") from None
    if verify and recorded_sha256:
        found = hashlib.sha256(data).hexdigest()
        if found != recorded_sha256:
            raise DlmprobeInputError(
                f"{file}: weights do not match the sha256 recorded when they were written ({recorded_sha256[:16]}…, "
                f"found {found[:16]}…): damaged, or edited (pass --no-verify to load edited weights)")
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:  # damaged header or tensor bytes
        raise DlmprobeInputError(f"{file}: expected a safetensors file, found damaged content ({one_line(err)})") from None


def _check_shapes(state: dict[str, torch.Tensor], config: ModelConfig, file: Path) -> None:
    """Refuse weights whose names or shapes differ from ``config``'s model, before building it."""
    with torch.device("meta"):  # shapes only: a config edited to a huge size allocates nothing
        expected = {k: tuple(v.shape) for k, v in NativeModel(bridge_config(config)).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        diff = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        key = diff[0]
        raise DlmprobeInputError(
            f"{file}: expected the tensors of {config.task}-{config.kind} (n_layers={config.n_layers}, "
            f"d_model={config.d_model}, d_vocab={config.d_vocab}, n_ctx={config.n_ctx}), found a mismatch at "
            f"{key!r}: expected {expected.get(key, 'no such tensor')}, found {found.get(key, 'no such tensor')}")


def load_native(name_or_path: str | Path, verify: bool = True) -> tuple[NativeModel, ModelConfig, dict[str, Any], Path]:
    """The plain torch module of a checkpoint (what training resumes from).

    ``verify``: check the weights against the sha256 recorded in ``config.json`` (off for weights
    edited on purpose).
    """
    path = resolve_checkpoint(name_or_path)
    config, info, recorded = read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {WEIGHTS_FILE}")
    state = read_weights(weights, recorded, verify)
    _check_shapes(state, config, weights)
    module = build_native(config, init=False)
    module.load_state_dict(state)
    module.eval()
    return module, config, info, path


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Load a shipped model by name (``arith-diffusion``) or a checkpoint folder, as a TransformerBridge.

    ``verify``: check the weights against the sha256 recorded in ``config.json``.
    """
    module, config, info, path = load_native(name_or_path, verify=verify)
    bridge = to_bridge(module, config)
    if torch.device(device) != torch.device("cpu"):
        bridge = bridge.to(device)
    return Checkpoint(bridge, config, config.build_task(), path, info)


def random_model(config: ModelConfig) -> Checkpoint:
    """A randomly initialised model of ``config``'s architecture (random-weights baselines, tests)."""
    return Checkpoint(to_bridge(build_native(config), config), config, config.build_task())
