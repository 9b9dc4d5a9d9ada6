"""Paraphrase between steps: does a trajectory survive a meaning-preserving rewrite of its canvas?

After every step the committed canvas of each example is rewritten by the task's paraphraser (a
fresh random rewrite each step: sudoku digits permuted, path-star nodes renamed, arith commutative
operands reordered) and sampling goes on. If the model carried information from step to step in the
exact surface form of the tokens (a steganographic code), the rewrite would destroy it.

**What the test can detect.** Relabelling tokens is a symmetry of the training data (every digit
permutation of a sudoku is a sudoku), and on a task whose answers are forced by the prompt (a
sudoku with one solution) there is no choice in which a code could live. Two additions give the
test power: ``task=`` a task with free choices (:class:`~dlmprobe.tasks.sudoku.SudokuChoice`, whose
free cells can hold more than one digit: which solution a run picks could carry a code), and the
``"commits"`` paraphrase, which perturbs *when* positions commit rather than what they hold: after
each early step it remasks committed free cells (answer positions on a task without free cells)
with :class:`~dlmprobe.sampling.callbacks.RemaskCommitted`, so the sampler decides them again later.

Each paraphrase relabels tokens by a ``token_map``; the maps compose. The labelling of the canvas
that step ``s`` sees maps original token ids to the ids used at step ``s``, so the token finally
committed at a position can be translated into the labelling of any earlier step. That is the
target of decodability at still-masked positions: the model's own argmax and, if a site is given,
a linear probe fitted on the plain run's activations.

Example:
    >>> from dlmprobe.models import load_model
    >>> result = paraphrase_run(load_model("sudoku-diffusion"), n=100, probe_site="blocks.3.hook_resid_post")
    >>> result.tables["solve"]
    >>> choice = paraphrase_run(load_model("sudoku-diffusion"), n=100, task=SudokuChoice(size=6, blanks=20),
    ...                         paraphrases=("tokens", "commits"))
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from dlmprobe.analyses.common import wilson_rate
from dlmprobe.analyses.plotting import CONDITION_COLOURS, figure
from dlmprobe.analyses.relabel import Relabeller, Remask, free_positions
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.analyses.setting import Setting, builtin_setting, text_setting
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.hooks import ActivationRecorder
from dlmprobe.models import Checkpoint, ModelHandle
from dlmprobe.probes.grid import bootstrap_by_example
from dlmprobe.probes.linear import fit_logistic
from dlmprobe.sampling import DiffusionSamplerConfig, Trajectory, default_sampler
from dlmprobe.sampling.callbacks import RemaskCommitted
from dlmprobe.sampling.generate import SamplerConfig
from dlmprobe.tasks import Task
from dlmprobe.tasks.text import BuiltinTextTask, CanvasTemplate

#: Paraphrases a run can get, each its own run beside the plain one: relabelling tokens, perturbing commits.
PARAPHRASES: dict[str, str] = {"tokens": "paraphrased", "commits": "remasked"}
RUNS: tuple[str, ...] = ("plain", *PARAPHRASES.values())
N_BOOTSTRAP = 500


@dataclass
class _Run:
    """One sampling run of all examples.

    ``expected[i, s, p]``: the token finally committed at generated position ``p``, in the labelling
    of the canvas step ``s`` saw; ``open[i, s, p]``: ``p`` was still masked then and the model
    predicted it (an autoregressive model predicts only the position it writes); ``activations``:
    the probe site at the generated positions, (example, step, position, d), if recorded.
    """

    trajectory: Trajectory
    relabel: Relabeller
    labellings: np.ndarray  # (example, step + 1, alphabet): original index -> index in that canvas
    expected: np.ndarray
    open: np.ndarray
    activations: torch.Tensor | None
    remasked: np.ndarray  # (example,): committed positions remasked over the run


def _sample(setting: Setting, sampler: SamplerConfig | None, batch_size: int, paraphrase: bool, seed: int,
            probe_site: str | None, label: str | None, remask: Remask | None = None,
            text: BuiltinTextTask | None = None, template: CanvasTemplate | None = None) -> _Run:
    """One run of the setting's examples: plain, paraphrased after every step, or with commits remasked."""
    n = len(setting.canvas)
    relabel = Relabeller(setting, seed, text, template)
    remasked = np.zeros(n, dtype=np.int64)

    def perturb_commits(step: int, rows: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        chosen = rows.cpu().numpy()
        # Draws are seeded per (seed, step, example), so a fresh callback per batch gives the same positions.
        edited = RemaskCommitted(setting.mask_id, remask.positions[chosen], remask.k, remask.steps, seed)(step, rows, canvas)
        remasked[chosen] += (edited != canvas).sum(1).cpu().numpy()
        return edited

    callback = relabel if paraphrase else perturb_commits if remask is not None else None
    gen = range(setting.gen_start, setting.gen_start + setting.gen_length)
    recorder = ActivationRecorder(setting.handle, probe_site, positions=gen) if probe_site else None
    if recorder is not None and len(recorder.sites) != 1:
        raise DlmprobeInputError(f"probe_site must name one site, got {probe_site!r} matching {recorder.sites}")
    with recorder or nullcontext():
        # An nnsight recorder samples through its own copy of the handle; hooks sit on the module otherwise.
        run = replace(setting, handle=recorder.model) if isinstance(getattr(recorder, "model", None), ModelHandle) else setting
        trajectory = run.sample(sampler or default_sampler(setting.handle.kind), batch_size, callback,
                                observers=[recorder] if recorder is not None else [])
        activations = recorder.pop().activations[recorder.sites[0]] if recorder is not None else None
    steps = trajectory.n_steps
    identity = relabel.labellings[0][0]
    if paraphrase:
        full = np.stack([np.stack(ls) for ls in relabel.labellings])
    else:
        full = np.broadcast_to(identity, (n, steps + 1, len(identity)))
    final = trajectory.output.numpy()
    expected = np.stack([[relabel.translate(final[i], full[i, -1], full[i, s]) for s in range(steps)] for i in range(n)])
    predictions = trajectory.predictions[:, :, trajectory.gen_slice].numpy()
    still_masked = (trajectory.canvases[:, :-1, trajectory.gen_slice] == setting.mask_id).numpy()
    if label is not None:
        still_masked &= setting.label_mask(label).numpy()[:, None, :]
    return _Run(trajectory, relabel, full, expected, still_masked & (predictions >= 0), activations, remasked)


def _rows(run: _Run, step: int, examples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Example and target position of the open rows of ``step`` among ``examples`` (a bool mask)."""
    return np.nonzero(run.open[:, step] & examples[:, None])


def _argmax_hits(run: _Run, step: int) -> tuple[np.ndarray, np.ndarray]:
    ex, pos = _rows(run, step, np.ones(len(run.open), dtype=bool))
    predictions = run.trajectory.predictions[:, step, run.trajectory.gen_slice].numpy()
    return predictions[ex, pos] == run.expected[ex, step, pos], ex


def _probe_hits(runs: dict[str, _Run], train: np.ndarray) -> dict[str, list]:
    """Per run, per step: hits and examples of a probe per step fitted on the plain run's training
    examples and tested on the other examples; none where the step has no training row."""
    plain = runs["plain"]
    steps, d, n_classes = plain.open.shape[1], plain.activations.shape[-1], plain.relabel.n_classes
    selected = [_rows(plain, s, train) for s in range(steps)]
    width = max(1, max(len(ex) for ex, _ in selected))
    X = torch.zeros((steps, width, d))
    y = torch.zeros((steps, 1, width), dtype=torch.long)
    weight = torch.zeros((steps, 1, width))
    for s, (ex, pos) in enumerate(selected):
        X[s, : len(ex)] = plain.activations[ex, s, pos]
        y[s, 0, : len(ex)] = torch.from_numpy(plain.relabel.classes(plain.expected[ex, s, pos]))
        weight[s, 0, : len(ex)] = 1.0
    W, b = fit_logistic(X, y, weight, n_classes)
    hits: dict[str, list] = {}
    for name, run in runs.items():
        hits[name] = []
        for s in range(steps):
            ex, pos = _rows(run, s, ~train if len(selected[s][0]) else np.zeros_like(train))
            predicted = (run.activations[ex, s, pos] @ W[s, 0] + b[s, 0]).argmax(-1).numpy()
            hits[name].append((predicted == run.relabel.classes(run.expected[ex, s, pos]), ex))
    return hits


def _rate_row(hits: np.ndarray, examples: np.ndarray, rng: np.random.Generator) -> dict:
    if not len(hits):
        return {"k": 0, "n": 0, "n_examples": 0, "rate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    low, high = bootstrap_by_example(hits, examples, N_BOOTSTRAP, rng)
    return {"k": int(hits.sum()), "n": len(hits), "n_examples": len(np.unique(examples)),
            "rate": float(hits.mean()), "ci_low": low, "ci_high": high}


def paraphrase_run(
    checkpoint: Checkpoint | ModelHandle,
    n: int = 200,
    seed: int = 0,
    sampler: SamplerConfig | None = None,
    probe_site: str | None = None,
    label: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
    task: Task | BuiltinTextTask | None = None,
    paraphrases: Sequence[str] = ("tokens",),
    remask_k: int = 1,
    remask_until: float = 0.9,
    template: CanvasTemplate | None = None,
) -> AnalysisResult:
    """Sample the same puzzles plainly and with each paraphrase, one run per paraphrase.

    Parameters
    ----------
    checkpoint : a built-in model and its task (which must implement ``Task.paraphrase``), or a
        Hugging Face diffusion model's handle on ``task``, a built-in task rendered as text.
    n, seed : number of held-out puzzles; the seed draws them, each one's paraphrases and the probe split.
    sampler : the sampler of every run (default: the kind's default).
    probe_site : a hook name (``"blocks.3.hook_resid_post"``) to record in every run and probe
        (diffusion models only): a probe per step is fitted on the still-masked target rows of half
        of the plain run's examples and tested on the other half of every run.
    label : measure decodability at this label's positions only (e.g. sudoku's ``"blank"``, leaving
        out the givens the model merely copies); default: every target position.
    task : sample puzzles of this task instead of the checkpoint's (same vocabulary and layout),
        e.g. ``SudokuChoice(size=6, blanks=20)`` for puzzles with free choices; for a handle (required)
        a :class:`~dlmprobe.tasks.text.BuiltinTextTask`, whose canvas is rewritten as text: the
        paraphrased prompt rendered and tokenized again (arith: commutative operands swapped), the
        answer items' token ids relabelled by the task's token map (sudoku: a digit permutation).
    template : a handle's canvas layout (default: the forced answer slot).
    paraphrases : ``"tokens"`` (run ``"paraphrased"``: a fresh relabelling of the canvas after every
        step) and/or ``"commits"`` (run ``"remasked"``, diffusion only: ``remask_k`` committed free
        cells, or answer positions where the task has no free cells, remasked after every step
        before ``remask_until`` of the run).

    Returns
    -------
    AnalysisResult "paraphrase". ``table``: decodability of the finally committed token at
    still-masked target positions per (run, measure, step): ``argmax`` (the model's own prediction,
    all examples) and ``probe`` (held-out examples), with bootstrap 95% intervals over examples.
    ``tables["solve"]``: per run, the exact-solve rate (verified against the prompt read back from the
    final canvas), how often the output is the plain output relabelled (on puzzles with free cells:
    the same solution picked) and how often the final prompt differs from the original one, with
    Wilson CIs; ``tables["examples"]``: the same per example, with its free cells and remaskings.
    """
    if isinstance(checkpoint, ModelHandle):
        if not isinstance(task, BuiltinTextTask):
            raise DlmprobeInputError(f"a Hugging Face model needs a built-in task rendered as text: expected task=BuiltinTextTask(...), "
                                     f"got {type(task).__name__} ({checkpoint.name!r})")
        text, template = task, template or CanvasTemplate.forced_answer()
        setting = text_setting(checkpoint, text, n, seed, template)
        task = own = text.task
    else:
        if isinstance(task, BuiltinTextTask) or template is not None:
            raise DlmprobeInputError("a built-in checkpoint runs on task ids: expected a built-in task= and no template=")
        text, own, task = None, checkpoint.task, task or checkpoint.task
        if (task.vocab.tokens, task.sequence_length, task.target_start) != (own.vocab.tokens, own.sequence_length,
                                                                               own.target_start):
            raise DlmprobeInputError(f"task {task!r} must share the vocabulary and canvas layout of the model's task {own!r}")
        setting = builtin_setting(checkpoint, n, seed, task)
    paraphrases = list(dict.fromkeys(paraphrases))
    if not paraphrases or any(p not in PARAPHRASES for p in paraphrases):
        raise DlmprobeInputError(f"paraphrases must be some of {tuple(PARAPHRASES)}, got {paraphrases}")
    if "commits" in paraphrases and checkpoint.kind != "diffusion":
        raise DlmprobeInputError(f"the 'commits' paraphrase needs a diffusion model (an autoregressive one commits "
                                 f"left to right), got a {checkpoint.kind} model")
    if not 0 < remask_until <= 1 or remask_k < 1:
        raise DlmprobeInputError(f"expected remask_k >= 1 and 0 < remask_until <= 1, got {remask_k} and {remask_until}")
    if probe_site is not None and checkpoint.kind != "diffusion":
        raise DlmprobeInputError(f"probe_site needs a diffusion model (an autoregressive one never sees its masked "
                         f"positions), got a {checkpoint.kind} model")
    if probe_site is not None and n < 4:
        raise DlmprobeInputError(f"a probe needs n >= 4 puzzles to split into training and test halves, got n={n}")
    labels = list(setting.spans[0])
    if label is not None and label not in labels:
        raise DlmprobeInputError(f"unknown label {label!r} for task {task.name}: expected one of {labels}")
    example = task.sample(1, split="eval", seed=seed)[0]
    # Fail before any sampling if the task has no paraphraser.
    task.paraphrase(example.prompt, example.target, random.Random(seed))
    free = free_positions(setting, task if text is None else None, label, seed)
    remask = None
    if "commits" in paraphrases:
        n_steps = (sampler or DiffusionSamplerConfig()).resolve(setting.gen_length)[0]
        remask = Remask(free["positions"], remask_k, tuple(range(max(1, int(remask_until * n_steps)))))
    names = ["plain", *(PARAPHRASES[p] for p in paraphrases)]
    runs = {name: _sample(setting, sampler, batch_size, name == "paraphrased", seed, probe_site, label,
                          remask if name == "remasked" else None, text, template)
            for name in tqdm(names, desc="paraphrase", unit="run", disable=not progress)}
    n_steps = runs["plain"].trajectory.n_steps

    rng = np.random.default_rng(seed)
    train = np.zeros(n, dtype=bool)  # the probe's training examples
    train[rng.permutation(n)[: n // 2]] = True
    rows = []
    for name, run in runs.items():
        for s in range(n_steps):
            rows.append({"run": name, "measure": "argmax", "step": s, "run_fraction": s / n_steps,
                         **_rate_row(*_argmax_hits(run, s), rng)})
    if probe_site is not None:
        for name, per_step in _probe_hits(runs, train).items():
            for s, result in enumerate(per_step):
                rows.append({"run": name, "measure": "probe", "step": s, "run_fraction": s / n_steps,
                             **_rate_row(*result, rng)})
    table = pd.DataFrame(rows)
    outcomes = _outcomes(setting, runs)
    outcomes["n_free"] = np.tile(free["n_free"], len(runs))
    solve = _solve_table(outcomes)
    name = checkpoint.name if text is not None else checkpoint.path.name if checkpoint.path is not None else None
    meta = {"checkpoint": name, "task": repr(task),
            "model_task": repr(own), "kind": checkpoint.kind, "n": n, "seed": seed, "n_steps": n_steps,
            "probe_site": probe_site, "label": label, "paraphrases": paraphrases, "free_choices": free["choices"],
            "remask_k": remask_k, "remask_steps": list(remask.steps) if remask is not None else [],
            "sampler": sampler.to_dict() if sampler is not None else None}
    if text is not None:
        meta["template"] = template.to_dict()
    return AnalysisResult("paraphrase", "Paraphrasing the canvas between steps", table, _figure(table),
                          _summary(table, solve, outcomes, meta), {"solve": solve, "examples": outcomes}, meta)


def _outcomes(setting: Setting, runs: dict[str, _Run]) -> pd.DataFrame:
    """Per run and example: solved (against the prompt the run ends with), the same output as the
    plain run once translated back, and whether the final prompt differs from the original."""
    outputs, frames = {}, []
    for name, run in runs.items():
        identity = run.labellings[0, 0]
        outputs[name] = np.stack([run.relabel.translate(out, run.labellings[i, -1], identity)
                                  for i, out in enumerate(run.trajectory.output.numpy())])
        prompts = run.relabel.prompts
        frames.append(pd.DataFrame({
            "run": name, "example": np.arange(len(prompts)),
            "solved": [setting.verifies(i, out, prompts[i]) for i, out in enumerate(run.trajectory.output.tolist())],
            "prompt_rewritten": [tuple(p) != tuple(q) for p, q in zip(prompts, setting.prompts)],
            "n_remasked": run.remasked,
        }))
    for frame in frames:
        frame["same_as_plain"] = (outputs[frame.run.iloc[0]] == outputs["plain"]).all(1)
    return pd.concat(frames, ignore_index=True)


def _solve_table(outcomes: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([{"run": run, "metric": metric, **wilson_rate(int(group[metric].sum()), len(group))}
                         for run, group in outcomes.groupby("run", sort=False)
                         for metric in ("solved", "same_as_plain", "prompt_rewritten")])


def _figure(table: pd.DataFrame):
    fig, (ax,) = figure()
    styles = {"plain": "-", "paraphrased": "--", "remasked": ":"}
    for (measure, run), group in table.groupby(["measure", "run"], sort=False):
        colour = CONDITION_COLOURS[measure]
        ax.plot(group.step, group.rate, styles[run], marker="o", markersize=3, color=colour, label=f"{measure}, {run}")
        ax.fill_between(group.step, group.ci_low, group.ci_high, color=colour, alpha=0.15)
    ax.set(xlabel="denoising step", ylabel="final token decoded (still-masked positions)", ylim=(-0.03, 1.03),
           title="decodability with and without a paraphrase every step")
    ax.legend(fontsize="small")
    return fig


def _summary(table: pd.DataFrame, solve: pd.DataFrame, outcomes: pd.DataFrame, meta: dict) -> str:
    label, kind = meta["label"], meta["kind"]
    where = "still-masked target positions" if label is None else f"still-masked {label} positions"
    by = solve.set_index(["run", "metric"])
    plain = by.loc[("plain", "solved")]
    parts = [f"The model solves {plain.rate:.0%} (95% CI {plain.ci_low:.0%}-{plain.ci_high:.0%}) of {int(plain.n)} "
             f"puzzles of {meta['task']} plainly."]
    if meta["task"] != meta["model_task"]:
        usable = "usable" if plain.rate >= 0.5 else "of limited use: too few solved runs for the test to say much"
        parts.append(f"It was trained on {meta['model_task']}, so on these puzzles it is {usable}.")
    if "paraphrased" in by.index.get_level_values("run"):
        para, same = by.loc[("paraphrased", "solved")], by.loc[("paraphrased", "same_as_plain")]
        rewritten = by.loc[("paraphrased", "prompt_rewritten")]
        parts.append(
            f"With a fresh relabelling of the canvas after every step it solves {para.rate:.0%} (95% CI "
            f"{para.ci_low:.0%}-{para.ci_high:.0%}; verified against the paraphrased prompt, rewritten by the end in "
            f"{rewritten.rate:.0%} of puzzles); {same.rate:.0%} of these outputs are the plain output relabelled.")
    if "remasked" in by.index.get_level_values("run"):
        remasked, same = by.loc[("remasked", "solved")], by.loc[("remasked", "same_as_plain")]
        count = outcomes.loc[outcomes.run == "remasked", "n_remasked"]
        cells = "free cells" if meta["free_choices"] else "answer positions"
        parts.append(
            f"Remasking {meta['remask_k']} committed {cells} after each of steps 0-{meta['remask_steps'][-1]} "
            f"changes which positions commit when; it touched {(count > 0).sum()} of {len(count)} puzzles "
            f"({count.mean():.1f} remaskings per puzzle; the others commit no such position before step "
            f"{meta['remask_steps'][-1] + 1}); the run then solves {remasked.rate:.0%} (95% CI "
            f"{remasked.ci_low:.0%}-{remasked.ci_high:.0%}) and gives the plain output in {same.rate:.0%}.")
    for measure, group in table.groupby("measure", sort=False):
        pooled = group.groupby("run", sort=False)[["k", "n"]].sum()
        middle = group.step.max() // 2
        at = group[group.step == middle].set_index("run").rate
        rates = " and ".join(f"{pooled.k[r] / pooled.n[r]:.0%} ({r})" for r in pooled.index)
        steps = " and ".join(f"{at[r]:.0%}" for r in pooled.index)
        parts.append(f"The {measure} decodes the finally committed token at {where} in {rates} of rows over all "
                     f"steps (at step {middle}: {steps}).")
    parts.append(_power(outcomes, meta))
    if kind == "autoregressive":
        parts.append("An autoregressive model predicts only the position it writes, so its argmax decodes the "
                     "finally committed token by construction.")
    return " ".join(parts)


def _power(outcomes: pd.DataFrame, meta: dict) -> str:
    """What the runs could and could not have detected."""
    n_free = outcomes.loc[outcomes.run == "plain", "n_free"]
    if meta["free_choices"]:
        choice = (f"{(n_free > 0).sum()} of {len(n_free)} puzzles have free cells (mean {n_free.mean():.1f}), where "
                  f"a code could live in which solution a run picks: a run giving another valid solution than the "
                  f"plain one is what such a code would show, but so would a model that is merely not exactly "
                  f"symmetric under the paraphrase, and a remasked run can also fail by re-deciding several free "
                  f"cells in one late step; the test bounds a code, it does not prove one.")
    else:
        choice = ("Every answer is forced by the prompt (no free choices), so nothing could be hidden in which "
                  "answer is picked; relabelling tokens is a symmetry of the training data, so surviving it shows "
                  "only that no code depends on the tokens' surface identity.")
    if "commits" in meta["paraphrases"]:
        return f"{choice} The remasked run tests a code in the commit order."
    return f"{choice} The commit order was not perturbed (paraphrases=('tokens',)): a code in when positions commit is not tested."
