"""Run a model's own generate loop inside one nnsight trace, recording every denoising step.

For diffusion LMs whose sampler lives in the model (DiffusionGemma's
``DiffusionGemmaForBlockDiffusion.generate``: an encoder writes the prompt into a KV cache, a
bidirectional decoder refines a canvas that starts from random tokens, with no mask token). The
decoder runs once per denoising step; nnsight's ``tracer.iter`` gives one value per call, so one
trace yields, at every step, the canvas the decoder read, the requested decoder sites and the
logits.

**Before the position settles.** With no mask token every canvas position may change at every
step, so "committed" cannot mean "unmasked". :func:`settle_steps` generalises it: a position settles
at the first canvas from which its token equals the final one and never changes again. Its
``commit_step`` is the step whose forward pass produced that canvas (the canvas index minus one),
exactly as for a masked model, where ``commit_step`` is the step that unmasked the position and the
canvas after it is the first to show it. So in both cases the forward pass of step ``s`` saw the
position *before commit* iff ``s <= commit_step``; a position already final in the initial canvas
(every prompt position; a canvas token drawn equal to its final value by chance) gets
``NOT_COMMITTED``. :class:`NativeTrajectory` carries ``commit_rule = "settle"`` to say so.

Example:
    >>> run = run_native(model, prompts, ["blocks.*.hook_resid_post"], steps=16, seed=0)
    >>> run.trajectory.commit_step[:, run.trajectory.gen_slice]  # settle steps of the canvas
    >>> run.activations["blocks.1.hook_resid_post"].shape  # (batch, 16, canvas_length, d)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.files import peek_json_object
from dlmprobe.sampling.trajectory import StepCallback, Trajectory

COMMIT_RULES = ("unmask", "settle")
NO_MASK = -1  # the mask id of a model without a mask token: no canvas token equals it
# What a site of the decoder is called (TransformerLens style) and which module produces it.
RESID_POST = "blocks.{layer}.hook_resid_post"
DECODER_LAYER = "model.decoder.layers.{layer}"
# generate() arguments run_native sets itself: one canvas, a fixed number of steps.
_OWN_ARGUMENTS = ("max_new_tokens", "max_length", "max_denoising_steps", "stability_threshold", "return_dict_in_generate")
# Models whose sampler lives in the model: the architecture names and model types of their configs.
NATIVE_ARCHITECTURES = ("DiffusionGemmaForBlockDiffusion",)
NATIVE_MODEL_TYPES = ("diffusion_gemma",)


def is_native_model(name: str) -> bool:
    """A folder whose Hugging Face ``config.json`` names a model with its own sampler (DiffusionGemma)."""
    data = peek_json_object(Path(name).expanduser() / "config.json")
    if data is None:
        return False
    architectures = data.get("architectures") or []
    return data.get("model_type") in NATIVE_MODEL_TYPES or any(a in NATIVE_ARCHITECTURES for a in architectures)


def load_native_model(name: str, device: str | torch.device = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """The DiffusionGemma checkpoint in folder ``name``, in eval mode on ``device``."""
    from transformers import DiffusionGemmaForBlockDiffusion

    if not is_native_model(name):
        raise DlmprobeInputError(f"expected a folder holding a DiffusionGemma checkpoint (config.json with "
                                 f"architectures {list(NATIVE_ARCHITECTURES)}), got {name!r}")
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load would come before a one-line error
    try:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(Path(name).expanduser(), dtype=getattr(torch, dtype))
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def default_denoising_steps(model: torch.nn.Module) -> int:
    """The model's own number of denoising steps (its generation config), which run_native runs in full."""
    steps = getattr(getattr(model, "generation_config", None), "max_denoising_steps", None)
    return int(steps) if isinstance(steps, int) and steps >= 1 else 48  # transformers' default


@dataclass
class NativeTrajectory(Trajectory):
    """A :class:`Trajectory` whose ``commit_step`` follows ``commit_rule`` (one of :data:`COMMIT_RULES`).

    ``"settle"``: the step after which a position's canvas token stays equal to the final one
    (:func:`settle_steps`), for models without a mask token; ``"unmask"``: the step that unmasked it.
    """

    commit_rule: str = "settle"


@dataclass
class NativeRun:
    """One batch through a model's own sampler.

    ``activations[site]`` is ``(batch, step, canvas_position, d)`` float32 on the CPU: the decoder
    runs on the canvas only (the prompt is in the encoder's KV cache), so its positions are the
    trajectory's ``gen_slice``.
    """

    trajectory: NativeTrajectory
    activations: dict[str, Float[Tensor, "batch step canvas d"]]


