"""Cache a Hugging Face model (diffusion or causal LM) on a text task, into the same HDF5 store.

The model is a :class:`~dlmprobe.models.ModelHandle`; the task is rendered through its tokenizer
(:mod:`dlmprobe.tasks.text`) and laid out by a :class:`CanvasTemplate`. Every example of the run is
encoded at once, so every batch shares one canvas layout (the longest prompt sets the width).

**The store's layout on a text canvas.** Schema v1 expects ``<bos> prompt <sep> target <eos>``. A
text canvas is ``lead | generated region`` (the lead: left padding and the prompt tokens), so one
fixed EOS token is appended after the region; the store's *target* is the generated region
(reasoning masks, template text, answer slot), ``target_start`` its first column, and its
*prompt* the lead's columns ``2 .. gen_start - 1`` (the whole lead is in the step-0 canvas). Labels
sit on the answer slot (:func:`~dlmprobe.tasks.text.encode`): their values are token ids, the
probe classes (answer set) are stored under ``task.classes``.

**Which hidden state.** A shifted model (Dream, a causal LM) predicts position ``p`` from its hidden
state at ``p - 1`` (``read_offset`` -1, stored in the run config). ``--positions answer-slot`` keeps
the column before the slot for every model: it holds every answer token's predicting state of a
shifted model, and is the last written token from which a causal LM reads the answer ahead
(``dlmprobe analyze compare`` reads every run there).

**Causal LMs** have no mask token: unwritten positions hold the tokenizer's padding id (never
generated, ``mask_id`` in the store), and, as for the built-in twins, one forward pass over the
final sequence is recorded and spread over the step axis (NaN where not yet computed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from dlmprobe import __version__
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.files import peek_json_object
from dlmprobe.hooks import firing_hook_names, resolve_sites
from dlmprobe.models.checkpoint import CHECKPOINT_DIR, CONFIG_FILE
from dlmprobe.models.handle import ModelHandle
from dlmprobe.models.huggingface import load_hf_model
from dlmprobe.sampling import AutoregressiveSamplerConfig, DiffusionSamplerConfig, Trajectory, sample
from dlmprobe.store import StoreLayout
from dlmprobe.tasks import get_task
from dlmprobe.tasks.text import (
    BuiltinTextTask,
    CanvasTemplate,
    JsonlTask,
    TextCanvas,
    TextExample,
    TextTask,
    close_canvas,
    encode,
)

TEMPLATES = ("plain", "forced-answer")
TEXT_POSITION_RULES = ("answer-slot", "target", "masked", "all")


def _shard(shard: tuple[int, int] | None, examples: list, encoded: TextCanvas) -> tuple[list, TextCanvas, int]:
    """The i-th of n contiguous slices of the examples and their encoded rows, and its first index."""
    if shard is None:
        return examples, encoded, 0
    i, k = shard
    bounds = np.linspace(0, len(examples), k + 1).astype(int)
    return examples[bounds[i] : bounds[i + 1]], _rows(encoded, bounds[i], bounds[i + 1]), int(bounds[i])


def is_builtin_model(name: str) -> bool:
    """A shipped model's name or a kit checkpoint folder (its config.json has a ``model`` entry)."""
    config = Path(name).expanduser() / CONFIG_FILE
    if not Path(name).is_absolute() and (CHECKPOINT_DIR / name / CONFIG_FILE).is_file():
        return True
    data = peek_json_object(config)
    return data is not None and isinstance(data.get("model"), dict) and "architectures" not in data


def load_handle(config: Any) -> ModelHandle:
    """The Hugging Face model a :class:`~dlmprobe.capture.CacheConfig` names, placed as it says."""
    return load_hf_model(config.model, trust_remote_code=config.trust_remote_code, dtype=config.model_dtype,
                         device=config.device, device_map=config.device_map)


def text_task(config: Any) -> TextTask:
    if config.task_file:
        if config.task or config.task_params:
            raise DlmprobeInputError("expected either --task (with --task-param) or --task-file, got both")
        return JsonlTask(config.task_file)
    if not config.task:
        raise DlmprobeInputError(f"a Hugging Face model needs a text task: expected --task or --task-file, got neither ({config.model!r})")
    return BuiltinTextTask(get_task(config.task, **config.task_params))


def template_of(config: Any) -> CanvasTemplate:
    if config.template == "forced-answer":
        return CanvasTemplate.forced_answer(config.reasoning_length, config.answer_length)
    return CanvasTemplate(config.reasoning_length or 0, "", config.answer_length)


