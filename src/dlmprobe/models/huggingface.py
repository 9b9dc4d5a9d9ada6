"""Load a Hugging Face model (a hub id or a local folder) as a :class:`ModelHandle`.

Architectures TransformerLens 4.3 has a diffusion adapter for (LLaDA, Dream, LLaDA2-MoE, GIDD,
BD3LM) are loaded here, then booted with ``TransformerBridge.boot_transformers(hf_model=...)`` so
every site keeps its TransformerLens hook name. Any other ``*ForMaskedLM`` (BERT, ModernBERT, ...)
or ``*ForCausalLM`` is wrapped for nnsight by module path, its blocks named
``blocks.{i}.hook_resid_post`` all the same.

Loading never waits on transformers' "Do you wish to run the custom code? [y/N]" prompt: remote
code runs only with ``trust_remote_code=True`` and every load passes that choice explicitly,
including TransformerLens's own tokenizer reload. Bad input raises a one-line
:class:`DlmprobeInputError`.

Example:
    >>> handle = load_hf_model("GSAI-ML/LLaDA-8B-Instruct", trust_remote_code=True, dtype="bfloat16", device="cuda")
    >>> handle.mask_id
    126336
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models.handle import Kind, ModelHandle, padding_mask_kwargs

# Architectures booted through TransformerLens: the diffusion LMs it has adapters for.
TL_DIFFUSION_ARCHITECTURES = frozenset({"LLaDAModelLM", "DreamModel", "LLaDA2MoeModelLM", "GiddForDiffusionLM", "BD3LM"})
# Hidden state i predicts token i + 1 (Dream was initialised from an autoregressive Qwen2.5).
SHIFTED_ARCHITECTURES = frozenset({"DreamModel"})
# Where configs keep the mask token, in the order they are looked up (then the tokenizer's).
MASK_FIELDS = ("mask_token_id", "mask_id", "mask_index")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DlmprobeInputError(f"expected a dtype in {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else the user typed is meant as a folder.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/") or "\\" in name


def _check_source(name: str, trust_remote_code: bool) -> None:
    """Refuse missing folders, non-model folders and undeclared remote code before transformers runs."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_path(name):
            raise DlmprobeInputError(f"expected a model folder or a Hugging Face id, got missing folder {name!r}")
        return
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise DlmprobeInputError(f"expected a folder with a Hugging Face config.json, got {name!r} without one")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise DlmprobeInputError(f"expected {config_file} to be JSON, got invalid JSON ({err.msg})") from None
    if not isinstance(config, dict) or "model_type" not in config and "architectures" not in config:
        raise DlmprobeInputError(f"expected {config_file} to be a Hugging Face config (model_type, architectures), got neither")
    if "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING and not trust_remote_code:
        raise DlmprobeInputError(f"{name!r} runs its own modeling code: expected --trust-remote-code to allow it, got none")


