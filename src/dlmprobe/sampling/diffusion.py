"""Masked-diffusion sampling as LLaDA and Dream do it: the policy the sampler loop runs for a denoiser.

The generated region is split into semi-autoregressive blocks of ``block_length`` tokens, each given
``steps / n_blocks`` steps. At every step the model predicts every position; the masked positions of
the current block with the highest score are committed and never change again. How many a step
commits is the ``schedule``:

* ``"llada"`` (LLaDA's ``generate``): the block's masked positions at its first step, split evenly
  over its steps with the remainder to the earliest (:func:`tokens_per_step`);
* ``"dream"`` (Dream's ``diffusion_generate``, one block by default): with ``t`` running down
  ``linspace(1, eps, steps + 1)`` in float32, step ``i`` commits ``int(n * (1 - t[i+1] / t[i]))``
  of the ``n`` positions still masked (all of them at the block's last step). Dream takes the batch's
  mean ``n``; here each row's own, the same when the rows have equal masks.

Orders (Dream's names are accepted and mapped, see :data:`DREAM_ORDERS`): ``confidence`` (the chosen
token's probability; LLaDA's ``low_confidence`` remasking, Dream's ``maskgit_plus``), ``margin``
(top-1 minus top-2 probability, ``topk_margin``), ``entropy`` (negative entropy, ``entropy``) and
``random`` (LLaDA's ``random`` remasking: random scores, the same budget; under the dream schedule
Dream's ``origin``: each masked position of the block is committed with probability ``1 - t[i+1] /
t[i]``). Scores come from :mod:`dlmprobe.sampling.scores` (no full-vocabulary softmax).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from dlmprobe.choices import ORDERS
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.sampling.scores import LogitSummary

Order = Literal["confidence", "margin", "entropy", "random"]
Schedule = Literal["llada", "dream"]
SCHEDULES = ("llada", "dream")
#: Dream's ``alg`` names -> the order that does the same.
DREAM_ORDERS = {"maskgit_plus": "confidence", "topk_margin": "margin", "entropy": "entropy", "origin": "random"}


@dataclass
class DiffusionSamplerConfig:
    """``steps`` and ``block_length`` default to ``gen_length`` (one token a step, one block).

    ``order`` may be given by Dream's name (``maskgit_plus``...); it is stored as the order it maps
    to. ``eps`` is the dream schedule's last time (Dream's default 1e-3).
    """

    steps: int | None = None
    block_length: int | None = None
    temperature: float = 0.0
    order: Order = "confidence"
    seed: int = 0
    schedule: Schedule = "llada"
    eps: float = 1e-3

    def __post_init__(self) -> None:
        self.order = DREAM_ORDERS.get(self.order, self.order)
        if self.order not in ORDERS:
            raise DlmprobeInputError(f"commit order must be one of {ORDERS} or Dream's {tuple(DREAM_ORDERS)}, "
                                     f"got {self.order!r}")
        if self.schedule not in SCHEDULES:
            raise DlmprobeInputError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 < self.eps < 1:
            raise DlmprobeInputError(f"eps must lie in (0, 1), got {self.eps!r}")
        if self.temperature < 0:
            raise DlmprobeInputError(f"temperature must be >= 0, got {self.temperature!r}")
        for name in ("steps", "block_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DlmprobeInputError(f"{name} must be a positive integer, got {value!r}")

    def resolve(self, gen_length: int) -> tuple[int, int]:
        """``(steps, block_length)`` for ``gen_length``; raises if they do not divide as LLaDA requires."""
        steps = gen_length if self.steps is None else self.steps
        block_length = gen_length if self.block_length is None else self.block_length
        if gen_length % block_length:
            raise DlmprobeInputError(
                f"block_length must divide gen_length: got block_length={block_length}, gen_length={gen_length}"
            )
        n_blocks = gen_length // block_length
        if steps % n_blocks:
            raise DlmprobeInputError(
                f"steps must be a multiple of the number of blocks (gen_length/block_length = {n_blocks}), "
                f"got steps={steps}"
            )
        if steps // n_blocks > block_length and self.schedule == "llada":
            raise DlmprobeInputError(
                f"steps per block ({steps // n_blocks}) exceeds block_length ({block_length}): "
                f"at most {gen_length} steps for gen_length={gen_length}"
            )
        return steps, block_length

    def to_dict(self) -> dict:
        return asdict(self)

    def policy(self, gen_start: int, gen_length: int, length: int) -> DiffusionPolicy:
        return DiffusionPolicy(self, gen_start, gen_length, length)


def tokens_per_step(n_masked: int, steps: int) -> list[int]:
    """Commit budget of each step: even split, remainder to the earliest steps (LLaDA)."""
    base, remainder = divmod(n_masked, steps)
    return [base + (1 if s < remainder else 0) for s in range(steps)]


def _scores(order: str, summary: LogitSummary, generator: torch.Generator) -> Tensor:
    """Commit score of every position of ``summary``: higher commits first."""
    if order == "confidence":
        return summary.chosen_probability
    if order == "margin":
        return summary.margin
    if order == "entropy":
        return summary.neg_entropy
    return torch.rand(summary.chosen.shape, generator=generator).to(summary.chosen.device)


class DiffusionPolicy:
    """Every step predicts every position and commits the best-scored masked ones of the current block.

    Under the llada schedule each block's budget comes from the positions of the block still masked,
    per row, when the block starts (as LLaDA's reference sampler does), so fixed tokens in the
    generated region are never counted or committed; under the dream schedule from those masked at
    each step. The block's last step commits whatever is still masked.
    """

    shift = 0

    def __init__(self, config: DiffusionSamplerConfig, gen_start: int, gen_length: int, length: int):
        self.n_steps, self.block_length = config.resolve(gen_length)
        self.steps_per_block = self.n_steps // (gen_length // self.block_length)
        self.order, self.schedule, self.gen_start, self.length = config.order, config.schedule, gen_start, length
        self.needs_entropy = self.order == "entropy"
        # Dream's times, float32 as in its sampler: the fractions 1 - t[i+1]/t[i] must round the same.
        self.times = torch.linspace(1, config.eps, self.steps_per_block + 1)
        self.budget: Int[Tensor, "batch step_in_block"] | None = None

    def predicted(self, step: int) -> slice:
        return slice(0, self.length)

    def resume(self, step: int, canvases: Int[Tensor, "batch step_plus_one pos"], mask_id: int) -> None:
        """The budget of the block under way, from its masked positions at the block's first step."""
        block, step_in_block = divmod(step, self.steps_per_block)
        if step_in_block:
            start = self.gen_start + block * self.block_length
            masked = canvases[:, step - step_in_block, start : start + self.block_length] == mask_id
            self._set_budget(masked.sum(-1))

    def _set_budget(self, n_masked: Int[Tensor, " batch"]) -> None:
        self.budget = torch.tensor([tokens_per_step(n, self.steps_per_block) for n in n_masked.tolist()])

    def _fraction(self, step_in_block: int) -> Tensor:
        return 1 - self.times[step_in_block + 1] / self.times[step_in_block]

    def _k(self, step_in_block: int, n_eligible: Int[Tensor, " batch"]) -> Int[Tensor, " batch"]:
        if step_in_block == self.steps_per_block - 1:
            return n_eligible  # the block's last step commits whatever is still masked
        if self.schedule == "dream":
            return (n_eligible.cpu().float() * self._fraction(step_in_block)).long().to(n_eligible.device)
        return n_eligible.clamp(max=self.budget[:, step_in_block].to(n_eligible.device))

    def commit(self, step: int, masked: Bool[Tensor, "batch pos"], summary: LogitSummary,
               generator: torch.Generator) -> Bool[Tensor, "batch pos"]:
        block, step_in_block = divmod(step, self.steps_per_block)
        start = self.gen_start + block * self.block_length
        block_slice = slice(start, start + self.block_length)
        eligible = torch.zeros_like(masked)
        eligible[:, block_slice] = masked[:, block_slice]
        n_eligible = eligible.sum(-1)
        if step_in_block == 0 and self.schedule == "llada":
            self._set_budget(n_eligible)
        batch = masked.shape[0]
        if self.order == "random" and self.schedule == "dream":  # Dream's origin: a coin per position
            last = step_in_block == self.steps_per_block - 1
            draw = torch.rand(masked.shape, generator=generator).to(masked.device)
            return eligible & (last | (draw < self._fraction(step_in_block).item()))
        k = self._k(step_in_block, n_eligible)
        score = torch.full(masked.shape, float("-inf"), device=masked.device)
        if self.order == "random":  # one draw per canvas position: the stream does not depend on the block
            score[:, block_slice] = _scores("random", summary, generator)[:, block_slice]
        else:
            score[:, block_slice] = _scores(self.order, summary[block_slice], generator)
        score = score.masked_fill(~eligible, float("-inf"))
        order = score.argsort(dim=-1, descending=True)
        rank = torch.empty_like(order)
        rank[torch.arange(batch, device=masked.device).unsqueeze(1), order] = torch.arange(
            self.length, device=masked.device).expand(batch, -1)
        return eligible & (rank < k.unsqueeze(1))