@dataclass
class TextCachePlan:
    """A cache job on a Hugging Face model: every example encoded, sizes and sites resolved."""

    config: Any  # CacheConfig
    handle: ModelHandle
    task: TextTask
    sampler: DiffusionSamplerConfig | AutoregressiveSamplerConfig
    sites: dict[str, int]
    n_steps: int
    steps: list[int]
    positions: list[int]
    examples: list[TextExample]
    encoded: TextCanvas  # the examples of this job (a shard's only), with the closing EOS column
    mask_id: int
    offset: int = 0

    @property
    def gen_start(self) -> int:
        return self.encoded.gen_start

    @property
    def gen_length(self) -> int:
        return self.encoded.gen_length - 1  # the closing EOS is not generated

    @property
    def labels(self) -> dict[str, int]:
        return {name: len(span.positions) for name, span in self.encoded.labels[0].items()}

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout(
            n_examples=len(self.examples), n_steps=self.n_steps, canvas_length=self.encoded.canvas.shape[1],
            prompt_length=self.gen_start - 2, target_length=self.gen_length, labels=self.labels, sites=self.sites,
            steps=self.steps, positions=self.positions, dtype=self.config.dtype,
        )

    @property
    def bytes_needed(self) -> int:
        return self.layout.bytes_needed()

    def describe(self) -> str:
        handle = self.handle
        return f"{self.config.model} ({handle.kind}, {handle.backend}) on text task {self.task.name}: {self.layout.describe()}"

    def text_config(self) -> dict[str, Any]:
        """The run config's parts every text run shares, whatever runs the model: task, canvas, selection."""
        encoded = self.encoded
        return {
            "cache": {k: v for k, v in self.config.to_dict().items() if k != "shard"},
            # "text_task", not "name": readers rebuild a built-in task (its vocabulary) from "name".
            "task": {"text_task": self.task.name, "text": self.task.describe(), "answer_label": self.task.answer_label,
                     "answer_set": list(self.task.answer_set), "classes": encoded.classes,
                     "template": encoded.template.to_dict()},
            "canvas": {"gen_start": encoded.gen_start, "answer_start": encoded.answer_start,
                       "answer_length": encoded.answer_length - 1, "closing_eos": True,
                       "prompt_columns": [2, encoded.gen_start]},
            "mask_id": self.mask_id,
            "sites": list(self.sites),
            "steps": self.steps,
            "positions": self.positions,
            "position_rule": self.config.positions,
            "shard": list(self.config.shard) if self.config.shard else None,
            "dlmprobe_version": __version__,
        }

    def store_config(self) -> dict[str, Any]:
        handle = self.handle
        return {
            **self.text_config(),
            "model": {**handle.describe(), "name": self.config.model, "kind": handle.kind,
                      "tokenizer": getattr(handle.tokenizer, "name_or_path", "")},
            "shifted_logits": handle.shifted,
            "read_offset": handle.read_offset,
            "sampler": self.sampler.to_dict(),
        }


def _placeholder(handle: ModelHandle) -> int:
    if handle.mask_id is not None:
        return handle.mask_id
    tokenizer = handle.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DlmprobeInputError(f"{handle.name!r}: a causal LM needs a padding or EOS token to mark unwritten positions, got neither")
    return int(pad)


def _rows(encoded: TextCanvas, start: int, stop: int) -> TextCanvas:
    return replace(encoded, canvas=encoded.canvas[start:stop], target=encoded.target[start:stop],
                   attention_mask=encoded.attention_mask[start:stop], fixed=encoded.fixed[start:stop],
                   labels=encoded.labels[start:stop])


def _site_widths(handle: ModelHandle, sites: Sequence[str], pad: int) -> dict[str, int]:
    ids = torch.full((1, 2), pad, dtype=torch.long)
    _, acts = handle.run_with_cache(ids, list(sites))
    widths = {}
    for site in sites:
        if acts[site].dim() != 3:
            raise DlmprobeInputError(f"site {site!r} has shape {tuple(acts[site].shape)}; expected a per-position site (batch, pos, d)")
        widths[site] = int(acts[site].shape[-1])
    return widths


def _resolve_positions(rule: str, encoded: TextCanvas, read_offset: int) -> list[int]:
    length = encoded.canvas.shape[1]
    if rule == "all":
        return list(range(length))
    if rule in ("target", "masked"):
        return list(range(encoded.gen_start + read_offset, length - 1))
    if rule == "answer-slot":
        # The column before the slot too, whatever the model: where a causal LM reads ahead from
        # (and a shifted model's predicting state), so runs of any two models compare there.
        return list(range(encoded.answer_start + min(read_offset, -1), length - 1))
    raise DlmprobeInputError(f"expected --positions in {TEXT_POSITION_RULES} for a text task, got {rule!r}")


