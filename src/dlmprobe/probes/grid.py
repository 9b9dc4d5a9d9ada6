"""Probe grids: one linear probe per (site, step[, slot]) cell of an activation dataset, trained at once.

The question a grid answers: at step t, before position p is committed, does a linear read-out of
a site already tell which token will be committed at p (``target="output"``) or what the correct
answer is (``target="truth"``)? Every cell is fitted by :func:`~dlmprobe.probes.linear.fit_logistic`
in batched optimisations, together with the controls a reviewer asks for:

* ``majority``: the most frequent training class;
* ``control_accuracy``: the same probe on a control task (Hewitt & Liang 2019): random labels that
  are consistent per input type, the type being the token at ``control_position`` (by default the
  first prompt token) and the slot; ``selectivity = accuracy - control_accuracy``;
* ``random_weights_accuracy``: the same probe on a model of the same architecture with random
  weights, replaying the stored canvases;
* ``ci_low`` / ``ci_high``: a bootstrap 95% interval over examples;
* ``mdl_bits`` (optional): online-code description length (Voita & Titov 2020).

Splits are k-fold by example, never by row: the rows of one example at different steps or slots
are near duplicates. "Before unmasking" (``phase="before_commit"``) keeps only rows whose position
is still masked at step t; ``phase="after_commit"`` the others, which are trivial and reported apart.

Example:
    >>> data = ActivationDataset("runs/sudoku.h5")
    >>> grid = ProbeGrid(label="blank", target="output", read="own")
    >>> table = grid.run(data)          # a tidy pandas DataFrame, one row per cell
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from dlmprobe.hooks import layer_of
from dlmprobe.probes.features import (
    FeatureSource,
    RandomWeightsFeatures,
    StoredFeatures,
    frontier_positions,
)
from dlmprobe.probes.linear import fit_logistic, predict_logits
from dlmprobe.store import ActivationDataset
from dlmprobe.probes.stats import (
    bootstrap_by_example,
    control_labels,
    majority_accuracy,
    online_code_length,
)

Phase = Literal["before_commit", "after_commit"]
Target = Literal["output", "truth"]


@dataclass
class Cell:
    """The rows of one probe: features, labels, the example and control type of every row."""

    site: str
    step: int
    slot: int  # -1 when the label's slots are pooled into one probe
    X: np.ndarray  # (rows, d)
    y: np.ndarray  # (rows,)
    examples: np.ndarray  # (rows,)
    control_type: np.ndarray  # (rows,)
    slots: np.ndarray  # (rows,) label slot of every row


@dataclass
class ProbeGrid:
    """A grid of probes over an activation dataset.

    Args:
        label: the task label to decode (its positions are the ones probed), e.g. ``"answer"``.
        target: ``"output"``, the token the model finally commits there, or ``"truth"``, the label's
            correct value (they differ where the model is wrong).
        read: where features are read: ``"own"`` (the label position itself), a canvas position
            (e.g. the ``<sep>`` token), ``"pooled"`` (the mean over the stored positions) or
            ``"frontier"``: the last token of the written prefix of the target at that step (the
            ``<sep>`` token before anything is written), from which an autoregressive model reads
            ahead; for it the store needs the ``<sep>`` position (``positions="sep+target"``).
        phase: rows still masked at the step (``before_commit``) or already committed.
        per_slot: one probe per label slot instead of one for all slots of the label.
        per_distance: one probe per distance between the probed position and the read position
            (``slot`` then holds the distance): with ``read="frontier"``, "k positions ahead of the
            last written token", since one feature vector cannot name several slots' tokens at once.
        sites, steps: subsets of the stored ones (None = all).
        folds: k of the k-fold split by example; ``seed`` seeds folds, control labels, bootstrap.
        C: inverse L2 strength, as scikit-learn's. ``min_rows``: smaller cells are skipped.
        random_baseline, control: compute those controls. ``mdl``: online code length too.

    Fitted state (set by :meth:`run`, or :meth:`out_of_fold` for the task probe alone), as
    scikit-learn names it: ``skipped_`` (cells with too few rows, one line each), ``row_hits_``
    (per cell ``(site, step, slot)``: the example and out-of-fold hit of every row),
    ``out_of_fold_`` (what :meth:`out_of_fold` returns) and ``fitted_on_`` (the data and settings
    they belong to).
    """

    label: str
    target: Target = "output"
    read: str | int = "own"
    phase: Phase = "before_commit"
    per_slot: bool = False
    per_distance: bool = False
    sites: Sequence[str] | None = None
    steps: Sequence[int] | None = None
    folds: int = 5
    C: float = 1.0
    max_iter: int = 100
    min_rows: int = 20
    control: bool = True
    control_position: int = 1
    random_baseline: bool = True
    mdl: bool = False
    bootstrap: int = 500
    seed: int = 0
    cells_per_fit: int = 16
    device: str = "cpu"
    skipped_: list[str] = field(default_factory=list, init=False, repr=False)
    row_hits_: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, init=False, repr=False)
    out_of_fold_: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False)
    fitted_on_: tuple[str, str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.target not in ("output", "truth"):
            raise ValueError(f"target must be 'output' or 'truth', got {self.target!r}")
        if self.phase not in ("before_commit", "after_commit"):
            raise ValueError(f"phase must be 'before_commit' or 'after_commit', got {self.phase!r}")
        if not (self.read in ("own", "pooled", "frontier") or isinstance(self.read, int)):
            raise ValueError(f"read must be 'own', 'pooled', 'frontier' or a canvas position, got {self.read!r}")
        if self.per_distance and (self.per_slot or self.read == "pooled"):
            raise ValueError("per_distance needs a single read position (own, frontier or a canvas position) and no per_slot")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        if self.C <= 0:
            raise ValueError(f"C must be positive, got {self.C}")

    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    # -- rows ----------------------------------------------------------------------------------
    def _select(self, data: ActivationDataset) -> tuple[list[str], list[int]]:
        sites = list(self.sites) if self.sites is not None else data.sites
        unknown = [s for s in sites if s not in data.sites]
        if unknown:
            raise ValueError(f"unknown site {unknown[0]!r}; the dataset has {data.sites}")
        steps = list(self.steps) if self.steps is not None else data.steps.tolist()
        missing = [s for s in steps if s not in data.steps]
        if missing:
            raise ValueError(f"step {missing[0]} is not stored; stored steps: {data.steps.tolist()}")
        if not sites or not steps:
            raise ValueError("the selection matches no site or no step")
        if self.label not in data.label_names:
            raise ValueError(f"unknown label {self.label!r}; the dataset has labels {data.label_names}")
        return sites, steps

    def _layout(self, data: ActivationDataset) -> dict[str, np.ndarray]:
        """Per (example, slot): canvas position, target value, control type; computed once."""
        slots, values = data.label(self.label)
        n, k = slots.shape
        positions = data.target_start + slots  # (n, k) canvas positions
        rows = np.arange(n)[:, None]
        y = values if self.target == "truth" else data.canvas[rows, -1, positions]
        if (y == data.mask_id).any():
            raise ValueError("some label positions were never committed; the run is incomplete")
        if len(np.unique(y)) < 2:
            raise ValueError(f"label {self.label!r} ({self.target}) has only one class {np.unique(y).tolist()}: nothing to probe")
        if not 0 <= self.control_position < data.canvas.shape[2]:
            raise ValueError(f"control_position must be a canvas position, got {self.control_position}")
        control_token = data.canvas[:, -1, self.control_position]
        control_type = control_token[:, None] * k + np.arange(k)[None, :]  # (n, k): type = (token, slot)
        return {"positions": positions, "y": y, "control_type": control_type}

    def _cells(self, data: ActivationDataset, sites: list[str], steps: list[int],
               layout: dict[str, np.ndarray], features: FeatureSource) -> Iterator[Cell]:
        positions, y_all, control_all = layout["positions"], layout["y"], layout["control_type"]
        n, k = positions.shape
        rows = np.arange(n)[:, None]
        for step in steps:
            masked = data.canvas[rows, step, positions] == data.mask_id  # (n, k)
            frontier = frontier_positions(data, step) if self.read == "frontier" else None
            keep = masked if self.phase == "before_commit" else ~masked
            for site in sites:
                acts = features(site, step)  # (n, stored_pos, d)
                read_at = positions  # (n, k) canvas position each row is read at
                if self.read == "own":
                    X_all = acts[rows, data.position_index(positions)]  # (n, k, d)
                elif self.read == "pooled":
                    X_all = np.broadcast_to(acts.mean(axis=1, keepdims=True), (n, k, acts.shape[2]))
                elif self.read == "frontier":
                    read_at = np.broadcast_to(frontier[:, None], (n, k))
                    index = data.position_index(frontier)
                    X_all = np.broadcast_to(acts[np.arange(n), index][:, None], (n, k, acts.shape[2]))
                else:
                    read_at = np.full((n, k), int(self.read))
                    index = int(data.position_index(np.array([self.read]))[0])
                    X_all = np.broadcast_to(acts[:, index : index + 1], (n, k, acts.shape[2]))
                if self.per_slot:
                    slot_groups = [(j, keep[:, j : j + 1], slice(j, j + 1)) for j in range(k)]
                elif self.per_distance:
                    distance = positions - read_at
                    slot_groups = [(int(dd), keep & (distance == dd), slice(None)) for dd in np.unique(distance[keep])]
                else:
                    slot_groups = [(-1, keep, slice(None))]
                for slot, mask, part in slot_groups:
                    X = X_all[:, part][mask]
                    if not np.isfinite(X).all():
                        raise ValueError(
                            f"activations of {site} at step {step} contain NaN or inf at the probed rows "
                            f"(an autoregressive store has NaN at positions not yet computed: read an earlier position)"
                        )
                    examples = np.broadcast_to(rows, mask.shape)[mask]
                    slots = np.broadcast_to(np.arange(k)[part][None, :], mask.shape)[mask]
                    yield Cell(site, step, slot, X, y_all[:, part][mask], examples, control_all[:, part][mask], slots)

    def cells(self, data: ActivationDataset) -> Iterator[Cell]:
        """The grid's cells (rows, labels, examples) as it would fit them: for custom probes."""
        sites, steps = self._select(data)
        yield from self._cells(data, sites, steps, self._layout(data), StoredFeatures(data))

    # -- fitting -------------------------------------------------------------------------------
    def run(self, data: ActivationDataset, progress: bool = True) -> pd.DataFrame:
        """Train every cell of the grid with its controls; one DataFrame row per cell."""
        records = self._fit(data, progress, full=True)
        if not records:
            raise ValueError(
                f"no cell has enough rows to probe (min_rows={self.min_rows}, {self.folds} folds, 2 classes): "
                f"{self.skipped_[0] if self.skipped_ else 'nothing selected'}"
            )
        table = pd.DataFrame(list(records.values()))
        if "control_accuracy" in table:
            table["selectivity"] = table["accuracy"] - table["control_accuracy"]
        return table.sort_values(["site", "step", "distance" if self.per_distance else "slot"]).reset_index(drop=True)

    def out_of_fold(self, data: ActivationDataset, progress: bool = False) -> dict[str, np.ndarray]:
        """Every row's prediction by the probe that did not train on its example.

        Returns, per site, an ``(n_examples, len(steps), k)`` array of predicted values (the
        label's token ids), ``-1`` where the row is outside the phase or its cell was skipped:
        the per-row material for analyses such as the planning lead. The task probe only. After
        :meth:`run` (or a first call) on the same data and settings nothing is fitted again.
        """
        if self.fitted_on_ != self._fingerprint(data):
            self._fit(data, progress, full=False)
        return {site: predicted.copy() for site, predicted in self.out_of_fold_.items()}

    def _fingerprint(self, data: ActivationDataset) -> tuple[str, str]:
        return str(Path(data.path).resolve()), repr(self.settings())

    def _fit(self, data: ActivationDataset, progress: bool, full: bool) -> dict[tuple[str, int, int], dict[str, Any]]:
        """Fit every cell's task probe (and, if ``full``, its controls and table row); keeps the fitted state."""
        sites, steps = self._select(data)
        layout = self._layout(data)
        rng = np.random.default_rng(self.seed)
        n = data.n_examples
        if n < self.folds:
            raise ValueError(f"{n} examples are too few for {self.folds}-fold probing")
        fold_of = rng.permutation(n) % self.folds  # by example
        k = layout["positions"].shape[1]
        fit = _Fit(fold_of=fold_of, classes=np.unique(layout["y"]), rng=rng,
                   out_of_fold={site: np.full((n, len(steps), k), -1, dtype=np.int64) for site in sites},
                   step_index={step: i for i, step in enumerate(steps)})
        sources: dict[str, FeatureSource] = {"task": StoredFeatures(data)}
        if full:
            fit.control_map = control_labels(layout["control_type"], layout["y"], rng)
            target = slice(data.target_start, data.target_start + data.output.shape[1])
            fit.committed = 1.0 - (data.canvas[:, :, target] == data.mask_id).mean(axis=(0, 2))  # of the whole target, per step
            if self.random_baseline:
                sources["random_weights"] = RandomWeightsFeatures(data, sites)
        self.skipped_, self.row_hits_ = [], {}
        total = len(sites) * len(steps) * (k if self.per_slot else 1)
        bar = tqdm(total=None if self.per_distance else total * len(sources), disable=not progress,
                   desc=f"probe {self.label}" + ("" if full else " (per row)"), unit="cell")
        for variant, source in sources.items():
            batch: list[Cell] = []
            for cell in self._cells(data, sites, steps, layout, source):
                bar.update(1)
                if len(cell.y) < self.min_rows or len(np.unique(cell.examples)) < self.folds or len(np.unique(cell.y)) < 2:
                    if variant == "task":
                        self.skipped_.append(f"{cell.site} step {cell.step} slot {cell.slot}: {len(cell.y)} rows")
                    continue
                batch.append(cell)
                if len(batch) == self.cells_per_fit:
                    self._fit_batch(batch, variant, fit, full)
                    batch = []
            if batch:
                self._fit_batch(batch, variant, fit, full)
        bar.close()
        self.out_of_fold_, self.fitted_on_ = fit.out_of_fold, self._fingerprint(data)
        return fit.records

    def _fit_batch(self, cells: list[Cell], variant: str, fit: _Fit, full: bool) -> None:
        ys = {variant: [c.y for c in cells]}
        if variant == "task" and full and self.control:
            ys["control"] = [fit.control_map[c.control_type] for c in cells]
        predicted = self._cross_validate(cells, list(ys.values()), fit.fold_of, fit.classes)
        for name, predicted_per_cell in zip(ys, predicted):
            for cell, y, guess in zip(cells, ys[name], predicted_per_cell):
                key = (cell.site, cell.step, cell.slot)
                if name != "task":
                    if key in fit.records:
                        fit.records[key][f"{name}_accuracy"] = float((guess == y).mean())
                    continue
                fit.out_of_fold[cell.site][cell.examples, fit.step_index[cell.step], cell.slots] = guess
                if full:
                    fit.records[key] = self._record(cell, guess == y, fit)

    def _record(self, cell: Cell, hits: np.ndarray, fit: _Fit) -> dict[str, Any]:
        """The table row of a task cell; bootstrap and online code draw from the grid's generator."""
        self.row_hits_[(cell.site, cell.step, cell.slot)] = (cell.examples, hits)
        low, high = bootstrap_by_example(hits, cell.examples, self.bootstrap, fit.rng)
        record = {
            "site": cell.site, "layer": layer_of(cell.site), "step": cell.step,
            ("distance" if self.per_distance else "slot"): cell.slot,
            "committed_fraction": float(fit.committed[cell.step]), "label": self.label,
            "target": self.target, "read": str(self.read), "phase": self.phase,
            "n_examples": len(np.unique(cell.examples)), "n_rows": len(cell.y),
            # k-fold: every row is tested once, by a probe trained on the other folds.
            "n_train": round(len(cell.y) * (self.folds - 1) / self.folds), "n_test": len(cell.y),
            "n_classes": len(np.unique(cell.y)), "accuracy": float(hits.mean()),
            "ci_low": low, "ci_high": high,
            "majority": majority_accuracy(cell.y, cell.examples, fit.fold_of, self.folds),
        }
        if self.mdl:
            record["mdl_bits"], record["uniform_bits"] = online_code_length(
                cell.X, np.searchsorted(fit.classes, cell.y), cell.examples, len(fit.classes), self.C, self.max_iter,
                fit.rng, self.device)
        return record

    def _cross_validate(self, cells: list[Cell], label_sets: list[list[np.ndarray]], fold_of: np.ndarray,
                        classes: np.ndarray) -> list[list[np.ndarray]]:
        """Out-of-fold prediction (a class value) of every row, for each label set (task, control) and cell.

        Every (label set, cell, fold) is one problem of a single batched fit: the features of a
        cell are shared by its label sets; folds differ in which rows are trained on.
        """
        X, valid = _pad([c.X for c in cells], self.device)  # (cells, rows, d)
        rows = X.shape[1]
        fold = _pad_int([fold_of[c.examples] for c in cells], rows, self.device).unsqueeze(1)
        folds = torch.arange(self.folds, device=self.device).view(1, -1, 1)
        train = (valid.unsqueeze(1) & (fold != folds)).float()  # (cells, folds, rows)
        test = valid.unsqueeze(1) & (fold == folds)
        ys = [_pad_int([np.searchsorted(classes, v) for v in label_set], rows, self.device).clamp_min(0)
              for label_set in label_sets]  # each (cells, rows)
        # Problems of a cell: every label set x every fold.
        y = torch.stack([v.unsqueeze(1).expand(-1, self.folds, -1) for v in ys], dim=1).flatten(1, 2)
        weight = train.repeat(1, len(label_sets), 1)
        W, b = fit_logistic(X, y, weight, len(classes), self.C, self.max_iter)
        predicted = predict_logits(X, W, b).argmax(-1).view(len(cells), len(label_sets), self.folds, rows)
        lengths = [len(c.y) for c in cells]
        out = []
        for s in range(len(ys)):
            # Each row is tested in exactly one fold: keep that fold's prediction.
            index = (predicted[:, s] * test).sum(dim=1)  # (cells, rows)
            out.append([classes[index[i, :m].cpu().numpy()] for i, m in enumerate(lengths)])
        return out


@dataclass
class _Fit:
    """What one fitting pass over a grid shares between its batches."""

    fold_of: np.ndarray
    classes: np.ndarray
    rng: np.random.Generator
    out_of_fold: dict[str, np.ndarray]
    step_index: dict[int, int]
    control_map: np.ndarray | None = None
    committed: np.ndarray | None = None
    records: dict[tuple[str, int, int], dict[str, Any]] = field(default_factory=dict)


def _pad(Xs: list[np.ndarray], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack cells of different row counts into (cells, rows, d) with a validity mask."""
    rows = max(len(x) for x in Xs)
    X = torch.zeros((len(Xs), rows, Xs[0].shape[1]), dtype=torch.float32, device=device)
    valid = torch.zeros((len(Xs), rows), dtype=torch.bool, device=device)
    for i, xi in enumerate(Xs):
        X[i, : len(xi)] = torch.as_tensor(xi, dtype=torch.float32)
        valid[i, : len(xi)] = True
    return X, valid


def _pad_int(values: list[np.ndarray], rows: int, device: str) -> torch.Tensor:
    out = torch.full((len(values), rows), -1, dtype=torch.long, device=device)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.as_tensor(v, dtype=torch.long)
    return out

