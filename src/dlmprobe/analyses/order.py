"""Analysis 4: commit order — when answer tokens are written relative to the reasoning tokens.

From a store's trajectories: the commit step of every label's positions, as a fraction of the run,
and per example whether the answer is committed before the reasoning. On sudoku, whether cells with
fewer candidate digits at the start are committed first (the "easy-first" order that lets a small
diffusion model solve what an autoregressive one cannot).

Example:
    >>> result = commit_order(ActivationDataset("runs/arith.h5"), answer="answer", reasoning="intermediate")
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from dlmprobe.analyses.common import builtin_task, default_label, describe_run, percent
from dlmprobe.analyses.plotting import figure
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.store import ActivationDataset


def commit_order(data: ActivationDataset, answer: str | None = None, reasoning: str | None = None) -> AnalysisResult:
    """Commit steps per label; answer-before-reasoning rate; sudoku candidates vs commit step.

    Args:
        data: a store (only its trajectories are read, no activations).
        answer: the answer label (default: the task's answer label).
        reasoning: a label of reasoning tokens to compare it with (e.g. arith's ``intermediate``);
            default: none, sudoku compares cells by their number of candidates instead.
    """
    answer = default_label(data, answer)
    if reasoning is not None:
        default_label(data, reasoning)
    last = max(data.n_steps - 1, 1)
    records, per_label = [], {}
    for name in data.label_names:
        slots, _ = data.label(name)
        positions = data.target_start + slots
        steps = data.commit_step[np.arange(data.n_examples)[:, None], positions].astype(float)
        steps[steps < 0] = np.nan  # never masked
        per_label[name] = steps
        fraction = steps / last
        records.append({"label": name, "n_positions": int(np.isfinite(steps).sum()),
                        "mean_commit_step": np.nanmean(steps), "median_commit_step": np.nanmedian(steps),
                        "mean_commit_fraction": np.nanmean(fraction),
                        "first_commit_fraction": np.nanmean(np.nanmin(fraction, axis=1)),
                        "last_commit_fraction": np.nanmean(np.nanmax(fraction, axis=1))})
    table = pd.DataFrame(records)
    tables: dict[str, pd.DataFrame] = {}
    pairs = None
    if reasoning is not None:
        a, r = per_label[answer], per_label[reasoning]
        pairs = pd.DataFrame({
            "example": np.arange(data.n_examples),
            "answer_step": np.nanmin(a, axis=1),
            "last_reasoning_step": np.nanmax(r, axis=1), "first_reasoning_step": np.nanmin(r, axis=1),
        })
        tables["examples"] = pairs
    candidates = _sudoku_candidates(data)
    if candidates is not None:
        tables["candidates"] = candidates
    return AnalysisResult(
        name="order", title="Commit order: answer vs reasoning tokens" + (", easy cells first?" if candidates is not None else ""),
        table=table, figure=_plot(per_label, last, answer, reasoning, candidates),
        summary=_summary(table, pairs, candidates, answer, reasoning, data.n_steps), tables=tables,
        meta={"run": describe_run(data), "answer": answer, "reasoning": reasoning},
    )


def _sudoku_candidates(data: ActivationDataset) -> pd.DataFrame | None:
    """Per blank cell of every puzzle: candidates at the start and commit step (a built-in sudoku run only:
    a text run's prompt is tokenizer ids)."""
    task = builtin_task(data)
    if task is None or not hasattr(task, "candidates") or "blank" not in data.label_names:
        return None
    slots, _ = data.label("blank")
    rows = []
    for i in range(data.n_examples):
        count = task.candidates(data.prompt[i].tolist())
        for slot in slots[i]:
            rows.append({"example": i, "cell": int(slot), "candidates": count[slot],
                         "commit_step": int(data.commit_step[i, data.target_start + slot])})
    table = pd.DataFrame(rows)
    # Rank within the puzzle: 0 = the first blank committed.
    table["commit_rank"] = table.groupby("example")["commit_step"].rank(method="average") - 1
    return table


def _plot(per_label, last, answer, reasoning, candidates):
    fig, axes = figure(ncols=2 if candidates is not None else 1, width=5.2)
    shown = [answer] + ([reasoning] if reasoning else []) + [n for n in per_label if n not in (answer, reasoning)]
    shown = shown[:6]
    values = [per_label[n][np.isfinite(per_label[n])] / last for n in shown]
    axes[0].boxplot(values, orientation="horizontal", tick_labels=shown)
    axes[0].set_xlabel("commit step / last step")
    axes[0].set_title("when each label's tokens are committed")
    axes[0].set_xlim(-0.02, 1.02)
    axes[0].grid(alpha=0.3, axis="x")
    if candidates is not None:
        axis = axes[1]
        means = candidates.groupby("candidates")["commit_step"].agg(["mean", "count", "sem"]).reset_index()
        axis.bar(means["candidates"], means["mean"], yerr=1.96 * means["sem"].fillna(0), color="#1f77b4", alpha=0.8)
        for _, row in means.iterrows():
            axis.annotate(f"n={int(row['count'])}", (row["candidates"], row["mean"]), ha="center", va="bottom", fontsize=7)
        axis.set_xlabel("candidate digits of the blank cell at the start")
        axis.set_ylabel("mean commit step")
        axis.set_title("sudoku: easy cells first?")
    return fig


def _summary(table, pairs, candidates, answer, reasoning, n_steps) -> str:
    row = table.set_index("label").loc[answer]
    text = (f"Over {n_steps} steps, `{answer}` tokens are committed on average at {percent(row['mean_commit_fraction'])} "
            f"of the run (median step {row['median_commit_step']:.0f}).")
    if pairs is not None:
        before_all = (pairs["answer_step"] < pairs["first_reasoning_step"]).mean()
        before_last = (pairs["answer_step"] < pairs["last_reasoning_step"]).mean()
        rrow = table.set_index("label").loc[reasoning]
        text += (f" `{reasoning}` tokens average {percent(rrow['mean_commit_fraction'])}. The answer is committed "
                 f"before all of the reasoning in {percent(before_all)} of examples and before the last reasoning "
                 f"token in {percent(before_last)}.")
    if candidates is not None:
        rho, p = spearmanr(candidates["candidates"], candidates["commit_step"])
        by = candidates.groupby("candidates")["commit_step"].mean()
        if p < 0.05 and rho > 0:
            verdict = "Sudoku blanks with fewer candidates are committed earlier"
        elif p < 0.05:
            verdict = "Sudoku blanks with fewer candidates are committed later"
        else:
            verdict = "No easy-first order: a blank's candidate count does not predict when it is committed"
        text += (f" {verdict}: Spearman ρ = {rho:.2f} "
                 f"(p = {p:.1g}) between a blank's candidate count at the start and its commit step; mean commit step "
                 + ", ".join(f"{c} candidates: {v:.1f}" for c, v in by.items()) + ".")
    return text