def _load_config(name: str, trust_remote_code: bool, local_files_only: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    except OSError:
        where = "in the local cache (offline)" if local_files_only else "on the hub or in the local cache"
        raise DlmprobeInputError(f"expected a model folder or a Hugging Face id, got {name!r}: no such model {where}") from None
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise DlmprobeInputError(f"{name!r} runs its own modeling code: expected --trust-remote-code to allow it, got none") from None
        raise DlmprobeInputError(f"cannot read the config of {name!r}: {str(err).splitlines()[0]}") from None


def _architecture(config: Any, name: str) -> tuple[str, str, Kind]:
    """(architecture, backend, kind) of a config, or a one-line refusal."""
    architectures = list(getattr(config, "architectures", None) or [])
    for arch in architectures:
        if arch in TL_DIFFUSION_ARCHITECTURES:
            return arch, "transformer_lens", "diffusion"
    for arch in architectures:
        if arch.endswith("ForMaskedLM"):
            return arch, "nnsight", "diffusion"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return arch, "nnsight", "autoregressive"
    raise DlmprobeInputError(
        f"expected a masked LM (*ForMaskedLM), a causal LM or one of {sorted(TL_DIFFUSION_ARCHITECTURES)}, "
        f"got {name!r} with architectures {architectures}"
    )


def _model_class(arch: str, backend: str, kind: Kind) -> Any:
    import transformers

    if backend == "transformer_lens":
        from transformer_lens.model_bridge.sources.transformers.helpers import (
            get_hf_model_class_for_architecture,
        )

        return get_hf_model_class_for_architecture(arch)
    return transformers.AutoModelForMaskedLM if kind == "diffusion" else transformers.AutoModelForCausalLM


def _prepare_tl_loading(config: Any, arch: str, name: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> None:
    """Let TransformerLens's adapter validate the config and shim the remote code before it loads.

    Dream's remote code, for one, needs transformers-4 rotary defaults restored before its modules
    are built; the adapter's ``prepare_loading`` does exactly that.
    """
    from transformer_lens.factories.architecture_adapter_factory import (
        ArchitectureAdapterFactory,
    )
    from transformer_lens.model_bridge.sources._bridge_builder import (
        build_bridge_config_from_hf,
    )

    try:
        adapter = ArchitectureAdapterFactory.select_architecture_adapter(build_bridge_config_from_hf(config, arch, name, dtype))
    except ValueError as err:
        raise DlmprobeInputError(f"{name!r} is a variant of {arch} TransformerLens cannot wrap: {str(err).splitlines()[0]}") from None
    adapter.prepare_loading(name, kwargs)


def _mask_id(config: Any, tokenizer: Any, name: str, kind: Kind) -> int | None:
    from_config = next((int(v) for f in MASK_FIELDS if isinstance(v := getattr(config, f, None), int)), None)
    from_tokenizer = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
    if from_config is not None and from_tokenizer is not None and from_config != from_tokenizer:
        raise DlmprobeInputError(f"{name!r}: expected one mask token, got {from_config} in the config and {from_tokenizer} in the tokenizer")
    mask_id = from_config if from_config is not None else from_tokenizer
    if mask_id is None and kind == "diffusion":
        raise DlmprobeInputError(f"{name!r} has no mask token (config {list(MASK_FIELDS)} or tokenizer): a masked denoiser needs one")
    return mask_id


def _layer_paths(module: torch.nn.Module, n_layers: int, name: str) -> tuple[str, ...]:
    """Module paths of the blocks: the first ``ModuleList`` with one entry per layer."""
    for path, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) == n_layers:
            return tuple(f"{path}.{i}" for i in range(n_layers))
    raise DlmprobeInputError(f"{name!r}: expected a list of {n_layers} blocks in the module tree, found none")


def _dream_inputs(ids: Tensor, attention_mask: Tensor | None) -> dict[str, Any]:
    """Dream's forward takes a (batch, 1, pos, pos) boolean mask and explicit positions, not a padding mask."""
    if attention_mask is None:
        return {}
    keep = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"attention_mask": keep[:, None, None, :] & keep[:, None, :, None], "position_ids": positions}


