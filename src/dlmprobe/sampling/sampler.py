"""The one sampling loop that both the masked-diffusion and the autoregressive policy run.

Every step: tell the observers (step, rows, the canvas the step reads), run the model on the
positions the policy reads (:class:`~dlmprobe.sampling.forward.StepForward`), summarise the logits
per position without a full-vocabulary softmax (:func:`~dlmprobe.sampling.scores.summarise`),
record argmax and confidence, choose a token per predicted position (argmax, or Gumbel noise at
temperature > 0; never the mask token), let the policy pick the positions to commit, write them,
let a callback edit the canvas, and record the canvas. What differs between the two kinds is
the policy: which positions a step predicts and which of them it commits.

The canvas is ``prefix + generated region + suffix``; the generated region may hold fixed tokens
besides masks (a template such as ``[MASK]*r "The answer is" [MASK]*a``): only masked positions
are ever committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models.handle import ModelHandle
from dlmprobe.sampling.forward import StepForward
from dlmprobe.sampling.scores import LogitSummary, summarise
from dlmprobe.sampling.trajectory import (
    NOT_COMMITTED,
    StepCallback,
    StepObserver,
    Trajectory,
)


class Policy(Protocol):
    """Which positions each step predicts and which of them it commits.

    Step ``s`` predicts the positions ``predicted(s)``; with ``shift = 1`` (a causal model) position
    ``p`` is predicted by the model's output at ``p - 1`` and the model reads only the positions
    before the last predicted one, with ``shift = 0`` (a denoiser) by its output at ``p``.
    """

    n_steps: int
    shift: int
    needs_entropy: bool

    def predicted(self, step: int) -> slice: ...

    def resume(self, step: int, canvases: Int[Tensor, "batch step_plus_one pos"], mask_id: int) -> None:
        """Take up a run at ``step`` whose canvases up to ``step`` are given."""

    def commit(self, step: int, masked: Bool[Tensor, "batch window"], summary: LogitSummary,
               generator: torch.Generator) -> Bool[Tensor, "batch window"]:
        """The positions to commit, given the summary of the window's logits."""


class SamplerConfig(Protocol):
    temperature: float
    seed: int

    def policy(self, gen_start: int, gen_length: int, length: int) -> Policy: ...


def make_canvas(prefix: Int[Tensor, "batch prefix"], gen_length: int, mask_id: int,
                suffix: Int[Tensor, "batch suffix"] | None = None) -> Int[Tensor, "batch pos"]:
    """``prefix + [MASK] * gen_length + suffix``."""
    masks = torch.full((prefix.shape[0], gen_length), mask_id, dtype=prefix.dtype, device=prefix.device)
    return torch.cat([prefix, masks] + ([] if suffix is None else [suffix.to(prefix.device)]), dim=1)


