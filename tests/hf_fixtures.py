"""Tiny random-weight Hugging Face models saved to folders, for offline tests of the real-model layer.

Each builder writes a folder that loads the way its full-size counterpart does:

* :func:`save_llada`: a LLaDA-shaped remote-code model (``tests/remote_code/tiny_llada.py`` saved as
  its modeling file, ``auto_map`` in ``config.json``): needs ``trust_remote_code=True``;
* :func:`save_dream`: a Dream-shaped remote-code model (Qwen2 module tree, shifted logits);
* :func:`save_modernbert`: a ``ModernBertForMaskedLM`` built from its transformers config;
* :func:`save_llama`, :func:`save_qwen2`: causal LMs (``LlamaForCausalLM``, ``Qwen2ForCausalLM``)
  built from their transformers configs, tokenizer without a mask token;
* :func:`save_dream_from_qwen2`: the matched pair, a Dream-shaped diffusion LM whose weights start
  as a saved tiny Qwen2's, as Dream-7B's started as Qwen2.5-7B's. The two share every parameter
  name (Dream's module tree is Qwen2's) and tokenizer; Dream's vocabulary is Qwen2's plus the mask
  token, whose embedding and unembedding rows are the only new weights.

All have 2 layers, width 32 and a tokenizer trained on the built-in tasks' text renderings, saved
beside the model: WordLevel (:func:`build_tokenizer`), but for Qwen2 a byte-level BPE of Qwen2's
own kind (:func:`build_qwen2_tokenizer`). A mask token is the last id (never the task vocabulary's 4).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)

from dlmprobe.tasks import get_task
from dlmprobe.tasks.text import ANSWER_PREFIX, BuiltinTextTask

REMOTE_CODE = Path(__file__).parent / "remote_code"
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
TASKS = {"arith": {"n_ops": 3}, "sudoku": {"size": 4}, "pathstar": {}}
WIDTH, LAYERS, HEADS, MLP = 32, 2, 2, 64
WEIGHTS = "model.safetensors"


def _corpus() -> list[str]:
    texts = [ANSWER_PREFIX]
    for name, params in TASKS.items():
        task = BuiltinTextTask(get_task(name, **params))
        texts += [ex.prompt + " " + " ".join(ex.answer) for split in ("train", "eval") for ex in task.sample(20, split)]
        texts.append(" ".join(task.answer_set))
    return texts


def build_tokenizer(mask: bool = True, split_digits: bool = False, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over the task texts; prepends [BOS]; [MASK] (optional) is the last id.

    ``split_digits`` makes every digit its own token (``n12`` -> ``n``, ``1``, ``2``), as in the
    Qwen and LLaMA-3 tokenizers, so that answer items span several tokens.
    """
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.train_from_iterator(corpus or _corpus(), trainer=trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", tok.token_to_id("[BOS]"))])
    extra = {"mask_token": "[MASK]"} if mask else {}
    if mask:
        tok.add_special_tokens(["[MASK]"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]", **extra)


def build_qwen2_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer of Qwen2's kind, trained on the task texts; no BOS, no mask token.

    transformers loads any tokenizer saved beside a Qwen2 config as ``Qwen2Tokenizer``, which
    rebuilds a byte-level BPE (its own normaliser and pre-tokenizer) from the saved vocabulary and
    merges: a WordLevel vocabulary comes back mangled ("Compute" -> "C"). This one is trained with
    that very pipeline, so it reads back as saved.
    """
    pipeline = Qwen2Tokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer = pipeline.normalizer, pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    return Qwen2Tokenizer(vocab=bpe["vocab"], merges=[tuple(pair) for pair in bpe["merges"]], unk_token="[UNK]",
                          bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]")


def _remote_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"dlmprobe_test_{name}", REMOTE_CODE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # transformers resolves the classes' annotations through it
    spec.loader.exec_module(module)
    return module


def _save_remote(folder: Path, source: str, config_cls: str, model_cls: str, auto: tuple[str, ...], config_kwargs: dict, seed: int) -> Path:
    module = _remote_module(source)
    file = f"modeling_{source}"
    auto_map = {"AutoConfig": f"{file}.{config_cls}", **{a: f"{file}.{model_cls}" for a in auto}}
    config = getattr(module, config_cls)(architectures=[model_cls], auto_map=auto_map, **config_kwargs)
    torch.manual_seed(seed)
    getattr(module, model_cls)(config).save_pretrained(folder)
    shutil.copy(REMOTE_CODE / f"{source}.py", folder / f"{file}.py")
    return folder


def save_llada(folder: str | Path, seed: int = 0) -> Path:
    """A tiny LLaDA-shaped remote-code model and its tokenizer, in ``folder``."""
    folder, tokenizer = Path(folder), build_tokenizer()
    kwargs = {"d_model": WIDTH, "n_heads": HEADS, "n_kv_heads": HEADS, "n_layers": LAYERS, "mlp_hidden_size": MLP,
              "vocab_size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id}
    _save_remote(folder, "tiny_llada", "LLaDAConfig", "LLaDAModelLM", ("AutoModel", "AutoModelForCausalLM"), kwargs, seed)
    tokenizer.save_pretrained(folder)
    return folder


def save_dream(folder: str | Path, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None) -> Path:
    """A tiny Dream-shaped remote-code model (Qwen2 tree, shifted logits) and its tokenizer
    (``tokenizer``, which must have a mask token, else :func:`build_tokenizer`'s)."""
    folder, tokenizer = Path(folder), tokenizer or build_tokenizer()
    kwargs = {"hidden_size": WIDTH, "num_attention_heads": HEADS, "num_key_value_heads": 1, "num_hidden_layers": LAYERS,
              "intermediate_size": MLP, "vocab_size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id,
              "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    _save_remote(folder, "tiny_dream", "DreamConfig", "DreamModel", ("AutoModel",), kwargs, seed)
    tokenizer.save_pretrained(folder)
    return folder


def save_modernbert(folder: str | Path, seed: int = 0, mask: bool = True) -> Path:
    """A tiny ModernBERT masked LM from its transformers config; ``mask=False`` drops the mask token."""
    folder, tokenizer = Path(folder), build_tokenizer(mask=mask)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "cls_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.eos_token_id}
    config = ModernBertConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, global_attn_every_n_layers=1, max_position_embeddings=256, **ids)
    torch.manual_seed(seed)
    ModernBertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _save_causal(folder: str | Path, config_cls: type, model_cls: type, tokenizer: PreTrainedTokenizerFast,
                 seed: int) -> Path:
    folder = Path(folder)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=256,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_llama(folder: str | Path, seed: int = 0) -> Path:
    """A tiny ``LlamaForCausalLM`` from its transformers config, with a WordLevel tokenizer."""
    return _save_causal(folder, LlamaConfig, LlamaForCausalLM, build_tokenizer(mask=False), seed)


def save_qwen2(folder: str | Path, seed: int = 0) -> Path:
    """A tiny ``Qwen2ForCausalLM`` from its transformers config, with a byte-level BPE tokenizer."""
    return _save_causal(folder, Qwen2Config, Qwen2ForCausalLM, build_qwen2_tokenizer(), seed)


def save_dream_from_qwen2(folder: str | Path, qwen2_folder: str | Path, seed: int = 1) -> Path:
    """A tiny Dream-shaped model in ``folder`` initialised from the tiny Qwen2 saved in ``qwen2_folder``.

    The tokenizer is the Qwen2's plus [MASK]; every Qwen2 weight is copied under its own name; the
    mask token's rows keep the fresh Dream's (drawn from ``seed``). The Qwen2 must have the
    fixtures' shape (:func:`save_qwen2`).
    """
    tokenizer = AutoTokenizer.from_pretrained(qwen2_folder)
    tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    folder = save_dream(folder, seed, tokenizer)
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
