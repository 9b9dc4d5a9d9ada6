"""Reasoning tasks whose planned answers are known: the first stage of the data flow.

Example:
    >>> from dlmprobe.tasks import get_task
    >>> get_task("sudoku", size=4)
    Sudoku(size=4, blanks=8)
"""

from __future__ import annotations

from typing import Any

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.tasks.arith import Arith
from dlmprobe.tasks.pathstar import PathStar
from dlmprobe.tasks.sudoku import Sudoku, SudokuChoice
from dlmprobe.tasks.task import Example, LabelSpan, Task, Vocab, split_of

TASKS: dict[str, type[Task]] = {"sudoku": Sudoku, "sudoku_choice": SudokuChoice, "pathstar": PathStar, "arith": Arith}


def get_task(name: str, **params: Any) -> Task:
    """Build a task by name; ``params`` override its defaults (e.g. ``size=9`` for sudoku)."""
    if name not in TASKS:
        raise DlmprobeInputError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    try:
        return TASKS[name](**params)
    except TypeError as err:
        raise DlmprobeInputError(f"bad parameters for task {name!r}: {params} ({err})") from None


__all__ = ["TASKS", "Arith", "Example", "LabelSpan", "PathStar", "Sudoku", "SudokuChoice", "Task", "Vocab", "get_task", "split_of"]
