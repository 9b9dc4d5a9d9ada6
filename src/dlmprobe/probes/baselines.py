"""Input-only baselines: the bar a probe must clear, on the same rows and folds as the probe.

A probe that decodes a masked cell's digit at 58% means little if a feature of the prompt alone
(which digits the givens exclude) gives 58% too. Every builder here returns a plain feature matrix
with one row per probe row, in the order of ``ActivationDataset.get(site, step, "label", ...)``
(see :func:`label_rows`); :func:`baseline_table` fits the same multinomial logistic probe on each,
k-fold by example, and :func:`strongest_baseline` names the one to beat.

Baselines (none reads an activation):

* ``majority``: the most frequent training class;
* ``position``: a one-hot of the row's canvas position;
* ``prompt+position``: a one-hot of every prompt token, and the position;
* ``embedding``: the model's token embedding of the canvas token at the row at that step (the mask
  embedding for a masked row), plus its position embedding if given;
* ``givens``: the task's own input feature (:meth:`Task.givens_features`, e.g. sudoku's candidate mask).

:class:`InputFeatures` builds them for any rows of a store, computing per-example parts once: a
:class:`~dlmprobe.probes.ProbeGrid` fits them beside every probe, on the probe's rows and folds.

Example:
    >>> rows = label_rows(data, "blank", step=0)
    >>> features = input_baselines(data, rows, task=task, embedding=W_E)
    >>> table, hits = baseline_table(features, rows["output"].to_numpy(), rows["example"].to_numpy())
    >>> strongest_baseline(table)["baseline"]
    'givens'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float, Int
from sklearn.linear_model import LogisticRegression

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.probes.stats import ExampleBootstrap, cross_validate
from dlmprobe.store import ActivationDataset
from dlmprobe.tasks import Example, Task, get_task

#: Every input-only baseline a grid can fit besides the majority class.
BASELINES = ("position", "prompt+position", "embedding", "givens")


def label_rows(data: ActivationDataset, label: str, step: int, only_masked: bool = True) -> pd.DataFrame:
    """One row per (example, label slot), the rows of ``data.get(site, step, "label", label=label, ...)`` in order.

    Columns: ``example``, ``slot``, ``target_position`` (target-relative), ``position`` (canvas),
    ``token`` (the canvas token there at ``step``), ``output`` (the token finally committed) and
    ``truth`` (the label's value). ``only_masked`` keeps the rows not yet committed at ``step``
    (:meth:`ActivationDataset.before_commit`: still masked, or under the settle rule not yet settled).
    """
    if not 0 <= step <= data.n_steps:
        raise DlmprobeInputError(f"step must be in [0, {data.n_steps}], got {step}")
    slots, values = data.label(label)
    n, k = slots.shape
    examples = np.repeat(np.arange(n), k)
    rows = rows_at(data, step, examples, data.target_start + slots.reshape(-1), np.tile(np.arange(k), n))
    rows["truth"] = values.reshape(-1)
    if only_masked:
        rows = rows[data.before_commit(step, rows["example"].to_numpy(), rows["position"].to_numpy())].reset_index(drop=True)
    return rows


def rows_at(data: ActivationDataset, step: int, examples: np.ndarray, positions: np.ndarray,
            slots: np.ndarray) -> pd.DataFrame:
    """Rows given by example and canvas position (a probe grid's cell), with the columns of :func:`label_rows`
    but ``truth``: ``example``, ``slot``, ``target_position``, ``position``, ``token`` (at ``step``), ``output``."""
    examples, positions = np.asarray(examples), np.asarray(positions)
    canvas = data.canvas
    return pd.DataFrame({
        "example": examples, "slot": np.asarray(slots), "target_position": positions - data.target_start,
        "position": positions, "token": canvas[examples, step, positions], "output": canvas[examples, -1, positions],
    })


def position_onehot(rows: pd.DataFrame, length: int) -> Float[np.ndarray, "row length"]:
    """A one-hot of each row's canvas position, (rows, length)."""
    positions = rows["position"].to_numpy()
    if len(positions) and not (positions.min() >= 0 and positions.max() < length):
        raise DlmprobeInputError(f"row positions must lie in [0, {length}), got {positions.min()}..{positions.max()}")
    out = np.zeros((len(positions), length), dtype=np.float32)
    out[np.arange(len(positions)), positions] = 1.0
    return out


def prompt_onehot(prompts: Int[np.ndarray, "example prompt"], vocab_size: int) -> Float[np.ndarray, "example k"]:
    """A one-hot of every prompt token of each example: (examples, prompt * vocab)."""
    prompts = np.asarray(prompts)
    if prompts.size and not (prompts.min() >= 0 and prompts.max() < vocab_size):
        raise DlmprobeInputError(f"prompt token ids must lie in [0, {vocab_size}), got {prompts.min()}..{prompts.max()}")
    n, width = prompts.shape
    per_example = np.zeros((n, width, vocab_size), dtype=np.float32)
    per_example[np.arange(n)[:, None], np.arange(width)[None, :], prompts] = 1.0
    return per_example.reshape(n, -1)


def prompt_position_onehot(rows: pd.DataFrame, prompts: Int[np.ndarray, "example prompt"], vocab_size: int,
                           length: int) -> Float[np.ndarray, "row k"]:
    """A one-hot of every prompt token of the row's example, then its position: (rows, prompt * vocab + length)."""
    per_example = prompt_onehot(prompts, vocab_size)
    return np.concatenate([per_example[rows["example"].to_numpy()], position_onehot(rows, length)], axis=1)


def embedding_features(rows: pd.DataFrame, embedding: Float[np.ndarray, "vocab d"],
                       position_embedding: Float[np.ndarray, "pos d"] | None = None) -> Float[np.ndarray, "row d"]:
    """The embedding of the canvas token at each row (``rows["token"]``), plus its position embedding if given."""
    embedding = np.asarray(embedding, dtype=np.float32)
    tokens = rows["token"].to_numpy()
    if embedding.ndim != 2 or (len(tokens) and tokens.max() >= embedding.shape[0]):
        raise DlmprobeInputError(f"expected a (vocab, d) embedding covering token {tokens.max()}, got shape {embedding.shape}")
    out = embedding[tokens]
    if position_embedding is not None:
        out = out + np.asarray(position_embedding, dtype=np.float32)[rows["position"].to_numpy()]
    return out


def per_example_feature(rows: pd.DataFrame, prompts: np.ndarray, targets: np.ndarray,
                        feature: Callable[[Example], np.ndarray]) -> np.ndarray:
    """A task feature of each row: ``feature(example)[target_position]``, computed once per example.

    ``feature`` is e.g. ``task.givens_features`` ((target, k) rows) or ``task.difficulty`` ((target,)).
    """
    examples = rows["example"].to_numpy()
    cache = {e: np.asarray(feature(Example(tuple(prompts[e].tolist()), tuple(targets[e].tolist()))))
             for e in np.unique(examples)}
    if not cache:
        return np.zeros((0,), dtype=np.float32)
    return np.stack([cache[e][t] for e, t in zip(examples, rows["target_position"].to_numpy())])


class InputFeatures:
    """The input-only feature matrices ``names`` (of :data:`BASELINES`) a store allows, for any of
    its rows; per-example parts computed once.

    ``task`` (its :meth:`~dlmprobe.tasks.Task.givens_features`) allows ``givens``; ``embedding``, the
    model's (vocab, d) W_E, allows ``embedding`` (with ``position_embedding``, its (positions, d)
    W_pos, if it has one). ``notes`` says which baselines could not be built and why.
    """

    def __init__(self, data: ActivationDataset, task: Task | None = None, embedding: np.ndarray | None = None,
                 position_embedding: np.ndarray | None = None, names: Sequence[str] = BASELINES):
        unknown = sorted(set(names) - set(BASELINES))
        if unknown:
            raise DlmprobeInputError(f"baselines must be among {list(BASELINES)}, got {unknown[0]!r}")
        self.names = list(names)
        self.length = data.canvas.shape[2]
        vocab_size = int(max(data.canvas.max(), data.prompt.max())) + 1
        if embedding is not None:
            vocab_size = max(vocab_size, np.asarray(embedding).shape[0])
        self.prompts = prompt_onehot(data.prompt, vocab_size)  # (examples, prompt * vocab)
        self.embedding, self.position_embedding = embedding, position_embedding
        self.givens: np.ndarray | None = None
        self.notes: list[str] = []
        if embedding is None and "embedding" in names:
            self.notes.append("no embedding baseline: no model embedding given")
        if task is None and "givens" in names:
            text = (data.config.get("task") or {}).get("text_task")
            self.notes.append(f"no givens baseline: text task {text!r} holds tokenizer ids, not the task's" if text
                              else "no givens baseline: the store names no task")
        if task is not None and "givens" in names:
            try:
                self.givens = np.stack([task.givens_features(Example(tuple(p.tolist()), tuple(t.tolist())))
                                        for p, t in zip(data.prompt, data.target)])  # (examples, target, k)
            except NotImplementedError as err:
                self.notes.append(f"no givens baseline: {err}")

    def __call__(self, rows: pd.DataFrame) -> dict[str, np.ndarray]:
        """Feature matrices of ``rows`` (columns ``example``, ``position``, ``target_position``, ``token``) by name."""
        features = {}
        if "position" in self.names:
            features["position"] = position_onehot(rows, self.length)
        if "prompt+position" in self.names:
            features["prompt+position"] = np.concatenate([self.prompts[rows["example"].to_numpy()],
                                                          position_onehot(rows, self.length)], axis=1)
        if self.embedding is not None and "embedding" in self.names:
            features["embedding"] = embedding_features(rows, self.embedding, self.position_embedding)
        if self.givens is not None:
            features["givens"] = self.givens[rows["example"].to_numpy(), rows["target_position"].to_numpy()]
        return features


def input_baselines(data: ActivationDataset, rows: pd.DataFrame, task: Task | None = None,
                    embedding: np.ndarray | None = None,
                    position_embedding: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every input-only feature matrix this run allows for ``rows``; ``embedding`` is the model's (vocab, d) W_E."""
    return InputFeatures(data, task, embedding, position_embedding)(rows)


def store_task(data: ActivationDataset) -> Task | None:
    """The built-in task a store was recorded on, or None if it names none: a hand-built store, or a
    Hugging Face model's run on a text task (``task.text_task``), whose prompts are the tokenizer's
    ids, not the task's, so no task feature (``givens``) can be read from them."""
    spec = data.config.get("task") or {}
    return get_task(spec["name"], **spec.get("params", {})) if "name" in spec else None


def example_folds(n_examples: int, folds: int = 5, seed: int = 0) -> Int[np.ndarray, " example"]:
    """The fold of every example, drawn as :class:`ProbeGrid` draws them (first draw of ``default_rng(seed)``)."""
    if folds < 2 or n_examples < folds:
        raise DlmprobeInputError(f"expected 2 <= folds <= examples, got {folds} folds for {n_examples} examples")
    return np.random.default_rng(seed).permutation(n_examples) % folds


def out_of_fold_hits(X: np.ndarray, y: np.ndarray, examples: np.ndarray, fold_of: np.ndarray,
                     C: float = 1.0, max_iter: int = 500) -> np.ndarray:
    """Whether a logistic probe trained on the other folds' examples predicts each row's ``y``, (rows,) bool.

    A fold whose training rows hold one class predicts that class.
    """
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    if X.ndim != 2 or len(X) != len(y) or len(y) != len(examples):
        raise DlmprobeInputError(f"expected X (rows, k), y and examples of one length, got {X.shape}, {y.shape}, {np.shape(examples)}")
    fold = fold_of[examples]
    hits = np.zeros(len(y), dtype=bool)
    for f in np.unique(fold):
        test, train = fold == f, fold != f
        if not train.any():
            continue
        if len(np.unique(y[train])) < 2:
            hits[test] = y[test] == y[train][0]
            continue
        model = LogisticRegression(C=C, max_iter=max_iter).fit(X[train], y[train])
        hits[test] = model.predict(X[test]) == y[test]
    return hits


def majority_hits(y: np.ndarray, examples: np.ndarray, fold_of: np.ndarray) -> np.ndarray:
    """Whether the most frequent class of the other folds' rows is each row's ``y``, (rows,) bool."""
    fold = fold_of[examples]
    hits = np.zeros(len(y), dtype=bool)
    for f in np.unique(fold):
        values, counts = np.unique(y[fold != f], return_counts=True)
        if len(values):
            hits[fold == f] = y[fold == f] == values[counts.argmax()]
    return hits


def fit_input_baselines(data: ActivationDataset, inputs: InputFeatures | None,
                        cells: Mapping[Any, tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                        fold_of: np.ndarray, classes: np.ndarray, C: float = 1.0, max_iter: int = 100,
                        device: str = "cpu") -> dict[Any, dict[str, np.ndarray]]:
    """Out-of-fold hits of the majority class and of every input baseline, for cells of a probe grid.

    ``cells`` maps a key to ``(step, examples, positions, slots, y)`` of one cell's rows. Each
    baseline is fitted with the grid's own trainer (:func:`~dlmprobe.probes.stats.cross_validate`),
    on the grid's folds, all cells of one baseline in one batched fit. Returns ``key -> name -> hits``.
    """
    out = {key: {"majority": majority_hits(y, examples, fold_of)} for key, (_, examples, _, _, y) in cells.items()}
    if inputs is None or not cells or not inputs.names:
        return out
    keys = list(cells)
    features = {key: inputs(rows_at(data, step, examples, positions, slots))
                for key, (step, examples, positions, slots, _) in cells.items()}
    for name in features[keys[0]]:  # every cell has the same baselines
        guesses = cross_validate([features[key][name] for key in keys], [[cells[key][4] for key in keys]],
                                 [cells[key][1] for key in keys], fold_of, classes, C, max_iter, device)[0]
        for key, guess in zip(keys, guesses):
            out[key][name] = guess == cells[key][4]
    return out


def baseline_table(features: Mapping[str, np.ndarray], y: np.ndarray, examples: np.ndarray,
                   fold_of: np.ndarray | None = None, folds: int = 5, seed: int = 0,
                   C: float = 1.0) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Out-of-fold accuracy of the majority class and of a logistic probe on each feature matrix.

    Folds are by example (``fold_of``, else :func:`example_folds`), so pass the probe's folds to
    compare like with like. Returns the table (``baseline``, ``accuracy``, ``n_rows``,
    ``n_features``) and every baseline's per-row hits (for intervals and strata).
    """
    y, examples = np.asarray(y), np.asarray(examples)
    if fold_of is None:
        fold_of = example_folds(int(examples.max()) + 1 if len(examples) else 0, folds, seed)
    hits = {"majority": majority_hits(y, examples, fold_of)}
    widths = {"majority": 0}
    for name, X in features.items():
        hits[name] = out_of_fold_hits(X, y, examples, fold_of, C)
        widths[name] = int(np.asarray(X).shape[1])
    table = pd.DataFrame([
        {"baseline": name, "accuracy": float(h.mean()) if len(h) else float("nan"), "n_rows": len(h), "n_features": widths[name]}
        for name, h in hits.items()
    ])
    return table, hits


def strongest_baseline(table: pd.DataFrame) -> pd.Series:
    """The row of :func:`baseline_table` with the highest accuracy: the bar a probe must clear."""
    if table.empty:
        raise DlmprobeInputError("expected a baseline table with at least one row, got an empty one")
    return table.loc[table["accuracy"].idxmax()]


def margin_over_baselines(probe_accuracy: float, table: pd.DataFrame) -> dict[str, float | str]:
    """The probe's accuracy minus the strongest baseline's: its selectivity against the input alone."""
    best = strongest_baseline(table)
    return {"strongest_baseline": str(best["baseline"]), "baseline_accuracy": float(best["accuracy"]),
            "probe_accuracy": float(probe_accuracy), "margin": float(probe_accuracy - best["accuracy"])}


def accuracy_by_stratum(hits: Mapping[str, np.ndarray], strata: np.ndarray,
                        name_of: Callable[[int], str] = str, examples: np.ndarray | None = None,
                        n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Accuracy of each reader (probe, lens, baselines: per-row hits) in each difficulty stratum.

    ``strata`` is each row's stratum (e.g. ``per_example_feature(rows, ..., task.difficulty)``);
    ``name_of`` names a stratum (``task.difficulty_name``). One row per (reader, stratum). Given
    each row's example, ``ci_low``/``ci_high`` are 95% intervals resampling examples (the readers of
    a stratum share their resamples; NaN below two examples, where resampling says nothing) and
    ``n_examples`` counts them.
    """
    strata = np.asarray(strata)
    for reader, h in hits.items():
        if np.shape(h) != strata.shape:
            raise DlmprobeInputError(f"hits of {reader!r} must match strata {strata.shape}, got {np.shape(h)}")
    if examples is not None and np.shape(examples) != strata.shape:
        raise DlmprobeInputError(f"examples must match strata {strata.shape}, got {np.shape(examples)}")
    rng = np.random.default_rng(seed)
    records = []
    for value in np.unique(strata):
        inside = strata == value
        boot = None if examples is None else ExampleBootstrap(np.asarray(examples)[inside], n_boot, rng)
        for reader, h in hits.items():
            h = np.asarray(h)[inside]
            record = {"reader": reader, "stratum": int(value), "stratum_name": name_of(int(value)),
                      "n_rows": int(inside.sum()), "accuracy": float(h.mean())}
            if boot is not None:
                record["n_examples"] = boot.n_ids
                record["ci_low"], record["ci_high"] = boot.interval(h) if boot.n_ids > 1 else (float("nan"),) * 2
            records.append(record)
    return pd.DataFrame(records).sort_values(["reader", "stratum"], kind="stable").reset_index(drop=True)
