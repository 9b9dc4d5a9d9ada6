"""Analysis 2: planning lead — how many steps before it commits a token is that token already known?

Per example and label position: the commit step ``c``, and the first step ``s`` from which a probe
(out-of-fold, so it never trained on that example) — and, separately, the model's own argmax at the
still-masked position and the logit lens at the probed site — gives the final committed token and
keeps giving it until ``c``. The lead is ``c - s`` steps (0 when the token is only found at its
commit), also as a fraction of the run.

A lead reads only against what the commit schedule allows: a position committed at step 3 can
lead by 3 steps at most. ``tables["schedule"]`` sets every reader's mean lead beside the lead of
an oracle that names every answer from the first step it is read at, and of an uninformed reader
(0), and gives the observed lead as a fraction of the oracle's; per difficulty stratum too, so
that copies of givens are reported apart (:func:`~dlmprobe.analyses.nulls.schedule_nulls`).

Example:
    >>> result = planning_lead(ActivationDataset("runs/sudoku.h5"), label="blank")
    >>> result.tables["summary"]
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dlmprobe.analyses.common import (
    deepest_site,
    default_label,
    describe_run,
    difficulty_of,
    percent,
)
from dlmprobe.analyses.nulls import first_stable_step, schedule_nulls
from dlmprobe.analyses.plotting import CONDITION_COLOURS, figure
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.probes import ProbeGrid
from dlmprobe.probes.lens import ModelReaders, store_readers
from dlmprobe.store import ActivationDataset

COLOURS = {**CONDITION_COLOURS, "lens": "#8c564b"}


def planning_lead(
    data: ActivationDataset,
    label: str | None = None,
    site: str | None = None,
    folds: int = 5,
    predicted: np.ndarray | None = None,
    progress: bool = True,
    readers: ModelReaders | None = None,
) -> AnalysisResult:
    """The lead of the probe, the logit lens and the model's argmax over the commit, against the schedule's nulls.

    Args:
        data: a diffusion store (an autoregressive model commits each token at the step it first
            predicts it, so its own argmax has no lead by construction).
        label: the label whose positions are followed (default: the task's answer label).
        site: the probed site (default: the deepest stored one).
        predicted: the site's out-of-fold probe predictions if already computed
            (``ProbeGrid(label, sites=[site]).out_of_fold(data)[site]``), else they are computed here.
        readers: the model's read-out for the logit lens (default: the built-in model the store names;
            without one the lens is left out and ``meta`` says why).
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
        raise DlmprobeInputError(f"predicted must be (examples, stored steps, slots) = {(n, len(data.steps), k)}, got {predicted.shape}")
    probe = predicted  # (n, stored steps, k)
    positions = data.target_start + slots
    rows = np.arange(n)[:, None]
    final = data.canvas[rows, -1, positions]  # (n, k)
    commit = data.commit_step[rows, positions]  # (n, k)
    stored = np.asarray(data.steps)
    all_steps = np.arange(data.n_steps)
    argmax = data.prediction[rows[:, :, None], all_steps[None, None, :], positions[:, :, None]]  # (n, k, S)

    flat_commit = commit.reshape(-1)
    correct = {"probe": probe.transpose(0, 2, 1) == final[:, :, None], "argmax": argmax == final[:, :, None]}
    readers = readers if readers is not None else store_readers(data)
    if readers.readout is not None:
        # A shifted model (Dream) predicts a position from the hidden state before it.
        read_at = data.position_index(positions + int(data.config.get("read_offset", 0)))
        lens = np.stack([readers.readout.predict(data.activations(site, int(s))[rows, read_at]
                                                 .reshape(n * k, -1), exclude=[data.mask_id]).reshape(n, k)
                         for s in stored], axis=2)  # (n, k, stored steps)
        correct["lens"] = lens == final[:, :, None]
    per_row = pd.DataFrame({"example": np.repeat(np.arange(n), k), "slot": np.tile(np.arange(k), n),
                            "position": positions.reshape(-1), "commit_step": flat_commit})
    found = difficulty_of(data)
    if found is not None:
        per_row["difficulty"] = found[0][rows, slots].reshape(-1)
        per_row["stratum"] = [found[1](int(v)) for v in per_row["difficulty"]]
    for reader, hits in correct.items():
        first = first_stable_step(hits.reshape(n * k, -1), flat_commit, all_steps if reader == "argmax" else stored)
        per_row[f"first_{reader}_step"] = first
        per_row[f"lead_{reader}"] = flat_commit - first
        per_row[f"lead_{reader}_fraction"] = per_row[f"lead_{reader}"] / data.n_steps
    per_row = per_row[per_row["commit_step"] >= 0].reset_index(drop=True)  # never-masked positions
    readers_run = list(correct)
    summary = _summarise(per_row, data.n_steps, stored, readers_run)
    schedule = _schedule(per_row, stored, data.n_steps, readers_run, found[1] if found is not None else str)
    return AnalysisResult(
        name="lead", title=f"Planning lead: {label} at {site}, against the commit schedule",
        table=summary, figure=_plot(per_row, data.n_steps, readers_run),
        summary=_sentence(summary, schedule, label, site, stored, data.n_examples),
        tables={"rows": per_row, "schedule": schedule},
        meta={"run": describe_run(data), "label": label, "site": site, "stored_steps": stored.tolist(),
              "readers_left_out": readers.note if "lens" not in correct else ""},
    )


