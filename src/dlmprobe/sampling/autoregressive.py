"""Greedy and temperature decoding for a causal model: the policy the sampler loop runs.

The canvas has the same layout as for diffusion (``prefix + generated region + suffix``); step
``s`` predicts position ``gen_start + s`` from the model's output at the position before it, reading
only the positions before it, and writes it if it is masked (a fixed token of a canvas template is
kept). A causal model never looks at later positions, so the masks after the write position do not
change its output.

With ``use_cache`` (the default) a Hugging Face causal LM keeps its KV cache between steps, so step
``s`` runs the model on the one position written last instead of the whole prefix; the tokens are
the same as without it (tested). Models without a Hugging Face KV cache (the built-in twins)
recompute the prefix every step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.sampling.scores import LogitSummary


@dataclass
class AutoregressiveSamplerConfig:
    temperature: float = 0.0
    seed: int = 0
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise DlmprobeInputError(f"temperature must be >= 0, got {self.temperature!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def policy(self, gen_start: int, gen_length: int, length: int) -> AutoregressivePolicy:
        return AutoregressivePolicy(gen_start, gen_length)


class AutoregressivePolicy:
    """Step ``s`` predicts position ``gen_start + s`` and commits it if it is still masked."""

    shift = 1

    def __init__(self, gen_start: int, gen_length: int):
        if gen_start < 1:
            raise DlmprobeInputError(f"an autoregressive model needs at least one token before the generated "
                                     f"region, got gen_start={gen_start}")
        self.gen_start, self.n_steps = gen_start, gen_length

    def predicted(self, step: int) -> slice:
        return slice(self.gen_start + step, self.gen_start + step + 1)

    def resume(self, step: int, canvases: Int[Tensor, "batch step_plus_one pos"], mask_id: int) -> None:
        """Nothing to take up: each step depends only on the canvas."""

    needs_entropy = False

    def commit(self, step: int, masked: Bool[Tensor, "batch 1"], summary: LogitSummary,
               generator: torch.Generator) -> Bool[Tensor, "batch 1"]:
        return masked
