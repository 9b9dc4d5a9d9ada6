"""Write runs of a model's own sampler (DiffusionGemma) to an HDF5 activation store, schema v1.

The counterpart of :mod:`dlmprobe.capture` for models whose sampler lives in the model: batches go
through :func:`dlmprobe.sampling.native.run_native` and are written with the same
:class:`ActivationWriter`, so the probes and analyses read the file as any other store. Two ways in:

* **A text task** (:func:`plan_native_cache`, what ``dlmprobe cache --model <DiffusionGemma folder>``
  runs): the task is rendered through the folder's tokenizer exactly as for the other Hugging Face
  models (:mod:`dlmprobe.capture_text`'s task, template, positions, labels and store config are
  reused: :class:`NativeTextCachePlan` is a :class:`~dlmprobe.capture_text.TextCachePlan`). The
  tokenized prompt (left-padded, with its attention mask) is the encoder's input; the generated
  region plus one closing column is the decoder's canvas, ``canvas_length`` tokens (the answer slot
  is widened to fill it: :func:`~dlmprobe.tasks.text.encode_for_canvas`); template text is held
  (``run_native``'s ``fixed``). :data:`NATIVE_OPTIONS` lists what it takes.
* **A built-in task of the model's own vocabulary** (:func:`capture_native`, Python only): the
  canvas is ``<bos> prompt <sep>`` (the encoder's input) followed by the decoder's canvas,
  ``target <eos>`` long: ``canvas_length`` must be the task's ``target_length + 1``, and token id
  ``i`` is ``task.vocab.tokens[i]``.

What differs from other stores, stated in the store's config either way:

* Activations exist only where the decoder runs (the canvas); prompt positions are never stored.
* There is no mask token: the file's ``mask_id`` attribute is :data:`NO_MASK` (no token equals it)
  and ``commit_step`` follows the settle rule (``"commit_rule": "settle"`` in the config): step
  ``s`` is before commit iff ``s <= commit_step``. Code that decides "still masked" by
  ``canvas == mask_id`` sees every position as committed on such a store.
* One canvas (one block of ``canvas_length`` tokens) per example: DiffusionGemma's ``generate``
  appends further blocks for longer outputs, which is not run.

Example:
    >>> capture_native(model, get_task("arith", n_ops=3), "runs/gemma.h5", n=64, steps=16)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlmprobe import __version__
from dlmprobe.capture import CacheConfig, batch_record, resolve_steps
from dlmprobe.capture_text import TextCachePlan, _resolve_positions, _rows, _shard, _text_batch, template_of, text_task
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.sampling import StepCallback
from dlmprobe.sampling.native import (
    NO_MASK,
    NativeRun,
    default_denoising_steps,
    load_native_model,
    resolve_decoder_sites,
    run_native,
)
from dlmprobe.store import ActivationWriter, StoreLayout
from dlmprobe.tasks import Example, Task
from dlmprobe.tasks.text import encode_for_canvas

# The --positions rules a native store can hold: the decoder runs on the canvas only.
NATIVE_POSITION_RULES = ("target", "masked", "answer")
# The same on a text task (``answer-slot``: the slot and the column before it where that is on the canvas).
NATIVE_TEXT_POSITION_RULES = ("answer-slot", "target", "masked")
# What dlmprobe cache takes for such a model (the sampler's only option is its number of steps).
NATIVE_OPTIONS = ("--task", "--task-param", "--task-file", "--template", "--reasoning-length", "--answer-length",
                  "--steps", "--n", "--split", "--seed", "--sites (decoder resid_post)", "--record-steps",
                  "--positions answer-slot|target", "--dtype", "--batch-size", "--shard", "--device", "--model-dtype")


@dataclass
class NativeCachePlan:
    """A cache job on a model with its own sampler: examples, sites, steps and positions resolved.

    ``steps`` are the recorded denoising steps among ``range(n_steps)``; ``positions`` the recorded
    canvas positions (within the target, where the decoder runs).
    """

    model: torch.nn.Module
    task: Task
    model_name: str
    examples: list[Example]
    sites: dict[str, str]  # site -> decoder module path
    n_steps: int
    steps: list[int]
    positions: list[int]
    dtype: str = "float16"
    seed: int = 0
    position_rule: str = "target"
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    callback: StepCallback | None = None
    config: CacheConfig | None = None
    offset: int = 0  # index of examples[0] among all the run's examples (non-zero for a shard)
    mask_id: int = NO_MASK

    @property
    def layout(self) -> StoreLayout:
        task, width = self.task, self.model.config.get_text_config().hidden_size
        labels = {name: len(span.positions) for name, span in self.examples[0].labels.items()}
        return StoreLayout(
            n_examples=len(self.examples), n_steps=self.n_steps, canvas_length=task.sequence_length,
            prompt_length=task.prompt_length, target_length=task.target_length, labels=labels,
            sites={site: width for site in self.sites}, steps=self.steps, positions=self.positions, dtype=self.dtype,
        )

    @property
    def bytes_needed(self) -> int:
        return self.layout.bytes_needed()

    def describe(self) -> str:
        return (f"{self.model_name} ({type(self.model).__name__}, its own generate, {self.n_steps} denoising steps) "
                f"on {self.task!r}: {self.layout.describe()}")

    def store_config(self) -> dict[str, Any]:
        model, task = self.model, self.task
        config = {
            "model": {"name": self.model_name or str(model.config._name_or_path), "kind": "diffusion",
                      "architecture": type(model).__name__, "config": json.loads(model.config.to_json_string())},
            "task": {"name": task.name, "params": task.params(), "vocab": list(task.vocab.tokens),
                     "answer_label": task.answer_label},
            "sampler": {"name": "native", "steps": self.n_steps, "seed": self.seed, "generate": self.generate_kwargs},
            "commit_rule": "settle",
            "sites": list(self.sites), "site_modules": self.sites, "steps": self.steps, "positions": self.positions,
            "position_rule": self.position_rule,
            "shard": list(self.config.shard) if self.config is not None and self.config.shard else None,
            "dlmprobe_version": __version__,
        }
        if self.config is not None:
            config["cache"] = {k: v for k, v in self.config.to_dict().items() if k != "shard"}
        return config

    def batch(self, begin: int, stop: int) -> dict[str, Any]:
        """Examples ``begin:stop`` of the plan through the model's own sampler: one store batch.

        Seeded ``seed * 1_000_003 + i`` (``i`` the first example's index in the whole run), as
        :func:`dlmprobe.capture.capture_batch` does.
        """
        task, batch = self.task, self.examples[begin:stop]
        prompts = torch.tensor([[task.vocab.bos_id, *ex.prompt, task.vocab.sep_id] for ex in batch])
        run = run_native(self.model, prompts, list(self.sites), steps=self.n_steps,
                         seed=self.seed * 1_000_003 + self.offset + begin, callback=self.callback,
                         **self.generate_kwargs)
        columns = [p - task.target_start for p in self.positions]
        run.activations = {site: value[:, self.steps][:, :, columns] for site, value in run.activations.items()}
        return native_batch(task, batch, run)


def check_native_model(model: torch.nn.Module, task: Task) -> None:
    """The model's canvas must be the task's ``target <eos>`` (one block) and its vocabulary the task's."""
    text = model.config.get_text_config()
    if model.config.canvas_length != task.target_length + 1:
        raise DlmprobeInputError(
            f"expected a model canvas of target_length + 1 = {task.target_length + 1} tokens for {task!r} (one "
            f"canvas per example; outputs spanning several canvases are not supported), got canvas_length "
            f"{model.config.canvas_length}"
        )
    if text.vocab_size != len(task.vocab):
        raise DlmprobeInputError(f"expected the task's vocabulary of {len(task.vocab)} tokens, got a model vocabulary of {text.vocab_size}")


def plan_native(model: torch.nn.Module, task: Task, *, n: int, split: str = "eval", seed: int = 0,
                sites: Sequence[str] = ("blocks.*.hook_resid_post",), steps: int = 16,
                record_steps: str | int | Sequence[int] = "all", positions: str = "target", dtype: str = "float16",
                model_name: str = "", callback: StepCallback | None = None, config: CacheConfig | None = None,
                shard: tuple[int, int] | None = None, generate_kwargs: dict[str, Any] | None = None) -> NativeCachePlan:
    """Check every argument against the model and task and resolve them, before anything is sampled."""
    check_native_model(model, task)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DlmprobeInputError(f"expected a positive number of denoising steps, got {steps!r}")
    if positions not in NATIVE_POSITION_RULES:
        raise DlmprobeInputError(f"expected positions in {NATIVE_POSITION_RULES} (the decoder runs on the canvas only), "
                                 f"got {positions!r}")
    site_paths = resolve_decoder_sites(model, sites)
    start = task.target_start
    chosen = (range(start, start + task.target_length) if positions != "answer"
              else [start + p for p in task.answer_positions()])
    examples = task.sample(n, split=split, seed=seed)
    offset = 0
    if shard is not None:
        i, k = shard
        bounds = np.linspace(0, len(examples), k + 1).astype(int)
        offset, examples = int(bounds[i]), examples[bounds[i] : bounds[i + 1]]
    return NativeCachePlan(model, task, model_name, examples, site_paths, steps, resolve_steps(record_steps, steps),
                           list(chosen), dtype, seed, positions, dict(generate_kwargs or {}), callback, config, offset)


def plan_native_cache(config: CacheConfig, model: torch.nn.Module | None = None,
                      tokenizer: Any = None) -> NativeTextCachePlan:
    """A :class:`CacheConfig` naming a DiffusionGemma folder, checked and resolved (model and tokenizer loaded).

    The task is a text task, as for every Hugging Face model: a built-in one (``task``, rendered
    through the model's tokenizer) or a JSONL file (``task_file``), laid out by ``template``. The
    generated region plus one closing column must fill the model's canvas: without
    ``answer_length`` the answer slot is widened (EOS-padded) to fill it. ``sampler`` may hold
    ``steps`` (default: the model's own) and ``seed`` only.
    """
    if config.device_map is not None:
        raise DlmprobeInputError(f"device_map does not apply to a DiffusionGemma folder ({config.model!r}): expected "
                                 f"--device, got --device-map {config.device_map}")
    unknown = sorted(set(config.sampler) - {"steps", "seed"})
    if unknown:
        raise DlmprobeInputError(f"DiffusionGemma samples with its own generate: it takes --steps and --seed only, got "
                                 f"{unknown[0]!r}")
    if config.positions not in NATIVE_TEXT_POSITION_RULES:
        raise DlmprobeInputError(f"expected --positions in {NATIVE_TEXT_POSITION_RULES} for DiffusionGemma (its decoder "
                                 f"runs on the canvas only), got {config.positions!r}")
    task = text_task(config)
    if tokenizer is None:
        tokenizer = load_native_tokenizer(config.model)
    model = model if model is not None else load_native_model(config.model, config.device, config.model_dtype)
    examples = task.sample(config.n, split=config.split, seed=config.seed)
    encoded = encode_for_canvas(task, examples, tokenizer, template_of(config), model.config.canvas_length)
    if encoded.gen_start < 3:
        raise DlmprobeInputError(f"expected a prompt of at least 3 tokens before the generated region, got {encoded.gen_start}")
    n_steps = config.sampler.get("steps") or default_denoising_steps(model)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise DlmprobeInputError(f"expected a positive number of denoising steps, got {n_steps!r}")
    site_paths = resolve_decoder_sites(model, config.sites)
    # The decoder runs from gen_start on: a rule's columns before it (the prompt's) are not stored.
    positions = [p for p in _resolve_positions(config.positions, encoded, 0) if p >= encoded.gen_start]
    examples, encoded, offset = _shard(config.shard, examples, encoded)
    width = model.config.get_text_config().hidden_size
    return NativeTextCachePlan(config, None, task, None, {site: width for site in site_paths}, n_steps,
                               resolve_steps(config.steps, n_steps), positions, examples, encoded, NO_MASK, offset,
                               model=model, tokenizer=tokenizer, site_paths=site_paths, seed=config.seed)


def load_native_tokenizer(name: str) -> Any:
    """The tokenizer saved in a DiffusionGemma folder (a text task is rendered through it)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(name).expanduser())
    except (OSError, ValueError) as err:
        raise DlmprobeInputError(f"expected a tokenizer saved in DiffusionGemma folder {name!r} (a text task is rendered "
                                 f"through it), got none ({str(err).splitlines()[0][:120]})") from None


@dataclass
class NativeTextCachePlan(TextCachePlan):
    """A DiffusionGemma on a text task: the prompt (left-padded) is the encoder's input, the
    generated region and one closing column the decoder's canvas.

    Template text in the region (a forced answer's ``"The answer is"``) is held through
    :func:`run_native`'s ``fixed``; everything else starts from the model's random canvas.
    ``handle`` and ``sampler`` are None (the model samples itself); ``sites`` maps each site to its width.
    """

    model: torch.nn.Module | None = None
    tokenizer: Any = None
    site_paths: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    callback: StepCallback | None = None

    def describe(self) -> str:
        return (f"{self.config.model} ({type(self.model).__name__}, its own generate, {self.n_steps} denoising steps) "
                f"on text task {self.task.name}: {self.layout.describe()}")

    def store_config(self) -> dict[str, Any]:
        config = self.text_config()
        config["canvas"]["closing_eos"] = False  # the decoder's last position, generated
        return {
            **config,
            "model": {"name": self.config.model, "kind": "diffusion", "architecture": type(self.model).__name__,
                      "config": json.loads(self.model.config.to_json_string()),
                      "tokenizer": getattr(self.tokenizer, "name_or_path", "")},
            "shifted_logits": False,
            "read_offset": 0,
            "sampler": {"name": "native", "steps": self.n_steps, "seed": self.seed, "generate": self.generate_kwargs},
            "commit_rule": "settle",
            "site_modules": self.site_paths,
        }

    def batch(self, begin: int, stop: int) -> dict[str, Any]:
        """Examples ``begin:stop`` through the model's own sampler (seeded as :meth:`NativeCachePlan.batch`)."""
        part, start = _rows(self.encoded, begin, stop), self.gen_start
        run = run_native(self.model, part.canvas[:, :start], list(self.site_paths), steps=self.n_steps,
                         seed=self.seed * 1_000_003 + self.offset + begin, callback=self.callback,
                         fixed=(part.canvas[:, start:], part.fixed[:, start:]),
                         attention_mask=part.attention_mask[:, :start], **self.generate_kwargs)
        columns = [p - start for p in self.positions]
        activations = {site: value[:, self.steps][:, :, columns] for site, value in run.activations.items()}
        return _text_batch(self, self.examples[begin:stop], part, run.trajectory, activations)


def capture_native(
    model: torch.nn.Module,
    task: Task,
    out: str | Path,
    *,
    n: int = 64,
    split: str = "eval",
    seed: int = 0,
    sites: Sequence[str] = ("blocks.*.hook_resid_post",),
    steps: int = 16,
    batch_size: int = 16,
    dtype: str = "float16",
    model_name: str = "",
    callback: StepCallback | None = None,
    overwrite: bool = False,
    **generate_kwargs: Any,
) -> Path:
    """Sample ``n`` puzzles of ``task`` with the model's own sampler and write every step to ``out``.

    Batch ``b`` (its first example's index ``i``) is sampled with seed ``seed * 1_000_003 + i``, as
    :func:`dlmprobe.capture.capture_batch` does. ``generate_kwargs`` and ``callback`` go to
    :func:`run_native`; the former are stored in the config and must be JSON values.
    """
    if batch_size < 1:
        raise DlmprobeInputError(f"expected batch_size >= 1, got {batch_size}")
    plan = plan_native(model, task, n=n, split=split, seed=seed, sites=sites, steps=steps, dtype=dtype,
                       model_name=model_name, callback=callback, generate_kwargs=generate_kwargs)
    with ActivationWriter(out, plan.layout, config=plan.store_config(), mask_id=NO_MASK, overwrite=overwrite) as writer:
        for begin in range(0, len(plan.examples), batch_size):
            writer.write_batch(plan.batch(begin, min(begin + batch_size, len(plan.examples))))
    return Path(out)


def native_batch(task: Task, examples: Sequence[Example], run: NativeRun) -> dict[str, Any]:
    """One store batch (see :class:`dlmprobe.store.Batch`) from a native run over ``examples``."""
    trajectory = run.trajectory
    if trajectory.canvases.shape[2] != task.sequence_length:
        raise DlmprobeInputError(f"expected runs over {task.sequence_length}-token sequences, got {trajectory.canvases.shape[2]}")
    # The decoder's canvas starts at target_start; its last position (the <eos> slot) is not stored.
    start, length = task.target_start, task.target_length
    return batch_record(task, examples, trajectory,
                        {site: value[:, :, :length] for site, value in run.activations.items()},
                        output=trajectory.canvases[:, -1, start : start + length])
