"""Masked-diffusion sampling as LLaDA does it.

The canvas is ``prefix + [MASK] * gen_length + suffix``. Generation is split into semi-autoregressive
blocks of ``block_length`` tokens, each given ``steps / n_blocks`` steps; within a block the tokens
to commit per step are spread evenly with the remainder going to the earliest steps. At every step
the model predicts every masked position; the masked positions of the current block with the
highest score (max probability, top-1 minus top-2 margin, negative entropy, or random) are
committed and never change again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from dlmprobe.choices import ORDERS
from dlmprobe.sampling.trajectory import NOT_COMMITTED, StepCallback, Trajectory

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
            raise ValueError(f"commit order must be one of {ORDERS}, got {self.order!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        for name in ("steps", "block_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def resolve(self, gen_length: int) -> tuple[int, int]:
        """``(steps, block_length)`` for ``gen_length``; raises if they do not divide as LLaDA requires."""
        steps = gen_length if self.steps is None else self.steps
        block_length = gen_length if self.block_length is None else self.block_length
        if gen_length % block_length:
            raise ValueError(
                f"block_length must divide gen_length: got block_length={block_length}, gen_length={gen_length}"
            )
        n_blocks = gen_length // block_length
        if steps % n_blocks:
            raise ValueError(
                f"steps must be a multiple of the number of blocks (gen_length/block_length = {n_blocks}), "
                f"got steps={steps}"
            )
        if steps // n_blocks > block_length:
            raise ValueError(
                f"steps per block ({steps // n_blocks}) exceeds block_length ({block_length}): "
                f"at most {gen_length} steps for gen_length={gen_length}"
            )
        return steps, block_length

    def to_dict(self) -> dict:
        return asdict(self)


def tokens_per_step(n_masked: int, steps: int) -> list[int]:
    """Commit budget of each step: even split, remainder to the earliest steps (LLaDA)."""
    base, remainder = divmod(n_masked, steps)
    return [base + (1 if s < remainder else 0) for s in range(steps)]


def _scores(probs: Tensor, chosen: Tensor, order: str, generator: torch.Generator) -> Tensor:
    if order == "confidence":
        return probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    if order == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if order == "entropy":
        return (probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
    return torch.rand(chosen.shape, generator=generator, device=generator.device).to(probs.device)


@torch.no_grad()
def sample_diffusion(
    model: torch.nn.Module,
    prefix: Int[Tensor, "batch prefix"],
    gen_length: int,
    mask_id: int,
    config: DiffusionSamplerConfig | None = None,
    suffix: Int[Tensor, "batch suffix"] | None = None,
    callback: StepCallback | None = None,
) -> Trajectory:
    """Sample ``gen_length`` tokens after ``prefix`` with a masked-diffusion ``model`` (ids -> logits)."""
    config = config or DiffusionSamplerConfig()
    steps, block_length = config.resolve(gen_length)
    n_blocks = gen_length // block_length
    steps_per_block = steps // n_blocks
    device = next(model.parameters()).device
    batch = prefix.shape[0]
    suffix = prefix.new_zeros((batch, 0)) if suffix is None else suffix
    gen_start = prefix.shape[1]
    canvas = torch.cat(
        [prefix, torch.full((batch, gen_length), mask_id, dtype=prefix.dtype), suffix], dim=1
    ).to(device)
    length = canvas.shape[1]
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    budget = tokens_per_step(block_length, steps_per_block)
    rows = torch.arange(batch, device=device)

    canvases = [canvas.to("cpu", copy=True)]
    predictions = torch.empty((batch, steps, length), dtype=torch.long)
    confidence = torch.empty((batch, steps, length), dtype=torch.float32)
    commit_step = torch.full((batch, length), NOT_COMMITTED, dtype=torch.long)
    for step in range(steps):
        block, step_in_block = divmod(step, steps_per_block)
        block_start = gen_start + block * block_length
        logits = model(canvas).float()  # (batch, pos, vocab)
        logits[..., mask_id] = float("-inf")  # committing <mask> would leave the position masked
        probs = F.softmax(logits, dim=-1)  # once per step: predictions and commit scores share it
        probs_max, argmax = probs.max(dim=-1)
        predictions[:, step], confidence[:, step] = argmax.cpu(), probs_max.cpu()
        if config.temperature > 0:
            uniform = torch.rand(logits.shape, generator=generator).to(device)
            gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0)))
            chosen = (logits / config.temperature + gumbel).argmax(-1)
        else:
            chosen = argmax
        masked = canvas == mask_id
        eligible = torch.zeros_like(masked)
        eligible[:, block_start : block_start + block_length] = masked[:, block_start : block_start + block_length]
        score = _scores(probs, chosen, config.order, generator).masked_fill(~eligible, float("-inf"))
        n_eligible = eligible.sum(-1)
        if step_in_block == steps_per_block - 1:
            k = n_eligible  # the block's last step commits whatever is still masked
        else:
            k = n_eligible.clamp(max=budget[step_in_block])
        order = score.argsort(dim=-1, descending=True)
        rank = torch.empty_like(order)
        rank[rows.unsqueeze(1), order] = torch.arange(length, device=device).expand(batch, -1)
        commit = eligible & (rank < k.unsqueeze(1))
        canvas = torch.where(commit, chosen, canvas)
        commit_step[commit.cpu()] = step
        if callback is not None:
            edited = callback(step, canvas.clone())
            if edited is not None:
                canvas = edited.to(device)
                # Remasked positions are uncommitted again.
                commit_step[(canvas == mask_id).cpu()] = NOT_COMMITTED
        canvases.append(canvas.to("cpu", copy=True))
    return Trajectory(torch.stack(canvases, dim=1), predictions, confidence, commit_step, gen_start, gen_length)
