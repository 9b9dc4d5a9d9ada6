"""Small helpers every store-based analysis shares: the task, kind and run description of a store,
intervals in words, and accuracy per difficulty stratum.

A store is either a built-in model's run, whose task (vocabulary, difficulty, givens) is rebuilt
from its config (:func:`task_of`), or a Hugging Face model's run on a text task
(:func:`is_text_run`), whose canvases hold tokenizer ids: an analysis reads its labels' positions
and values from the store and names tokens through the stored tokenizer (:func:`token_namer`);
what needs the built-in task (difficulty strata, sudoku's candidates) is left out for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.hooks import layer_of
from dlmprobe.probes.baselines import accuracy_by_stratum
from dlmprobe.store import ActivationDataset
from dlmprobe.tasks import Example, Task, get_task


def is_text_run(data: ActivationDataset) -> bool:
    """Whether a store is a Hugging Face model's run on a text task (tokenizer ids, not task ids)."""
    return "text_task" in (data.config.get("task") or {})


def check_slot_read_on_canvas(name: str, data: ActivationDataset) -> None:
    """Refuse a run through a model's own sampler (DiffusionGemma) whose like-for-like read, the
    column before its answer slot, is a prompt token: its encoder reads the prompt once, and only
    its decoder's canvas is run (and stored) at every step. With ``--template forced-answer`` that
    column is the last token of the held "The answer is", on the canvas."""
    canvas = data.config.get("canvas") or {}
    if not (is_text_run(data) and (data.config.get("sampler") or {}).get("name") == "native"):
        return
    if int(canvas["answer_start"]) <= int(canvas["gen_start"]):
        raise DlmprobeInputError(
            f"run {name!r} ({data.path.name}) cannot be read like for like: the column before its answer slot is the "
            f"prompt's last token, in DiffusionGemma's encoder, where no denoising step runs; expected a store cached "
            f"with --template forced-answer (that column is then the held \"The answer is\" on the decoder's canvas), "
            f"got the answer slot at the canvas start (column {canvas['gen_start']})")


def task_of(data: ActivationDataset) -> Task:
    """The built-in task (with its options) a store was recorded on; a text run has none (see :func:`builtin_task`)."""
    spec = data.config.get("task")
    if not spec:
        raise DlmprobeInputError(f"{data.path} has no task description; was it written by dlmprobe cache?")
    if is_text_run(data):
        raise DlmprobeInputError(f"{data.path} holds text task {spec['text_task']!r} (a Hugging Face model's run): expected a "
                                 "run of a built-in model, whose task this analysis rebuilds")
    return get_task(spec["name"], **spec.get("params", {}))


def builtin_task(data: ActivationDataset) -> Task | None:
    """:func:`task_of`, or None for a text run."""
    return None if is_text_run(data) else task_of(data)


def task_key(data: ActivationDataset) -> tuple[str, str]:
    """What makes two runs "of one task": the task's name and options (a text task's source and options)."""
    spec = data.config.get("task") or {}
    if is_text_run(data):
        return f"text:{spec['text_task']}", str(spec.get("text"))
    return str(spec.get("name")), str(spec.get("params"))


def task_name(data: ActivationDataset) -> str | None:
    spec = data.config.get("task") or {}
    return spec.get("text_task") if is_text_run(data) else spec.get("name")


def token_namer(data: ActivationDataset) -> Callable[[int], str]:
    """Token id -> its text: the built-in task's vocabulary, or the text run's stored tokenizer
    (``#<id>`` for every id if that tokenizer cannot be loaded offline)."""
    if not is_text_run(data):
        tokens = task_of(data).vocab.tokens
        return lambda i: tokens[i]
    from transformers import AutoTokenizer  # slow to import; only a text run needs it

    name = (data.config.get("model") or {}).get("tokenizer") or ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True,
                                                  trust_remote_code=bool(data.config["model"].get("trust_remote_code")))
    except (OSError, ValueError):
        return lambda i: f"#{i}"
    return lambda i: tokenizer.convert_ids_to_tokens(int(i))


def kind_of(data: ActivationDataset) -> str:
    """``"diffusion"`` or ``"autoregressive"``: the kind of model a store was recorded from."""
    kind = data.config.get("model", {}).get("kind")
    if kind not in ("diffusion", "autoregressive"):
        raise DlmprobeInputError(f"{data.path} does not say which kind of model wrote it (got {kind!r})")
    return kind


def default_label(data: ActivationDataset, label: str | None) -> str:
    """``label`` if given (checked), else the task's answer label."""
    if label is None:
        label = data.config.get("task", {}).get("answer_label") or data.label_names[0]
    if label not in data.label_names:
        raise DlmprobeInputError(f"unknown label {label!r}; {data.path.name} has labels {data.label_names}")
    return label


