"""The statistics around a probe's accuracy: chance levels, control labels, intervals, code length.

* :func:`bootstrap_by_example`: a 95% interval of accuracy that resamples examples, not rows (the
  rows of one example are near duplicates), built on :func:`cluster_bootstrap`, the one cluster
  bootstrap of the kit: any rate that sums hits and counts over resampled clusters;
* :func:`majority_accuracy`: the most frequent training class of each fold, as a probe;
* :func:`control_labels`: Hewitt & Liang's control task (random labels, consistent per input type);
* :func:`online_code_length`: Voita & Titov's online (prequential) description length.

Example:
    >>> low, high = bootstrap_by_example(hits, examples, n_boot=500, rng=np.random.default_rng(0))
"""

from __future__ import annotations

import itertools
import math

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


def bootstrap_by_example(hits: np.ndarray, examples: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile interval of accuracy, resampling examples (not rows); NaNs when ``n_boot < 1``."""
    if n_boot < 1:
        return float("nan"), float("nan")
    ids, inverse = np.unique(examples, return_inverse=True)
    correct = np.bincount(inverse, weights=hits.astype(float), minlength=len(ids))
    count = np.bincount(inverse, minlength=len(ids)).astype(float)
    return cluster_bootstrap(correct, count, rng.integers(0, len(ids), size=(n_boot, len(ids))))


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

    Returns a lookup table: ``table[type]`` is the control label of that type.
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
