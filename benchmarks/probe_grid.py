"""Batched probe grid vs. a loop of scikit-learn LogisticRegression over the same grid.

    python benchmarks/probe_grid.py [--model sudoku-diffusion] [--n 256] [--steps 0,6,12,18,24,30]

Caches a run of a shipped model (every layer's residual stream), then fits the same cells with the
same k folds twice: once with :class:`dlmprobe.probes.ProbeGrid` (all cells and folds in batched
L-BFGS) and once with a Python loop of ``StandardScaler + LogisticRegression(C=1)`` per cell and
fold. Reports both wall times, their ratio (goal: >= 20x) and the largest accuracy difference
(goal: <= 1 point). Controls are off in both, so the work is identical.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dlmprobe.capture import CacheConfig, run_cache
from dlmprobe.datasets.store import ActivationDataset
from dlmprobe.probes import ProbeGrid


def sklearn_loop(grid: ProbeGrid, data: ActivationDataset) -> dict[tuple[str, int], float]:
    fold_of = np.random.default_rng(grid.seed).permutation(data.n_examples) % grid.folds
    accuracy = {}
    # Both sides stop at 100 L-BFGS iterations (scikit-learn's default); it warns when it does.
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    for cell in grid.cells(data):
        fold = fold_of[cell.examples]
        hits = np.zeros(len(cell.y), dtype=bool)
        for f in range(grid.folds):
            train, test = fold != f, fold == f
            model = make_pipeline(StandardScaler(), LogisticRegression(C=grid.C))
            model.fit(cell.X[train], cell.y[train])
            hits[test] = model.predict(cell.X[test]) == cell.y[test]
        accuracy[(cell.site, cell.step)] = float(hits.mean())
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sudoku-diffusion")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--label", default=None, help="default: the task's answer label")
    parser.add_argument("--steps", default="0,6,12,18,24,30")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.h5"
        run_cache(CacheConfig(model=args.model, n=args.n, steps=steps), path, progress=False)
        with ActivationDataset(path) as data:
            label = args.label or data.config["task"]["answer_label"]
            grid = ProbeGrid(label=label, folds=args.folds, control=False, random_baseline=False, bootstrap=0)
            start = time.perf_counter()
            table = grid.run(data, progress=False)
            batched_s = time.perf_counter() - start
            start = time.perf_counter()
            reference = sklearn_loop(grid, data)
            sklearn_s = time.perf_counter() - start
    differences = [abs(row.accuracy - reference[(row.site, row.step)]) for row in table.itertuples()]
    result = {
        "model": args.model, "n_examples": args.n, "label": label, "cells": len(table), "folds": args.folds,
        "rows_per_cell": float(table["n_rows"].mean()), "threads": args.threads,
        "batched_s": round(batched_s, 2), "sklearn_loop_s": round(sklearn_s, 2),
        "speedup": round(sklearn_s / batched_s, 1), "max_accuracy_difference": round(max(differences), 4),
        "mean_accuracy": round(float(table["accuracy"].mean()), 4),
    }
    for key, value in result.items():
        print(f"{key:<24} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
