"""Write runs of a model's own sampler (DiffusionGemma) to an HDF5 activation store, schema v1.

The counterpart of :mod:`dlmprobe.capture` for models whose sampler lives in the model: batches go
through :func:`dlmprobe.sampling.native.run_native` and are written with the same
:class:`ActivationWriter`, so the probes and analyses read the file as any other store. What
differs, all stated in the store's config:

* The canvas is ``<bos> prompt <sep>`` (the encoder's input, never changed) followed by the
  decoder's canvas, ``target <eos>`` long: the model's ``canvas_length`` must be the task's
  ``target_length + 1``, and its vocabulary the task's (token id ``i`` is ``task.vocab.tokens[i]``).
* Activations exist only where the decoder runs; the target positions are stored.
* There is no mask token: the file's ``mask_id`` attribute is :data:`NO_MASK` (no token equals it)
  and ``commit_step`` follows the settle rule (``"commit_rule": "settle"`` in the config): step
  ``s`` is before commit iff ``s <= commit_step``. Code that decides "still masked" by
  ``canvas == mask_id`` sees every position as committed on such a store.

Example:
    >>> capture_native(model, get_task("arith", n_ops=3), "runs/gemma.h5", n=64, steps=16)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dlmprobe import __version__
from dlmprobe.capture import batch_record
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.sampling import StepCallback
from dlmprobe.sampling.native import NativeRun, resolve_decoder_sites, run_native
from dlmprobe.store import ActivationWriter, StoreLayout
from dlmprobe.tasks import Example, Task

NO_MASK = -1  # the store's mask_id for a model without a mask token: no canvas token equals it


def capture_native(
    model: torch.nn.Module,
    task: Task,
    out: str | Path,
    *,
    n: int = 64,
    split: str = "eval",
    seed: int = 0,
    sites: Sequence[str] = ("blocks.*.hook_resid_post",),
    steps: int = 16,
    batch_size: int = 16,
    dtype: str = "float16",
    model_name: str = "",
    callback: StepCallback | None = None,
    overwrite: bool = False,
    **generate_kwargs: Any,
) -> Path:
    """Sample ``n`` puzzles of ``task`` with the model's own sampler and write every step to ``out``.

    Batch ``b`` (its first example's index ``i``) is sampled with seed ``seed * 1_000_003 + i``, as
    :func:`dlmprobe.capture.capture_batch` does. ``generate_kwargs`` and ``callback`` go to
    :func:`run_native`; the former are stored in the config and must be JSON values.
    """
    text = model.config.get_text_config()
    if model.config.canvas_length != task.target_length + 1:
        raise DlmprobeInputError(
            f"expected a model canvas of target_length + 1 = {task.target_length + 1} tokens for {task!r}, "
            f"got canvas_length {model.config.canvas_length}"
        )
    if text.vocab_size != len(task.vocab):
        raise DlmprobeInputError(f"expected the task's vocabulary of {len(task.vocab)} tokens, got a model vocabulary of {text.vocab_size}")
    if batch_size < 1:
        raise DlmprobeInputError(f"expected batch_size >= 1, got {batch_size}")
    examples = task.sample(n, split=split, seed=seed)
    site_paths = resolve_decoder_sites(model, sites)
    labels = {name: len(span.positions) for name, span in examples[0].labels.items()}
    start = task.target_start
    positions = list(range(start, start + task.target_length))
    layout = StoreLayout(
        n_examples=len(examples), n_steps=steps, canvas_length=task.sequence_length, prompt_length=task.prompt_length,
        target_length=task.target_length, labels=labels, sites={site: text.hidden_size for site in site_paths},
        steps=range(steps), positions=positions, dtype=dtype,
    )
    config = {
        "model": {"name": model_name or str(model.config._name_or_path), "kind": "diffusion",
                  "architecture": type(model).__name__, "config": json.loads(model.config.to_json_string())},
        "task": {"name": task.name, "params": task.params(), "vocab": list(task.vocab.tokens),
                 "answer_label": task.answer_label},
        "sampler": {"name": "native", "steps": steps, "seed": seed, "generate": generate_kwargs},
        "commit_rule": "settle",
        "sites": list(site_paths), "site_modules": site_paths, "steps": list(range(steps)), "positions": positions,
        "position_rule": "target", "shard": None, "dlmprobe_version": __version__,
    }
    with ActivationWriter(out, layout, config=config, mask_id=NO_MASK, overwrite=overwrite) as writer:
        for begin in range(0, len(examples), batch_size):
            batch = examples[begin : begin + batch_size]
            prompts = torch.tensor([[task.vocab.bos_id, *ex.prompt, task.vocab.sep_id] for ex in batch])
            run = run_native(model, prompts, list(site_paths), steps=steps, seed=seed * 1_000_003 + begin,
                             callback=callback, **generate_kwargs)
            writer.write_batch(native_batch(task, batch, run))
    return Path(out)


def native_batch(task: Task, examples: Sequence[Example], run: NativeRun) -> dict[str, Any]:
    """One store batch (see :class:`dlmprobe.store.Batch`) from a native run over ``examples``."""
    trajectory = run.trajectory
    if trajectory.canvases.shape[2] != task.sequence_length:
        raise DlmprobeInputError(f"expected runs over {task.sequence_length}-token sequences, got {trajectory.canvases.shape[2]}")
    # The decoder's canvas starts at target_start; its last position (the <eos> slot) is not stored.
    start, length = task.target_start, task.target_length
    return batch_record(task, examples, trajectory,
                        {site: value[:, :, :length] for site, value in run.activations.items()},
                        output=trajectory.canvases[:, -1, start : start + length])