@torch.no_grad()
def sample(
    model: ModelHandle | torch.nn.Module,
    canvas: Int[Tensor, "batch pos"],
    gen_start: int,
    gen_length: int,
    mask_id: int,
    config: SamplerConfig,
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    rows: Int[Tensor, " batch"] | None = None,
    callback: StepCallback | None = None,
    observers: Sequence[StepObserver] = (),
    branch: Trajectory | None = None,
    first_step: int = 0,
) -> Trajectory:
    """Fill the masked positions of ``canvas[:, gen_start : gen_start + gen_length]`` with ``model``.

    ``model`` is a :class:`ModelHandle` (or a bare module, see :mod:`dlmprobe.sampling.forward`);
    ``attention_mask`` (0 on left padding, as :func:`dlmprobe.tasks.text.encode` gives) is passed to
    every forward pass. ``config`` (a ``DiffusionSamplerConfig`` or ``AutoregressiveSamplerConfig``) chooses the
    policy. ``rows`` are the examples' indices that observers and the callback are told (default
    ``0 .. batch-1``). With ``first_step > 0`` the run branches off ``branch`` (a run of the same
    rows and sampler): its record up to ``first_step`` is copied and sampling starts there, which
    gives the run from step 0 exactly when the sampler is deterministic (temperature 0, not the
    random order) and nothing edited the model before ``first_step``.

    Example:
        >>> canvas = make_canvas(torch.tensor([[1, 5, 6, 2]]), 3, mask_id=4)
        >>> trajectory = sample(model, canvas, 4, 3, 4, DiffusionSamplerConfig())
    """
    batch, length = canvas.shape
    if gen_start < 0 or gen_length < 1 or gen_start + gen_length > length:
        raise DlmprobeInputError(f"the generated region [{gen_start}, {gen_start + gen_length}) must lie within "
                                 f"the canvas of {length} positions")
    rows = torch.arange(batch) if rows is None else rows.cpu()
    if rows.shape != (batch,):
        raise DlmprobeInputError(f"rows must hold one index per canvas row ({batch}), got shape {tuple(rows.shape)}")
    policy = config.policy(gen_start, gen_length, length)
    forward = StepForward(model, causal=policy.shift == 1, use_cache=getattr(config, "use_cache", False))
    device = forward.device
    canvas = canvas.to(device, copy=True)
    if attention_mask is not None:
        if attention_mask.shape != canvas.shape:
            raise DlmprobeInputError(f"attention_mask must have the canvas shape {tuple(canvas.shape)}, "
                                     f"got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.to(device)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)

    canvases = [canvas.to("cpu", copy=True)]
    predictions = torch.full((batch, policy.n_steps, length), -1, dtype=torch.long)
    confidence = torch.full((batch, policy.n_steps, length), float("nan"), dtype=torch.float32)
    commit_step = torch.full((batch, length), NOT_COMMITTED, dtype=torch.long)
    if first_step:
        _check_branch(branch, first_step, config, (batch, policy.n_steps, length))
        canvas = branch.canvases[:, first_step].to(device, copy=True)
        canvases = list(branch.canvases[:, : first_step + 1].unbind(1))
        predictions[:, :first_step] = branch.predictions[:, :first_step]
        confidence[:, :first_step] = branch.confidence[:, :first_step]
        commit_step = torch.where(branch.commit_step < first_step, branch.commit_step, NOT_COMMITTED)
        policy.resume(first_step, branch.canvases, mask_id)
    for step in range(first_step, policy.n_steps):
        window = policy.predicted(step)
        for observer in observers:
            observer.begin_step(step, rows, canvas[:, : forward.read_stop(window, policy.shift)])
        logits = forward(canvas, attention_mask, window, policy.shift)  # (batch, window, vocab)
        summary = summarise(logits, mask_id, config.temperature, generator, entropy=policy.needs_entropy)
        del logits
        predictions[:, step, window] = summary.argmax.cpu()
        confidence[:, step, window] = summary.confidence.cpu()
        current = canvas[:, window]
        commit = policy.commit(step, current == mask_id, summary, generator)
        canvas[:, window] = torch.where(commit, summary.chosen.to(device), current)
        commit_step[:, window][commit.cpu()] = step
        if callback is not None:
            edited = callback(step, rows, canvas.clone())
            if edited is not None:
                canvas = edited.to(device)
                commit_step[(canvas == mask_id).cpu()] = NOT_COMMITTED  # remasked: no longer committed
        canvases.append(canvas.to("cpu", copy=True))
    return Trajectory(torch.stack(canvases, dim=1), predictions, confidence, commit_step, gen_start, gen_length)


def _check_branch(branch: Trajectory | None, first_step: int, config: SamplerConfig, shape: tuple[int, int, int]) -> None:
    if branch is None or tuple(branch.predictions.shape) != shape:
        got = None if branch is None else tuple(branch.predictions.shape)
        raise DlmprobeInputError(f"first_step={first_step} needs a branch run of the same rows and schedule, with "
                                 f"predictions of shape {shape}; got {got}")
    if not 0 < first_step < shape[1]:
        raise DlmprobeInputError(f"first_step must lie in [0, {shape[1]}), got {first_step}")
    # The noise of the steps skipped is not drawn, so a random stream would not line up with the branch's.
    if config.temperature > 0 or getattr(config, "order", None) == "random":
        raise DlmprobeInputError("branching off a run needs a deterministic sampler (temperature 0, not the random "
                                 "order)")
