"""Reasoning tasks whose planned answers are known (and, later, HDF5 activation datasets)."""

from __future__ import annotations

from typing import Any

from dlmprobe.datasets.arith import Arith
from dlmprobe.datasets.pathstar import PathStar
from dlmprobe.datasets.store import ActivationDataset, ActivationWriter, StoreError, bytes_needed, merge_shards
from dlmprobe.datasets.sudoku import Sudoku
from dlmprobe.datasets.task import Example, LabelSpan, Task, Vocab, split_of

TASKS: dict[str, type[Task]] = {"sudoku": Sudoku, "pathstar": PathStar, "arith": Arith}


def get_task(name: str, **params: Any) -> Task:
    """Build a task by name; ``params`` override its defaults (e.g. ``size=9`` for sudoku)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    try:
        return TASKS[name](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for task {name!r}: {params} ({err})") from None


__all__ = ["TASKS", "Arith", "Example", "LabelSpan", "PathStar", "Sudoku", "Task", "Vocab", "get_task", "split_of"]
__all__ += ["ActivationDataset", "ActivationWriter", "StoreError", "bytes_needed", "merge_shards"]