def _summarise(rows: pd.DataFrame, n_steps: int, stored: np.ndarray, readers: list[str]) -> pd.DataFrame:
    records = []
    for reader in readers:
        lead = rows[f"lead_{reader}"]
        records.append({
            "reader": reader, "n": len(lead), "n_steps": n_steps,
            "read_at": "every step" if reader == "argmax" else f"{len(stored)} stored steps",
            "mean_lead": lead.mean(), "median_lead": lead.median(),
            "mean_lead_fraction": rows[f"lead_{reader}_fraction"].mean(),
            "share_with_lead": (lead > 0).mean(),
            # Over positions with at least one step before their commit (a step-0 commit has none).
            "share_known_at_step0": (rows.loc[rows["commit_step"] > 0, f"first_{reader}_step"]
                                     == (0 if reader == "argmax" else stored[0])).mean(),
        })
    return pd.DataFrame(records)


def _schedule(rows: pd.DataFrame, stored: np.ndarray, n_steps: int, readers: list[str], name_of) -> pd.DataFrame:
    """Per reader and stratum: its mean lead beside the schedule's oracle and uninformed leads,
    read at the steps that reader is read at (the argmax at every step, the others at the stored ones)."""
    strata = rows["difficulty"].to_numpy() if "difficulty" in rows else None
    commit = rows["commit_step"].to_numpy()
    parts = []
    for reader in readers:
        steps = np.arange(n_steps) if reader == "argmax" else stored
        table = schedule_nulls(commit, steps, {"observed": rows[f"lead_{reader}"].to_numpy()}, strata, name_of)
        parts.append(table.rename(columns={"observed_lead": "lead", "observed_of_oracle": "of_oracle"}).assign(reader=reader))
    out = pd.concat(parts, ignore_index=True)
    return out[["reader"] + [c for c in out.columns if c != "reader"]]


def _plot(rows: pd.DataFrame, n_steps: int, readers: list[str]):
    fig, (hist, scatter) = figure(ncols=2, width=4.8)
    bins = np.arange(-0.5, n_steps + 0.5, 1)
    for reader in readers:
        hist.hist(rows[f"lead_{reader}"], bins=bins, alpha=0.45, color=COLOURS[reader],
                  label=f"{reader} (mean {rows[f'lead_{reader}'].mean():.1f})")
    hist.hist(rows["commit_step"], bins=bins, histtype="step", color="black",
              label=f"most the schedule allows (mean {rows['commit_step'].mean():.1f})")
    hist.set_xlabel("lead: commit step − first step it is known (steps)")
    hist.set_ylabel("positions")
    hist.set_title("how far ahead the committed token is known")
    hist.legend(fontsize=7)
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(rows))
    for reader, marker in (("argmax", "o"), ("probe", "x"), ("lens", "+")):
        if reader in readers:
            scatter.scatter(rows["commit_step"] + jitter, rows[f"first_{reader}_step"] + jitter[::-1], s=6, alpha=0.3,
                            marker=marker, color=COLOURS[reader], label=reader)
    scatter.plot([0, n_steps], [0, n_steps], color="black", lw=0.8, label="known only at commit")
    scatter.set_xlabel("commit step")
    scatter.set_ylabel("first step known (stable)")
    scatter.set_title("known long before it is written?")
    scatter.legend(fontsize=8, markerscale=2)
    return fig


def _sentence(summary: pd.DataFrame, schedule: pd.DataFrame, label: str, site: str, stored: np.ndarray,
              n_examples: int) -> str:
    by = summary.set_index("reader")
    overall = schedule[schedule["stratum"] == "all"].set_index("reader")
    names = {"argmax": "the model's own argmax at the still-masked position (read at every step)",
             "probe": f"a linear probe on {site} (out-of-fold, read at {len(stored)} stored steps)",
             "lens": f"the logit lens at {site} (read at the stored steps)"}
    text = (f"Over {int(by.loc['argmax', 'n'])} `{label}` positions of {n_examples} examples, the commit schedule "
            f"alone allows a mean lead of at most {overall.loc['argmax', 'oracle_lead']:.1f} steps (an oracle that "
            f"names every answer from step 0 and keeps naming it; one that knows nothing until the commit has 0). ")
    parts = []
    for reader in by.index:
        row, null = by.loc[reader], overall.loc[reader]
        parts.append(f"{names[reader]}: mean lead {row['mean_lead']:.1f} steps, {percent(null['of_oracle'])} of the "
                     f"{null['oracle_lead']:.1f} the schedule allows at those steps; {percent(row['share_known_at_step0'])} "
                     f"of positions committed after step 0 are named from the first step read")
    text += "; ".join(parts)[0].upper() + "; ".join(parts)[1:] + "."
    strata = schedule[(schedule["stratum"] != "all") & schedule["reader"].isin(["argmax", "probe"])]
    if len(strata):
        text += " By difficulty (argmax / probe lead as a share of what the schedule allows; mean commit step): " + "; ".join(
            f"{stratum} ({int(group['n'].iloc[0])} positions): {' / '.join(percent(v) for v in group.set_index('reader').reindex(['argmax', 'probe'])['of_oracle'])}"
            f"; commit {group['mean_commit'].iloc[0]:.1f}"
            for stratum, group in strata.groupby("stratum", sort=False)) + "."
    return text
