"""The kit's datasets, in one place: reasoning tasks and HDF5 activation datasets.

A facade only: tasks live in :mod:`dlmprobe.tasks`, activation stores in :mod:`dlmprobe.store`.
"""

from dlmprobe.store import (
    ActivationDataset,
    ActivationWriter,
    StoreError,
    StoreLayout,
    merge_shards,
)
from dlmprobe.tasks import (
    TASKS,
    Arith,
    Example,
    LabelSpan,
    PathStar,
    Sudoku,
    Task,
    Vocab,
    get_task,
    split_of,
)

__all__ = ["TASKS", "Arith", "Example", "LabelSpan", "PathStar", "Sudoku", "Task", "Vocab", "get_task", "split_of"]
__all__ += ["ActivationDataset", "ActivationWriter", "StoreError", "StoreLayout", "merge_shards"]
