"""Paraphrase between steps: does a trajectory survive a meaning-preserving rewrite of its canvas?

After every step the committed canvas of each example is rewritten by the task's paraphraser (a
fresh random rewrite each step: sudoku digits permuted, path-star nodes renamed, arith commutative
operands reordered) and sampling goes on. If the model carried information from step to step in the
exact surface form of the tokens (a steganographic code), the rewrite would destroy it.

Each paraphrase relabels tokens by a ``token_map``; the maps compose. The labelling of the canvas
that step ``s`` sees maps original token ids to the ids used at step ``s``, so the token finally
committed at a position can be translated into the labelling of any earlier step. That is the
target of decodability at still-masked positions: the model's own argmax and, if a site is given,
a linear probe fitted on the plain run's activations.

Example:
    >>> from dlmprobe.models import load_model
    >>> result = paraphrase_run(load_model("sudoku-diffusion"), n=100, probe_site="blocks.3.hook_resid_post")
    >>> result.tables["solve"]
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from dlmprobe.analyses.common import label_mask, wilson_rate
from dlmprobe.analyses.plotting import CONDITION_COLOURS, figure
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.hooks import ActivationRecorder
from dlmprobe.models import Checkpoint
from dlmprobe.probes.grid import bootstrap_by_example
from dlmprobe.probes.linear import fit_logistic
from dlmprobe.sampling import Trajectory, generate
from dlmprobe.sampling.generate import SamplerConfig
from dlmprobe.tasks import Example, Task

RUNS: tuple[str, ...] = ("plain", "paraphrased")
N_BOOTSTRAP = 500


def compose(first: np.ndarray, then: np.ndarray) -> np.ndarray:
    """The token map of relabelling by ``first`` and then by ``then``."""
    return then[first]


def invert(token_map: np.ndarray) -> np.ndarray:
    """The inverse of a token map; it must be a permutation of the vocabulary."""
    if not np.array_equal(np.sort(token_map), np.arange(len(token_map))):
        raise DlmprobeInputError(f"a token map must be a permutation of 0..{len(token_map) - 1}, got {token_map.tolist()}")
    inverse = np.empty_like(token_map)
    inverse[token_map] = np.arange(len(token_map))
    return inverse


def translate(tokens: np.ndarray, source: np.ndarray, destination: np.ndarray) -> np.ndarray:
    """``tokens`` written in the labelling ``source`` rewritten in the labelling ``destination``.

    A labelling is a token map from the original ids to the ids used in it.
    """
    return destination[invert(source)[tokens]]


@dataclass
class _Run:
    """One sampling run of all examples.

    ``expected[i, s, p]``: the token finally committed at target position ``p``, in the labelling of
    the canvas step ``s`` saw; ``open[i, s, p]``: ``p`` was still masked then and the model predicted
    it (an autoregressive model predicts only the position it writes); ``activations``: the probe
    site at the target positions, (example, step, target position, d), if recorded.
    """

    trajectory: Trajectory
    labellings: np.ndarray  # (example, step + 1, vocab): original id -> id in that canvas
    expected: np.ndarray
    open: np.ndarray
    activations: torch.Tensor | None


def _sample(checkpoint: Checkpoint, examples: Sequence[Example], sampler: SamplerConfig | None, batch_size: int,
            paraphrase: bool, seed: int, probe_site: str | None, label: str | None) -> _Run:
    task = checkpoint.task
    identity = np.arange(len(task.vocab))
    labellings = [[identity] for _ in examples]
    rngs = [random.Random(f"paraphrase|{seed}|{i}") for i in range(len(examples))]
    prompt_slice = slice(1, 1 + task.prompt_length)
    gen = slice(task.target_start, task.target_start + task.target_length)

    def rewrite(step: int, rows: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        edited = canvas.cpu()
        for row, i in enumerate(rows.tolist()):
            prompt, target, token_map = task.paraphrase(edited[row, prompt_slice].tolist(),
                                                        edited[row, gen].tolist(), rngs[i])
            edited[row, prompt_slice], edited[row, gen] = torch.tensor(prompt), torch.tensor(target)
            labellings[i].append(compose(labellings[i][-1], token_map))
        return edited

    recorder = ActivationRecorder(checkpoint.model, probe_site, positions=range(gen.start, gen.stop)) if probe_site else None
    if recorder is not None and len(recorder.sites) != 1:
        raise DlmprobeInputError(f"probe_site must name one site, got {probe_site!r} matching {recorder.sites}")
    with recorder or nullcontext():
        model = checkpoint.model if recorder is None else recorder.model
        trajectory = generate(model, task, examples, checkpoint.kind, sampler, batch_size,
                              rewrite if paraphrase else None, observers=[recorder] if recorder is not None else [])
        activations = recorder.pop().activations[recorder.sites[0]] if recorder is not None else None
    steps = trajectory.n_steps
    if paraphrase:
        full = np.stack([np.stack(ls) for ls in labellings])
    else:
        full = np.broadcast_to(identity, (len(examples), steps + 1, len(identity)))
    final = trajectory.output.numpy()
    expected = np.stack([[translate(final[i], full[i, -1], full[i, s]) for s in range(steps)]
                         for i in range(len(examples))])
    predictions = trajectory.predictions[:, :, trajectory.gen_slice].numpy()
    still_masked = (trajectory.canvases[:, :-1, trajectory.gen_slice] == task.vocab.mask_id).numpy()
    if label is not None:
        still_masked &= label_mask(task, examples, label).numpy()[:, None, :]
    return _Run(trajectory, full, expected, still_masked & (predictions >= 0), activations)


def _rows(run: _Run, step: int, examples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Example and target position of the open rows of ``step`` among ``examples`` (a bool mask)."""
    return np.nonzero(run.open[:, step] & examples[:, None])


