"""Analysis 2: planning lead — how many steps before it commits a token is that token already known?

Per example and label position: the commit step ``c``, and the first step ``s`` from which a probe
(out-of-fold, so it never trained on that example) — and, separately, the model's own argmax at the
still-masked position — gives the final committed token and keeps giving it until ``c``. The lead
is ``c - s`` steps (0 when the token is only found at its commit), also as a fraction of the run.

Example:
    >>> result = planning_lead(ActivationDataset("runs/sudoku.h5"), label="blank")
    >>> result.tables["summary"]
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.analyses.common import deepest_site, default_label, describe_run, percent
from dlmprobe.analyses.plotting import CONDITION_COLOURS, figure
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.probes import ProbeGrid
from dlmprobe.store import ActivationDataset


def first_stable_step(correct: np.ndarray, commit: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """First step of ``steps`` from which ``correct`` holds at every step up to the commit.

    ``correct`` is (rows, len(steps)) bool, ``commit`` (rows,) the commit step. Steps at or after
    the commit do not count; a row never correct before its commit gets its commit step.
    """
    before = steps[None, :] < commit[:, None]
    ok = correct | ~before  # after the commit nothing is asked
    # Scan from the last step back: a step is "stable" if it and every later one are ok.
    stable = np.flip(np.logical_and.accumulate(np.flip(ok, axis=1), axis=1), axis=1) & before
    first = np.where(stable.any(axis=1), steps[stable.argmax(axis=1)], commit)
    return first


def planning_lead(
    data: ActivationDataset,
    label: str | None = None,
    site: str | None = None,
    folds: int = 5,
    predicted: np.ndarray | None = None,
    progress: bool = True,
) -> AnalysisResult:
    """The lead of the probe and of the model's argmax over the commit, per example and position.

    Args:
        data: a diffusion store (an autoregressive model commits each token at the step it first
            predicts it, so its own argmax has no lead by construction).
        label: the label whose positions are followed (default: the task's answer label).
        site: the probed site (default: the deepest stored one).
        predicted: the site's out-of-fold probe predictions if already computed
            (``ProbeGrid(label, sites=[site]).out_of_fold(data)[site]``), else they are computed here.
    """
    label = default_label(data, label)
    site = site or deepest_site(data.sites)
    if site not in data.sites:
        raise DlmprobeInputError(f"unknown site {site!r}; {data.path.name} has sites {data.sites}")
    slots, _ = data.label(label)
    n, k = slots.shape
    if predicted is None:
        grid = ProbeGrid(label=label, sites=[site], folds=folds, control=False, random_baseline=False, bootstrap=0)
        predicted = grid.out_of_fold(data, progress=progress)[site]
    if predicted.shape != (n, len(data.steps), k):
        raise ValueError(f"predicted must be (examples, stored steps, slots) = {(n, len(data.steps), k)}, got {predicted.shape}")
    probe = predicted  # (n, stored steps, k)
    positions = data.target_start + slots
    rows = np.arange(n)[:, None]
    final = data.canvas[rows, -1, positions]  # (n, k)
    commit = data.commit_step[rows, positions]  # (n, k)
    stored = np.asarray(data.steps)
    all_steps = np.arange(data.n_steps)
    argmax = data.prediction[rows[:, :, None], all_steps[None, None, :], positions[:, :, None]]  # (n, k, S)

    flat_commit = commit.reshape(-1)
    probe_correct = (probe.transpose(0, 2, 1) == final[:, :, None]).reshape(n * k, -1)
    argmax_correct = (argmax == final[:, :, None]).reshape(n * k, -1)
    first_probe = first_stable_step(probe_correct, flat_commit, stored)
    first_argmax = first_stable_step(argmax_correct, flat_commit, all_steps)
    per_row = pd.DataFrame({
        "example": np.repeat(np.arange(n), k), "slot": np.tile(np.arange(k), n),
        "position": positions.reshape(-1), "commit_step": flat_commit,
        "first_probe_step": first_probe, "first_argmax_step": first_argmax,
        "lead_probe": flat_commit - first_probe, "lead_argmax": flat_commit - first_argmax,
    })
    per_row["lead_probe_fraction"] = per_row["lead_probe"] / data.n_steps
    per_row["lead_argmax_fraction"] = per_row["lead_argmax"] / data.n_steps
    per_row = per_row[per_row["commit_step"] >= 0].reset_index(drop=True)  # never-masked positions
    summary = _summarise(per_row, data.n_steps, stored)
    return AnalysisResult(
        name="lead", title=f"Planning lead: {label} at {site}",
        table=summary, figure=_plot(per_row, data.n_steps), summary=_sentence(summary, label, site, stored),
        tables={"rows": per_row},
        meta={"run": describe_run(data), "label": label, "site": site, "stored_steps": stored.tolist()},
    )


def _summarise(rows: pd.DataFrame, n_steps: int, stored: np.ndarray) -> pd.DataFrame:
    records = []
    for reader in ("probe", "argmax"):
        lead = rows[f"lead_{reader}"]
        records.append({
            "reader": reader, "n": len(lead), "n_steps": n_steps,
            "mean_lead": lead.mean(), "median_lead": lead.median(),
            "mean_lead_fraction": rows[f"lead_{reader}_fraction"].mean(),
            "share_with_lead": (lead > 0).mean(),
            # Over positions with at least one step before their commit (a step-0 commit has none).
            "share_known_at_step0": (rows.loc[rows["commit_step"] > 0, f"first_{reader}_step"]
                                     == (stored[0] if reader == "probe" else 0)).mean(),
        })
    return pd.DataFrame(records)


def _plot(rows: pd.DataFrame, n_steps: int):
    fig, (hist, scatter) = figure(ncols=2, width=4.8)
    bins = np.arange(-0.5, n_steps + 0.5, 1)
    for reader in ("probe", "argmax"):
        hist.hist(rows[f"lead_{reader}"], bins=bins, alpha=0.55, color=CONDITION_COLOURS[reader],
                  label=f"{reader} (mean {rows[f'lead_{reader}'].mean():.1f})")
    hist.set_xlabel("lead: commit step − first step it is known (steps)")
    hist.set_ylabel("positions")
    hist.set_title("how far ahead the committed token is known")
    hist.legend(fontsize=8)
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(rows))
    for reader, marker in (("argmax", "o"), ("probe", "x")):
        scatter.scatter(rows["commit_step"] + jitter, rows[f"first_{reader}_step"] + jitter[::-1], s=6, alpha=0.3,
                        marker=marker, color=CONDITION_COLOURS[reader], label=reader)
    scatter.plot([0, n_steps], [0, n_steps], color="black", lw=0.8, label="known only at commit")
    scatter.set_xlabel("commit step")
    scatter.set_ylabel("first step known (stable)")
    scatter.set_title("known long before it is written?")
    scatter.legend(fontsize=8, markerscale=2)
    return fig


def _sentence(summary: pd.DataFrame, label: str, site: str, stored: np.ndarray) -> str:
    probe, argmax = (summary[summary["reader"] == r].iloc[0] for r in ("probe", "argmax"))
    text = (
        f"Over {int(probe['n'])} `{label}` positions, the model's own argmax at the still-masked position already "
        f"names the token it will commit, and keeps naming it, a mean {argmax['mean_lead']:.1f} steps "
        f"({percent(argmax['mean_lead_fraction'])} of the run) before the commit; {percent(argmax['share_with_lead'])} "
        f"of positions have a lead and {percent(argmax['share_known_at_step0'])} are known from step 0. "
        f"A linear probe on {site} gives a mean lead of {probe['mean_lead']:.1f} steps "
        f"({percent(probe['share_with_lead'])} with a lead)"
    )
    if len(stored) < int(probe["n_steps"]):
        text += f" (probe read at {len(stored)} stored steps only, so its lead is coarser)"
    return text + "."
