"""Samplers that record a whole trajectory: masked diffusion (LLaDA-style) and autoregressive."""

from dlmprobe.sampling.autoregressive import AutoregressiveSamplerConfig, sample_autoregressive
from dlmprobe.sampling.diffusion import ORDERS, DiffusionSamplerConfig, sample_diffusion, tokens_per_step
from dlmprobe.sampling.generate import default_sampler, evaluate, generate, prefixes, solved
from dlmprobe.sampling.trajectory import NOT_COMMITTED, StepCallback, Trajectory

__all__ = [
    "NOT_COMMITTED",
    "ORDERS",
    "AutoregressiveSamplerConfig",
    "DiffusionSamplerConfig",
    "StepCallback",
    "Trajectory",
    "default_sampler",
    "evaluate",
    "generate",
    "prefixes",
    "sample_autoregressive",
    "sample_diffusion",
    "solved",
    "tokens_per_step",
]
