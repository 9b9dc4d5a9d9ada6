"""Faithfulness along the time axis: corrupt committed reasoning at step t, watch the final answer.

A diffusion LM discards its activations after every step: the canvas is the only channel from step
t to step t+1. At the end of step t (the sampler's between-steps callback) every reasoning token
already committed is corrupted, then sampling goes on:

* ``"replace"``: each one becomes a different value that the reasoning label takes (seeded draw);
  committed tokens are never resampled, so it stays;
* ``"remask"``: each one is set back to the mask and the sampler commits it again. With
  semi-autoregressive blocks, a position of a block already finished stays masked to the end.

Each corrupted run is compared with the clean run of the same examples and sampler. With a
deterministic sampler (temperature 0, not the random order) a corrupted run is the clean run up to
step t, so it branches off the clean run there and only steps t.. are sampled again. An
autoregressive twin gets the same corruption of the results it has already written; it never
rewrites a position, so it runs ``"replace"`` only. Answer tokens are never corrupted.

A Hugging Face diffusion model runs on a text task (arith rendered as text is the natural one: its
reasoning tokens are the intermediate results, its answer the final one) with the forced answer
slot; its replacement values are the labelled token ids of the reasoning label, and its output is
read back through the tokenizer's answer set and verified by the built-in task's rule.

A model with its own sampler (DiffusionGemma, ``DiffusionGemmaForBlockDiffusion``) has no mask token:
every canvas position holds a token at every step, so "committed" becomes "before the position
settles" (the settle rule of :mod:`dlmprobe.sampling.native`). After step t every reasoning position
is replaced (its current token, whatever it is, by a different value of the label), through
:func:`~dlmprobe.sampling.native.run_native`'s between-steps callback, and the model's own loop
carries the edit on; ``answer_committed`` says whether the answer had already settled in the clean
run by then. Its runs are seeded as the clean run, so a corrupted run differs from it only through
the edit. ``"remask"`` is not run on it (no mask token to set a position back to).

Example:
    >>> from dlmprobe.models import load_model
    >>> result = faithfulness(load_model("arith-diffusion"), n=200, twin=load_model("arith-autoregressive"))
    >>> text = faithfulness(load_hf_model("GSAI-ML/LLaDA-8B-Instruct"), n=50,
    ...                     task=BuiltinTextTask(get_task("arith", n_ops=2)))
    >>> result.table.query("metric == 'answer_changed'")[["kind", "mode", "step", "rate"]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from dlmprobe.analyses.common import wilson_rate
from dlmprobe.analyses.plotting import CONDITION_COLOURS, figure
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.analyses.setting import (
    NativeSetting,
    Setting,
    builtin_setting,
    native_setting,
    native_text_setting,
    text_setting,
)
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models import Checkpoint, ModelHandle
from dlmprobe.sampling.generate import SamplerConfig, default_sampler
from dlmprobe.tasks import Arith, Task
from dlmprobe.tasks.text import CanvasTemplate, TextTask

MODES: tuple[str, ...] = ("replace", "remask")
AR_REMASK_NOTE = "not run: an autoregressive model never rewrites a written position, so remasking is meaningless"
NATIVE_REMASK_NOTE = "not run: this model has no mask token to set a position back to"
# How the table, figure and summary call a position that is / is not yet final, by commit rule
# (:attr:`dlmprobe.store.ActivationDataset.commit_rule`): the metric names stay "committed" either way.
WORDS: dict[str, tuple[str, str]] = {"unmask": ("committed", "still masked"), "settle": ("settled", "not yet settled")}
# Aggregated metrics: (name, numerator column, rows it is a rate over).
METRICS: tuple[tuple[str, str, str], ...] = (
    ("corrupted", "corrupted", "all"),
    ("answer_committed", "answer_committed", "all"),
    ("answer_committed_before", "answer_committed", "corrupted"),
    ("answer_changed", "answer_changed", "corrupted"),
    ("answer_changed_open", "answer_changed", "corrupted, answer still masked"),
    ("answer_follows", "answer_follows", "corrupted"),
    ("reasoning_changed", "reasoning_changed", "corrupted"),
)


def _follows(setting: Setting, answer_label: str | None, i: int, output: list[int]) -> bool:
    """Arith: the answer is the last operation applied to the output's own last intermediate result.
    Other tasks have no such rule: whether the whole output verifies stands in for it (with
    ``answer_label=None``: whether it verifies). A text output that is not the task's words fails."""
    task, target = setting.task, setting.decode(i, output)
    if target is not None and isinstance(task, Arith) and answer_label == task.answer_label:
        return target[-1] == task.answer_from(setting.prompts[i], target)
    return setting.verifies(i, output)


