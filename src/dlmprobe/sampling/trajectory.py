"""The record of one sampling run: what the canvas was at every step and how it got there."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

# commit_step of a position no step committed: the prompt, <sep>, <eos>, fixed tokens of a canvas
# template, a position a callback remasked and no later step committed again.
NOT_COMMITTED = -1


@dataclass
class Trajectory:
    """A batch of sampling runs.

    ``canvases[:, s]`` is the canvas the model saw at step ``s``; ``canvases[:, -1]`` is the final
    output, so there are ``n_steps + 1`` canvases. ``predictions[:, s, p]`` and
    ``confidence[:, s, p]`` are the model's argmax and its probability at position ``p`` in the
    forward pass of step ``s`` (``-1`` and NaN where the model makes no prediction, e.g. an
    autoregressive model's positions other than the one it writes). ``commit_step[:, p]`` is the
    step whose forward pass committed position ``p`` (``NOT_COMMITTED`` if none did; the latest
    commit if a callback remasked it and a later step committed it again).
    """

    canvases: Int[Tensor, "batch step_plus_one pos"]
    predictions: Int[Tensor, "batch step pos"]
    confidence: Float[Tensor, "batch step pos"]
    commit_step: Int[Tensor, "batch pos"]
    gen_start: int
    gen_length: int

    @property
    def n_steps(self) -> int:
        return self.predictions.shape[1]

    @property
    def batch_size(self) -> int:
        return self.canvases.shape[0]

    @property
    def gen_slice(self) -> slice:
        return slice(self.gen_start, self.gen_start + self.gen_length)

    @property
    def output(self) -> Int[Tensor, "batch gen"]:
        """The generated region of the final canvas."""
        return self.canvases[:, -1, self.gen_slice]

    @property
    def target_commit_step(self) -> Int[Tensor, "batch gen"]:
        """``commit_step`` of the generated region only."""
        return self.commit_step[:, self.gen_slice]

    def __getitem__(self, index) -> Trajectory:
        """A sub-batch (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Trajectory(
            self.canvases[index], self.predictions[index], self.confidence[index],
            self.commit_step[index], self.gen_start, self.gen_length,
        )

    @staticmethod
    def concat(parts: list[Trajectory]) -> Trajectory:
        if not parts:
            raise ValueError("cannot concatenate an empty list of trajectories")
        first = parts[0]
        tensors = {
            f.name: torch.cat([getattr(p, f.name) for p in parts])
            for f in fields(Trajectory)
            if f.name not in ("gen_start", "gen_length")
        }
        return Trajectory(**tensors, gen_start=first.gen_start, gen_length=first.gen_length)


class StepCallback(Protocol):
    """Called after every step, before the next forward pass, with the step just done, the batch's
    ``rows`` (indices of its examples within the whole ``generate`` call) and the new canvas.

    Return an edited canvas (corrupt, remask, paraphrase committed tokens) or None to keep it. A
    position set back to the mask id becomes uncommitted (``commit_step`` -1). The diffusion sampler
    commits it again if its block is still running (the current block's commit budget is not
    raised, and its last step commits whatever is still masked); a position of a finished block
    stays masked to the end. The autoregressive sampler never revisits a position it has passed: a
    remasked position before the one it writes next stays masked, and the model reads the mask
    there from then on. A token written into a still-masked position is kept and never committed,
    by either sampler.
    """

    def __call__(self, step: int, rows: Int[Tensor, " batch"], canvas: Int[Tensor, "batch pos"]) -> Tensor | None: ...


class StepObserver(Protocol):
    """Told before every forward pass which step it belongs to and which examples the batch holds.

    ``rows`` are the indices of the batch's examples within the whole ``generate`` call and
    ``canvas`` (batch, pos) is the canvas the step reads (an autoregressive step reads the positions
    before the one it writes). Activation hooks (recording, editing) take the step from here.
    """

    def begin_step(self, step: int, rows: Int[Tensor, " batch"], canvas: Int[Tensor, "batch pos"]) -> None: ...
