"""The statistics around a probe's accuracy: chance levels, control labels, intervals, code length.

* :func:`cross_validate`: out-of-fold predictions of many cells and label sets in one batched fit,
  the trainer every probe and every input-only baseline of a grid shares; inside
  :func:`shared_fits` a cell identical to one already fitted there is not fitted again;
* :func:`bootstrap_by_example`: a 95% interval of accuracy that resamples examples, not rows (the
  rows of one example are near duplicates), built on :func:`cluster_bootstrap`, the one cluster
  bootstrap of the kit: any rate that sums hits and counts over resampled clusters;
  :class:`ExampleBootstrap` shares one set of resamples between several readers of the same rows,
  so that the difference of two accuracies gets a paired interval;
* :func:`majority_accuracy`: the most frequent training class of each fold, as a probe;
* :func:`control_labels`: Hewitt & Liang's control task (random labels, consistent per input type);
* :func:`online_code_length`: Voita & Titov's online (prequential) description length.

Example:
    >>> low, high = bootstrap_by_example(hits, examples, n_boot=500, rng=np.random.default_rng(0))
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch

from dlmprobe.probes.linear import fit_logistic, predict_logits


def cluster_bootstrap(numerator: np.ndarray, denominator: np.ndarray, draws: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of ``sum(numerator) / sum(denominator)`` over resampled clusters.

    ``numerator`` and ``denominator`` hold one total per cluster (e.g. hits and rows of an
    example); ``draws`` is ``(n_boot, n_clusters)`` cluster indices, one resample per row, so that
    several rates of the same clusters can share their resamples. A resample whose denominator is
    0 counts as rate 0 (its sum is taken as 1).
    """
    rates = numerator[draws].sum(axis=1) / np.maximum(denominator[draws].sum(axis=1), 1)
    low, high = np.percentile(rates, [2.5, 97.5])
    return float(low), float(high)


class ExampleBootstrap:
    """One set of example resamples for every reader of the same rows (probe, lens, baselines).

    :meth:`interval` gives the 95% interval of the mean of any per-row value: hits give an
    accuracy's interval, the difference of two readers' hits the paired interval of the difference
    of their accuracies (the rows are the same, so the difference of rates is the rate of differences).
    """

    def __init__(self, examples: np.ndarray, n_boot: int, rng: np.random.Generator):
        ids, self.inverse = np.unique(np.asarray(examples), return_inverse=True)
        self.n_ids = len(ids)
        self.count = np.bincount(self.inverse, minlength=self.n_ids).astype(float)
        self.draws = rng.integers(0, self.n_ids, size=(n_boot, self.n_ids)) if n_boot >= 1 else None

    def interval(self, values: np.ndarray) -> tuple[float, float]:
        """95% percentile interval of the row mean of ``values`` (one per row); NaNs without resamples."""
        if self.draws is None:
            return float("nan"), float("nan")
        total = np.bincount(self.inverse, weights=np.asarray(values, dtype=float), minlength=self.n_ids)
        return cluster_bootstrap(total, self.count, self.draws)


def reader_columns(reader: str, reader_hits: np.ndarray, probe_hits: np.ndarray, boot: ExampleBootstrap,
                   gap: str | None = None) -> dict[str, float]:
    """A reader's accuracy with its interval, and the probe's lead over it with a paired interval:
    ``<reader>_accuracy``, ``<reader>_ci_low``/``_ci_high``, and ``<gap>`` (default
    ``probe_over_<reader>``) with ``<gap>_ci_low``/``<gap>_ci_high``."""
    gap = gap or f"probe_over_{reader}"
    low, high = boot.interval(reader_hits)
    gap_low, gap_high = boot.interval(np.asarray(probe_hits, dtype=float) - reader_hits)
    return {f"{reader}_accuracy": float(np.mean(reader_hits)), f"{reader}_ci_low": low, f"{reader}_ci_high": high,
            gap: float(np.mean(probe_hits) - np.mean(reader_hits)), f"{gap}_ci_low": gap_low, f"{gap}_ci_high": gap_high}


