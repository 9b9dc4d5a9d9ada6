"""Batched probe grid vs. a loop of scikit-learn LogisticRegression over the same grid.

    python benchmarks/probe_grid.py [--model sudoku-diffusion] [--n 128] [--steps 6,12,18] [--threads 1] [--repeats 2]
                                    [--device cuda]

Caches a run of a shipped model (every layer's residual stream), then fits the same cells with the
same k folds twice: once with :class:`dlmprobe.probes.ProbeGrid` (all cells and folds in batched
L-BFGS) and once with a Python loop of ``StandardScaler + LogisticRegression(C=1)`` per cell and
fold (scikit-learn's defaults: lbfgs, tol 1e-4, max_iter 100). Reports both wall times, their ratio
(goal: >= 20x) and the largest accuracy difference (goal: <= 1 point). Controls are off in both,
so the work is identical.

Both sides get the same number of threads: torch's intra-op threads and the BLAS threads numpy and
scipy use (threadpoolctl), ``--threads`` each. Leaving scikit-learn's BLAS at its default while
torch has one thread is not a fair race, and on a loaded machine it is not even a stable one: with
two OpenBLAS threads on two busy cores the loop ran 50x slower than with one.

``--device cuda`` runs the batched side on a GPU (one untimed warm-up run first, so CUDA's start-up
is not counted); the scikit-learn loop stays on the CPU, where it runs.

With ``--repeats`` the two sides alternate that many times; the ratio is of the median times. The
convergence of both is measured apart (untimed) by the quantity scikit-learn's lbfgs stops on: the
largest absolute gradient entry of ``mean CE + ||W||^2 / (2 C n)`` in the standardised space.

The matmul floor: every batched run also times its trainer (the ``fit_logistic`` calls inside the
grid run) and then, right after it, the float32 matrix products that trainer computed alone (the
same shapes and counts, which ``fit_logistic`` reports; products of different shapes interleaved
as the trainer's cells are, on operands that stay allocated). ``trainer_over_floor`` is how far
the trainer is from doing nothing but its products.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import dlmprobe.probes.stats as stats_module
from dlmprobe.capture import CacheConfig, run_cache
from dlmprobe.probes import ProbeGrid
from dlmprobe.store import ActivationDataset


def sklearn_loop(grid: ProbeGrid, data: ActivationDataset, fits: list | None = None) -> dict[tuple[str, int], float]:
    """The plain scikit-learn way: one pipeline per cell and fold. ``fits`` collects them (untimed use)."""
    fold_of = np.random.default_rng(grid.seed).permutation(data.n_examples) % grid.folds
    accuracy = {}
    for cell in grid.cells(data):
        fold = fold_of[cell.examples]
        hits = np.zeros(len(cell.y), dtype=bool)
        for f in range(grid.folds):
            train, test = fold != f, fold == f
            model = make_pipeline(StandardScaler(), LogisticRegression(C=grid.C))
            model.fit(cell.X[train], cell.y[train])
            hits[test] = model.predict(cell.X[test]) == cell.y[test]
            if fits is not None:
                fits.append((model, cell.X[train], cell.y[train]))
        accuracy[(cell.site, cell.step)] = float(hits.mean())
    return accuracy


def sklearn_grad_max(model, X: np.ndarray, y: np.ndarray, C: float) -> float:
    """Largest |gradient| entry of scikit-learn's lbfgs objective at a fitted pipeline's solution."""
    scaler, lr = model[0], model[-1]
    Z = scaler.transform(X).astype(np.float64)
    n = len(y)
    if lr.coef_.shape[0] == 1:  # binary: one weight vector, log-loss
        p = 1 / (1 + np.exp(-(Z @ lr.coef_[0] + lr.intercept_[0])))
        r = (p - (y == lr.classes_[1])) / n
        grad = np.concatenate([Z.T @ r + lr.coef_[0] / (C * n), [r.sum()]])
    else:
        logits = Z @ lr.coef_.T + lr.intercept_
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        r = (p - (y[:, None] == lr.classes_[None, :])) / n
        grad = np.concatenate([(Z.T @ r + lr.coef_.T / (C * n)).ravel(), r.sum(0)])
    return float(np.abs(grad).max())


def timed_run(grid: ProbeGrid, data: ActivationDataset) -> tuple[pd.DataFrame, float, float, list[dict]]:
    """One grid run: its table, wall time, the time spent in fit_logistic and every call's report."""
    reports: list[dict] = []
    trainer = [0.0]
    original = stats_module.fit_logistic

    def recording(*args, **kwargs):
        report: dict = {}
        start = time.perf_counter()
        out = original(*args, report=report, **kwargs)
        trainer[0] += time.perf_counter() - start
        reports.append(report)
        return out

    stats_module.fit_logistic = recording
    try:
        start = time.perf_counter()
        table = grid.run(data, progress=False)
        wall = time.perf_counter() - start
    finally:
        stats_module.fit_logistic = original
    return table, wall, trainer[0], reports


