"""Greedy and temperature sampling for the autoregressive twin, recorded as a Trajectory.

The canvas has the same layout as for diffusion (``prefix + [MASK] * gen_length + suffix``); step
``s`` writes position ``gen_start + s`` from the logits at the position before it. A causal model
never looks at later positions, so the masks after the write position do not change its output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from dlmprobe.sampling.trajectory import NOT_COMMITTED, StepCallback, Trajectory


@dataclass
class AutoregressiveSamplerConfig:
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def sample_autoregressive(
    model: torch.nn.Module,
    prefix: Int[Tensor, "batch prefix"],
    gen_length: int,
    mask_id: int,
    config: AutoregressiveSamplerConfig | None = None,
    suffix: Int[Tensor, "batch suffix"] | None = None,
    callback: StepCallback | None = None,
) -> Trajectory:
    """Write ``gen_length`` tokens after ``prefix`` one at a time with a causal ``model``."""
    config = config or AutoregressiveSamplerConfig()
    device = next(model.parameters()).device
    batch = prefix.shape[0]
    suffix = prefix.new_zeros((batch, 0)) if suffix is None else suffix
    gen_start = prefix.shape[1]
    canvas = torch.cat(
        [prefix, torch.full((batch, gen_length), mask_id, dtype=prefix.dtype), suffix], dim=1
    ).to(device)
    length = canvas.shape[1]
    generator = torch.Generator(device="cpu").manual_seed(config.seed)

    canvases = [canvas.to("cpu", copy=True)]
    predictions = torch.full((batch, gen_length, length), -1, dtype=torch.long)
    confidence = torch.full((batch, gen_length, length), float("nan"), dtype=torch.float32)
    commit_step = torch.full((batch, length), NOT_COMMITTED, dtype=torch.long)
    for step in range(gen_length):
        pos = gen_start + step
        logits = model(canvas[:, :pos])[:, -1].float()  # the last written position predicts `pos`
        logits[:, mask_id] = float("-inf")
        probs_max, argmax = F.softmax(logits, dim=-1).max(dim=-1)
        predictions[:, step, pos], confidence[:, step, pos] = argmax.cpu(), probs_max.cpu()
        if config.temperature > 0:
            uniform = torch.rand(logits.shape, generator=generator).to(device)
            chosen = (logits / config.temperature - torch.log(-torch.log(uniform.clamp(1e-20, 1.0)))).argmax(-1)
        else:
            chosen = argmax
        canvas[:, pos] = chosen
        commit_step[:, pos] = step
        if callback is not None:
            edited = callback(step, canvas.clone())
            if edited is not None:
                canvas = edited.to(device)
        canvases.append(canvas.to("cpu", copy=True))
    return Trajectory(torch.stack(canvases, dim=1), predictions, confidence, commit_step, gen_start, gen_length)
