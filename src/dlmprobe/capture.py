"""Build an HDF5 activation dataset: sample a model with hooks attached, stream every step to disk.

This is the stage that joins sampling (+ hooks) to the HDF5 store. For a diffusion model the
activations of every denoising step are recorded while it samples (they exist nowhere else). For an
autoregressive model the activation at a position never changes once computed, so one forward pass
over the final sequence is exact: stored step ``s`` holds the positions the model had computed
before writing position ``gen_start + s`` (``pos < gen_start + s``) and NaN at the others, on the
same schema.

Example:
    >>> config = CacheConfig(model="arith-diffusion", n=256, sites=["blocks.*.hook_resid_post"])
    >>> plan = plan_cache(config)
    >>> print(plan.describe())  # sizes and the disk space the file will take
    >>> run_cache(config, "runs/arith.h5", plan=plan)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from dlmprobe import __version__
from dlmprobe.capture_text import (
    TEMPLATES,
    TEXT_POSITION_RULES,
    TextCachePlan,
    capture_text_batch,
    is_builtin_model,
    plan_text_cache,
)
from dlmprobe.choices import POSITION_RULES
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.hooks import ActivationRecorder, firing_hook_names, resolve_sites
from dlmprobe.models import Checkpoint, load_model
from dlmprobe.sampling import (
    AutoregressiveSamplerConfig,
    DiffusionSamplerConfig,
    Trajectory,
    generate,
)
from dlmprobe.sampling.native import is_native_model
from dlmprobe.store import ActivationWriter, StoreLayout
from dlmprobe.tasks import Example, Task, get_task

PositionRule = Literal["all", "target", "masked", "answer", "last_prompt", "sep+target", "answer-slot"]


@dataclass
class CacheConfig:
    """One ``dlmprobe cache`` job.

    Args:
        model: shipped model name or checkpoint folder.
        n: examples (puzzles of ``split``, drawn with ``seed``).
        sites: TransformerLens hook names or globs.
        steps: denoising steps to record: ``"all"``, every k-th (an int) or a list of indices.
        positions: ``all`` canvas positions; the ``target`` region; ``answer``: the task's
            answer label positions; ``last_prompt``: the ``<sep>`` token just before the target;
            ``sep+target``: that token and the target region, what an autoregressive model reads
            ahead from (``ProbeGrid(read="frontier")``). ``masked`` is an alias of ``target``
            (the same positions, kept for ``dlmprobe cache --positions masked`` and the files it
            wrote); which rows are still masked at a step is chosen when reading
            (``ActivationDataset.get(..., only_masked=True)``).
        sampler: sampler options (``steps``, ``block_length``, ``temperature``, ``order``, ``seed``).
        task_params: overrides of the model's task options (evaluate a variant); for a Hugging
            Face model, the options of ``task``.
        shard: ``(i, n)`` writes the i-th of n contiguous slices of the examples.

    A Hugging Face model (an id or a folder with its ``config.json``, see
    :mod:`dlmprobe.capture_text`) also takes: ``task`` (a built-in task rendered as text) or
    ``task_file`` (JSONL), ``template`` (``plain`` or ``forced-answer``), ``reasoning_length``
    and ``answer_length`` (tokens; None: the longest reference), ``trust_remote_code``,
    ``model_dtype`` (its weights: float32, bfloat16, float16), ``device`` and ``device_map``
    (``"auto"``: spread over the GPUs by accelerate). ``positions`` may then be ``answer-slot``.
    """

    model: str
    n: int = 256
    split: str = "eval"
    seed: int = 0
    sites: list[str] = field(default_factory=lambda: ["blocks.*.hook_resid_post"])
    steps: str | int | list[int] = "all"
    positions: PositionRule = "target"
    sampler: dict[str, Any] = field(default_factory=dict)
    task_params: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float16"
    batch_size: int = 64
    shard: tuple[int, int] | None = None
    task: str | None = None
    task_file: str | None = None
    template: str = "plain"
    reasoning_length: int | None = None
    answer_length: int | None = None
    trust_remote_code: bool = False
    model_dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise DlmprobeInputError(f"n must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise DlmprobeInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.positions not in (*POSITION_RULES, *TEXT_POSITION_RULES):
            raise DlmprobeInputError(f"positions must be one of {(*POSITION_RULES, 'answer-slot')}, got {self.positions!r}")
        if self.template not in TEMPLATES:
            raise DlmprobeInputError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.dtype not in ("float16", "float32"):
            raise DlmprobeInputError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.shard is not None:
            i, k = self.shard
            if not 0 <= i < k:
                raise DlmprobeInputError(f"shard must be i/n with 0 <= i < n, got {i}/{k}")
            if k > self.n:
                raise DlmprobeInputError(f"cannot split {self.n} examples into {k} shards")
            self.shard = (int(i), int(k))
        if isinstance(self.steps, str) and self.steps != "all":
            raise DlmprobeInputError(f"steps must be 'all', an int k (every k-th step) or a list of steps, got {self.steps!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shard"] = list(self.shard) if self.shard else None
        return data


@dataclass
class CachePlan:
    """Everything a cache job derives from its config before it starts: sizes, positions, sites."""

    config: CacheConfig
    checkpoint: Checkpoint
    task: Task
    sampler: DiffusionSamplerConfig | AutoregressiveSamplerConfig
    sites: dict[str, int]
    n_steps: int
    steps: list[int]
    positions: list[int]
    examples: list[Example]
    offset: int = 0  # index of examples[0] among all the run's examples (non-zero for a shard)

    @property
    def labels(self) -> dict[str, int]:
        return {name: len(span.positions) for name, span in self.examples[0].labels.items()}

    @property
    def layout(self) -> StoreLayout:
        """The sizes of the store this job writes."""
        task = self.task
        return StoreLayout(
            n_examples=len(self.examples), n_steps=self.n_steps, canvas_length=task.sequence_length,
            prompt_length=task.prompt_length, target_length=task.target_length, labels=self.labels,
            sites=self.sites, steps=self.steps, positions=self.positions, dtype=self.config.dtype,
        )

    @property
    def bytes_needed(self) -> int:
        return self.layout.bytes_needed()

    def describe(self) -> str:
        return f"{self.config.model} ({self.checkpoint.kind}) on {self.task!r}: {self.layout.describe()}"

    def store_config(self) -> dict[str, Any]:
        """The run config stored in the file: enough to reproduce it."""
        ckpt = self.checkpoint
        return {
            # The shard is a top-level entry only: shards of one run differ in nothing else.
            "cache": {k: v for k, v in self.config.to_dict().items() if k != "shard"},
            "model": {"name": self.config.model, "kind": ckpt.kind, "config": ckpt.config.to_dict(),
                      "weights_sha256": ckpt.weights_sha256},
            "task": {"name": self.task.name, "params": self.task.params(), "vocab": list(self.task.vocab.tokens),
                     "answer_label": self.task.answer_label},
            "sampler": self.sampler.to_dict(),
            "sites": list(self.sites),
            "steps": self.steps,
            "positions": self.positions,
            "position_rule": self.config.positions,
            "shard": list(self.config.shard) if self.config.shard else None,
            "dlmprobe_version": __version__,
        }


def plan_cache(config: CacheConfig, checkpoint: Checkpoint | None = None) -> CachePlan | TextCachePlan:
    """Resolve a config against its model: checks every argument before anything is computed.

    A Hugging Face model (anything but a shipped name or a kit checkpoint folder) gets a
    :class:`~dlmprobe.capture_text.TextCachePlan`; a DiffusionGemma folder (its own sampler) a
    :class:`~dlmprobe.capture_native.NativeCachePlan`.
    """
    if checkpoint is None and is_native_model(config.model):
        from dlmprobe.capture_native import plan_native_cache  # it builds on this module

        return plan_native_cache(config)
    if checkpoint is None and not is_builtin_model(config.model):
        return plan_text_cache(config)
    ckpt = checkpoint or load_model(config.model)
    if config.positions == "answer-slot":
        raise DlmprobeInputError("--positions answer-slot is for text tasks (a Hugging Face model); a built-in model has 'answer'")
    task = get_task(ckpt.config.task, **{**ckpt.task.params(), **config.task_params}) if config.task_params else ckpt.task
    needed = task.sequence_length
    if needed > ckpt.config.n_ctx:
        raise DlmprobeInputError(f"{task!r} needs a context of {needed} tokens; the model's context is {ckpt.config.n_ctx}")
    if ckpt.kind == "diffusion":
        sampler: Any = DiffusionSamplerConfig(**config.sampler)
        n_steps, _ = sampler.resolve(task.target_length)
    else:
        unknown = set(config.sampler) - {"temperature", "seed"}
        if unknown:
            raise DlmprobeInputError(f"an autoregressive model takes only temperature and seed, got {sorted(unknown)}")
        sampler = AutoregressiveSamplerConfig(**config.sampler)
        n_steps = task.target_length
    sites = resolve_sites(config.sites, firing_hook_names(ckpt.model))
    widths = _site_widths(ckpt, sites)
    steps = resolve_steps(config.steps, n_steps)
    positions = _resolve_positions(config.positions, task)
    examples = task.sample(config.n, split=config.split, seed=config.seed)
    offset = 0
    if config.shard is not None:
        i, k = config.shard
        bounds = np.linspace(0, len(examples), k + 1).astype(int)
        offset, examples = int(bounds[i]), examples[bounds[i] : bounds[i + 1]]
    return CachePlan(config, ckpt, task, sampler, widths, n_steps, steps, positions, examples, offset)


def _site_widths(ckpt: Checkpoint, sites: Sequence[str]) -> dict[str, int]:
    tokens = torch.zeros((1, 1), dtype=torch.long, device=next(ckpt.model.parameters()).device)
    _, cache = ckpt.model.run_with_cache(tokens, names_filter=list(sites))
    widths = {}
    for site in sites:
        activation = cache[site]
        if activation.dim() != 3:
            raise DlmprobeInputError(
                f"site {site!r} has shape {tuple(activation.shape)}; dlmprobe stores per-position sites of "
                f"shape (batch, pos, d) such as hook_resid_post, attn.hook_out or mlp.hook_out"
            )
        widths[site] = activation.shape[-1]
    return widths


def resolve_steps(steps: str | int | Sequence[int], n_steps: int) -> list[int]:
    if steps == "all":
        return list(range(n_steps))
    if isinstance(steps, int):
        if steps < 1:
            raise DlmprobeInputError(f"record every k-th step needs k >= 1, got {steps}")
        return list(range(0, n_steps, steps))
    chosen = sorted({int(s) for s in steps})
    if not chosen or chosen[0] < 0 or chosen[-1] >= n_steps:
        raise DlmprobeInputError(f"steps to record must lie in [0, {n_steps}), got {list(steps)}")
    return chosen


def _resolve_positions(rule: str, task: Task) -> list[int]:
    start = task.target_start
    if rule == "all":
        return list(range(task.sequence_length))
    if rule in ("target", "masked"):
        return list(range(start, start + task.target_length))
    if rule == "answer":
        return [start + p for p in task.answer_positions()]
    if rule == "sep+target":
        return list(range(start - 1, start + task.target_length))
    return [start - 1]  # last_prompt: the <sep> token, from which an autoregressive model reads ahead


def batch_record(task: Task, examples: Sequence[Example], trajectory: Trajectory,
                 activations: dict[str, torch.Tensor], output: torch.Tensor | None = None) -> dict[str, Any]:
    """One store batch (see :class:`dlmprobe.store.Batch`): the examples, their run and activations.

    ``output`` (batch, target) defaults to the trajectory's generated region.
    """
    output = trajectory.output if output is None else output
    return {
        "uid": [ex.uid for ex in examples],
        "prompt": np.array([ex.prompt for ex in examples]),
        "target": np.array([ex.target for ex in examples]),
        "output": output.numpy(),
        "solved": np.array([task.verify(ex.prompt, out.tolist()) for ex, out in zip(examples, output)]),
        "canvas": trajectory.canvases.numpy(),
        "commit_step": trajectory.commit_step.numpy(),
        "prediction": trajectory.predictions.numpy(),
        "confidence": trajectory.confidence.numpy(),
        "labels": {
            name: (np.array([ex.labels[name].positions for ex in examples]),
                   np.array([ex.labels[name].values for ex in examples]))
            for name in examples[0].labels
        },
        "activations": {site: value.numpy() for site, value in activations.items()},
    }


def autoregressive_steps(steps: Sequence[int], positions: Sequence[int], final_pass: dict[str, torch.Tensor],
                         gen_start: int) -> dict[str, torch.Tensor]:
    """Spread one forward pass over the final sequence onto the step axis (NaN = not yet computed)."""
    computed = torch.tensor(positions).unsqueeze(0) < gen_start + torch.tensor(steps).unsqueeze(1)  # (steps, pos)
    out = {}
    for site, value in final_pass.items():  # (batch, 1, pos, d)
        expanded = value.expand(-1, len(steps), -1, -1).clone()
        expanded[:, ~computed] = float("nan")
        out[site] = expanded
    return out


def capture_batch(plan: CachePlan, recorder: ActivationRecorder, examples: Sequence[Example],
                  first_example: int) -> dict[str, Any]:
    """Sample one batch, recording its activations, and return it as a store batch.

    The recorder is attached for this batch only: an autoregressive model samples without hooks
    and is recorded in one forward pass over its final sequence.
    """
    ckpt = plan.checkpoint
    # A distinct, reproducible noise stream per batch, keyed by its first example's index in the
    # whole run: the same on resume.
    sampler = replace(plan.sampler, seed=plan.sampler.seed * 1_000_003 + first_example)
    if ckpt.kind == "diffusion":
        with recorder:
            trajectory = generate(recorder.model, plan.task, examples, ckpt.kind, sampler, batch_size=len(examples),
                                  observers=[recorder])
            activations = recorder.pop().activations
    else:
        trajectory = generate(ckpt.model, plan.task, examples, ckpt.kind, sampler, batch_size=len(examples))
        with recorder, torch.no_grad():
            final = trajectory.canvases[:, -1].to(next(ckpt.model.parameters()).device)
            recorder.begin_step(0, torch.arange(len(examples)), final)
            recorder.model(final)
            final_pass = recorder.pop().activations
        activations = autoregressive_steps(plan.steps, plan.positions, final_pass, trajectory.gen_start)
    return batch_record(plan.task, examples, trajectory, activations)


def run_cache(config: CacheConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False,
              progress: bool = True, plan: Any = None) -> Path:
    """Sample ``config.n`` examples with capture and write them to the HDF5 file ``out``.

    Refuses to start if ``out`` exists and neither ``overwrite`` nor ``resume`` is given, if
    another process writes ``out``, or if the disk lacks the space the file still needs (the
    writer reserves it before sampling). With ``resume`` an interrupted run, or one stopped by a
    write error such as a full disk, continues at its first incomplete batch and ends with the
    same contents as an uninterrupted one. ``plan`` is what :func:`plan_cache` returns for
    ``config`` (a :class:`CachePlan`, a text plan or a native plan: any plan with a ``batch(begin,
    stop)`` method and a ``mask_id`` writes its own batches).
    """
    out = Path(out)
    plan = plan or plan_cache(config)
    if out.exists() and not (overwrite or resume):
        raise FileExistsError(f"{out} already exists; pass --resume to continue it or --overwrite to replace it")
    if hasattr(plan, "batch"):  # a model with its own sampler (capture_native)
        mask_id, batch_of = plan.mask_id, plan.batch
    elif isinstance(plan, TextCachePlan):
        mask_id = plan.mask_id

        def batch_of(begin: int, stop: int) -> dict[str, Any]:
            return capture_text_batch(plan, begin, stop)
    else:
        recorder_steps = plan.steps if plan.checkpoint.kind == "diffusion" else None
        # Converted to the stored dtype as it is copied out of the forward pass: one copy, half the bytes.
        recorder = ActivationRecorder(plan.checkpoint.model, list(plan.sites), steps=recorder_steps,
                                      positions=plan.positions, dtype=getattr(torch, config.dtype))
        mask_id = plan.task.vocab.mask_id

        def batch_of(begin: int, stop: int) -> dict[str, Any]:
            return capture_batch(plan, recorder, plan.examples[begin:stop], plan.offset + begin)
    writer = ActivationWriter(out, plan.layout, config=plan.store_config(), mask_id=mask_id,
                              overwrite=overwrite, resume=resume)
    size = config.batch_size
    with writer:
        start = writer.n_complete
        if start % size and start != len(plan.examples):
            raise DlmprobeInputError(f"cannot resume {out}: {start} examples written is not a multiple of batch_size {size}")
        # Closed also when a write error stops the run, so the error is the last line on stderr.
        with tqdm(total=len(plan.examples), initial=start, disable=not progress, unit="ex",
                  desc=f"cache {plan.config.model}") as bar:
            for begin in range(start, len(plan.examples), size):
                stop = min(begin + size, len(plan.examples))
                # Every batch's arrays are new and never touched again: handed over, not copied.
                writer.write_batch(batch_of(begin, stop), copy=False)
                bar.update(stop - begin)
    return out