def readers_beside_probe(readers: Mapping[str, np.ndarray], boot: ExampleBootstrap) -> dict[str, float | str]:
    """The table columns of every reader of a probe's rows, each given by its per-row hits.

    ``readers["probe"]`` is the probe's; ``lens`` and ``readout`` (the model's own read-out) get
    :func:`reader_columns`; ``majority`` and every ``baseline_<name>`` are input-only baselines:
    each gets its accuracy, and the strongest of them is ``strongest_baseline`` (its name without
    the prefix) with ``strongest_baseline_accuracy`` and ``baseline_selectivity`` (the probe's lead
    over it), each with a paired interval.
    """
    probe = readers["probe"]
    record: dict[str, float | str] = {}
    for reader in ("lens", "readout"):
        if reader in readers:
            record.update(reader_columns(reader, readers[reader], probe, boot))
    inputs = {name: hits for name, hits in readers.items() if name == "majority" or name.startswith("baseline_")}
    for name, hits in inputs.items():
        record["majority" if name == "majority" else f"{name}_accuracy"] = float(np.mean(hits))
    if inputs:
        best = max(inputs, key=lambda name: float(np.mean(inputs[name])))
        record["strongest_baseline"] = best.removeprefix("baseline_")
        record.update(reader_columns("strongest_baseline", inputs[best], probe, boot, gap="baseline_selectivity"))
    return record


