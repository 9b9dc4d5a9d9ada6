"""Causal check of a probe: does the model use what the probe reads, or only carry it?

A probe that decodes, from a still-masked position, the token the model will commit there shows
that the information is present, not that the model acts on it (Nanda et al. 2023 intervened on
Othello board directions for this reason). This analysis fits one multinomial probe for a label
on a stored run and samples fresh puzzles again with a hook on the probed site that, from
denoising step ``t`` on, edits the activation ``h`` of every label position still masked, within
a rank ``C - 1`` subspace (``C`` classes):

* ``ablate``: ``h - P (h - μ)``, ``μ`` the mean training activation: the subspace's component is
  set to the mean's, everything else is kept;
* ``steer``: ``h - α P (h - m_c)``, ``m_c`` the mean training activation of class ``c``, a seeded
  random class other than the token the clean run commits there.

``P`` projects onto one of these subspaces, each of rank ``C - 1``:

* ``probe``: the probe's class directions in activation space, centred over classes and
  orthonormalised (``P = U Uᵀ``). Removing it blinds this probe, not necessarily the model: probe
  weights are filters (Haufe et al. 2014), which can lie in low-variance directions the model
  never reads while the information itself stays elsewhere;
* ``leace``: LEACE (Belrose et al. 2023, arXiv 2306.03819), the least-squares edit after which no
  linear classifier reads the label better than a constant (an oblique projection of the same
  rank). It asks whether the model uses the linearly decodable information at all;
* controls (ablated only), each scaled to the mean displacement (norm of the edit per row) of the
  ablation it sits beside, since an edit that moves activations further changes more, label or
  not: ``random`` (a random orthonormal basis), ``pca`` (the top principal directions left after
  LEACE, which carry no linear label information) and ``shuffled`` (LEACE fitted on shuffled
  labels); steering along the probe is also run at LEACE's displacement
  (:func:`~dlmprobe.analyses.nulls.edit_conditions`).

What the model commits is compared with a clean run of the same puzzles and sampler: the fraction
of edited positions whose token changes, the exact-solve rate, and for ``steer`` the fraction that
commit ``c`` (chance ``1 / C``), each with a 95% bootstrap interval over puzzles, and each effect
beside its strongest displacement-matched control (the excess is the label-specific part). On the
stored held-out rows: what the probe reads after the edit, and what a fresh probe trained on
ablated rows reads (whether the label is still linearly there). Up to step
``t`` an edited run is the clean one, so the conditions (intervention, subspace) that start at
``t`` branch off the clean run there and are sampled together, each row carrying its condition
(:func:`sample_conditions`); the sampler must be deterministic (temperature 0).

A Hugging Face model's text run (``dlmprobe cache --model FOLDER --task ...``) is checked the same
way on fresh examples of its text task and canvas template, edited through the handle's site
names. On a model with shifted logits (Dream) a position's token is read from the state one to its
left, so an edit at the probed position acts only through what later positions attend to.

Example:
    >>> ckpt = load_model("sudoku-diffusion")
    >>> data = ActivationDataset("runs/sudoku.h5")      # dlmprobe cache --model sudoku-diffusion ...
    >>> result = causal_check(ckpt, data, "blocks.3.hook_resid_post", label="blank")
    >>> result.table[["intervention", "subspace", "matched_to", "displacement_run", "changed", "changed_beyond_control"]]
    >>> print(result.summary)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from dlmprobe.analyses.causal_report import causal_figure, causal_summary
from dlmprobe.analyses.nulls import EFFECTS, EditCondition, MeasuredEdit, beside_controls, edit_conditions
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.analyses.setting import Setting, store_setting
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.hooks import ActivationEditor, Edit, layer_of
from dlmprobe.models import Checkpoint, ModelHandle
from dlmprobe.probes.linear import LinearProbe
from dlmprobe.probes.subspaces import Subspace
from dlmprobe.sampling import DiffusionSamplerConfig, Trajectory
from dlmprobe.store import ActivationDataset

SUBSPACES: tuple[str, ...] = EFFECTS


def ablation_edit(subspace: Subspace | EditCondition, centre: Float[Tensor, " d"]) -> Edit:
    """Every edited row gets the subspace component of ``centre`` (a condition: times its scale)."""
    return lambda h, example, position: subspace.move(h, centre)


def steering_edit(subspace: Subspace | EditCondition, class_means: Float[Tensor, "cls d"],
                  goal: Int[Tensor, "example pos"], alpha: float = 1.0) -> Edit:
    """Row (example, position) moves ``alpha`` of the way to the subspace component of ``class_means[goal[example, position]]``."""
    return lambda h, example, position: subspace.move(h, class_means[goal[example, position]], alpha)


def sample_conditions(setting: Setting, site: str, where: Bool[Tensor, "example pos"],
                      conditions: Sequence[tuple[Edit, int]], sampler: DiffusionSamplerConfig, clean: Trajectory,
                      batch_size: int = 256) -> list[Trajectory]:
    """Sample the setting's examples once per condition ``(edit, start_step)``, conditions sharing batches.

    Under each condition the canvas positions ``where[example]`` still masked in the canvas a step
    reads go through ``edit`` (given example indices) at ``site`` (a site name of the setting's
    handle) from ``start_step`` on. Until then a condition's run is the ``clean`` run with
    ``sampler`` (deterministic: temperature 0), so the conditions that start at step ``t`` branch
    off it at ``t`` and run together, one row per (condition, example), each row carrying its condition.
    """
    n = len(setting.canvas)
    runs: dict[int, Trajectory] = {}
    for t in sorted({t for _, t in conditions}):
        group = [c for c, (_, start) in enumerate(conditions) if start == t]

        def edit(h: Tensor, rows: Tensor, positions: Tensor, group: list[int] = group) -> Tensor:
            member, example = rows // n, rows % n
            edited = torch.empty_like(h)
            for m in member.unique().tolist():
                chosen = member == m
                edited[chosen] = conditions[group[m]][0](h[chosen], example[chosen], positions[chosen])
            return edited

        with ActivationEditor(setting.handle, site, edit, where.repeat(len(group), 1), start_step=t,
                              mask_id=setting.mask_id) as editor:
            run = setting.sample(sampler, batch_size, observers=[editor], copies=len(group),
                                 branch=Trajectory.concat([clean] * len(group)), first_step=t)
        runs.update({c: run[m * n : (m + 1) * n] for m, c in enumerate(group)})
    return [runs[c] for c in range(len(conditions))]


def causal_check(
    checkpoint: Checkpoint | ModelHandle,
    data: ActivationDataset,
    site: str,
    label: str | None = None,
    start_steps: Sequence[int] | None = None,
    n: int = 200,
    seed: int = 1,
    alpha: float = 1.0,
    batch_size: int = 256,
    progress: bool = True,
    subspaces: Sequence[str] = SUBSPACES,
    sampler: DiffusionSamplerConfig | None = None,
) -> AnalysisResult:
    """Ablate and steer a probe's subspace while sampling fresh puzzles; measure what the model commits.

    Args:
        checkpoint: the diffusion model ``data`` was recorded from: a built-in checkpoint, or for a
            text run (``dlmprobe cache --model FOLDER --task ...``) the Hugging Face model's handle,
            sampled on fresh examples of the stored text task and canvas template.
        data: a store holding ``site`` at the label's positions.
        site: the hook name to probe and edit, e.g. ``"blocks.3.hook_resid_post"``.
        label: the label whose still-masked positions are probed and edited (default: the task's
            answer label; ``"blank"`` for sudoku's cells to fill).
        start_steps: denoising steps from which the edits act (default 0, 25%, 50%, 75% of the run).
        n: fresh examples of the eval split, drawn with ``seed`` (not the store's seed).
        seed: also seeds the probe's train/test split, the random basis and the steering classes.
        alpha: steering strength; 1 gives the subspace component of the class mean.
        subspaces: which of ``"probe"`` and ``"leace"`` to ablate and steer (the controls are always
            ablated beside each, at its displacement).
        sampler: the fresh runs' sampler (default: the store's); it must be deterministic
            (temperature 0), as the store's need not be (a store sampled at temperature 1 still
            gives the probe more than one class from a model that is near-constant at temperature 0).

    The probe is fitted on 80% of the store's examples (rows pooled over the stored steps, the
    positions still masked, target = the token finally committed) and scored on the rest; the
    means and LEACE use the same training rows. One row of the table per (intervention, subspace,
    ``matched_to``, start step), ``matched_to`` naming the ablation a control's displacement is
    scaled to; ``displacement_run`` is measured while sampling, ``displacement`` on held-out stored
    rows; ``tables["examples"]`` holds the per-puzzle counts behind it.
    """
    began = time.perf_counter()
    if checkpoint.kind != "diffusion":
        raise DlmprobeInputError(f"causal_check needs a diffusion model, got a {checkpoint.kind} one")
    if site not in data.sites:
        raise DlmprobeInputError(f"site {site!r} is not in the store {data.path}; stored sites: {data.sites}")
    stored_model = data.config.get("model", {})
    setting = store_setting(checkpoint, data, n, seed)
    subspaces = list(dict.fromkeys(subspaces))
    unknown = [s for s in subspaces if s not in SUBSPACES]
    if unknown or not subspaces:
        raise DlmprobeInputError(f"subspaces must be some of {SUBSPACES}, got {list(subspaces)}")
    label = label or data.config["task"].get("answer_label") or setting.task.answer_label
    if label not in data.label_names:
        raise DlmprobeInputError(f"unknown label {label!r}; the store has labels {data.label_names}")
    sampler = sampler or DiffusionSamplerConfig(**data.config["sampler"])
    if sampler.temperature > 0:
        raise DlmprobeInputError(f"causal_check compares edited and clean runs of a deterministic sampler: got "
                                 f"temperature {sampler.temperature}, expected 0 (pass a sampler at temperature 0)")
    n_steps = sampler.resolve(setting.gen_length)[0]
    if start_steps is None:
        start_steps = [int(f * n_steps) for f in (0.0, 0.25, 0.5, 0.75)]
    start_steps = sorted({int(t) for t in start_steps})
    if not start_steps or start_steps[0] < 0 or start_steps[-1] >= n_steps:
        raise DlmprobeInputError(f"start_steps must lie in [0, {n_steps}), got {list(start_steps)}")
    cache = data.config.get("cache", {})
    if cache.get("split") == "eval" and cache.get("seed") == seed:
        raise DlmprobeInputError(f"seed {seed} draws the store's own puzzles; pass another seed")

    fit = _fit_probe(data, site, label, seed)
    classes = fit.probe.classes_
    device = setting.handle.device
    check_goal = _other_classes(np.searchsorted(classes, fit.y_test), len(classes), seed)
    conditions = edit_conditions(fit.X_train, fit.y_train, fit.probe.coef_, fit.X_test, fit.class_means[check_goal],
                                 subspaces, seed, alpha)
    diagnostics = _diagnostics(fit, conditions, check_goal, alpha)

    where = setting.where(label)
    bar = tqdm(total=2, disable=not progress, desc=f"causal {site}", unit="run")
    clean = setting.sample(sampler, batch_size)
    bar.update(1)
    final = clean.canvases[:, -1]
    goal = _steering_goals(final, where, classes, seed)
    mean, class_means = (torch.as_tensor(a, dtype=torch.float32, device=device) for a in (fit.mean, fit.class_means))
    runs_of = [(t, condition.to(device)) for t in start_steps for condition in conditions]
    edits = [MeasuredEdit(ablation_edit(c, mean) if c.intervention == "ablate"
                       else steering_edit(c, class_means, goal.to(device), alpha)) for _, c in runs_of]
    runs = sample_conditions(setting, site, where, [(edit, t) for edit, (t, _) in zip(edits, runs_of)], sampler,
                             clean, batch_size)
    bar.update(1)
    bar.close()
    clean_solved = np.array(_solved(setting, clean))
    goal_token = torch.as_tensor(classes)[goal.clamp_min(0)]
    per_example, moved = [], []
    for (t, c), run, edit in zip(runs_of, runs, edits):
        edited = where & (clean.canvases[:, t] == setting.mask_id)  # the runs agree up to step t
        output = run.canvases[:, -1]
        key = {"intervention": c.intervention, "subspace": c.subspace, "matched_to": c.matched_to, "start_step": t}
        per_example.append(pd.DataFrame({
            **key, "example": np.arange(n),
            "n_edited": edited.sum(1).numpy(), "n_changed": (edited & (output != final)).sum(1).numpy(),
            "n_steered": (edited & (output == goal_token)).sum(1).numpy(),
            "solved": _solved(setting, run), "clean_solved": clean_solved,
        }))
        moved.append({**key, "displacement_run": edit.mean})
    examples_table = pd.concat(per_example, ignore_index=True)
    keys = ["intervention", "subspace", "matched_to"]
    table = (_summarise(examples_table, len(classes), seed).merge(diagnostics, on=keys)
             .merge(pd.DataFrame(moved), on=[*keys, "start_step"]))
    table = beside_controls(table)
    meta = {
        "model": stored_model.get("name"), "store": str(data.path), "site": site, "layer": layer_of(site),
        "label": label, "n": n, "seed": seed, "alpha": alpha, "start_steps": start_steps, "n_steps": n_steps,
        "sampler": sampler.to_dict(), "subspaces": list(dict.fromkeys(subspaces)), "classes": classes.tolist(),
        "ranks": {c.subspace: c.space.rank for c in conditions},
        "probe_accuracy": fit.accuracy, "probe_train_rows": len(fit.y_train), "probe_test_rows": len(fit.y_test),
        "activation_norm": float(np.linalg.norm(fit.X_test - fit.mean, axis=1).mean()),
        "clean_solved": float(clean_solved.mean()),
        "puzzles_in_store": len(set(data.uid) & set(setting.uids)),
        "seconds": round(time.perf_counter() - began, 1),
    }
    return AnalysisResult(
        name="causal",
        title=f"Causal check of the {label!r} probe at {site}",
        table=table,
        figure=causal_figure(table, meta),
        summary=causal_summary(table, meta),
        tables={"examples": examples_table},
        meta=meta,
    )


@dataclass
class _ProbeFit:
    probe: LinearProbe
    accuracy: float
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    class_means: np.ndarray  # (classes, d), in the order of probe.classes_


def _fit_probe(data: ActivationDataset, site: str, label: str, seed: int) -> _ProbeFit:
    """One probe on the label's still-masked rows pooled over steps; 20% of examples held out."""
    parts = [data.get(site, int(step), "label", label=label, target="output", only_masked=True) for step in data.steps]
    X, y, groups = (np.concatenate(column) for column in zip(*parts))
    held_out = np.random.default_rng(seed).permutation(data.n_examples)[: max(1, data.n_examples // 5)]
    test = np.isin(groups, held_out)
    if test.all() or not test.any():
        raise DlmprobeInputError(f"the probe needs masked rows of {label!r} in both train and test examples; "
                         f"got {data.n_examples} examples with {len(y)} such rows")
    X_train, y_train = X[~test], y[~test]
    probe = LinearProbe().fit(X_train, y_train)
    return _ProbeFit(
        probe, float(probe.score(X[test], y[test])), X_train, y_train, X[test], y[test], X_train.mean(axis=0),
        np.stack([X_train[y_train == c].mean(axis=0) for c in probe.classes_]),
    )


def _diagnostics(fit: _ProbeFit, conditions: list[EditCondition], goal: np.ndarray, alpha: float) -> pd.DataFrame:
    """Each edit applied to the held-out stored rows: how far it moves them, what the probe then reads and,
    after an ablation, what a fresh probe trained on ablated training rows reads (``retrained_after``)."""
    X, X_train = torch.as_tensor(fit.X_test), torch.as_tensor(fit.X_train)
    classes = fit.probe.classes_
    mean, class_means = torch.as_tensor(fit.mean), torch.as_tensor(fit.class_means)
    records = []
    for c in conditions:
        retrained = np.nan
        if c.intervention == "ablate":
            moved = c.move(X, mean)
            after = fit.probe.score(moved.numpy(), fit.y_test)
            fresh = LinearProbe().fit(c.move(X_train, mean).numpy(), fit.y_train)
            retrained = fresh.score(moved.numpy(), fit.y_test)
        else:
            moved = c.move(X, class_means[goal], alpha)
            after = float((fit.probe.predict(moved.numpy()) == classes[goal]).mean())
        records.append({"intervention": c.intervention, "subspace": c.subspace, "matched_to": c.matched_to,
                        "scale": c.scale, "displacement": float((moved - X).norm(dim=1).mean()),
                        "probe_after": after, "retrained_after": retrained})
    return pd.DataFrame(records)


def _other_classes(own: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """Per row, a random class index other than ``own``."""
    return (own + np.random.default_rng(seed).integers(1, n_classes, size=len(own))) % n_classes


def _solved(setting: Setting, run: Trajectory) -> list[bool]:
    return [setting.verifies(i, output) for i, output in enumerate(run.output.tolist())]


def _steering_goals(final: Int[Tensor, "example pos"], where: Bool[Tensor, "example pos"],
                    classes: np.ndarray, seed: int) -> Int[Tensor, "example pos"]:
    """Per label position, the index of a random class other than the clean run's token (-1 elsewhere)."""
    rng = np.random.default_rng(seed)
    clean = final.numpy()
    goal = np.full(clean.shape, -1, dtype=np.int64)
    for example, position in zip(*np.nonzero(where.numpy())):
        goal[example, position] = rng.choice(np.flatnonzero(classes != clean[example, position]))
    return torch.from_numpy(goal)


def _summarise(per_example: pd.DataFrame, n_classes: int, seed: int, n_boot: int = 1000) -> pd.DataFrame:
    """Rates per (intervention, subspace, matched_to, start step) with 95% bootstrap intervals over puzzles."""
    rng = np.random.default_rng(seed)
    records = []
    for (kind, name, matched, t), group in per_example.groupby(["intervention", "subspace", "matched_to", "start_step"],
                                                               sort=False):
        draws = rng.integers(0, len(group), size=(n_boot, len(group)))
        edited = group["n_edited"].to_numpy(float)
        record = {"intervention": kind, "subspace": name, "matched_to": matched, "start_step": int(t),
                  "n_examples": len(group), "n_positions": int(edited.sum())}
        for quantity in ("changed", "steered"):
            hits = group[f"n_{quantity}"].to_numpy(float)
            if quantity == "steered" and kind != "steer":
                record.update({quantity: np.nan, f"{quantity}_low": np.nan, f"{quantity}_high": np.nan})
                continue
            record[quantity] = hits.sum() / max(edited.sum(), 1)
            resampled = hits[draws].sum(1) / np.maximum(edited[draws].sum(1), 1)
            record[f"{quantity}_low"], record[f"{quantity}_high"] = np.percentile(resampled, [2.5, 97.5])
        wins = group["solved"].to_numpy(float)
        record["solved"] = wins.mean()
        record["solved_low"], record["solved_high"] = np.percentile(wins[draws].mean(1), [2.5, 97.5])
        record["clean_solved"] = group["clean_solved"].mean()
        record["chance"] = 1.0 / n_classes if kind == "steer" else np.nan
        records.append(record)
    return pd.DataFrame(records)
