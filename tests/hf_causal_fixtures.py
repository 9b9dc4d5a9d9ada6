"""Tiny random-weight Hugging Face causal LMs (Llama, Qwen2) saved to folders, for offline tests.

Both are built from their transformers configs (2 layers, width 32) with the WordLevel tokenizer of
:mod:`hf_fixtures` minus its mask token: a causal LM has none.

:func:`save_dream_from_qwen2` is the matched pair: a Dream-shaped diffusion LM whose weights start
as a saved tiny Qwen2's, as Dream-7B's started as Qwen2.5-7B's. The two share every parameter name
(Dream's module tree is Qwen2's); Dream's vocabulary is Qwen2's plus the mask token, whose
embedding and unembedding rows are the only new weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hf_fixtures import HEADS, LAYERS, MLP, WIDTH, build_tokenizer, save_dream
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

CAUSAL = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
WEIGHTS = "model.safetensors"


def save_causal(folder: str | Path, arch: str, seed: int = 0) -> Path:
    """A tiny ``arch`` ("llama" or "qwen2") causal LM and its tokenizer, in ``folder``."""
    folder, tokenizer = Path(folder), build_tokenizer(mask=False)
    config_cls, model_cls = CAUSAL[arch]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=256,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_llama(folder: str | Path, seed: int = 0) -> Path:
    return save_causal(folder, "llama", seed)


def save_qwen2(folder: str | Path, seed: int = 0) -> Path:
    return save_causal(folder, "qwen2", seed)


def save_dream_from_qwen2(folder: str | Path, qwen2_folder: str | Path, seed: int = 1) -> Path:
    """A tiny Dream-shaped model in ``folder`` initialised from the tiny Qwen2 saved in ``qwen2_folder``.

    Every Qwen2 weight is copied under its own name; the mask token's rows keep the fresh Dream's
    (drawn from ``seed``). The Qwen2 must have the fixtures' shape (:func:`save_qwen2`).
    """
    folder = save_dream(folder, seed)
    dream, qwen = load_file(folder / WEIGHTS), load_file(Path(qwen2_folder) / WEIGHTS)
    if set(dream) != set(qwen):
        raise ValueError(f"expected the Qwen2 and Dream trees to match, got {sorted(set(dream) ^ set(qwen))}")
    for name, weight in qwen.items():
        rows = weight.shape[0]
        if dream[name].shape[1:] != weight.shape[1:] or dream[name].shape[0] not in (rows, rows + 1):
            raise ValueError(f"{name}: Dream shape {tuple(dream[name].shape)} does not extend Qwen2's {tuple(weight.shape)}")
        dream[name][:rows] = weight  # embeddings and unembedding: Dream's vocabulary is Qwen2's plus [MASK]
    save_file(dream, folder / WEIGHTS, metadata={"format": "pt"})
    return folder
