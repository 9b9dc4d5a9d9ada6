"""The record of one sampling run: what the canvas was at every step and how it got there."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

NOT_COMMITTED = -1  # commit_step of a position that was never masked (prompt, <sep>, <eos>)


@dataclass
class Trajectory:
    """A batch of sampling runs.

    ``canvases[:, s]`` is the canvas the model saw at step ``s``; ``canvases[:, -1]`` is the final
    output, so there are ``n_steps + 1`` canvases. ``predictions[:, s, p]`` and
    ``confidence[:, s, p]`` are the model's argmax and its probability at position ``p`` in the
    forward pass of step ``s`` (``-1`` and NaN where the model makes no prediction, e.g. an
    autoregressive model's positions other than the one it writes). ``commit_step[:, p]`` is the
    step whose forward pass committed position ``p`` (the last commit if a callback remasked it).
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

    def __getitem__(self, index) -> "Trajectory":
        """A sub-batch (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Trajectory(
            self.canvases[index], self.predictions[index], self.confidence[index],
            self.commit_step[index], self.gen_start, self.gen_length,
        )

    @staticmethod
    def concat(parts: list["Trajectory"]) -> "Trajectory":
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
    """Called after every step with the new canvas (batch, pos), before the next forward pass.

    Return an edited canvas (corrupt, remask, paraphrase committed tokens) or None to keep it.
    Positions set back to the mask id become uncommitted and are sampled again.
    """

    def __call__(self, step: int, canvas: Int[Tensor, "batch pos"]) -> Tensor | None: ...
