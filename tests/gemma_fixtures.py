"""A tiny random-weight DiffusionGemma built offline from its transformers config, for tests.

:func:`save_diffusiongemma` writes a folder that loads with
``DiffusionGemmaForBlockDiffusion.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``.
Its vocabulary *is* a built-in task's vocabulary (token id ``i`` is ``task.vocab.tokens[i]``), so a
run on the task's examples needs no id mapping and its store reads back with the task's own words.
The decoder's canvas is the task's ``target <eos>``: ``canvas_length = target_length + 1``.

Attention: the decoder always attends bidirectionally over the prompt's KV cache and the canvas;
the encoder is causal here. ``use_bidirectional_attention="all"`` (a bidirectional encoder) is not
used: in transformers 5.24 its forward raises ``TypeError: ... got multiple values for keyword
argument 'is_causal'`` (the config sets ``is_causal`` and the attention call passes it again).
"""

from __future__ import annotations

from pathlib import Path

import torch
from hf_fixtures import HEADS, LAYERS, MLP, WIDTH
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    PreTrainedTokenizerFast,
)

from dlmprobe.tasks import Task, get_task

TASK = {"name": "arith", "n_ops": 3}
HEAD_DIM = WIDTH // HEADS
# Gemma 4's vision tower is part of the architecture even for text-only use; keep it minimal.
VISION = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}


def fixture_task() -> Task:
    return get_task(TASK["name"], **{k: v for k, v in TASK.items() if k != "name"})


def task_tokenizer(task: Task) -> PreTrainedTokenizerFast:
    """A whitespace WordLevel tokenizer whose ids are the task vocabulary's ids."""
    vocab = {token: i for i, token in enumerate(task.vocab.tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   sep_token="<sep>")


def diffusiongemma_config(task: Task, bidirectional_encoder: bool = False) -> DiffusionGemmaConfig:
    """Two layers (one sliding-window, one full attention) of width 32, two experts, top-1 routing."""
    vocab = task.vocab
    text = {"vocab_size": len(vocab), "hidden_size": WIDTH, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": 1, "head_dim": HEAD_DIM, "global_head_dim": HEAD_DIM,
            "num_experts": 2, "top_k_experts": 1, "moe_intermediate_size": MLP // 2, "max_position_embeddings": 256,
            "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"],
            "pad_token_id": vocab.pad_id, "bos_token_id": vocab.bos_id, "eos_token_id": vocab.eos_id}
    if bidirectional_encoder:
        text["use_bidirectional_attention"] = "all"
    return DiffusionGemmaConfig(text_config=text, vision_config=VISION, canvas_length=task.target_length + 1)


def build_diffusiongemma(task: Task, seed: int = 0, bidirectional_encoder: bool = False) -> DiffusionGemmaForBlockDiffusion:
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(diffusiongemma_config(task, bidirectional_encoder)).eval()


def save_diffusiongemma(folder: str | Path, seed: int = 0) -> Path:
    """The tiny DiffusionGemma and its tokenizer, saved in ``folder``."""
    folder, task = Path(folder), fixture_task()
    build_diffusiongemma(task, seed).save_pretrained(folder)
    task_tokenizer(task).save_pretrained(folder)
    return folder
