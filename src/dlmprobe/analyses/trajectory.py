"""Analysis 8: trajectory view — how one example's output changes across denoising steps.

A token x step picture of the target region: committed tokens coloured by the step that committed
them, and at positions not yet committed (``ActivationDataset.before_commit``: still masked, or
under the settle rule not yet settled) the model's current argmax guess (and, if given, a probe's
guess), marked by whether it already equals the token finally committed there. The table's
``masked`` column is that "not yet committed".

Example:
    >>> result = trajectory_view(ActivationDataset("runs/sudoku.h5"), example=0)
    >>> result.figure
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dlmprobe.analyses.common import describe_run, is_text_run, task_of, token_namer
from dlmprobe.analyses.plotting import figure
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.store import ActivationDataset


def trajectory_view(data: ActivationDataset, example: int = 0, probe: np.ndarray | None = None,
                    probe_name: str = "probe") -> AnalysisResult:
    """One example's trajectory as a table (step x position) and a picture.

    Args:
        data: a store.
        example: index of the example in the store.
        probe: optional per-step probe guesses for this example, ``(n_steps, target_length)`` token
            ids (``-1`` where none), e.g. from :meth:`ProbeGrid.out_of_fold` spread over the steps.
    """
    if not 0 <= example < data.n_examples:
        raise DlmprobeInputError(f"example must be in [0, {data.n_examples}), got {example}")
    name = token_namer(data)
    length = data.output.shape[1]
    target = slice(data.target_start, data.target_start + length)
    canvas = data.canvas[example, :, target]  # (n_steps + 1, length)
    prediction = data.prediction[example, :, target]  # (n_steps, length)
    confidence = data.confidence[example, :, target].astype(float)
    commit = data.commit_step[example, target]
    final = canvas[-1]
    n_steps = data.n_steps
    positions = np.arange(data.target_start, data.target_start + length)
    pending = np.stack([data.before_commit(step, np.full(length, example), positions) for step in range(n_steps)])
    if probe is not None and probe.shape != (n_steps, length):
        raise DlmprobeInputError(f"probe guesses must be (n_steps, target_length) = {(n_steps, length)}, got {probe.shape}")
    records = []
    for step in range(n_steps):
        for pos in range(length):
            records.append({
                "step": step, "position": pos, "masked": bool(pending[step, pos]), "final": name(final[pos]),
                "commit_step": int(commit[pos]),
                "argmax": name(prediction[step, pos]) if prediction[step, pos] >= 0 else None,
                "confidence": confidence[step, pos],
                "argmax_is_final": bool(prediction[step, pos] == final[pos]),
                **({probe_name: name(probe[step, pos]) if probe[step, pos] >= 0 else None} if probe is not None else {}),
            })
    table = pd.DataFrame(records)
    fig = _plot(canvas, prediction, commit, final, probe, name, ~pending, n_steps, length)
    if is_text_run(data):
        shown = "Generated region (tokens, fixed template text included):\n\n```\n" + " ".join(map(name, final)) + "\n```"
    else:
        shown = f"Puzzle:\n\n```\n{task_of(data).render(data.prompt[example].tolist(), final.tolist())}\n```"
    # Only pairs where the model made a prediction (an autoregressive model predicts one position a step).
    masked_guess = table[table["masked"] & table["argmax"].notna()]
    summary = (
        f"Example {example} ({'solved' if data.solved[example] else 'not solved'}): {length} target positions over "
        f"{n_steps} steps. While a position is not yet committed, the model's argmax already equals the token finally "
        f"committed there in {100 * masked_guess['argmax_is_final'].mean():.0f}% of the {len(masked_guess)} "
        f"(step, uncommitted position) pairs with a prediction. " + shown
    )
    return AnalysisResult("trajectory", f"Trajectory of example {example}", table, fig, summary,
                          meta={"run": describe_run(data), "example": example})


def _plot(canvas, prediction, commit, final, probe, name, committed, n_steps, length):
    """``committed``: (n_steps, length), whether each position was committed in the canvas each step's forward pass saw."""
    cell = 0.32
    fig, (axis,) = figure(width=max(6.0, n_steps * cell + 2), height=max(3.0, length * cell * 0.75 + 1.2))
    colour = np.where(committed, commit[None, :], np.nan).T.astype(float)  # (length, steps)
    image = axis.imshow(colour, aspect="auto", cmap="viridis", vmin=0, vmax=max(n_steps - 1, 1), origin="upper")
    axis.set_facecolor("#eeeeee")
    fontsize = 7 if length <= 24 else 5.5
    for step in range(n_steps):
        for pos in range(length):
            if committed[step, pos]:
                axis.text(step, pos, name(canvas[step, pos]), ha="center", va="center", fontsize=fontsize,
                          color="white")
            else:
                guess = prediction[step, pos]
                text = name(guess) if guess >= 0 else ""
                if probe is not None and probe[step, pos] >= 0:
                    text += "|" + name(probe[step, pos])
                right = guess == final[pos]
                axis.text(step, pos, text, ha="center", va="center", fontsize=fontsize * 0.9, style="italic",
                          color="#2a7f2a" if right else "#b22222")
    axis.set_xlabel("denoising step (the canvas each forward pass saw)")
    axis.set_ylabel("target position")
    axis.set_title("committed tokens (colour = commit step); grey: not yet committed, with the model's guess "
                   "(green = already the final token, red = not)" + (" | probe guess" if probe is not None else ""),
                   fontsize=8)
    fig.colorbar(image, ax=axis, fraction=0.03, label="commit step")
    return fig