def settle_steps(canvases: Int[Tensor, "batch step_plus_one pos"]) -> Int[Tensor, "batch pos"]:
    """``commit_step`` under the settle rule: the last step whose canvas differs from the final one.

    ``canvases[:, k]`` is the canvas step ``k`` read and ``canvases[:, -1]`` the final output. A
    position settles at canvas ``k + 1`` when ``k`` is the last index whose token differs from the
    final one; step ``k`` produced it, so ``commit_step = k``. ``-1`` (``NOT_COMMITTED``) when no
    canvas differs. Before settling at step ``s`` means ``s <= commit_step``.
    """
    if canvases.dim() != 3 or canvases.shape[1] < 2:
        raise DlmprobeInputError(f"expected canvases of shape (batch, steps + 1, pos) with >= 1 step, got {tuple(canvases.shape)}")
    index = torch.arange(canvases.shape[1], device=canvases.device)[None, :, None]
    differs = canvases != canvases[:, -1:]
    return torch.where(differs, index, -1).amax(dim=1)


def decoder_sites(model: torch.nn.Module) -> dict[str, str]:
    """Every site :func:`run_native` can record: TransformerLens-style name -> the decoder module's path."""
    n_layers = model.config.get_text_config().num_hidden_layers
    return {RESID_POST.format(layer=i): DECODER_LAYER.format(layer=i) for i in range(n_layers)}


def resolve_decoder_sites(model: torch.nn.Module, sites: Sequence[str]) -> dict[str, str]:
    """Names or globs (``blocks.*.hook_resid_post``) -> ``{site: module path}``, in layer order."""
    available = decoder_sites(model)
    chosen: list[str] = []
    for pattern in sites:
        matches = [name for name in available if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise DlmprobeInputError(f"expected a decoder site such as {RESID_POST.format(layer=0)!r}, got {pattern!r}")
        chosen += [m for m in matches if m not in chosen]
    return {site: available[site] for site in sorted(chosen, key=lambda s: int(re.findall(r"\d+", s)[0]))}


def run_native(
    model: torch.nn.Module,
    prompts: Int[Tensor, "batch prompt"],
    sites: Sequence[str] = (),
    *,
    steps: int,
    seed: int = 0,
    callback: StepCallback | None = None,
    fixed: tuple[Int[Tensor, "batch canvas"], Bool[Tensor, "batch canvas"]] | None = None,
    **generate_kwargs: Any,
) -> NativeRun:
    """Generate one canvas with the model's own ``generate`` and record every denoising step.

    Args:
        model: a ``DiffusionGemmaForBlockDiffusion`` (or a model with the same ``generate`` and
            module tree).
        prompts: prompt token ids, the encoder's input (pass ``attention_mask`` for padding).
        sites: decoder sites to record (names or globs, see :func:`decoder_sites`).
        steps: denoising steps. The model's adaptive stop (a stable, confident canvas) is turned
            off, so every example runs exactly ``steps`` steps and step ``s`` means the same
            everywhere.
        seed: seeds the random initial canvas, the sampling and the renoising.
        callback: called before every step but the first as ``callback(s - 1, rows, canvas)`` with the
            whole sequence (prompt + canvas) the decoder is about to read; a returned tensor
            replaces the canvas in place, so the model's own loop carries the edit on (its accept
            and renoise logic read the same tensor). The prompt cannot be edited: it lives in the
            encoder's KV cache.
        fixed: ``(tokens, where)``, both ``(batch, canvas_length)``: canvas positions held at
            ``tokens`` wherever ``where`` is True (template text such as a forced answer prefix).
            They are written into the canvas before every step, the first included (after the
            callback), and into the output, which is otherwise the model's argmax there; so they
            never change and never settle (``NOT_COMMITTED``).
        generate_kwargs: other ``generate`` options (``t_min``, ``t_max``, ``sampler_config``,
            ``decoder_input_ids``, ``attention_mask``...).

    ``predictions`` are the argmax of the logits (the same under the sampler's temperature) and
    ``confidence`` their probability at temperature 1 after the model's logit soft-capping.
    """
    from nnsight import NNsight

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DlmprobeInputError(f"expected steps to be a positive int, got {steps!r}")
    if prompts.dim() != 2 or prompts.shape[1] == 0:
        raise DlmprobeInputError(f"expected prompts of shape (batch, prompt_length), got {tuple(prompts.shape)}")
    clash = sorted(set(generate_kwargs) & set(_OWN_ARGUMENTS))
    if clash:
        raise DlmprobeInputError(f"run_native runs one canvas (canvas_length tokens, one block) for a fixed number of "
                                 f"steps and sets {list(_OWN_ARGUMENTS)} itself, got {clash}")
    paths = resolve_decoder_sites(model, sites)
    canvas_length = model.config.canvas_length
    device = next(model.parameters()).device
    prompts = prompts.to(device)
    generate_kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in generate_kwargs.items()}
    if fixed is not None:
        tokens, where = fixed
        if tokens.shape != (prompts.shape[0], canvas_length) or where.shape != tokens.shape:
            raise DlmprobeInputError(f"expected fixed tokens and positions of shape {(prompts.shape[0], canvas_length)} "
                                     f"(batch, canvas_length), got {tuple(tokens.shape)} and {tuple(where.shape)}")
        fixed = (tokens.to(device), where.to(device, torch.bool))
    gen_start = prompts.shape[1]
    options = {"max_new_tokens": canvas_length, "max_denoising_steps": steps, "return_dict_in_generate": True,
               # Stability compares the argmax with the last `threshold` ones, -1 before any step:
               # more than `steps` of them can never all match, so the loop never stops early.
               "stability_threshold": steps + 1, **generate_kwargs}
    envoy = NNsight(model)
    canvases: list[Tensor] = []
    logits: list[Tensor] = []
    recorded: dict[str, list[Tensor]] = {site: [] for site in paths}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        with envoy.trace(prompts, fn="generate", **options) as tracer:
            for step in tracer.iter[:steps]:
                canvas = envoy.model.decoder.inputs[1]["decoder_input_ids"]
                if callback is not None and step > 0:
                    _edit_in_place(callback, step, prompts, canvas)
                if fixed is not None:
                    canvas.copy_(torch.where(fixed[1], fixed[0], canvas))
                canvases.append(canvas.clone().save())
                for site, path in paths.items():
                    recorded[site].append(_module(envoy, path).output.float().cpu().save())
                logits.append(envoy.lm_head.output.float().save())
            result = tracer.result.save()
    if len(canvases) != steps:
        raise RuntimeError(f"the model's generate ran {len(canvases)} denoising steps, {steps} were asked for")
    raw = torch.stack(logits, dim=1)  # (batch, step, canvas, vocab)
    cap = getattr(model, "final_logit_softcapping", None)
    capped = torch.tanh(raw / cap) * cap if cap else raw
    confidence, prediction = capped.softmax(-1).max(-1)
    final = result.sequences
    if fixed is not None:
        final = torch.cat([final[:, :gen_start], torch.where(fixed[1], fixed[0], final[:, gen_start:])], dim=1)
    trajectory = _trajectory(prompts, torch.stack(canvases, dim=1), final, prediction, confidence, gen_start)
    return NativeRun(trajectory, {site: torch.stack(values, dim=1) for site, values in recorded.items()})


