"""The route every model-running analysis takes: a model (built-in checkpoint or Hugging Face
handle) and its examples laid out as canvases, sampled through the handle.

A built-in checkpoint goes through :func:`dlmprobe.models.from_checkpoint` with its task's canvas
``<bos> prompt <sep> [MASK]* <eos>``; a Hugging Face diffusion model through a text task encoded by
:func:`dlmprobe.tasks.text.encode` (the forced answer slot by default). Either way the analysis sees
label spans in generated-region positions and one verifier: the built-in task's, on the output
read back as task ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from dlmprobe.analyses.common import is_text_run
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models import Checkpoint, ModelHandle, from_checkpoint
from dlmprobe.sampling import (
    DiffusionSamplerConfig,
    StepCallback,
    StepObserver,
    Trajectory,
    make_canvas,
    prefixes,
    sample,
)
from dlmprobe.sampling.generate import SamplerConfig
from dlmprobe.sampling.native import NO_MASK, default_denoising_steps, run_native
from dlmprobe.store import ActivationDataset
from dlmprobe.tasks import Task, get_task
from dlmprobe.tasks.task import LabelSpan
from dlmprobe.tasks.text import (
    BuiltinTextTask,
    CanvasTemplate,
    JsonlTask,
    TextCanvas,
    TextExample,
    TextTask,
    encode,
    encode_for_canvas,
)


@dataclass
class Setting:
    """One model's canvases of the examples, and what the analysis reads off them.

    Label spans hold positions in the generated region. ``decode`` turns a generated region into
    the built-in task's target ids (None where a text run's output is no answer item), so that a
    built-in checkpoint and a Hugging Face model on a built-in task are verified by one rule.
    """

    handle: ModelHandle
    canvas: torch.Tensor
    attention_mask: torch.Tensor | None
    gen_start: int
    gen_length: int
    spans: list[dict[str, LabelSpan]]
    task: Task | None  # the built-in task behind the examples (None for a JSONL task)
    prompts: list[list[int]]
    decode: Callable[[int, list[int]], list[int] | None]
    token_name: Callable[[int], str]
    uids: list[str]  # the examples' ids, as a store records them

    @property
    def mask_id(self) -> int:
        return self.handle.mask_id

    @property
    def kind(self) -> str:
        return self.handle.kind

    @property
    def vocab_size(self) -> int:
        return self.handle.vocab_size

    @property
    def name(self) -> str:
        return self.handle.name

    def label_mask(self, label: str) -> torch.Tensor:
        """(example, generated position) True where ``label`` sits."""
        mask = torch.zeros((len(self.spans), self.gen_length), dtype=torch.bool)
        for i, spans in enumerate(self.spans):
            mask[i, list(spans[label].positions)] = True
        return mask

    def where(self, label: str) -> torch.Tensor:
        """:meth:`label_mask` laid out on the whole canvas (example, canvas position)."""
        where = torch.zeros(self.canvas.shape, dtype=torch.bool)
        where[:, self.gen_start : self.gen_start + self.gen_length] = self.label_mask(label)
        return where

    def verifies(self, i: int, output: list[int], prompt: Sequence[int] | None = None) -> bool:
        """Whether example ``i``'s generated region ``output`` solves ``prompt`` (task ids; default: the
        example's own), a JSONL task's: whether it is the reference."""
        target = self.decode(i, output)
        if target is None or self.task is None:
            return target is not None
        return self.task.verify(self.prompts[i] if prompt is None else prompt, target)

    def sample(self, sampler: SamplerConfig, batch_size: int, callback: StepCallback | None = None,
               branch: Trajectory | None = None, first_step: int = 0, observers: Sequence[StepObserver] = (),
               copies: int = 1) -> Trajectory:
        """Every example's run, ``batch_size`` at a time (see :func:`dlmprobe.sampling.sample`).

        With ``copies > 1`` the examples are sampled that many times over, row ``c * n + i`` being
        copy ``c`` of example ``i`` (the row observers, the callback and ``branch`` are told).
        """
        if isinstance(sampler, DiffusionSamplerConfig):
            sampler.resolve(self.gen_length)  # refuse a bad schedule before any work starts
        canvas = self.canvas.repeat(copies, 1)
        attention = None if self.attention_mask is None else self.attention_mask.repeat(copies, 1)
        module, parts = self.handle.module, []
        was_training = module.training
        module.eval()
        try:
            for start in range(0, len(canvas), batch_size):
                rows = slice(start, start + batch_size)
                mask = None if attention is None else attention[rows]
                parts.append(sample(self.handle, canvas[rows], self.gen_start, self.gen_length, self.mask_id,
                                    sampler, attention_mask=mask, rows=torch.arange(len(canvas))[rows],
                                    callback=callback, observers=observers,
                                    branch=branch[rows] if first_step else None, first_step=first_step))
        finally:
            module.train(was_training)
        return Trajectory.concat(parts)


@dataclass
class NativeSetting(Setting):
    """A model with its own sampler (DiffusionGemma) on a built-in task whose vocabulary is its own
    (:func:`native_setting`) or on a text task through its tokenizer (:func:`native_text_setting`).

    ``canvas`` is the encoder's input (``<bos> prompt <sep>``, or the left-padded tokenized prompt
    with ``attention_mask``) and the decoder's canvas ``target <eos>`` (or the text run's generated
    region and one closing column, ``fixed`` holding its template text); :meth:`sample` runs :func:`~dlmprobe.sampling.native.run_native`, whose callback edits
    the canvas between steps. There is no mask token (``mask_id`` is ``NO_MASK``) and commit steps
    follow the settle rule. Batch ``b`` (first example ``i``) is seeded ``seed * 1_000_003 + i``, so
    a run with a callback differs from the clean run only by what the callback changed.
    """

    model: Any = None
    n_steps: int = 48
    seed: int = 0
    generate_options: dict[str, Any] = field(default_factory=dict)
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None  # (tokens, where) over the decoder's canvas: template text

    @property
    def mask_id(self) -> int:
        return NO_MASK

    @property
    def kind(self) -> str:
        return "diffusion"

    @property
    def vocab_size(self) -> int:
        return self.model.config.get_text_config().vocab_size

    @property
    def name(self) -> str:
        return str(self.model.config._name_or_path) or type(self.model).__name__

    def sample(self, sampler: SamplerConfig | None, batch_size: int, callback: StepCallback | None = None,
               branch: Trajectory | None = None, first_step: int = 0, observers: Sequence[StepObserver] = (),
               copies: int = 1) -> Trajectory:
        """Every example's run through the model's own generate (``sampler`` must be None)."""
        if sampler is not None or branch is not None or first_step or observers or copies != 1:
            raise DlmprobeInputError("a model with its own sampler runs whole runs only: expected no sampler, branch, "
                                     "observers or copies")
        parts = []
        for start in range(0, len(self.canvas), batch_size):
            def shifted(step: int, rows: torch.Tensor, canvas: torch.Tensor, start: int = start) -> torch.Tensor | None:
                return callback(step, rows + start, canvas)

            rows = slice(start, start + batch_size)
            text = {} if self.fixed is None else {"fixed": (self.fixed[0][rows], self.fixed[1][rows]),
                                                  "attention_mask": self.attention_mask[rows]}
            run = run_native(self.model, self.canvas[rows], steps=self.n_steps, seed=self.seed * 1_000_003 + start,
                             callback=shifted if callback else None, **text, **self.generate_options)
            parts.append(run.trajectory)
        return replace(Trajectory.concat(parts), gen_length=self.gen_length)


def native_setting(model: torch.nn.Module, task: Task, n: int, seed: int, steps: int | None = None,
                   generate_options: dict[str, Any] | None = None) -> NativeSetting:
    """A DiffusionGemma on ``n`` held-out puzzles of ``task`` (its vocabulary the model's, its canvas
    the task's ``target <eos>``), ``steps`` denoising steps (default: the model's own)."""
    text = model.config.get_text_config()
    if model.config.canvas_length != task.target_length + 1 or text.vocab_size != len(task.vocab):
        raise DlmprobeInputError(
            f"expected a model with the vocabulary of {task!r} ({len(task.vocab)} tokens) and a canvas of one "
            f"target + <eos> ({task.target_length + 1} tokens), got vocabulary {text.vocab_size} and canvas "
            f"{model.config.canvas_length}")
    examples = task.sample(n, split="eval", seed=seed)
    prompts = torch.tensor([[task.vocab.bos_id, *ex.prompt, task.vocab.sep_id] for ex in examples])
    return NativeSetting(None, prompts, None, prompts.shape[1], task.target_length,
                         [dict(ex.labels) for ex in examples], task, [list(ex.prompt) for ex in examples],
                         lambda i, output: output, lambda i: task.vocab.tokens[i], [ex.uid for ex in examples],
                         model=model, n_steps=steps or default_denoising_steps(model), seed=seed,
                         generate_options=dict(generate_options or {}))


def builtin_setting(checkpoint: Checkpoint, n: int, seed: int, task: Task | None = None) -> Setting:
    """A built-in checkpoint on ``n`` held-out puzzles of its task (or ``task``, of the same layout):
    ``<bos> prompt <sep> [MASK]* <eos>``."""
    task = task or checkpoint.task
    examples = task.sample(n, split="eval", seed=seed)
    prefix, suffix = prefixes(task, examples)
    canvas = make_canvas(prefix, task.target_length, task.vocab.mask_id, suffix)
    return Setting(from_checkpoint(checkpoint), canvas, None, prefix.shape[1], task.target_length,
                    [dict(ex.labels) for ex in examples], task, [list(ex.prompt) for ex in examples],
                    lambda i, output: output, lambda i: task.vocab.tokens[i], [ex.uid for ex in examples])


def text_setting(handle: ModelHandle, task: TextTask, n: int, seed: int, template: CanvasTemplate | None) -> Setting:
    """A Hugging Face model on ``n`` held-out examples of a text task, laid out by ``template``
    (default: the forced answer slot)."""
    if handle.mask_id is None:
        raise DlmprobeInputError(f"{handle.name!r} has no mask token: expected a diffusion model for a text run")
    examples = task.sample(n, split="eval", seed=seed)
    encoded = encode(task, examples, handle.tokenizer, handle.mask_id, template or CanvasTemplate.forced_answer())
    spans, builtin, prompts, decode = _text_reading(task, examples, encoded, encoded.gen_length, n, seed)
    return Setting(handle, encoded.canvas, encoded.attention_mask, encoded.gen_start, encoded.gen_length, spans, builtin,
                   prompts, decode, lambda i: handle.tokenizer.convert_ids_to_tokens(int(i)),
                   [ex.uid for ex in examples])


def native_text_setting(model: torch.nn.Module, tokenizer: Any, task: TextTask, n: int, seed: int,
                        template: CanvasTemplate | None = None, steps: int | None = None,
                        generate_options: dict[str, Any] | None = None) -> NativeSetting:
    """A DiffusionGemma on ``n`` held-out examples of a text task rendered through its ``tokenizer``:
    the prompt is the encoder's input, the generated region (``template``, default the forced answer
    slot, widened to fill the canvas) and one closing column the decoder's canvas, template text held."""
    examples = task.sample(n, split="eval", seed=seed)
    encoded = encode_for_canvas(task, examples, tokenizer, template or CanvasTemplate.forced_answer(),
                                model.config.canvas_length)
    start, length = encoded.gen_start, encoded.gen_length - 1  # the closing column is not read back
    spans, builtin, prompts, decode = _text_reading(task, examples, encoded, length, n, seed)
    return NativeSetting(None, encoded.canvas[:, :start], encoded.attention_mask[:, :start], start, length, spans,
                         builtin, prompts, decode, lambda i: tokenizer.convert_ids_to_tokens(int(i)),
                         [ex.uid for ex in examples], model=model, n_steps=steps or default_denoising_steps(model),
                         seed=seed, generate_options=dict(generate_options or {}),
                         fixed=(encoded.canvas[:, start:], encoded.fixed[:, start:]))


