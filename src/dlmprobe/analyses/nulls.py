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
:func:`matching_scale`. :func:`edit_conditions` builds a causal check's edits that way: ablating
the probe's and LEACE's subspaces, steering in them, and beside each ablation the controls of
:data:`CONTROLS` scaled to its displacement (and steering along the probe at LEACE's).

Example:
    >>> lead = planning_lead(data, label="cell").tables["rows"]
    >>> commit = lead["commit_step"].to_numpy()
    >>> schedule_nulls(commit, data.steps, {"probe": lead["lead_probe"].to_numpy()}, strata=difficulty)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.probes.subspaces import (
    Subspace,
    leace_subspace,
    pca_subspace,
    probe_subspace,
    random_subspace,
)

#: Subspaces a causal check edits to test whether the model uses the label.
EFFECTS: tuple[str, ...] = ("probe", "leace")
#: Controls of the same rank, each scaled to the displacement of the effect it sits beside: a random
#: subspace, the top principal directions left after LEACE (no linear label information) and LEACE
#: fitted on shuffled labels (an eraser of the same form that targets no label).
CONTROLS: tuple[str, ...] = ("random", "pca", "shuffled")


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


@dataclass
class EditCondition:
    """One edit of a causal check: ``h - scale · α · write readᵀ (h - towards)``.

    ``towards`` is the training mean for ``intervention="ablate"`` and a class mean for
    ``"steer"``. ``matched_to`` names the ablation whose mean displacement ``scale`` matches (""
    for an edit at its natural size, ``scale = 1``).
    """

    intervention: str
    subspace: str
    space: Subspace
    matched_to: str = ""
    scale: float = 1.0

    @property
    def key(self) -> tuple[str, str, str]:
        return self.intervention, self.subspace, self.matched_to

    def move(self, h: Float[Tensor, "row d"], towards: Float[Tensor, "row d"] | Float[Tensor, " d"],
             alpha: float = 1.0) -> Float[Tensor, "row d"]:
        return self.space.move(h, towards, alpha * self.scale)

    def to(self, device: torch.device | str) -> EditCondition:
        return EditCondition(self.intervention, self.subspace, self.space.to(device), self.matched_to, self.scale)


def edit_conditions(X_train: Float[np.ndarray, "row d"], y_train: Int[np.ndarray, " row"],
                    coef: Float[np.ndarray, "cls d"], X_check: Float[np.ndarray, "check d"],
                    steer_towards: Float[np.ndarray, "check d"], effects: Sequence[str] = EFFECTS,
                    seed: int = 0, alpha: float = 1.0) -> list[EditCondition]:
    """A causal check's edits, each control scaled to the displacement of the effect it controls.

    Args:
        X_train, y_train: the rows the probe (``coef``, one row per class of ``np.unique(y_train)``),
            LEACE and the controls are fitted on; ablation moves towards their mean.
        X_check: rows the displacements are measured and matched on (held-out activations).
        steer_towards: per ``X_check`` row, the class mean steering moves it towards.
        effects: which of :data:`EFFECTS` to ablate and steer in.
        seed: seeds the random basis and the shuffled labels.
        alpha: steering strength (1: the subspace component of the class mean).

    Returns, per effect, its ablation and its steering at natural size, then per effect and
    control of :data:`CONTROLS` the control ablation scaled to that effect's ablation, then (if
    both effects are asked for) steering along the probe scaled to LEACE's ablation.
    """
    effects = list(dict.fromkeys(effects))
    if not effects or any(e not in EFFECTS for e in effects):
        raise DlmprobeInputError(f"effects must be some of {EFFECTS}, got {effects}")
    X_train, y_train = np.asarray(X_train, dtype=np.float64), np.asarray(y_train)
    rank = len(np.unique(y_train)) - 1
    mean = torch.as_tensor(X_train.mean(axis=0), dtype=torch.float32)
    check = torch.as_tensor(X_check, dtype=torch.float32)
    towards = torch.as_tensor(steer_towards, dtype=torch.float32)
    leace = leace_subspace(X_train, y_train)
    spaces = {"probe": probe_subspace(coef), "leace": leace,
              "random": random_subspace(X_train.shape[1], rank, seed),
              "pca": pca_subspace(leace.move(torch.as_tensor(X_train, dtype=torch.float32), mean).numpy(), rank),
              "shuffled": leace_subspace(X_train, np.random.default_rng(seed).permutation(y_train))}

    def size(condition: EditCondition) -> tuple[np.ndarray, np.ndarray]:
        target = mean if condition.intervention == "ablate" else towards
        return check.numpy(), condition.move(check, target, alpha).numpy()

    conditions = [EditCondition(kind, name, spaces[name]) for name in effects for kind in ("ablate", "steer")]
    reach = {c.subspace: displacement(*size(c)) for c in conditions if c.intervention == "ablate"}
    for name in effects:
        for control in CONTROLS:
            natural = EditCondition("ablate", control, spaces[control], name)
            natural.scale = matching_scale(*size(natural), reach[name])
            conditions.append(natural)
    if set(EFFECTS) <= set(effects):
        steer = EditCondition("steer", "probe", spaces["probe"], "leace")
        steer.scale = matching_scale(*size(steer), reach["leace"])
        conditions.append(steer)
    return conditions


class MeasuredEdit:
    """An edit ``(h, example, position) -> h'`` that also sums the norm of what it changes: :attr:`mean` is
    its mean displacement per edited activation while sampling."""

    def __init__(self, edit: Callable[[Tensor, Tensor, Tensor], Tensor]):
        self.edit, self.total, self.rows = edit, 0.0, 0

    def __call__(self, h: Tensor, example: Tensor, position: Tensor) -> Tensor:
        edited = self.edit(h, example, position)
        self.total += float((edited - h).norm(dim=-1).sum())
        self.rows += len(h)
        return edited

    @property
    def mean(self) -> float:
        return self.total / self.rows if self.rows else float("nan")


def beside_controls(table: pd.DataFrame) -> pd.DataFrame:
    """Each effect of a causal-check table beside the strongest control matched to its displacement.

    ``table`` has a row per (``intervention``, ``subspace``, ``matched_to``, ``start_step``) with the
    rates ``changed`` and ``solved``; effects are compared with controls of the same start step.

    An ablation's controls are the ones scaled to it; steering along the probe at LEACE's
    displacement sits beside LEACE's. ``control`` changes the most tokens (``control_changed``),
    ``control_solved`` is the lowest solve rate of any of them. ``changed_beyond_control`` is the
    part of ``changed`` no control of that size reaches (the label-specific part),
    ``solve_drop_beyond_control`` the same for the solve rate; NaN for controls and for steering
    at its natural size.
    """
    table = table.copy()
    columns = {"control": None, "control_changed": np.nan, "control_solved": np.nan,
               "changed_beyond_control": np.nan, "solve_drop_beyond_control": np.nan}
    for column, empty in columns.items():
        table[column] = pd.Series([empty] * len(table), index=table.index, dtype=object if empty is None else float)
    is_control = table["subspace"].isin(CONTROLS)
    for index, row in table[~is_control].iterrows():
        reference = row.subspace if row.intervention == "ablate" else row.matched_to
        if not reference:
            continue
        rivals = table[is_control & (table["matched_to"] == reference) & (table["start_step"] == row.start_step)]
        strongest, lowest = rivals.loc[rivals["changed"].idxmax()], rivals["solved"].min()
        table.loc[index, list(columns)] = [strongest.subspace, strongest.changed, lowest,
                                           row.changed - strongest.changed, lowest - row.solved]
    return table