def _sizes(config: Any) -> tuple[int, int, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = next(getattr(text, f) for f in ("num_hidden_layers", "n_layers", "num_layers") if hasattr(text, f))
    d_model = next(getattr(text, f) for f in ("hidden_size", "d_model", "n_embd") if hasattr(text, f))
    return int(n_layers), int(d_model), int(text.vocab_size)


def load_hf_model(
    name_or_folder: str | Path,
    *,
    trust_remote_code: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
    local_files_only: bool = False,
) -> ModelHandle:
    """A Hugging Face model as a handle (see the module docstring).

    Args:
        name_or_folder: a hub id (``GSAI-ML/LLaDA-8B-Instruct``) or a folder with ``config.json``.
        trust_remote_code: allow the model's own modeling code (LLaDA, Dream, ...) to run.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.
        device: where the whole model goes, unless ``device_map`` places it.
        device_map: ``"auto"`` (or an accelerate map) to spread a model bigger than one GPU.
        local_files_only: never reach the hub (offline use).
    """
    name = str(name_or_folder)
    if device_map is not None and str(device) != "cpu":
        raise DlmprobeInputError(f"expected either a device or a device map, got device {device!r} and device map {device_map!r}")
    torch_dtype = _dtype(dtype)
    _check_source(name, trust_remote_code)
    config = _load_config(name, trust_remote_code, local_files_only)
    arch, backend, kind = _architecture(config, name)
    tokenizer = _load_tokenizer(name, trust_remote_code, local_files_only)
    mask_id = _mask_id(config, tokenizer, name, kind)
    model_class = _model_class(arch, backend, kind)

    kwargs: dict[str, Any] = {"config": config, "dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if backend == "transformer_lens":
        kwargs["attn_implementation"] = "eager"  # hook_pattern only fires on eager attention
        _prepare_tl_loading(config, arch, name, torch_dtype, kwargs)
    try:
        module = model_class.from_pretrained(name, local_files_only=local_files_only, device_map=device_map, **kwargs)
    except (OSError, ValueError) as err:
        raise DlmprobeInputError(f"cannot load the weights of {name!r}: {str(err).splitlines()[0]}") from None
    if device_map is None:
        module = module.to(device)
    n_layers, d_model, vocab_size = _sizes(config)
    info = {
        "source": "huggingface",
        "model": name,
        "architecture": arch,
        "trust_remote_code": trust_remote_code,
        "device_map": device_map if device_map is None or isinstance(device_map, str) else dict(device_map),
    }

    def wrap(hf_module: torch.nn.Module) -> ModelHandle:
        hf_module.eval()
        handle = ModelHandle(
            module=_boot(hf_module, name, tokenizer, trust_remote_code, torch_dtype) if backend == "transformer_lens" else hf_module,
            backend=backend,
            kind=kind,
            mask_id=mask_id,
            n_layers=n_layers,
            d_model=d_model,
            vocab_size=vocab_size,
            shifted=arch in SHIFTED_ARCHITECTURES or kind == "autoregressive",
            tokenizer=tokenizer,
            name=name,
            layer_paths=_layer_paths(hf_module, n_layers, name) if backend == "nnsight" else (),
            input_adapter=_dream_inputs if arch == "DreamModel" else padding_mask_kwargs,
            info=dict(info),
        )
        handle.rebuild = rebuild
        return handle

    def rebuild(seed: int) -> ModelHandle:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = model_class.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        fresh = _place(fresh, device, device_map)
        handle = wrap(fresh)
        handle.info["random_weights_seed"] = seed
        return handle

    return wrap(module)


def _place(module: torch.nn.Module, device: str | torch.device, device_map: str | dict[str, Any] | None) -> torch.nn.Module:
    """Move a model built on the CPU where a loaded one would be: one device, or spread by accelerate."""
    if device_map is None:
        return module.to(device)
    from accelerate import dispatch_model, infer_auto_device_map

    plan = infer_auto_device_map(module, no_split_module_classes=module._no_split_modules) if device_map == "auto" else device_map
    return dispatch_model(module, device_map=plan)


def _load_tokenizer(name: str, trust_remote_code: bool, local_files_only: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise DlmprobeInputError(f"expected a tokenizer beside {name!r}, got none that loads ({str(err).splitlines()[0]})") from None
    # TransformerLens reloads the tokenizer with these init kwargs; without the flag transformers
    # would stop and ask on stdin whether to run the remote code.
    tokenizer.init_kwargs["trust_remote_code"] = trust_remote_code
    return tokenizer


def _boot(hf_module: torch.nn.Module, name: str, tokenizer: Any, trust_remote_code: bool, dtype: torch.dtype) -> torch.nn.Module:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_module, tokenizer=tokenizer, trust_remote_code=trust_remote_code, dtype=dtype)
    bridge.eval()
    return bridge
