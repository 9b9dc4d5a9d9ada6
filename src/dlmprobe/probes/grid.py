"""Probe grids: one linear probe per (site, step[, slot]) cell of an activation dataset, trained at once.

The question a grid answers: at step t, before position p is committed, does a linear read-out of
a site already tell which token will be committed at p (``target="output"``) or what the correct
answer is (``target="truth"``)? Every cell is fitted by :func:`~dlmprobe.probes.linear.fit_logistic`
in batched optimisations, beside what a reviewer compares it with, on the same rows:

* the model's own read-out: ``lens_accuracy`` (the logit lens on the very features the probe
  reads; with ``read="own"`` on a shifted model, Dream or a causal LM, on the hidden state one
  position earlier, which is the one that predicts the probed position) and ``readout_accuracy``
  (the model's argmax at the probed position at that step);
  ``probe_over_lens``/``probe_over_readout`` say how much more the probe knows than the model says;
* input-only baselines on the same rows, folds and trainer (``majority``,
  ``baseline_<name>_accuracy``); ``baseline_selectivity``: the probe minus the strongest of them;
* ``control_accuracy``: Hewitt & Liang's control task, random labels consistent per canvas
  position decoded (a sudoku cell), mean of ``control_draws`` draws (``control_accuracy_sd``
  their spread); ``selectivity = accuracy - control_accuracy``;
* ``random_weights_accuracy``: the same probe on a random-weights model fed the stored canvases
  (where one can be built: not for a run through a model's own generate loop);
* ``ci_low``/``ci_high`` and every ``*_ci_low``/``*_ci_high``: bootstrap 95% intervals over
  examples, paired for differences (:func:`~dlmprobe.probes.stats.readers_beside_probe`);
* ``mdl_bits`` (optional): online-code description length (Voita & Titov 2020).

Splits are k-fold by example, never by row: the rows of one example at different steps or slots
are near duplicates. "Before commit" (``phase="before_commit"``) keeps only rows whose position is
not yet committed at step t (``ActivationDataset.before_commit``: still masked, or under the settle
rule not yet settled); ``phase="after_commit"`` the others, which are trivial and reported apart.

Example:
    >>> data = ActivationDataset("runs/sudoku.h5")
    >>> grid = ProbeGrid(label="blank", target="output", read="own")
    >>> table = grid.run(data)          # a tidy pandas DataFrame, one row per cell
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.hooks import layer_of
from dlmprobe.models import ModelHandle
from dlmprobe.probes.baselines import (
    BASELINES,
    InputFeatures,
    fit_input_baselines,
    store_task,
)
from dlmprobe.probes.features import (
    FeatureSource,
    RandomWeightsFeatures,
    StoredFeatures,
    frontier_positions,
    is_hf_store,
    store_handle,
    subsample_rows,
)
from dlmprobe.probes.lens import ModelReaders, Readout, store_readers
from dlmprobe.probes.stats import (
    ExampleBootstrap,
    bootstrap_by_example,
    control_labels,
    cross_validate,
    online_code_length,
    readers_beside_probe,
)
from dlmprobe.store import ActivationDataset

# bootstrap_by_example lives in stats; analyses that import it from here keep working.
__all__ = ["Cell", "ProbeGrid", "bootstrap_by_example"]

Phase = Literal["before_commit", "after_commit"]
Target = Literal["output", "truth"]


@dataclass
class Cell:
    """The rows of one probe: features, labels, and the example, canvas position and slot of every row."""

    site: str
    step: int
    slot: int  # -1 when the label's slots are pooled into one probe
    X: np.ndarray  # (rows, d)
    y: np.ndarray  # (rows,)
    examples: np.ndarray  # (rows,)
    positions: np.ndarray  # (rows,) canvas position each row decodes (its control type too)
    slots: np.ndarray  # (rows,) label slot of every row
    lens_X: np.ndarray | None = None  # (rows, d) where the logit lens reads elsewhere than the probe, else None


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
        phase: rows not yet committed at the step (``before_commit``) or already committed.
        per_slot: one probe per label slot instead of one for all slots of the label.
        per_distance: one probe per distance between the probed position and the read position
            (``slot`` then holds the distance): with ``read="frontier"``, "k positions ahead of the
            last written token", since one feature vector cannot name several slots' tokens at once.
        sites, steps: subsets of the stored ones (None = all).
        folds: k of the k-fold split by example; ``seed`` seeds folds, control labels, bootstrap.
        C: inverse L2 strength, as scikit-learn's. ``min_rows``: smaller cells are skipped.
        max_rows: at most this many rows per cell, a random subset drawn per (step, slot) from
            ``seed`` (so every site and target sees the same rows); a mapping ``(step, slot) ->
            rows`` caps each cell on its own (absent keys: no cap). Comparisons of runs pass the
            smallest count of every cell, so that all train on as many rows.
        control, control_draws: the control task and how many draws of its labels.
        random_baseline: the random-weights baseline. ``mdl``: online code length too.
        lens: the logit lens and the model's own read-out beside every probe.
        baselines: the input-only baselines fitted beside every probe (the majority class always is),
            among :data:`~dlmprobe.probes.baselines.BASELINES`; ``()`` for none but the majority.

    Fitted state (set by :meth:`run`, or :meth:`out_of_fold` for the task probe alone), as
    scikit-learn names it: ``skipped_`` (cells with too few rows, one line each), ``rows_`` (per
    cell ``(site, step, slot)``, a DataFrame of every row: ``example``, ``slot``, ``position``
    and each reader's out-of-fold hit, ``probe``, ``lens``, ``readout``, ``majority`` and
    ``baseline_<name>``), ``readers_note_`` (which readers could not be computed and why),
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
    max_rows: int | Mapping[tuple[int, int], int] | None = None
    control: bool = True
    control_draws: int = 3
    random_baseline: bool = True
    lens: bool = True
    baselines: Sequence[str] = BASELINES
    mdl: bool = False
    bootstrap: int = 500
    seed: int = 0
    cells_per_fit: int = 16
    device: str = "cpu"
    skipped_: list[str] = field(default_factory=list, init=False, repr=False)
    rows_: dict[tuple[str, int, int], pd.DataFrame] = field(default_factory=dict, init=False, repr=False)
    readers_note_: str = field(default="", init=False, repr=False)
    out_of_fold_: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False)
    fitted_on_: tuple[str, str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.target not in ("output", "truth"):
            raise DlmprobeInputError(f"target must be 'output' or 'truth', got {self.target!r}")
        if self.phase not in ("before_commit", "after_commit"):
            raise DlmprobeInputError(f"phase must be 'before_commit' or 'after_commit', got {self.phase!r}")
        if not (self.read in ("own", "pooled", "frontier") or isinstance(self.read, int)):
            raise DlmprobeInputError(f"read must be 'own', 'pooled', 'frontier' or a canvas position, got {self.read!r}")
        if self.per_distance and (self.per_slot or self.read == "pooled"):
            raise DlmprobeInputError("per_distance needs a single read position (own, frontier or a canvas position) and no per_slot")
        if self.folds < 2:
            raise DlmprobeInputError(f"folds must be >= 2, got {self.folds}")
        if self.C <= 0:
            raise DlmprobeInputError(f"C must be positive, got {self.C}")
        if self.control and self.control_draws < 1:
            raise DlmprobeInputError(f"control_draws must be >= 1, got {self.control_draws}")

    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    # -- rows ----------------------------------------------------------------------------------
    def _select(self, data: ActivationDataset) -> tuple[list[str], list[int]]:
        sites = list(self.sites) if self.sites is not None else data.sites
        unknown = [s for s in sites if s not in data.sites]
        if unknown:
            raise DlmprobeInputError(f"unknown site {unknown[0]!r}; the dataset has {data.sites}")
        steps = list(self.steps) if self.steps is not None else data.steps.tolist()
        missing = [s for s in steps if s not in data.steps]
        if missing:
            raise DlmprobeInputError(f"step {missing[0]} is not stored; stored steps: {data.steps.tolist()}")
        if not sites or not steps:
            raise DlmprobeInputError("the selection matches no site or no step")
        if self.label not in data.label_names:
            raise DlmprobeInputError(f"unknown label {self.label!r}; the dataset has labels {data.label_names}")
        return sites, steps

    def _layout(self, data: ActivationDataset) -> dict[str, np.ndarray]:
        """Per (example, slot): canvas position and target value; computed once."""
        slots, values = data.label(self.label)
        positions = data.target_start + slots  # (n, k) canvas positions
        rows = np.arange(slots.shape[0])[:, None]
        y = values if self.target == "truth" else data.canvas[rows, -1, positions]
        if (y == data.mask_id).any():
            raise DlmprobeInputError("some label positions were never committed; the run is incomplete")
        if len(np.unique(y)) < 2:
            raise DlmprobeInputError(f"label {self.label!r} ({self.target}) has only one class {np.unique(y).tolist()}: nothing to probe")
        return {"positions": positions, "y": y}

    def _groups(self, data: ActivationDataset, step: int, positions: np.ndarray) -> tuple[list[tuple[int, np.ndarray]], np.ndarray]:
        """The cells of one step before features: (slot, row mask (n, k)) each, and the read position (n, k)."""
        n, k = positions.shape
        masked = data.before_commit(step, np.broadcast_to(np.arange(n)[:, None], (n, k)), positions)  # (n, k)
        keep = masked if self.phase == "before_commit" else ~masked
        if self.read == "frontier":
            read_at = np.broadcast_to(frontier_positions(data, step)[:, None], (n, k))
        elif self.read in ("own", "pooled"):
            read_at = positions
        else:
            read_at = np.full((n, k), int(self.read))
        if self.per_slot:
            groups = [(j, keep & (np.arange(k) == j)[None, :]) for j in range(k)]
        elif self.per_distance:
            distance = positions - read_at
            groups = [(int(dd), keep & (distance == dd)) for dd in np.unique(distance[keep])]
        else:
            groups = [(-1, keep)]
        return [(slot, subsample_rows(mask, self._limit(step, slot), (self.seed, step, slot))) for slot, mask in groups], read_at

    def _limit(self, step: int, slot: int) -> int | None:
        return self.max_rows.get((step, slot)) if isinstance(self.max_rows, Mapping) else self.max_rows

    def row_counts(self, data: ActivationDataset) -> dict[tuple[int, int], int]:
        """Rows of every cell, by ``(step, slot)`` (the same for every site), read from the canvas alone."""
        _, steps = self._select(data)
        positions = self._layout(data)["positions"]
        return {(step, slot): int(mask.sum()) for step in steps for slot, mask in self._groups(data, step, positions)[0]}

    def lens_offset(self, data: ActivationDataset) -> int:
        """Where the logit lens reads relative to the probe: the store's ``read_offset`` (-1 on a
        shifted model, whose hidden state at ``p - 1`` predicts ``p``) for ``read="own"``, else 0."""
        return int(data.config_entry("read_offset") or 0) if self.read == "own" else 0

    def _cells(self, data: ActivationDataset, sites: list[str], steps: list[int],
               layout: dict[str, np.ndarray], features: FeatureSource, lens_offset: int = 0) -> Iterator[Cell]:
        positions, y_all = layout["positions"], layout["y"]
        n, k = positions.shape
        rows = np.arange(n)[:, None]
        for step in steps:
            groups, read_at = self._groups(data, step, positions)
            index = data.position_index(read_at)  # (n, k) along the stored positions
            lens_index = data.position_index(read_at + lens_offset) if lens_offset else None
            for site in sites:
                acts = features(site, step)  # (n, stored_pos, d)
                if self.read == "pooled":
                    X_all = np.broadcast_to(acts.mean(axis=1, keepdims=True), (n, k, acts.shape[2]))
                else:
                    X_all = acts[rows, index]  # (n, k, d)
                lens_all = None if lens_index is None else acts[rows, lens_index]  # (n, k, d)
                for slot, mask in groups:
                    X = X_all[mask]
                    if not np.isfinite(X).all():
                        raise DlmprobeInputError(
                            f"activations of {site} at step {step} contain NaN or inf at the probed rows "
                            f"(an autoregressive store has NaN at positions not yet computed: read an earlier position)"
                        )
                    examples = np.broadcast_to(rows, mask.shape)[mask]
                    slots = np.broadcast_to(np.arange(k)[None, :], mask.shape)[mask]
                    yield Cell(site, step, slot, X, y_all[mask], examples, positions[mask], slots,
                               None if lens_all is None else lens_all[mask])

    def cells(self, data: ActivationDataset) -> Iterator[Cell]:
        """The grid's cells (rows, labels, examples) as it would fit them: for custom probes."""
        sites, steps = self._select(data)
        yield from self._cells(data, sites, steps, self._layout(data), StoredFeatures(data))

    # -- fitting -------------------------------------------------------------------------------
    def run(self, data: ActivationDataset, progress: bool = True, readers: ModelReaders | None = None) -> pd.DataFrame:
        """Train every cell of the grid with its controls; one DataFrame row per cell.

        ``readers``: the model's read-out and embeddings for the lens and the embedding baseline
        (:func:`~dlmprobe.probes.lens.readers_of`); by default those of the built-in model the
        store names, if it can be loaded (``readers_note_`` says what was left out).
        """
        records = self._fit(data, progress, full=True, readers=readers)
        if not records:
            raise DlmprobeInputError(
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

    def _fit(self, data: ActivationDataset, progress: bool, full: bool,
             readers: ModelReaders | None = None) -> dict[tuple[str, int, int], dict[str, Any]]:
        """Fit every cell's task probe (and, if ``full``, its readers, controls and table row); keeps the fitted state."""
        sites, steps = self._select(data)
        layout = self._layout(data)
        rng = np.random.default_rng(self.seed)
        n = data.n_examples
        if n < self.folds:
            raise DlmprobeInputError(f"{n} examples are too few for {self.folds}-fold probing")
        fold_of = rng.permutation(n) % self.folds  # by example; the first draw (baselines.example_folds)
        k = layout["positions"].shape[1]
        fit = _Fit(data=data, fold_of=fold_of, classes=np.unique(layout["y"]), rng=rng,
                   out_of_fold={site: np.full((n, len(steps), k), -1, dtype=np.int64) for site in sites},
                   step_index={step: i for i, step in enumerate(steps)})
        sources: dict[str, FeatureSource] = {"task": StoredFeatures(data)}
        self.readers_note_ = ""
        if full:
            if self.control:
                fit.control_maps = [control_labels(layout["positions"], layout["y"], rng) for _ in range(self.control_draws)]
            target = data.target_start + np.arange(data.output.shape[1])[None, :]
            examples = np.arange(n)[:, None]
            fit.committed = 1.0 - np.array([data.before_commit(s, examples, target).mean()  # of the whole target, per step
                                            for s in range(data.n_steps + 1)])
            sources.update(self._prepare_models(fit, readers, sites, layout["positions"]))
        self.skipped_, self.rows_ = [], {}
        total = len(sites) * len(steps) * (k if self.per_slot else 1)
        bar = tqdm(total=None if self.per_distance else total * len(sources), disable=not progress,
                   desc=f"probe {self.label}" + ("" if full else " (per row)"), unit="cell")
        for variant, source in sources.items():
            batch: list[Cell] = []
            lens_offset = self.lens_offset(data) if variant == "task" and fit.readout is not None else 0
            for cell in self._cells(data, sites, steps, layout, source, lens_offset):
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

    def _prepare_models(self, fit: _Fit, readers: ModelReaders | None, sites: list[str],
                        positions: np.ndarray) -> dict[str, FeatureSource]:
        """The lens's read-out and the input features (from ``readers`` or the store's own model) and
        the random-weights features; a Hugging Face model is loaded once for all of them."""
        notes, sources, failed = [], {}, ""
        handle: ModelHandle | None = None
        if is_hf_store(fit.data) and (self.random_baseline or (readers is None and (self.lens or self.baselines))):
            try:
                handle = store_handle(fit.data)
            except DlmprobeInputError as err:
                failed = f"cannot load model {fit.data.config_entry('model', 'name')!r} ({err})"
        if self.lens or self.baselines:
            if readers is None:
                readers = ModelReaders(note=f"no logit lens or embedding baseline: {failed}") if failed \
                    else store_readers(fit.data, handle)
            notes.append(readers.note)
        if self.lens and readers.readout is not None:
            offset = self.lens_offset(fit.data)
            if self.read == "pooled":
                notes.append("no logit lens: a mean over positions is no activation the model reads out")
            elif not np.isin(positions + offset, fit.data.positions).all():
                notes.append(f"no logit lens: it reads each position's hidden state {-offset} before it (a shifted "
                             f"model), which the store does not hold")
            else:
                fit.readout = readers.readout
        if self.baselines:
            fit.inputs = InputFeatures(fit.data, store_task(fit.data), readers.embedding, readers.position_embedding,
                                       self.baselines)
            notes += fit.inputs.notes
        if self.random_baseline and failed:
            notes.append(f"no random-weights baseline: {failed}")
        elif self.random_baseline:
            try:
                sources["random_weights"] = RandomWeightsFeatures(fit.data, sites, handle)
            except DlmprobeInputError as err:  # e.g. a run through a model's own generate loop
                notes.append(f"no random-weights baseline: {err}")
        self.readers_note_ = "; ".join(note for note in notes if note)
        return sources

    def _fit_batch(self, cells: list[Cell], variant: str, fit: _Fit, full: bool) -> None:
        ys = {variant: [c.y for c in cells]}
        if variant == "task" and full:
            for draw, table in enumerate(fit.control_maps):
                ys[f"control{draw}"] = [table[c.positions] for c in cells]
        predicted = cross_validate([c.X for c in cells], list(ys.values()), [c.examples for c in cells],
                                   fit.fold_of, fit.classes, self.C, self.max_iter, self.device)
        guesses = dict(zip(ys, predicted))
        for i, cell in enumerate(cells):
            key = (cell.site, cell.step, cell.slot)
            if variant != "task":
                if key in fit.records:
                    fit.records[key][f"{variant}_accuracy"] = float((guesses[variant][i] == cell.y).mean())
                continue
            fit.out_of_fold[cell.site][cell.examples, fit.step_index[cell.step], cell.slots] = guesses["task"][i]
        if variant == "task" and full:
            self._fit_baselines(cells, fit)
            for i, cell in enumerate(cells):
                controls = [float((guesses[name][i] == ys[name][i]).mean()) for name in ys if name != "task"]
                fit.records[(cell.site, cell.step, cell.slot)] = self._record(cell, guesses["task"][i] == cell.y, controls, fit)

    def _fit_baselines(self, cells: list[Cell], fit: _Fit) -> None:
        """Per new (step, slot): every input-only baseline's out-of-fold hits (the same for every site)."""
        new = {(c.step, c.slot): c for c in cells if (c.step, c.slot) not in fit.baseline_hits}
        if new:
            fit.baseline_hits.update(fit_input_baselines(
                fit.data, fit.inputs, {key: (c.step, c.examples, c.positions, c.slots, c.y) for key, c in new.items()},
                fit.fold_of, fit.classes, self.C, self.max_iter, self.device))

    def _record(self, cell: Cell, hits: np.ndarray, controls: list[float], fit: _Fit) -> dict[str, Any]:
        """The table row of a task cell; resamples and online code draw from the grid's generator."""
        readers = {"probe": hits}
        if fit.readout is not None:
            X = cell.X if cell.lens_X is None else cell.lens_X
            readers["lens"] = fit.readout.predict(X, exclude=[fit.data.mask_id]) == cell.y
        if cell.step < fit.data.n_steps:
            readers["readout"] = fit.data.prediction[cell.examples, cell.step, cell.positions] == cell.y
        readers.update({name if name == "majority" else f"baseline_{name}": h
                        for name, h in fit.baseline_hits.get((cell.step, cell.slot), {}).items()})
        self.rows_[(cell.site, cell.step, cell.slot)] = pd.DataFrame(
            {"example": cell.examples, "slot": cell.slots, "position": cell.positions, **readers})
        boot = ExampleBootstrap(cell.examples, self.bootstrap, fit.rng)
        low, high = boot.interval(hits)
        record = {
            "site": cell.site, "layer": layer_of(cell.site), "step": cell.step,
            ("distance" if self.per_distance else "slot"): cell.slot,
            "committed_fraction": float(fit.committed[cell.step]), "label": self.label,
            "target": self.target, "read": str(self.read), "phase": self.phase,
            "n_examples": boot.n_ids, "n_rows": len(cell.y),
            # k-fold: every row is tested once, by a probe trained on the other folds.
            "n_train": round(len(cell.y) * (self.folds - 1) / self.folds), "n_test": len(cell.y),
            "n_classes": len(np.unique(cell.y)), "accuracy": float(hits.mean()),
            "ci_low": low, "ci_high": high,
        }
        if controls:
            record.update(control_accuracy=float(np.mean(controls)), control_draws=len(controls),
                          control_accuracy_sd=float(np.std(controls, ddof=1)) if len(controls) > 1 else float("nan"))
        record.update(readers_beside_probe(readers, boot))
        if self.mdl:
            record["mdl_bits"], record["uniform_bits"] = online_code_length(
                cell.X, np.searchsorted(fit.classes, cell.y), cell.examples, len(fit.classes), self.C, self.max_iter,
                fit.rng, self.device)
        return record


@dataclass
class _Fit:
    """What one fitting pass over a grid shares between its batches."""

    data: ActivationDataset
    fold_of: np.ndarray
    classes: np.ndarray
    rng: np.random.Generator
    out_of_fold: dict[str, np.ndarray]
    step_index: dict[int, int]
    control_maps: list[np.ndarray] = field(default_factory=list)
    committed: np.ndarray | None = None
    readout: Readout | None = None
    inputs: InputFeatures | None = None
    baseline_hits: dict[tuple[int, int], dict[str, np.ndarray]] = field(default_factory=dict)
    records: dict[tuple[str, int, int], dict[str, Any]] = field(default_factory=dict)