def matmul_floor(reports: list[dict], device: str) -> float:
    """Seconds to compute the products the reported fits computed (float32, same shapes and counts)."""
    operands: dict[tuple[int, int, int], torch.Tensor] = {}

    def operand(shape: tuple[int, int, int]) -> torch.Tensor:
        if shape not in operands:
            operands[shape] = torch.randn(shape, device=device)
        return operands[shape]

    work = []
    for report in reports:
        pending = [[operand((b, m, k)), operand((b, k, n)), count] for (b, m, k, n), count in report["products"].items()]
        work.append(pending)
    _synchronize(device)
    start = time.perf_counter()
    for pending in work:
        while pending:  # one product of every shape in turn, as the trainer visits its cells
            for item in pending:
                a, b, _ = item
                if a.shape[0] == 1:
                    torch.mm(a[0], b[0])
                else:
                    torch.bmm(a, b)
                item[2] -= 1
            pending[:] = [item for item in pending if item[2] > 0]
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sudoku-diffusion")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--label", default=None, help="default: the task's answer label")
    parser.add_argument("--steps", default="6,12,18")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads, both sides")
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two sides this many times")
    parser.add_argument("--device", default="cpu", help="where the batched side runs (cpu, cuda)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    try:
        kind = torch.device(args.device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device expects cpu or an available cuda device, got {args.device!r}")
    torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    # Both sides stop at 100 L-BFGS iterations (scikit-learn's default) at most; it warns when it does.
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    batched_times, sklearn_times, trainer_times, floor_times = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=args.threads):
        path = Path(tmp) / "run.h5"
        run_cache(CacheConfig(model=args.model, n=args.n, steps=steps), path, progress=False)
        with ActivationDataset(path) as data:
            label = args.label or data.config["task"]["answer_label"]
            grid = ProbeGrid(label=label, folds=args.folds, control=False, random_baseline=False, bootstrap=0,
                             device=args.device)
            if args.device != "cpu":
                grid.run(data, progress=False)  # warm-up: CUDA context and kernels
            for _ in range(args.repeats):
                table, wall, trainer, reports = timed_run(grid, data)
                batched_times.append(wall)
                trainer_times.append(trainer)
                floor_times.append(matmul_floor(reports, args.device))
                start = time.perf_counter()
                reference = sklearn_loop(grid, data)
                sklearn_times.append(time.perf_counter() - start)
            # Convergence, untimed.
            fits: list = []
            sklearn_loop(grid, data, fits)
    sklearn_grads = [sklearn_grad_max(model, X, y, grid.C) for model, X, y in fits]
    sklearn_iters = [int(model[-1].n_iter_.max()) for model, _, _ in fits]
    ours = torch.cat([r["grad_max"].flatten() for r in reports]).double().numpy()
    differences = [abs(row.accuracy - reference[(row.site, row.step)]) for row in table.itertuples()]
    batched_s, sklearn_s = statistics.median(batched_times), statistics.median(sklearn_times)
    trainer_s, floor_s = statistics.median(trainer_times), statistics.median(floor_times)
    result = {
        "model": args.model, "n_examples": args.n, "label": label, "steps": steps, "cells": len(table),
        "folds": args.folds, "rows_per_cell": float(table["n_rows"].mean()),
        "threads": args.threads, "blas_threads": args.threads, "device": args.device,
        "gpu": torch.cuda.get_device_name(args.device) if args.device != "cpu" else None,
        "batched_s": round(batched_s, 3), "sklearn_loop_s": round(sklearn_s, 3),
        "speedup": round(sklearn_s / batched_s, 1),
        "trainer_s": round(trainer_s, 3), "matmul_floor_s": round(floor_s, 3),
        "trainer_over_floor": round(trainer_s / floor_s, 2), "batched_over_floor": round(batched_s / floor_s, 2),
        "matmul_gflop": round(sum(2 * b * m * k * n * count for r in reports
                                  for (b, m, k, n), count in r["products"].items()) / 1e9, 2),
        "runs": [{"batched_s": round(b, 3), "sklearn_loop_s": round(s, 3), "speedup": round(s / b, 1),
                  "trainer_s": round(t, 3), "matmul_floor_s": round(f, 3), "trainer_over_floor": round(t / f, 2)}
                 for b, s, t, f in zip(batched_times, sklearn_times, trainer_times, floor_times)],
        "max_accuracy_difference": round(max(differences), 4),
        "mean_accuracy": round(float(table["accuracy"].mean()), 4),
        "batched_grad_max": {"median": float(f"{np.median(ours):.3g}"), "max": float(f"{ours.max():.3g}"),
                             "iterations": max(int(r["iterations"].max()) for r in reports)},
        "sklearn_grad_max": {"median": float(f"{np.median(sklearn_grads):.3g}"), "max": float(f"{max(sklearn_grads):.3g}"),
                             "fits_at_max_iter": f"{sum(i >= model[-1].max_iter for i, (model, _, _) in zip(sklearn_iters, fits))} of {len(fits)}"},
    }
    for key, value in result.items():
        print(f"{key:<24} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
