"""Masked-diffusion sampling as LLaDA does it: the policy the sampler loop runs for a denoiser.

The generated region is split into semi-autoregressive blocks of ``block_length`` tokens, each given
``steps / n_blocks`` steps; within a block the tokens to commit per step are spread evenly over its
still-masked positions with the remainder going to the earliest steps. At every step the model
predicts every position; the masked positions of the current block with the highest score (the
chosen token's probability, top-1 minus top-2 margin, negative entropy, or random) are committed
and never change again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dlmprobe.choices import ORDERS
from dlmprobe.errors import DlmprobeInputError

Order = Literal["confidence", "margin", "entropy", "random"]


@dataclass
class DiffusionSamplerConfig:
    """``steps`` and ``block_length`` default to ``gen_length`` (one token a step, one block)."""

    steps: int | None = None
    block_length: int | None = None
    temperature: float = 0.0
    order: Order = "confidence"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise DlmprobeInputError(f"commit order must be one of {ORDERS}, got {self.order!r}")
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
        if steps // n_blocks > block_length:
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


def _scores(order: str, logits: Tensor, top: Tensor, norm: Tensor, chosen: Tensor,
            generator: torch.Generator) -> Tensor:
    """Commit score of every position from the logits (mask id at -inf), their max ``top`` and
    ``norm = Σ exp(logits - top)``: a probability is ``exp(logit - top) / norm``, so no softmax over
    the vocabulary is kept."""
    if order == "confidence":
        return (logits.gather(-1, chosen.unsqueeze(-1)).squeeze(-1) - top).exp() / norm
    if order == "margin":
        top2 = logits.topk(2, dim=-1).values
        return (top2[..., 0] - top).exp() / norm - (top2[..., 1] - top).exp() / norm
    if order == "entropy":  # Σ p log p: one pass over the vocabulary, 0 log 0 = 0
        probs = (logits - top.unsqueeze(-1)).exp() / norm.unsqueeze(-1)
        return torch.special.xlogy(probs, probs).sum(-1)
    return torch.rand(chosen.shape, generator=generator, device=generator.device).to(logits.device)


class DiffusionPolicy:
    """Every step predicts every position and commits the best-scored masked ones of the current block.

    Each block's budget comes from the positions of the block still masked, per row, when the block
    starts (as LLaDA's reference sampler does), so fixed tokens in the generated region are never
    counted or committed. The block's last step commits whatever is still masked.
    """

    shift = 0

    def __init__(self, config: DiffusionSamplerConfig, gen_start: int, gen_length: int, length: int):
        self.n_steps, self.block_length = config.resolve(gen_length)
        self.steps_per_block = self.n_steps // (gen_length // self.block_length)
        self.order, self.gen_start, self.length = config.order, gen_start, length
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

    def commit(self, step: int, masked: Bool[Tensor, "batch pos"], logits: Float[Tensor, "batch pos vocab"],
               top: Float[Tensor, "batch pos"], norm: Float[Tensor, "batch pos"], chosen: Int[Tensor, "batch pos"],
               generator: torch.Generator) -> Bool[Tensor, "batch pos"]:
        block, step_in_block = divmod(step, self.steps_per_block)
        start = self.gen_start + block * self.block_length
        block_slice = slice(start, start + self.block_length)
        eligible = torch.zeros_like(masked)
        eligible[:, block_slice] = masked[:, block_slice]
        n_eligible = eligible.sum(-1)
        if step_in_block == 0:
            self._set_budget(n_eligible)
        if step_in_block == self.steps_per_block - 1:
            k = n_eligible  # the block's last step commits whatever is still masked
        else:
            k = n_eligible.clamp(max=self.budget[:, step_in_block].to(masked.device))
        batch = masked.shape[0]
        score = torch.full(masked.shape, float("-inf"), device=masked.device)
        if self.order == "random":  # one draw per canvas position: the stream does not depend on the block
            score[:, block_slice] = _scores("random", logits, top, norm, chosen, generator)[:, block_slice]
        else:
            score[:, block_slice] = _scores(self.order, logits[:, block_slice], top[:, block_slice],
                                            norm[:, block_slice], chosen[:, block_slice], generator)
        score = score.masked_fill(~eligible, float("-inf"))
        order = score.argsort(dim=-1, descending=True)
        rank = torch.empty_like(order)
        rank[torch.arange(batch, device=masked.device).unsqueeze(1), order] = torch.arange(
            self.length, device=masked.device).expand(batch, -1)
        return eligible & (rank < k.unsqueeze(1))
