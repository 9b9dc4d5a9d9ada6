"""Sampling that records a whole trajectory: one loop, a masked-diffusion (LLaDA-style) or an
autoregressive policy."""

from dlmprobe.sampling.autoregressive import AutoregressiveSamplerConfig
from dlmprobe.sampling.diffusion import ORDERS, DiffusionSamplerConfig, tokens_per_step
from dlmprobe.sampling.generate import (
    default_sampler,
    evaluate,
    generate,
    prefixes,
    solved,
)
from dlmprobe.sampling.sampler import logits_of, make_canvas, sample
from dlmprobe.sampling.trajectory import (
    NOT_COMMITTED,
    StepCallback,
    StepObserver,
    Trajectory,
)

__all__ = [
    "NOT_COMMITTED",
    "ORDERS",
    "AutoregressiveSamplerConfig",
    "DiffusionSamplerConfig",
    "StepCallback",
    "StepObserver",
    "Trajectory",
    "default_sampler",
    "evaluate",
    "generate",
    "logits_of",
    "make_canvas",
    "prefixes",
    "sample",
    "solved",
    "tokens_per_step",
]