def bootstrap_by_example(hits: np.ndarray, examples: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile interval of accuracy, resampling examples (not rows); NaNs when ``n_boot < 1``."""
    return ExampleBootstrap(examples, n_boot, rng).interval(hits)


def majority_accuracy(y: np.ndarray, examples: np.ndarray, fold_of: np.ndarray, folds: int) -> float:
    """Out-of-fold accuracy of predicting each fold's test rows with its training rows' commonest class."""
    hits = 0
    for f in range(folds):
        test = fold_of[examples] == f
        train_values, counts = np.unique(y[~test], return_counts=True)
        hits += int((y[test] == train_values[counts.argmax()]).sum())
    return hits / len(y)


def control_labels(control_type: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hewitt & Liang's control task: each input type gets a label drawn from the label distribution.

    ``control_type`` holds non-negative integer types (a probe grid types a row by the canvas
    position it decodes). Returns a lookup table: ``table[type]`` is the control label of that type.
    """
    types = np.unique(control_type)
    table = np.zeros(int(types.max()) + 1, dtype=y.dtype)
    table[types] = rng.choice(y.reshape(-1), size=len(types))
    return table


def online_code_length(X: np.ndarray, y: np.ndarray, examples: np.ndarray, n_classes: int, C: float, max_iter: int,
                       rng: np.random.Generator, device: str = "cpu") -> tuple[float, float]:
    """Online code length in bits (Voita & Titov) and the uniform code's length, of class indices ``y``.

    Blocks of examples are transmitted in a random order, each with a probe trained on the blocks
    before it; the first block with a uniform code. All blocks' probes are one batched fit.
    """
    order = rng.permutation(np.unique(examples))
    n = len(order)
    bounds = sorted({max(2, int(n * f)) for f in (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)})
    rank = np.empty(examples.max() + 1, dtype=int)
    rank[order] = np.arange(n)
    row_rank = rank[examples]
    bits = float((row_rank < bounds[0]).sum() * math.log2(n_classes))
    Xt = torch.as_tensor(X, device=device).unsqueeze(0)
    yy = torch.as_tensor(y, device=device)
    # One problem per block: train on the blocks before it, pay for the block itself.
    blocks = list(itertools.pairwise(bounds))
    weight = torch.stack([torch.as_tensor(row_rank < start, dtype=torch.float32) for start, _ in blocks]).unsqueeze(0)
    W, b = fit_logistic(Xt, yy.expand(1, len(blocks), -1), weight.to(device), n_classes, C, max_iter)
    log_probs = torch.log_softmax(predict_logits(Xt, W, b)[0], dim=-1)  # (blocks, rows, classes)
    picked = log_probs.gather(-1, yy.view(1, -1, 1).expand(len(blocks), -1, 1)).squeeze(-1)
    for p, (start, stop) in enumerate(blocks):
        block = torch.as_tensor((row_rank >= start) & (row_rank < stop), device=device)
        bits -= float(picked[p][block].sum()) / math.log(2)
    return bits, float(len(y) * math.log2(n_classes))


_shared: dict[bytes, list[np.ndarray]] | None = None  # the open shared_fits() scope's fits, by cell


@contextmanager
def shared_fits() -> Iterator[None]:
    """A scope in which :func:`cross_validate` fits every distinct cell once.

    A cell (its features, every label set, examples, folds, classes and trainer settings, compared
    by content) already fitted in the scope gets the same predictions back without a fit: e.g. the
    input-only baselines of grids that probe the same rows of the same puzzles (runs of one model
    under different samplers at step 0, or a run's ``output`` and ``truth`` targets where the two
    agree). A cell's fit does not depend on the other cells fitted beside it, so the results are
    those of fitting it again. Nested scopes share the outermost one's fits; they are dropped
    when it closes.
    """
    global _shared
    if _shared is not None:
        yield
        return
    _shared = {}
    try:
        yield
    finally:
        _shared = None


def _cell_key(arrays: list[np.ndarray], settings: tuple) -> bytes:
    digest = hashlib.blake2b(repr(settings).encode(), digest_size=20)
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(repr((array.dtype.str, array.shape)).encode())
        digest.update(array.data)
    return digest.digest()


def cross_validate(Xs: list[np.ndarray], label_sets: list[list[np.ndarray]], examples: list[np.ndarray],
                   fold_of: np.ndarray, classes: np.ndarray, C: float, max_iter: int,
                   device: str = "cpu") -> list[list[np.ndarray]]:
    """Out-of-fold prediction (a class value) of every row, for each label set and cell.

    ``Xs[i]`` is cell i's features (rows, d), every cell of one width; ``label_sets[s][i]`` its
    labels under label set s (e.g. the task and control draws), values among ``classes``;
    ``examples[i]`` the example of each row, whose fold is ``fold_of[example]``. Every (label set,
    cell, fold) is one problem of a single batched :func:`fit_logistic`: the features of a cell are
    shared by its label sets; folds differ in which rows are trained on. Returns
    ``predicted[s][i]``, (rows,) class values. Inside :func:`shared_fits` a cell fitted there
    before is not fitted again.
    """
    if _shared is None:
        return _cross_validate(Xs, label_sets, examples, fold_of, classes, C, max_iter, device)
    settings = (len(label_sets), float(C), int(max_iter), str(device))
    keys = [_cell_key([Xs[i], *(labels[i] for labels in label_sets), examples[i], fold_of, classes], settings)
            for i in range(len(Xs))]
    todo = sorted({key: i for i, key in reversed(list(enumerate(keys))) if key not in _shared}.values())
    if todo:
        fitted = _cross_validate([Xs[i] for i in todo], [[labels[i] for i in todo] for labels in label_sets],
                                 [examples[i] for i in todo], fold_of, classes, C, max_iter, device)
        for j, i in enumerate(todo):
            _shared[keys[i]] = [predicted[j] for predicted in fitted]
    return [[_shared[key][s].copy() for key in keys] for s in range(len(label_sets))]


def _cross_validate(Xs: list[np.ndarray], label_sets: list[list[np.ndarray]], examples: list[np.ndarray],
                    fold_of: np.ndarray, classes: np.ndarray, C: float, max_iter: int,
                    device: str) -> list[list[np.ndarray]]:
    folds = int(fold_of.max()) + 1
    X, valid = _pad(Xs, device)  # (cells, rows, d)
    rows = X.shape[1]
    fold = _pad_int([fold_of[e] for e in examples], rows, device).unsqueeze(1)
    fold_ids = torch.arange(folds, device=device).view(1, -1, 1)
    train = (valid.unsqueeze(1) & (fold != fold_ids)).float()  # (cells, folds, rows)
    test = valid.unsqueeze(1) & (fold == fold_ids)
    ys = [_pad_int([np.searchsorted(classes, v) for v in label_set], rows, device).clamp_min(0)
          for label_set in label_sets]  # each (cells, rows)
    # Problems of a cell: every label set x every fold.
    y = torch.stack([v.unsqueeze(1).expand(-1, folds, -1) for v in ys], dim=1).flatten(1, 2)
    weight = train.repeat(1, len(label_sets), 1)
    W, b = fit_logistic(X, y, weight, len(classes), C, max_iter)
    predicted = predict_logits(X, W, b).argmax(-1).view(len(Xs), len(label_sets), folds, rows)
    lengths = [len(x) for x in Xs]
    out = []
    for s in range(len(ys)):
        # Each row is tested in exactly one fold: keep that fold's prediction.
        index = (predicted[:, s] * test).sum(dim=1)  # (cells, rows)
        out.append([classes[index[i, :m].cpu().numpy()] for i, m in enumerate(lengths)])
    return out


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
