"""Tiny random-weight Hugging Face causal LMs (Llama, Qwen2) saved to folders, for offline tests.

Both are built from their transformers configs (2 layers, width 32) with the WordLevel tokenizer of
:mod:`hf_fixtures` minus its mask token: a causal LM has none.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hf_fixtures import HEADS, LAYERS, MLP, WIDTH, build_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

CAUSAL = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


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