def _argmax_hits(run: _Run, step: int) -> tuple[np.ndarray, np.ndarray]:
    ex, pos = _rows(run, step, np.ones(len(run.open), dtype=bool))
    predictions = run.trajectory.predictions[:, step, run.trajectory.gen_slice].numpy()
    return predictions[ex, pos] == run.expected[ex, step, pos], ex


def _probe_hits(runs: dict[str, _Run], train: np.ndarray, n_classes: int) -> dict[str, list]:
    """Per run, per step: hits and examples of a probe per step fitted on the plain run's training
    examples and tested on the other examples; none where the step has no training row."""
    plain = runs["plain"]
    steps, d = plain.open.shape[1], plain.activations.shape[-1]
    selected = [_rows(plain, s, train) for s in range(steps)]
    width = max(1, max(len(ex) for ex, _ in selected))
    X = torch.zeros((steps, width, d))
    y = torch.zeros((steps, 1, width), dtype=torch.long)
    weight = torch.zeros((steps, 1, width))
    for s, (ex, pos) in enumerate(selected):
        X[s, : len(ex)] = plain.activations[ex, s, pos]
        y[s, 0, : len(ex)] = torch.from_numpy(plain.expected[ex, s, pos])
        weight[s, 0, : len(ex)] = 1.0
    W, b = fit_logistic(X, y, weight, n_classes)
    hits: dict[str, list] = {}
    for name, run in runs.items():
        hits[name] = []
        for s in range(steps):
            ex, pos = _rows(run, s, ~train if len(selected[s][0]) else np.zeros_like(train))
            predicted = (run.activations[ex, s, pos] @ W[s, 0] + b[s, 0]).argmax(-1).numpy()
            hits[name].append((predicted == run.expected[ex, s, pos], ex))
    return hits