def plan_text_cache(config: Any, handle: ModelHandle | None = None) -> TextCachePlan:
    """Resolve a config naming a Hugging Face model: checks every argument before anything is sampled."""
    from dlmprobe.capture import resolve_steps

    task = text_task(config)
    handle = handle or load_handle(config)
    if handle.tokenizer is None:
        raise DlmprobeInputError(f"{config.model!r}: a text task needs the model's tokenizer, found none")
    mask_id = _placeholder(handle)
    examples = task.sample(config.n, split=config.split, seed=config.seed)
    encoded = encode(task, examples, handle.tokenizer, mask_id, template_of(config))
    tokenizer = handle.tokenizer
    encoded = close_canvas(encoded, tokenizer.eos_token_id if tokenizer.eos_token_id is not None else mask_id)
    if encoded.gen_start < 3:
        raise DlmprobeInputError(f"expected a prompt of at least 3 tokens before the generated region, got {encoded.gen_start}")
    gen_length = encoded.gen_length - 1
    if handle.kind == "diffusion":
        sampler: Any = DiffusionSamplerConfig(**config.sampler)
        n_steps, _ = sampler.resolve(gen_length)
    else:
        unknown = set(config.sampler) - {"temperature", "seed"}
        if unknown:
            raise DlmprobeInputError(f"an autoregressive model takes only temperature and seed, got {sorted(unknown)}")
        sampler = AutoregressiveSamplerConfig(**config.sampler)
        n_steps = gen_length
    if handle.backend == "nnsight":
        available = list(handle.site_paths)
    else:
        available = firing_hook_names(handle.module)
    sites = _site_widths(handle, resolve_sites(config.sites, available), mask_id)
    steps = resolve_steps(config.steps, n_steps)
    positions = _resolve_positions(config.positions, encoded, handle.read_offset)
    examples, encoded, offset = _shard(config.shard, examples, encoded)
    return TextCachePlan(config, handle, task, sampler, sites, n_steps, steps, positions, examples, encoded, mask_id, offset)


class _HandleStepper(torch.nn.Module):
    """The handle as the sampler's model for one batch: its padding mask applied, chosen steps recorded."""

    def __init__(self, handle: ModelHandle, attention_mask: Tensor, sites: Sequence[str], steps: Sequence[int] | None,
                 positions: Sequence[int]):
        super().__init__()
        self.inner = handle.module  # so that .parameters() tells the sampler the device
        self.handle, self.attention_mask, self.sites = handle, attention_mask, list(sites)
        self.steps, self.positions = steps, list(positions)
        self.step = 0
        self.captured: dict[str, list[Tensor]] = {site: [] for site in self.sites}

    def begin_step(self, step: int, rows: Tensor, canvas: Tensor) -> None:
        self.step = step

    def forward(self, ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        mask = self.attention_mask[:, : ids.shape[1]]
        if self.steps is None or self.step not in self.steps:
            return self.handle.logits(ids, mask)
        logits, acts = self.handle.run_with_cache(ids, self.sites, mask)
        for site in self.sites:
            self.captured[site].append(acts[site][:, self.positions].float().cpu())
        return logits

    def activations(self) -> dict[str, Float[Tensor, "batch step pos d"]]:
        return {site: torch.stack(values, 1) for site, values in self.captured.items()}


def capture_text_batch(plan: TextCachePlan, start: int, stop: int) -> dict[str, Any]:
    """Sample rows ``start:stop`` of the plan's examples, recording their activations: one store batch."""
    from dlmprobe.capture import autoregressive_steps

    handle, part = plan.handle, _rows(plan.encoded, start, stop)
    sampler = replace(plan.sampler, seed=plan.sampler.seed * 1_000_003 + plan.offset + start)
    diffusion = handle.kind == "diffusion"
    stepper = _HandleStepper(handle, part.attention_mask.to(handle.device), plan.sites,
                             plan.steps if diffusion else None, plan.positions)
    trajectory = sample(stepper, part.canvas, plan.gen_start, plan.gen_length, plan.mask_id, sampler,
                        observers=[stepper])
    if diffusion:
        activations = stepper.activations()
    else:
        final = trajectory.canvases[:, -1]
        _, acts = handle.run_with_cache(final, plan.sites, part.attention_mask)
        final_pass = {site: value[:, None, plan.positions].float().cpu() for site, value in acts.items()}
        activations = autoregressive_steps(plan.steps, plan.positions, final_pass, plan.gen_start)
    return _text_batch(plan, plan.examples[start:stop], part, trajectory, activations)


def _text_batch(plan: TextCachePlan, examples: Sequence[TextExample], part: TextCanvas, trajectory: Trajectory,
                activations: dict[str, Tensor]) -> dict[str, Any]:
    region = slice(plan.gen_start, plan.gen_start + plan.gen_length)
    output = trajectory.canvases[:, -1, region]
    columns = {name: np.array([ex[name].positions for ex in part.labels]) for name in plan.labels}
    values = {name: np.array([ex[name].values for ex in part.labels]) for name in plan.labels}
    answer = plan.task.answer_label
    final = trajectory.canvases[:, -1].numpy()
    solved = (np.take_along_axis(final, columns[answer], 1) == values[answer]).all(1)
    return {
        "uid": [ex.uid for ex in examples],
        "prompt": part.canvas[:, 2 : plan.gen_start].numpy(),
        "target": part.target[:, region].numpy(),
        "output": output.numpy(),
        "solved": solved,
        "canvas": trajectory.canvases.numpy(),
        "commit_step": trajectory.commit_step.numpy(),
        "prediction": trajectory.predictions.numpy(),
        "confidence": trajectory.confidence.numpy(),
        "labels": {name: (columns[name] - plan.gen_start, values[name]) for name in plan.labels},
        "activations": {site: value.numpy() for site, value in activations.items()},
    }

