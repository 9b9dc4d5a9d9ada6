"""A tiny random-weight DiffusionGemma built offline from its transformers config, for tests.

Two kinds, both loading with ``DiffusionGemmaForBlockDiffusion.from_pretrained(folder)`` and
``AutoTokenizer.from_pretrained(folder)``:

* :func:`build_diffusiongemma` / :func:`save_diffusiongemma`: its vocabulary *is* a built-in task's
  vocabulary (token id ``i`` is ``task.vocab.tokens[i]``) and its canvas the task's ``target <eos>``
  (``canvas_length = target_length + 1``): the Python-level runs on the task's own ids.
* :func:`build_text_diffusiongemma` / :func:`save_text_diffusiongemma`: the vocabulary of a
  tokenizer the test builds (:func:`hf_fixtures.build_tokenizer`, no mask token) and a canvas of
  :data:`TEXT_CANVAS` tokens: a real checkpoint's situation, where the CLI renders a task as text.

:func:`save_gemma_causal` saves the causal LM to put beside it: a tiny ``Gemma3ForCausalLM`` (Gemma's
``1 + weight`` RMS norms, scaled embeddings, sliding and full attention layers) with the very same
tokenizer, as DiffusionGemma would be compared with a Gemma of its tokenizer.

Attention: the decoder always attends bidirectionally over the prompt's KV cache and the canvas;
the encoder is causal here. ``use_bidirectional_attention="all"`` (a bidirectional encoder) is not
used: in transformers 5.24 its forward raises ``TypeError: ... got multiple values for keyword
argument 'is_causal'`` (the config sets ``is_causal`` and the attention call passes it again).
"""

from __future__ import annotations

from pathlib import Path

import torch
from hf_fixtures import HEADS, LAYERS, MLP, WIDTH, build_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.diffusion_gemma.generation_diffusion_gemma import LinearTemperatureScheduleLogitsProcessor

from dlmprobe.tasks import Task, get_task

TASK = {"name": "arith", "n_ops": 3}
# The text fixture's canvas: arith n_ops=3 (three one-token answer items) with the plain template, or
# forced-answer with no reasoning ("The answer is" is 3 tokens), widen the answer slot to 7.
TEXT_CANVAS = 8
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
    return _config(len(vocab), (vocab.pad_id, vocab.bos_id, vocab.eos_id), task.target_length + 1, bidirectional_encoder)


def _config(vocab_size: int, ids: tuple[int, int, int], canvas_length: int,
            bidirectional_encoder: bool = False) -> DiffusionGemmaConfig:
    pad, bos, eos = ids
    text = {"vocab_size": vocab_size, "hidden_size": WIDTH, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": 1, "head_dim": HEAD_DIM, "global_head_dim": HEAD_DIM,
            "num_experts": 2, "top_k_experts": 1, "moe_intermediate_size": MLP // 2, "max_position_embeddings": 256,
            "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"],
            "pad_token_id": pad, "bos_token_id": bos, "eos_token_id": eos}
    if bidirectional_encoder:
        text["use_bidirectional_attention"] = "all"
    return DiffusionGemmaConfig(text_config=text, vision_config=VISION, canvas_length=canvas_length)


def build_diffusiongemma(task: Task, seed: int = 0, bidirectional_encoder: bool = False) -> DiffusionGemmaForBlockDiffusion:
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(diffusiongemma_config(task, bidirectional_encoder)).eval()


def save_diffusiongemma(folder: str | Path, seed: int = 0) -> Path:
    """The tiny DiffusionGemma of a task's vocabulary and its tokenizer, saved in ``folder``."""
    folder, task = Path(folder), fixture_task()
    build_diffusiongemma(task, seed).save_pretrained(folder)
    task_tokenizer(task).save_pretrained(folder)
    return folder


def build_text_diffusiongemma(tokenizer: PreTrainedTokenizerFast, seed: int = 0,
                              canvas_length: int = TEXT_CANVAS) -> DiffusionGemmaForBlockDiffusion:
    """The tiny DiffusionGemma over ``tokenizer``'s vocabulary."""
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(_config(len(tokenizer), ids, canvas_length)).eval()


def save_text_diffusiongemma(folder: str | Path, seed: int = 0, canvas_length: int = TEXT_CANVAS) -> Path:
    """The tiny DiffusionGemma with a WordLevel tokenizer over the task texts (no mask token), in ``folder``."""
    folder, tokenizer = Path(folder), build_tokenizer(mask=False)
    build_text_diffusiongemma(tokenizer, seed, canvas_length).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_gemma_causal(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random-weight ``Gemma3ForCausalLM`` with the text DiffusionGemma's tokenizer, in ``folder``.

    Two layers (sliding, then full attention) of width 32; its final norm weight is drawn away from
    zero so that Gemma's ``1 + weight`` scale differs from a plain ``weight`` one (a logit lens that
    read it as Llama's would be wrong).
    """
    folder, tokenizer = Path(folder), build_tokenizer(mask=False)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=MLP,
                              num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=1,
                              head_dim=HEAD_DIM, max_position_embeddings=256, sliding_window=64,
                              layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=None,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def recompute_decoder(model: DiffusionGemmaForBlockDiffusion, prompts: torch.Tensor, canvases: torch.Tensor, steps: int,
                      t_min: float = 0.4, t_max: float = 0.8, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each step's decoder layer outputs, from the model's forward on that step's stored canvas,
    ``(layer, batch, step, canvas, d)``; ``canvases`` is ``(batch, step, canvas)``.

    The decoder at step t reads: the canvas of step t, the encoder's KV cache of the prompt and, as
    self-conditioning, step t - 1's logits after the sampler's temperature (none at step 0; the
    defaults are generate's own ``t_min``/``t_max``). Recomputing step t therefore chains through
    the recomputed logits of the steps before it. ``attention_mask`` (0 on a left-padded prompt's pads)
    masks the pads for the encoder and, extended over the canvas, for the decoder.
    """
    temperature = LinearTemperatureScheduleLogitsProcessor(max_denoising_steps=steps, t_min=t_min, t_max=t_max)
    # With padding the decoder needs its own mask over prompt + canvas (forward does not extend the
    # encoder's): without it the canvas attends to the pads' keys. generate builds the same one.
    decoder_mask = None if attention_mask is None else \
        torch.nn.functional.pad(attention_mask.bool(), (0, canvases.shape[2]), value=True)
    layers = model.model.decoder.layers
    outputs, self_conditioning, seen = [], None, {}
    handles = [layer.register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(i, out)) for i, layer in enumerate(layers)]
    try:
        for t in range(canvases.shape[1]):
            with torch.no_grad():
                logits = model(input_ids=prompts, attention_mask=attention_mask, decoder_input_ids=canvases[:, t],
                               decoder_attention_mask=decoder_mask, self_conditioning_logits=self_conditioning).logits
            outputs.append(torch.stack([seen[i] for i in range(len(layers))]))  # (layer, batch, canvas, d)
            self_conditioning = temperature(None, logits, cur_step=steps - t)  # generate counts steps down to 1
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(outputs, dim=2)