class _Corruption:
    """Corrupts the committed reasoning tokens of every example after one step, and records which
    examples had any (``corrupted``) and which had their answer committed by then (``committed``)."""

    def __init__(self, step: int, mode: str, reasoning: torch.Tensor, answer: torch.Tensor, valid: torch.Tensor,
                 setting: Setting, seed: int):
        self.step, self.mode, self.reasoning, self.answer, self.valid = step, mode, reasoning, answer, valid
        self.mask_id = setting.mask_id  # NO_MASK (-1) without a mask token: every position holds a token
        self.gen = slice(setting.gen_start, setting.gen_start + setting.gen_length)
        # Indexed by whatever a model commits: any id of its vocabulary, the mask included.
        size = max(setting.vocab_size, setting.mask_id, int(valid.max())) + 1
        self.index_in_valid = torch.zeros(size, dtype=torch.long)
        self.index_in_valid[valid] = torch.arange(len(valid))
        # A shift of 1..len(valid)-1 within the valid values: a different value, whatever was committed.
        self.shift = torch.from_numpy(np.random.default_rng([seed, step]).integers(1, len(valid), reasoning.shape))
        self.corrupted = torch.zeros(len(reasoning), dtype=torch.bool)
        self.committed = torch.zeros(len(reasoning), dtype=torch.bool)

    def __call__(self, step: int, rows: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor | None:
        """The sampler's callback: corrupt the batch's examples ``rows`` after step ``self.step``."""
        if step != self.step:
            return None
        target = canvas[:, self.gen].cpu()
        committed = target != self.mask_id
        hit = self.reasoning[rows] & committed
        self.corrupted[rows] = hit.any(1)
        self.committed[rows] = (committed | ~self.answer[rows]).all(1)
        if self.mode == "replace":
            new = self.valid[(self.index_in_valid[target] + self.shift[rows]) % len(self.valid)]
        else:
            new = torch.full_like(target, self.mask_id)
        canvas[:, self.gen] = torch.where(hit, new, target).to(canvas.device)
        return canvas


def faithfulness(
    checkpoint: Checkpoint | ModelHandle,
    n: int = 200,
    seed: int = 0,
    corrupt_label: str | None = None,
    answer_label: str | None = None,
    modes: Sequence[str] = MODES,
    steps: Sequence[int] | None = None,
    sampler: SamplerConfig | None = None,
    twin: Checkpoint | None = None,
    batch_size: int = 256,
    progress: bool = True,
    task: TextTask | Task | None = None,
    template: CanvasTemplate | None = None,
    denoising_steps: int | None = None,
    generate_options: dict | None = None,
    tokenizer: Any = None,
) -> AnalysisResult:
    """Corrupt committed reasoning tokens at each step t and measure how often the answer changes.

    Parameters
    ----------
    checkpoint : the model and its examples: a built-in checkpoint (diffusion or autoregressive) on
        its task, a Hugging Face diffusion model's handle (``load_hf_model``) on ``task``, or a
        DiffusionGemma (``DiffusionGemmaForBlockDiffusion``) on a text ``task`` through its
        ``tokenizer`` (or on a built-in ``task`` whose vocabulary is the model's).
    n, seed : number of held-out puzzles and the seed that draws them and the replacement tokens.
    corrupt_label : the reasoning label whose committed tokens are corrupted (default
        ``"intermediate"``); positions it shares with the answer label are left alone.
    answer_label : the label holding the answer (default: the task's ``answer_label``).
    modes : ``"replace"`` and/or ``"remask"``.
    steps : the steps t after which to corrupt (default ``0 .. n_steps-2``, each model its own).
    sampler : sampler of ``checkpoint`` (default: the kind's default); the twin uses its default.
    twin : a built-in checkpoint of the other kind on the same task, corrupted the same way.
    task, template : a handle's text task (required) and canvas layout (default: the forced answer slot);
        DiffusionGemma: the same with its ``tokenizer`` (the answer slot widened to fill its canvas), or
        a built-in task of its vocabulary without template or tokenizer.
    denoising_steps, generate_options : DiffusionGemma only: its number of denoising steps (default:
        its own) and other ``generate`` options (``t_min``, ``t_max``...).

    Returns
    -------
    AnalysisResult "faithfulness". ``table``: one row per (kind, mode, step, metric) with the count
    ``k`` among ``n`` rows (``denominator`` says which), ``rate`` and its Wilson 95% interval;
    ``run_fraction`` is ``step / n_steps``. ``tables["examples"]``: the per-example flags behind it;
    ``tables["clean"]``: solve rate and answer-follows rate of the clean runs.
    """
    native = isinstance(checkpoint, torch.nn.Module)
    if (denoising_steps is not None or generate_options) and not native:
        raise DlmprobeInputError("denoising_steps and generate_options are for a model with its own sampler (DiffusionGemma)")
    if tokenizer is not None and not native:
        raise DlmprobeInputError("tokenizer= is for a model with its own sampler (DiffusionGemma); a handle carries its own")
    if native:
        own_vocabulary = isinstance(task, Task) and tokenizer is None and template is None
        text = task is not None and not isinstance(task, Task) and tokenizer is not None
        if not (own_vocabulary or text) or twin is not None or sampler is not None:
            raise DlmprobeInputError(f"a {type(checkpoint).__name__} runs its own generate on a text task through its "
                                     "tokenizer (task=<TextTask>, tokenizer=) or on a built-in task of its vocabulary "
                                     f"(task=<Task>, no template), with no twin or sampler; got task={type(task).__name__}, "
                                     f"tokenizer={'given' if tokenizer is not None else None}")
        if text:
            setting = native_text_setting(checkpoint, tokenizer, task, n, seed, template, denoising_steps, generate_options)
        else:
            setting = native_setting(checkpoint, task, n, seed, denoising_steps, generate_options)
        task_name, answer_default = task.name, task.answer_label
    elif isinstance(checkpoint, ModelHandle):
        if task is None:
            raise DlmprobeInputError(f"a Hugging Face model needs a text task: expected task=, got None ({checkpoint.name!r})")
        if twin is not None:
            raise DlmprobeInputError("a twin runs only beside a built-in checkpoint: expected twin=None for a Hugging Face model")
        setting = text_setting(checkpoint, task, n, seed, template)
        task_name, answer_default = task.name, task.answer_label
    else:
        if task is not None or template is not None:
            raise DlmprobeInputError("a built-in checkpoint runs on its own task: expected no task= or template=")
        setting = builtin_setting(checkpoint, n, seed)
        task_name, answer_default = setting.task.name, setting.task.answer_label
    labels = list(setting.spans[0])
    corrupt_label = corrupt_label or "intermediate"
    answer_label = answer_label or answer_default
    for label in (corrupt_label, answer_label):
        if label not in labels:
            raise DlmprobeInputError(f"unknown label {label!r} for task {task_name}: expected one of {labels}")
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise DlmprobeInputError(f"modes must be a non-empty subset of {MODES}, got {list(modes)}")
    kind = setting.kind
    if (kind == "autoregressive" or native) and twin is None and set(modes) == {"remask"}:
        what = "a model without a mask token" if native else "an autoregressive model"
        raise DlmprobeInputError(f"modes {list(modes)} run nothing on {what}: it supports only 'replace'")
    if twin is not None and (twin.kind == kind or repr(twin.task) != repr(checkpoint.task)):
        raise DlmprobeInputError(f"twin must be the other kind on the same task as {kind} {checkpoint.task!r}, "
                         f"got {twin.kind} {twin.task!r}")

    answer = setting.label_mask(answer_label)
    reasoning = setting.label_mask(corrupt_label) & ~answer
    if not reasoning.any():
        raise DlmprobeInputError(f"label {corrupt_label!r} has no position outside {answer_label!r}: nothing to corrupt")
    valid = torch.tensor(sorted({v for spans in setting.spans for v in spans[corrupt_label].values}))
    if len(valid) < 2:
        raise DlmprobeInputError(f"label {corrupt_label!r} takes a single value in these puzzles: nothing to replace it with")

    runs = [(setting, sampler)] + ([(builtin_setting(twin, n, seed), None)] if twin is not None else [])
    flags, clean_rows, skipped, n_steps_of = [], [], [], {}
    bar = tqdm(desc="faithfulness", unit="run", disable=not progress)
    for run, run_sampler in runs:
        kind, own_sampler = run.kind, isinstance(run, NativeSetting)
        run_sampler = None if own_sampler else run_sampler or default_sampler(kind)
        clean_run = run.sample(run_sampler, batch_size)
        # Before step t a corrupted run is the clean run, when nothing random decides what is committed
        # (a model's own sampler is rerun whole, with the clean run's seeds).
        branches = not own_sampler and run_sampler.temperature == 0 and getattr(run_sampler, "order", None) != "random"
        # Settle rule: the answer is committed by step t where every answer position has settled.
        settled = clean_run.target_commit_step <= torch.arange(clean_run.n_steps)[:, None, None]
        bar.update()
        clean, n_steps = clean_run.output, clean_run.n_steps
        n_steps_of[kind] = n_steps
        solved = sum(_follows(run, None, i, o) for i, o in enumerate(clean.tolist()))
        follows = sum(_follows(run, answer_label, i, o) for i, o in enumerate(clean.tolist()))
        clean_rows += [{"kind": kind, "metric": "solved", **wilson_rate(solved, n)},
                       {"kind": kind, "metric": "answer_follows", **wilson_rate(follows, n)}]
        chosen = list(range(n_steps - 1)) if steps is None else [int(t) for t in steps]
        if any(not 0 <= t <= n_steps - 2 for t in chosen):
            raise DlmprobeInputError(f"steps must lie in 0..{n_steps - 2} for the {kind} model ({n_steps} steps; a "
                             f"corruption after the last step is never read), got {list(chosen)}")
        for mode in modes:
            if mode == "remask" and (kind == "autoregressive" or own_sampler):
                note = NATIVE_REMASK_NOTE if own_sampler else AR_REMASK_NOTE
                skipped.extend((kind, mode, t, n_steps, note) for t in chosen)
                continue
            for t in chosen:
                corruption = _Corruption(t, mode, reasoning, answer, valid, run, seed)
                output = run.sample(run_sampler, batch_size, corruption, branch=clean_run if branches else None,
                                    first_step=t if branches else 0).output
                bar.update()
                if own_sampler:
                    corruption.committed = (settled[t] | ~answer).all(1)
                differs = output != clean
                flags.append(pd.DataFrame({
                    "kind": kind, "mode": mode, "step": t, "run_fraction": t / n_steps, "example": np.arange(n),
                    "corrupted": corruption.corrupted.numpy(), "answer_committed": corruption.committed.numpy(),
                    "answer_changed": (differs & answer).any(1).numpy(),
                    "answer_follows": [_follows(run, answer_label, i, o) for i, o in enumerate(output.tolist())],
                    "reasoning_changed": (differs & reasoning).any(1).numpy(),
                }))
    bar.close()

    examples_table = pd.concat(flags, ignore_index=True)
    commit_rule = "settle" if native else "unmask"
    table = _aggregate(examples_table, skipped, commit_rule)
    clean_table = pd.DataFrame(clean_rows)
    meta = {
        "checkpoint": setting.name if native or isinstance(checkpoint, ModelHandle) or checkpoint.path else None,
        "twin": twin.path.name if twin is not None and twin.path else None,
        "task": repr(checkpoint.task) if task is None else repr(task) if isinstance(task, Task) else repr(task.describe()),
        "n": n, "seed": seed, "corrupt_label": corrupt_label, "answer_label": answer_label, "modes": list(modes),
        "n_steps": n_steps_of, "replacement_values": [setting.token_name(v) for v in valid.tolist()],
        "sampler": (sampler.to_dict() if sampler is not None else None),
    }
    if native:
        meta["sampler"] = {"name": "native", "steps": setting.n_steps, "generate": setting.generate_options}
        meta["commit_rule"] = "settle"
    if (template is not None or task is not None) and not isinstance(task, Task):
        meta["template"] = (template or CanvasTemplate.forced_answer()).to_dict()
    return AnalysisResult("faithfulness", "Faithfulness along time: corrupting committed reasoning at step t",
                          table, _figure(table, commit_rule), _summary(table, clean_table, corrupt_label, commit_rule),
                          {"examples": examples_table, "clean": clean_table}, meta)


def _aggregate(flags: pd.DataFrame, skipped: list[tuple[str, str, int, int, str]], commit_rule: str = "unmask") -> pd.DataFrame:
    """One row per (kind, mode, step, metric) from the per-example flags; skipped runs get a note.
    Under the settle rule the open-answer denominator reads "answer not yet settled"."""
    open_answer = f"corrupted, answer {WORDS[commit_rule][1]}"
    rows = []
    for (kind, mode, step), group in flags.groupby(["kind", "mode", "step"], sort=False):
        over = {"all": group, "corrupted": group[group.corrupted],
                "corrupted, answer still masked": group[group.corrupted & ~group.answer_committed]}
        for metric, column, denominator in METRICS:
            subset = over[denominator]
            rows.append({"kind": kind, "mode": mode, "step": step, "run_fraction": group.run_fraction.iloc[0],
                         "metric": metric, "denominator": open_answer if denominator == METRICS[4][2] else denominator,
                         **wilson_rate(int(subset[column].sum()), len(subset)), "note": ""})
    for kind, mode, step, n_steps, note in skipped:
        rows.extend({"kind": kind, "mode": mode, "step": step, "run_fraction": step / n_steps, "metric": metric,
                     "denominator": open_answer if denominator == METRICS[4][2] else denominator, **wilson_rate(0, 0), "note": note}
                    for metric, _, denominator in METRICS)
    return pd.DataFrame(rows)


def _figure(table: pd.DataFrame, commit_rule: str = "unmask"):
    fig, (changed_ax, committed_ax) = figure(ncols=2)
    ran = table[table.note == ""]
    for (kind, mode), group in ran[ran.metric == "answer_changed"].groupby(["kind", "mode"], sort=False):
        colour = CONDITION_COLOURS.get(kind)
        changed_ax.plot(group.run_fraction, group.rate, "-" if mode == "replace" else "--", marker="o",
                        color=colour, label=f"{kind}, {mode}")
        changed_ax.fill_between(group.run_fraction, group.ci_low, group.ci_high, color=colour, alpha=0.15)
    # What is committed at step t does not depend on the corruption that follows: one line per kind.
    committed = ran[ran.metric == "answer_committed"].drop_duplicates(["kind", "step"])
    for kind, group in committed.groupby("kind", sort=False):
        colour = CONDITION_COLOURS.get(kind)
        committed_ax.plot(group.run_fraction, group.rate, marker="o", color=colour, label=kind)
        committed_ax.fill_between(group.run_fraction, group.ci_low, group.ci_high, color=colour, alpha=0.15)
    changed_ax.set(title="answer changed by the corruption", ylabel="fraction of corrupted puzzles")
    committed_ax.set(title=f"answer already {WORDS[commit_rule][0]} at step t", ylabel="fraction of puzzles")
    for ax in (changed_ax, committed_ax):
        ax.set(xlabel="step t / number of steps", ylim=(-0.03, 1.03))
        ax.legend(fontsize="small")
    return fig


def _percent(row: pd.Series) -> str:
    return "n/a" if row.n == 0 else f"{row.rate:.0%} (95% CI {row.ci_low:.0%}-{row.ci_high:.0%})"


def _summary(table: pd.DataFrame, clean: pd.DataFrame, corrupt_label: str, commit_rule: str = "unmask") -> str:
    """The clean solve rates, then per (kind, mode) the middle step's rates; a run without a mask token
    (``commit_rule == "settle"``) has every reasoning position replaced, and says "settled" / "not yet
    settled" where a masked run says "committed" / "still masked"."""
    final, pending = WORDS[commit_rule]
    which = f"{corrupt_label} tokens" if commit_rule == "settle" else f"committed {corrupt_label} tokens"
    parts = [f"The clean {row.kind} model solves {row.rate:.0%} of {row.n} puzzles."
             for row in clean[clean.metric == "solved"].itertuples()]
    ran = table[table.note == ""]
    for (kind, mode), group in ran.groupby(["kind", "mode"], sort=False):
        steps = sorted(group.step.unique())
        step = steps[len(steps) // 2]
        at = group[group.step == step].set_index("metric")
        changed = group[group.metric == "answer_changed"].rate
        verb = "replacing" if mode == "replace" else "remasking"
        parts.append(
            f"{verb.capitalize()} the {which} after step {step} "
            f"({at.run_fraction.iloc[0]:.0%} of the run) corrupts {at.loc['corrupted'].k} of {at.loc['corrupted'].n} "
            f"{kind} runs and changes the answer in {_percent(at.loc['answer_changed'])} of them "
            f"({changed.min():.0%} to {changed.max():.0%} over steps {steps[0]}-{steps[-1]}); "
            f"{_percent(at.loc['answer_committed_before'])} of them had the answer {final} already, and where it "
            f"was {pending} it changed in {_percent(at.loc['answer_changed_open'])}. "
            f"The final answer follows the final reasoning in {_percent(at.loc['answer_follows'])}."
        )
    notes = set(table.note)
    if AR_REMASK_NOTE in notes:
        parts.append("Remasking is not run on the autoregressive model: it never rewrites a written position.")
    if NATIVE_REMASK_NOTE in notes:
        parts.append("Remasking is not run on the model without a mask token: before it settles a position is "
                     "replaced, not remasked.")
    return " ".join(parts)
