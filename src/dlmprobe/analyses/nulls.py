"""Nulls that say how large an effect the setup allows: the commit schedule's lead, an edit's size.

**Planning lead against the schedule.** A position committed at step 18 can show a lead of at
most 18 steps, whatever the model knows; one committed at step 0 none. So a mean lead reads only
against what the same commit schedule allows: the lead of an *oracle* reader that names every
answer from the first recorded step, and of an *uninformed* one that names nothing before the
commit (0 by definition of the lead). :func:`schedule_nulls` reports both beside the observed lead
and the observed lead as a fraction of the oracle's, per stratum so that givens-copies (sudoku
difficulty 0) are reported apart.

**Displacement.** A causal edit that moves activations further changes more, label or not:
compare edits of equal mean per-row norm (:func:`displacement`), scaling a control edit with
:func:`matching_scale`.

Example:
    >>> lead = planning_lead(data, label="cell").tables["rows"]
    >>> commit = lead["commit_step"].to_numpy()
    >>> schedule_nulls(commit, data.steps, {"probe": lead["lead_probe"].to_numpy()}, strata=difficulty)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
from jaxtyping import Float, Int

from dlmprobe.errors import DlmprobeInputError


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


def null_leads(commit: Int[np.ndarray, " row"], steps: Int[np.ndarray, " step"]) -> tuple[np.ndarray, np.ndarray]:
    """The lead of the oracle and of the uninformed reader at each row, read at ``steps`` as the probe is.

    The lead is the one :func:`~dlmprobe.analyses.lead.planning_lead` measures (commit step minus
    :func:`first_stable_step`, the first step from which the reader is right until the commit), so the nulls share its
    granularity: with coarse recorded steps the oracle's lead is coarse too.
    """
    commit, steps = np.asarray(commit), np.asarray(steps)
    if steps.ndim != 1 or not len(steps) or np.any(np.diff(steps) <= 0):
        raise DlmprobeInputError(f"expected increasing recorded steps, got {steps.tolist()}")
    always = np.ones((len(commit), len(steps)), dtype=bool)
    oracle = commit - first_stable_step(always, commit, steps)
    uninformed = commit - first_stable_step(~always, commit, steps)
    return oracle, uninformed


def schedule_nulls(commit: Int[np.ndarray, " row"], steps: Int[np.ndarray, " step"],
                   observed: Mapping[str, np.ndarray] | None = None, strata: np.ndarray | None = None,
                   name_of: Callable[[int], str] = str) -> pd.DataFrame:
    """Observed mean leads beside the schedule's nulls, overall and per stratum.

    Args:
        commit: each row's commit step (rows with a negative commit step, never masked, are left out).
        steps: the steps the readers were read at (``data.steps`` for a probe, all steps for the argmax).
        observed: reader name -> each row's lead (e.g. ``lead_probe`` of ``planning_lead``).
        strata: each row's stratum (e.g. sudoku difficulty: 0 = a copy of a given), named by ``name_of``.

    One row per stratum (first ``"all"``): ``n``, ``mean_commit``, ``oracle_lead``,
    ``uninformed_lead`` and per reader ``<reader>_lead`` and ``<reader>_of_oracle``, its mean lead
    over the oracle's (NaN where the schedule allows none).
    """
    commit = np.asarray(commit)
    observed = {name: np.asarray(lead) for name, lead in (observed or {}).items()}
    strata = None if strata is None else np.asarray(strata)
    for name, values in {**observed, **({} if strata is None else {"strata": strata})}.items():
        if values.shape != commit.shape:
            raise DlmprobeInputError(f"{name} must have one value per row {commit.shape}, got {values.shape}")
    oracle, uninformed = null_leads(commit, steps)
    masked = commit >= 0
    groups = [("all", masked)]
    if strata is not None:
        groups += [(name_of(int(v)), masked & (strata == v)) for v in np.unique(strata[masked])]
    records = []
    for name, inside in groups:
        allowed = oracle[inside].mean() if inside.any() else np.nan
        record = {"stratum": name, "n": int(inside.sum()), "mean_commit": commit[inside].mean() if inside.any() else np.nan,
                  "oracle_lead": allowed, "uninformed_lead": uninformed[inside].mean() if inside.any() else np.nan}
        for reader, lead in observed.items():
            mean = lead[inside].mean() if inside.any() else np.nan
            record[f"{reader}_lead"] = mean
            record[f"{reader}_of_oracle"] = mean / allowed if allowed > 0 else np.nan
        records.append(record)
    return pd.DataFrame(records)


def displacement(before: Float[np.ndarray, "row d"], after: Float[np.ndarray, "row d"]) -> float:
    """Mean over rows of the L2 norm of ``after - before``: how far an edit moves an activation."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape or before.ndim != 2:
        raise DlmprobeInputError(f"expected two (rows, d) arrays of one shape, got {before.shape} and {after.shape}")
    return float(np.linalg.norm(after - before, axis=1).mean()) if len(before) else 0.0


def matching_scale(before: Float[np.ndarray, "row d"], after: Float[np.ndarray, "row d"], target: float) -> float:
    """The factor ``s`` for which ``before + s * (after - before)`` has mean displacement ``target``.

    Scale a control edit (random or PCA subspace, shuffled-label LEACE) by it to match the
    displacement of the edit it controls for; the norm is linear in ``s``, so the match is exact.
    """
    if target < 0:
        raise DlmprobeInputError(f"expected a target displacement >= 0, got {target}")
    current = displacement(before, after)
    if current == 0:
        raise DlmprobeInputError("the edit moves no row: no scale can give it a displacement")
    return target / current
