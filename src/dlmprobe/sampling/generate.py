"""Task-level sampling: examples in, a Trajectory out, whatever the model kind."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models.handle import ModelHandle
from dlmprobe.sampling.autoregressive import AutoregressiveSamplerConfig
from dlmprobe.sampling.diffusion import DiffusionSamplerConfig
from dlmprobe.sampling.sampler import make_canvas, sample
from dlmprobe.sampling.trajectory import StepCallback, StepObserver, Trajectory
from dlmprobe.tasks import Example, Task

SamplerConfig = DiffusionSamplerConfig | AutoregressiveSamplerConfig


def default_sampler(kind: str) -> SamplerConfig:
    """LLaDA-style pure diffusion (one token a step, max-probability order) or greedy decoding."""
    return DiffusionSamplerConfig() if kind == "diffusion" else AutoregressiveSamplerConfig()


def prefixes(task: Task, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """``<bos> prompt <sep>`` and ``<eos>`` of every example, as (batch, len) id tensors."""
    vocab = task.vocab
    lengths = {len(ex.prompt) for ex in examples}
    if len(lengths) > 1:
        raise DlmprobeInputError(f"all prompts in a batch must have the same length, got lengths {sorted(lengths)}")
    prefix = torch.tensor([[vocab.bos_id, *ex.prompt, vocab.sep_id] for ex in examples], dtype=torch.long)
    suffix = torch.full((len(examples), 1), vocab.eos_id, dtype=torch.long)
    return prefix, suffix


def check_context(task: Task, n_ctx: int, prompt_length: int) -> None:
    needed = prompt_length + task.target_length + 3
    if needed > n_ctx:
        raise DlmprobeInputError(
            f"prompt of {prompt_length} tokens plus a target of {task.target_length} needs a context of "
            f"{needed} tokens; the model's context is {n_ctx}"
        )


def generate(
    model: ModelHandle | torch.nn.Module,
    task: Task,
    examples: Sequence[Example],
    kind: str,
    sampler: SamplerConfig | None = None,
    batch_size: int = 256,
    callback: StepCallback | None = None,
    observers: Sequence[StepObserver] = (),
    progress: bool = False,
    branch: Trajectory | None = None,
    first_step: int = 0,
) -> Trajectory:
    """Sample a target for every example with ``model`` (a diffusion or autoregressive model).

    ``model`` is a :class:`ModelHandle` (``from_checkpoint(ckpt)``, a recorder's ``model``) or, as
    before handles, a built-in checkpoint's ``ckpt.model``.

    Examples are sampled ``batch_size`` at a time. ``callback`` and ``observers`` (activation
    recorders and editors) see the current batch only, and are told its ``rows``: the indices of
    its examples in ``examples``. With ``first_step > 0`` each example's run branches off its row of
    ``branch`` (a run of the same examples and sampler) at that step (see :func:`sample`).

    Example:
        >>> handle = from_checkpoint(ckpt)
        >>> with ActivationRecorder(handle, "blocks.*.hook_resid_post") as recorder:
        ...     trajectory = generate(recorder.model, task, examples, "diffusion", observers=[recorder])
    """
    if not examples:
        raise DlmprobeInputError("no examples to sample: expected at least one")
    sampler = sampler or default_sampler(kind)
    expected = DiffusionSamplerConfig if kind == "diffusion" else AutoregressiveSamplerConfig
    if not isinstance(sampler, expected):
        raise DlmprobeInputError(f"a {kind} model needs a {expected.__name__}, got {type(sampler).__name__}")
    if isinstance(sampler, DiffusionSamplerConfig):
        sampler.resolve(task.target_length)  # refuse a bad schedule before any work starts
    if first_step and (branch is None or branch.batch_size != len(examples)):
        raise DlmprobeInputError(f"first_step={first_step} needs a branch run of all {len(examples)} examples, got "
                                 f"{None if branch is None else branch.batch_size}")
    module = model.module if isinstance(model, ModelHandle) else model
    n_ctx = getattr(getattr(module, "cfg", None), "n_ctx", None)
    if n_ctx is not None:
        check_context(task, n_ctx, max(len(ex.prompt) for ex in examples))
    was_training = module.training
    module.eval()
    parts = []
    try:
        starts = range(0, len(examples), batch_size)
        for start in tqdm(starts, desc=f"sampling {task.name}", disable=not progress, unit="batch"):
            batch = examples[start : start + batch_size]
            prefix, suffix = prefixes(task, batch)
            canvas = make_canvas(prefix, task.target_length, task.vocab.mask_id, suffix)
            parts.append(sample(model, canvas, prefix.shape[1], task.target_length, task.vocab.mask_id, sampler,
                                rows=torch.arange(start, start + len(batch)), callback=callback, observers=observers,
                                branch=branch[start : start + len(batch)] if first_step else None,
                                first_step=first_step))
    finally:
        module.train(was_training)
    return Trajectory.concat(parts)


def solved(task: Task, examples: Sequence[Example], trajectory: Trajectory) -> list[bool]:
    """Whether each sampled output is a correct solution, by the task's verifier."""
    return [task.verify(ex.prompt, out.tolist()) for ex, out in zip(examples, trajectory.output)]


def evaluate(
    model: ModelHandle | torch.nn.Module,
    task: Task,
    kind: str,
    n: int = 500,
    seed: int = 0,
    sampler: SamplerConfig | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> float:
    """Exact-solve rate on ``n`` held-out puzzles (the eval split) with the given sampler."""
    examples = task.sample(n, split="eval", seed=seed)
    trajectory = generate(model, task, examples, kind, sampler, batch_size, progress=progress)
    return sum(solved(task, examples, trajectory)) / n