def _rate_row(hits: np.ndarray, examples: np.ndarray, rng: np.random.Generator) -> dict:
    if not len(hits):
        return {"k": 0, "n": 0, "n_examples": 0, "rate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    low, high = bootstrap_by_example(hits, examples, N_BOOTSTRAP, rng)
    return {"k": int(hits.sum()), "n": len(hits), "n_examples": len(np.unique(examples)),
            "rate": float(hits.mean()), "ci_low": low, "ci_high": high}


def paraphrase_run(
    checkpoint: Checkpoint,
    n: int = 200,
    seed: int = 0,
    sampler: SamplerConfig | None = None,
    probe_site: str | None = None,
    label: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> AnalysisResult:
    """Sample the same puzzles plainly and with a fresh paraphrase of the canvas after every step.

    Parameters
    ----------
    checkpoint : the model and its task (which must implement ``Task.paraphrase``).
    n, seed : number of held-out puzzles; the seed draws them, each one's paraphrases and the probe split.
    sampler : the sampler of both runs (default: the kind's default).
    probe_site : a hook name (``"blocks.3.hook_resid_post"``) to record in both runs and probe
        (diffusion models only): a probe per step is fitted on the still-masked target rows of half
        of the plain run's examples and tested on the other half of both runs.
    label : measure decodability at this label's positions only (e.g. sudoku's ``"blank"``, leaving
        out the givens the model merely copies); default: every target position.

    Returns
    -------
    AnalysisResult "paraphrase". ``table``: decodability of the finally committed token at
    still-masked target positions per (run, measure, step): ``argmax`` (the model's own prediction,
    all examples) and ``probe`` (held-out examples), with bootstrap 95% intervals over examples.
    ``tables["solve"]``: per run, the exact-solve rate (verified against the prompt read back from the
    final canvas), how often the output is the plain output relabelled and how often the final prompt
    differs from the original one, with Wilson CIs; ``tables["examples"]``: the same per example.
    """
    task = checkpoint.task
    if probe_site is not None and checkpoint.kind != "diffusion":
        raise DlmprobeInputError(f"probe_site needs a diffusion model (an autoregressive one never sees its masked "
                         f"positions), got a {checkpoint.kind} model")
    if probe_site is not None and n < 4:
        raise DlmprobeInputError(f"a probe needs n >= 4 puzzles to split into training and test halves, got n={n}")
    if label is not None and label not in task.label_names():
        raise DlmprobeInputError(f"unknown label {label!r} for task {task.name}: expected one of {task.label_names()}")
    examples = task.sample(n, split="eval", seed=seed)
    # Fail before any sampling if the task has no paraphraser.
    task.paraphrase(examples[0].prompt, examples[0].target, random.Random(seed))
    runs = {name: _sample(checkpoint, examples, sampler, batch_size, name == "paraphrased", seed, probe_site, label)
            for name in tqdm(RUNS, desc="paraphrase", unit="run", disable=not progress)}
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
        for name, per_step in _probe_hits(runs, train, len(task.vocab)).items():
            for s, result in enumerate(per_step):
                rows.append({"run": name, "measure": "probe", "step": s, "run_fraction": s / n_steps,
                             **_rate_row(*result, rng)})
    table = pd.DataFrame(rows)
    outcomes = _outcomes(task, examples, runs)
    solve = _solve_table(outcomes)
    meta = {"checkpoint": checkpoint.path.name if checkpoint.path is not None else None, "task": repr(task),
            "kind": checkpoint.kind, "n": n, "seed": seed, "n_steps": n_steps, "probe_site": probe_site, "label": label,
            "sampler": sampler.to_dict() if sampler is not None else None}
    return AnalysisResult("paraphrase", "Paraphrasing the canvas between steps", table, _figure(table),
                          _summary(table, solve, label, checkpoint.kind), {"solve": solve, "examples": outcomes}, meta)


def _outcomes(task: Task, examples: Sequence[Example], runs: dict[str, _Run]) -> pd.DataFrame:
    """Per run and example: solved (against the prompt read back from the final canvas), the same
    output as the plain run once translated back, and whether the final prompt differs from the original."""
    prompt_slice = slice(1, 1 + task.prompt_length)
    original_prompts = np.array([ex.prompt for ex in examples])
    outputs, frames = {}, []
    for name, run in runs.items():
        final = run.trajectory.canvases[:, -1]
        original = np.arange(run.labellings.shape[2])
        outputs[name] = np.stack([translate(out, run.labellings[i, -1], original)
                                  for i, out in enumerate(run.trajectory.output.numpy())])
        frames.append(pd.DataFrame({
            "run": name, "example": np.arange(len(examples)),
            "solved": [task.verify(c[prompt_slice].tolist(), c[run.trajectory.gen_slice].tolist()) for c in final],
            "prompt_rewritten": (final[:, prompt_slice].numpy() != original_prompts).any(1),
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
    for (measure, run), group in table.groupby(["measure", "run"], sort=False):
        colour = CONDITION_COLOURS[measure]
        ax.plot(group.step, group.rate, "-" if run == "plain" else "--", marker="o", markersize=3,
                color=colour, label=f"{measure}, {run}")
        ax.fill_between(group.step, group.ci_low, group.ci_high, color=colour, alpha=0.15)
    ax.set(xlabel="denoising step", ylabel="final token decoded (still-masked positions)", ylim=(-0.03, 1.03),
           title="decodability with and without a paraphrase every step")
    ax.legend(fontsize="small")
    return fig


def _summary(table: pd.DataFrame, solve: pd.DataFrame, label: str | None, kind: str) -> str:
    where = "still-masked target positions" if label is None else f"still-masked {label} positions"
    by = solve.set_index(["run", "metric"])
    plain, para = by.loc[("plain", "solved")], by.loc[("paraphrased", "solved")]
    same, rewritten = by.loc[("paraphrased", "same_as_plain")], by.loc[("paraphrased", "prompt_rewritten")]
    parts = [(
        f"The model solves {plain.rate:.0%} (95% CI {plain.ci_low:.0%}-{plain.ci_high:.0%}) of {int(plain.n)} puzzles "
        f"plainly and {para.rate:.0%} (95% CI {para.ci_low:.0%}-{para.ci_high:.0%}) with a fresh paraphrase of the "
        f"canvas after every step (verified against the paraphrased prompt, rewritten by the end in "
        f"{rewritten.rate:.0%} of puzzles); {same.rate:.0%} of the paraphrased outputs are the plain output relabelled."
    )]
    for measure, group in table.groupby("measure", sort=False):
        pooled = group.groupby("run", sort=False)[["k", "n"]].sum()
        middle = group.step.max() // 2
        at = group[group.step == middle].set_index("run").rate
        parts.append(
            f"The {measure} decodes the finally committed token at {where} in "
            f"{pooled.k['plain'] / pooled.n['plain']:.0%} of rows over all steps plainly and "
            f"{pooled.k['paraphrased'] / pooled.n['paraphrased']:.0%} with paraphrases "
            f"(at step {middle}: {at['plain']:.0%} and {at['paraphrased']:.0%})."
        )
    if kind == "autoregressive":
        parts.append("An autoregressive model predicts only the position it writes, so its argmax decodes the "
                     "finally committed token by construction.")
    return " ".join(parts)