def _edit_in_place(callback: StepCallback, step: int, prompts: Tensor, canvas: Tensor) -> None:
    whole = torch.cat([prompts, canvas], dim=1)
    edited = callback(step - 1, torch.arange(whole.shape[0]), whole.clone())
    if edited is None:
        return
    if edited.shape != whole.shape:
        raise DlmprobeInputError(f"expected the callback to return a canvas of shape {tuple(whole.shape)}, got {tuple(edited.shape)}")
    edited = edited.to(canvas.device)
    if not torch.equal(edited[:, : prompts.shape[1]], prompts):
        raise DlmprobeInputError("expected the callback to leave the prompt unchanged (it is in the encoder's KV cache), got an edit there")
    canvas.copy_(edited[:, prompts.shape[1] :])


def _module(envoy: Any, path: str) -> Any:
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def _trajectory(prompts: Tensor, steps: Tensor, final: Tensor, prediction: Tensor, confidence: Tensor,
                gen_start: int) -> NativeTrajectory:
    """Prompt + canvas at every step; predictions only where the decoder predicts (the canvas)."""
    batch, n_steps, canvas_length = steps.shape
    seen = torch.cat([prompts[:, None].expand(-1, n_steps, -1), steps], dim=2)
    canvases = torch.cat([seen, final[:, None]], dim=1).cpu()
    predictions = torch.full((batch, n_steps, gen_start + canvas_length), -1, dtype=torch.long)
    predictions[:, :, gen_start:] = prediction.cpu()
    confidences = torch.full(predictions.shape, float("nan"))
    confidences[:, :, gen_start:] = confidence.cpu()
    return NativeTrajectory(canvases, predictions, confidences, settle_steps(canvases), gen_start, canvas_length)