def _text_reading(task: TextTask, examples: Sequence[TextExample], encoded: TextCanvas, gen_length: int, n: int,
                  seed: int) -> tuple[list[dict[str, LabelSpan]], Task | None, list[list[int]], Callable]:
    """What an analysis reads off a text run: label spans in the generated region, the built-in task
    behind the examples, their prompts as task ids and the decoder of a generated region."""
    start = encoded.gen_start
    spans = [{name: LabelSpan(tuple(p - start for p in span.positions), span.values) for name, span in labels.items()}
             for labels in encoded.labels]
    # Each answer item's column, from the labels that name it: where its word is read back.
    columns = [{item: col - start for name, idx in ex.labels.items() for item, col in zip(idx, labels[name].positions)}
               for ex, labels in zip(examples, encoded.labels)]
    if isinstance(task, BuiltinTextTask):
        builtin = task.task
        prompts = [list(ex.prompt) for ex in builtin.sample(n, split="eval", seed=seed)]
        id_of_word = {word: i for i, word in task._words().items()}
        id_of_token = {t: id_of_word[w] for t, w in zip(encoded.classes["token_ids"], encoded.classes["items"])}

        def decode(i: int, output: list[int]) -> list[int] | None:
            items = [columns[i].get(k) for k in range(len(examples[i].answer))]
            if None in items or any(output[c] not in id_of_token for c in items):
                return None
            return [id_of_token[output[c]] for c in items]
    else:
        builtin, prompts = None, [[] for _ in examples]
        reference = encoded.target[:, start : start + gen_length]

        def decode(i: int, output: list[int]) -> list[int] | None:
            return output if output == reference[i].tolist() else None
    return spans, builtin, prompts, decode