def describe_run(data: ActivationDataset) -> dict[str, Any]:
    """What a store holds, for an analysis's ``meta``."""
    return {
        "path": str(data.path), "model": data.config.get("model", {}).get("name"), "kind": kind_of(data),
        "task": task_name(data), "task_params": (data.config.get("task", {}).get("text") or {}).get("params")
        if is_text_run(data) else data.config.get("task", {}).get("params"),
        "sampler": data.config.get("sampler"), "n_examples": data.n_examples, "n_steps": data.n_steps,
        "solve_rate": float(np.mean(data.solved)),
    }


def percent(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.0f}%"


def deepest_site(sites) -> str:
    """The site of the highest layer (sites without a layer, e.g. ``hook_embed``, count as -1).

    Stores list sites in name order (``blocks.10`` before ``blocks.2``), so never take the last one.
    """
    sites = list(dict.fromkeys(sites))
    if not sites:
        raise DlmprobeInputError("no site to choose from")
    return max(sites, key=lambda s: (layer_of(s) if layer_of(s) is not None else -1, s))


def best_site(table: pd.DataFrame, column: str = "accuracy") -> str:
    """The site with the highest mean ``column`` over the steps of a probe table."""
    return str(table.groupby("site")[column].mean().idxmax())


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of the rate ``k / n`` (95% by default); NaNs when ``n == 0``."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # Exact at k = 0 and k = n, where rounding would put the bound a hair inside the rate.
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def wilson_rate(k: int, n: int) -> dict[str, float | int]:
    """``k``, ``n``, the rate ``k / n`` (NaN when ``n == 0``) and its Wilson 95% interval, as table columns."""
    low, high = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": k / n if n else float("nan"), "ci_low": low, "ci_high": high}


def label_mask(task: Task, examples: Sequence[Example], label: str) -> torch.Tensor:
    """(example, target position) True where ``label`` sits."""
    mask = torch.zeros((len(examples), task.target_length), dtype=torch.bool)
    for i, ex in enumerate(examples):
        mask[i, list(ex.labels[label].positions)] = True
    return mask


def with_interval(value: float, low: float, high: float) -> str:
    """``84% (95% CI 80–88%)``; the interval left out when it is NaN (no bootstrap)."""
    if not np.isfinite(low):
        return percent(value)
    return f"{percent(value)} (95% CI {percent(low)}–{percent(high)})"


def points(value: float, low: float, high: float) -> str:
    """A difference of two rates in points with its interval, and what the interval says."""
    text = f"{100 * value:+.0f} points"
    if not np.isfinite(low):
        return text
    verdict = "includes 0" if low <= 0 <= high else "excludes 0"
    return f"{text} (95% CI {100 * low:+.0f} to {100 * high:+.0f}, {verdict})"


def difficulty_of(data: ActivationDataset) -> tuple[np.ndarray, Callable[[int], str]] | None:
    """Every target position's difficulty from the prompt alone, (examples, target_length), and
    the task's namer of its values; None if the store names no built-in task (a text run's prompts
    are tokenizer ids) or the task defines none."""
    spec = data.config.get("task") or {}
    if "name" not in spec or is_text_run(data):
        return None
    task = task_of(data)
    try:
        values = np.stack([task.difficulty(Example(tuple(p.tolist()), tuple(t.tolist())))
                           for p, t in zip(data.prompt, data.target)])
    except NotImplementedError:
        return None
    return values, task.difficulty_name


def strata_table(data: ActivationDataset, rows: dict[tuple[str, int, int], pd.DataFrame], slot_name: str = "slot",
                 n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Every reader's accuracy per difficulty stratum in every cell of a probe grid (``grid.rows_``).

    One row per (site, step, slot, reader, stratum) with ``n_rows``, ``n_examples`` and a 95%
    interval over examples; empty when the task defines no difficulty.
    """
    found = difficulty_of(data)
    if found is None or not rows:
        return pd.DataFrame()
    difficulty, name_of = found
    parts = []
    for (site, step, slot), cell in rows.items():
        strata = difficulty[cell["example"].to_numpy(), cell["position"].to_numpy() - data.target_start]
        readers = {name: cell[name].to_numpy() for name in cell.columns if name not in ("example", "slot", "position")}
        table = accuracy_by_stratum(readers, strata, name_of, cell["example"].to_numpy(), n_boot, seed)
        parts.append(table.assign(site=site, layer=layer_of(site), step=step, **{slot_name: slot}))
    out = pd.concat(parts, ignore_index=True)
    front = ["site", "layer", "step", slot_name]
    return out[front + [c for c in out.columns if c not in front]]
