"""Sampling that records a whole trajectory: one loop, a masked-diffusion (LLaDA or Dream schedule)
or an autoregressive policy (with a KV cache for Hugging Face causal LMs), any model through a
``ModelHandle``."""

from dlmprobe.sampling.autoregressive import AutoregressiveSamplerConfig
from dlmprobe.sampling.diffusion import DREAM_ORDERS, ORDERS, SCHEDULES, DiffusionSamplerConfig, tokens_per_step
from dlmprobe.sampling.forward import logits_of
from dlmprobe.sampling.generate import (
    default_sampler,
    evaluate,
    generate,
    prefixes,
    solved,
)
from dlmprobe.sampling.sampler import make_canvas, sample
from dlmprobe.sampling.scores import LogitSummary, summarise
from dlmprobe.sampling.trajectory import (
    NOT_COMMITTED,
    StepCallback,
    StepObserver,
    Trajectory,
)

__all__ = [
    "DREAM_ORDERS",
    "NOT_COMMITTED",
    "ORDERS",
    "SCHEDULES",
    "AutoregressiveSamplerConfig",
    "DiffusionSamplerConfig",
    "LogitSummary",
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
    "summarise",
    "tokens_per_step",
]