def store_setting(model: Checkpoint | ModelHandle, data: ActivationDataset, n: int, seed: int) -> Setting:
    """``n`` fresh examples of the task a store was recorded on, laid out as the store's run was, for
    the model that recorded it: a built-in checkpoint, or for a text run the Hugging Face model's handle."""
    stored = data.config.get("model", {})
    if not is_text_run(data):
        if isinstance(model, ModelHandle):
            raise DlmprobeInputError(f"{data.path} is a built-in model's run: expected its checkpoint, got Hugging Face model {model.name!r}")
        if stored.get("config") != model.config.to_dict() or (
            stored.get("weights_sha256") and model.path is not None and stored["weights_sha256"] != model.weights_sha256
        ):
            raise DlmprobeInputError(f"the store {data.path} was recorded from model {stored.get('name')!r}, not from this checkpoint")
        return builtin_setting(model, n, seed)
    if not isinstance(model, ModelHandle):
        raise DlmprobeInputError(f"{data.path} is a Hugging Face model's text run: expected that model's handle, got a built-in checkpoint")
    described = model.describe()
    differs = [k for k in ("architecture", "kind", "n_layers", "d_model", "vocab_size", "mask_id") if stored.get(k) != described.get(k)]
    if differs:
        raise DlmprobeInputError(f"the store {data.path} was recorded from model {stored.get('name')!r}, not from "
                                 f"{model.name!r} (their {differs[0]} differ)")
    spec = data.config["task"]
    text = spec.get("text") or {}
    task = JsonlTask(text["path"]) if text.get("source") == "jsonl" else BuiltinTextTask(get_task(text["task"], **text["params"]))
    return text_setting(model, task, n, seed, CanvasTemplate(**spec["template"]))
