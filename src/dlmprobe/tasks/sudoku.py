"""Sudoku with unique solutions: 4×4 (2×2 boxes), 6×6 (2×3 boxes) and 9×9 (3×3 boxes).

:class:`SudokuChoice` keeps puzzles with several solutions instead (free choices for paraphrase tests).

The prompt is the grid read row by row with ``_`` for a blank; the target is the solved grid.
Labels: ``cell`` (every cell's value) and ``blank`` (only the cells the model has to find).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Float, Int

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.tasks.task import Example, LabelSpan, Task, Vocab, check_int

BOX_SHAPES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}
DEFAULT_BLANKS = {4: 8, 6: 20, 9: 45}
# The most blanks a puzzle is drawn with: one removal pass over a random grid keeps its solution
# unique down to this many blanks in 83% (4x4), 26% (6x6) and ~33% (9x9) of passes (measured); more
# blanks are rare or impossible, so generation would not end.
MAX_BLANKS = {4: 12, 6: 27, 9: 58}
# Removal passes tried per puzzle before giving up; at the limits above all of them fail with
# probability below 1e-8.
MAX_PASSES = 100


def _peers(size: int, box_rows: int, box_cols: int) -> list[list[int]]:
    peers = []
    for cell in range(size * size):
        r, c = divmod(cell, size)
        group = {r * size + j for j in range(size)} | {i * size + c for i in range(size)}
        r0, c0 = r - r % box_rows, c - c % box_cols
        group |= {(r0 + i) * size + c0 + j for i in range(box_rows) for j in range(box_cols)}
        group.discard(cell)
        peers.append(sorted(group))
    return peers


def count_solutions(grid: Sequence[int], size: int, peers: list[list[int]], limit: int = 2) -> int:
    """Number of completions of ``grid`` (0 = blank, digits 1..size), counted up to ``limit``."""
    cells = list(grid)
    full = (1 << (size + 1)) - 2  # bits 1..size

    def candidates(cell: int) -> int:
        used = 0
        for p in peers[cell]:
            used |= 1 << cells[p]
        return full & ~used

    def search() -> int:
        best, best_cands, best_count = -1, 0, size + 1
        for cell, v in enumerate(cells):
            if v == 0:
                cands = candidates(cell)
                n = bin(cands).count("1")
                if n < best_count:
                    best, best_cands, best_count = cell, cands, n
                    if n <= 1:
                        break
        if best < 0:
            return 1
        found = 0
        for digit in range(1, size + 1):
            if best_cands >> digit & 1:
                cells[best] = digit
                found += search()
                cells[best] = 0
                if found >= limit:
                    break
        return found

    return search()


class Sudoku(Task):
    """Sudoku of side ``size`` (4, 6 or 9) with ``blanks`` empty cells and a unique solution."""

    name = "sudoku"
    answer_label = "cell"

    def __init__(self, size: int = 6, blanks: int | None = None):
        if type(size) is not int or size not in BOX_SHAPES:
            raise DlmprobeInputError(f"sudoku size must be one of {sorted(BOX_SHAPES)}, got size={size!r}")
        blanks = DEFAULT_BLANKS[size] if blanks is None else blanks
        check_int("sudoku", "blanks", blanks, 1, MAX_BLANKS[size],
                  f" for size {size} (more rarely leave a unique solution)")
        self.size, self.blanks = size, blanks
        self.box_rows, self.box_cols = BOX_SHAPES[size]
        self.vocab = Vocab(["_"] + [str(d) for d in range(1, size + 1)])
        self._peers = _peers(size, self.box_rows, self.box_cols)
        self._digit_ids = [self.vocab.id(str(d)) for d in range(1, size + 1)]
        self._check_size()

    @property
    def prompt_length(self) -> int:
        return self.size * self.size

    @property
    def target_length(self) -> int:
        return self.size * self.size

    def params(self) -> dict[str, Any]:
        return {"size": self.size, "blanks": self.blanks}

    def _solved_grid(self, rng: random.Random) -> list[int]:
        n, br, bc = self.size, self.box_rows, self.box_cols
        # A valid base pattern, then symmetries that keep it valid: digits, rows within a band,
        # bands, columns within a stack, stacks.
        base = [[(bc * (r % br) + r // br + c) % n + 1 for c in range(n)] for r in range(n)]
        digits = list(range(1, n + 1))
        rng.shuffle(digits)
        bands = rng.sample(range(n // br), n // br)
        rows = [b * br + r for b in bands for r in rng.sample(range(br), br)]
        stacks = rng.sample(range(n // bc), n // bc)
        cols = [s * bc + c for s in stacks for c in rng.sample(range(bc), bc)]
        return [digits[base[r][c] - 1] for r in rows for c in cols]

    def _generate(self, rng: random.Random) -> tuple[list[int], list[int], dict[str, LabelSpan]]:
        for _ in range(MAX_PASSES):
            solution = self._solved_grid(rng)
            puzzle = list(solution)
            removed = 0
            for cell in rng.sample(range(self.size**2), self.size**2):
                value, puzzle[cell] = puzzle[cell], 0
                if count_solutions(puzzle, self.size, self._peers) == 1:
                    removed += 1
                    if removed == self.blanks:
                        break
                else:
                    puzzle[cell] = value
            if removed == self.blanks:
                break
        else:
            raise DlmprobeInputError(f"sudoku blanks={self.blanks}: no {self.size}x{self.size} puzzle with a unique "
                                     f"solution found in {MAX_PASSES} tries; use fewer blanks")
        return self._tokens_and_labels(puzzle, solution)

    def _digits(self, ids: Sequence[int]) -> list[int]:
        lookup = {tid: d + 1 for d, tid in enumerate(self._digit_ids)}
        return [lookup.get(int(i), 0) for i in ids]

    def verify(self, prompt: Sequence[int], output: Sequence[int]) -> bool:
        if len(output) != self.target_length:
            return False
        givens, grid = self._digits(prompt), self._digits(output)
        if 0 in grid or any(g and g != v for g, v in zip(givens, grid)):
            return False
        return all(grid[p] != grid[c] for c in range(len(grid)) for p in self._peers[c])

    def candidates(self, prompt: Sequence[int]) -> list[int]:
        """Number of candidate digits of every cell of the puzzle (1 for a given)."""
        grid = self._digits(prompt)
        return [
            1 if v else self.size - len({grid[p] for p in self._peers[c]} - {0})
            for c, v in enumerate(grid)
        ]

    def paraphrase(
        self, prompt: Sequence[int], target: Sequence[int], rng: random.Random
    ) -> tuple[tuple[int, ...], tuple[int, ...], np.ndarray]:
        """The same puzzle with the digits 1..size permuted, in the givens and the committed cells."""
        digits = list(self._digit_ids)
        rng.shuffle(digits)
        return self._relabel(prompt, target, self._digit_ids, digits)

    def render(self, prompt: Sequence[int], output: Sequence[int] | None = None) -> str:
        grids = [self.vocab.decode(prompt)] + ([self.vocab.decode(output)] if output is not None else [])
        lines = []
        for r in range(self.size):
            if r and r % self.box_rows == 0:
                lines.append("   ".join("-" * (2 * self.size + self.size // self.box_cols - 2) for _ in grids))
            parts = []
            for g in grids:
                row = g[r * self.size : (r + 1) * self.size]
                stacks = [" ".join(row[s : s + self.box_cols]) for s in range(0, self.size, self.box_cols)]
                parts.append(" | ".join(stacks))
            lines.append("   ".join(parts))
        return "\n".join(lines)

    def _tokens_and_labels(self, puzzle: list[int], solution: list[int]) -> tuple[list[int], list[int], dict[str, LabelSpan]]:
        """Prompt ids, target ids and labels of a puzzle and its solution given as digits (0 = blank)."""
        blank_id = self.vocab.id("_")
        prompt = [blank_id if v == 0 else self._digit_ids[v - 1] for v in puzzle]
        target = [self._digit_ids[v - 1] for v in solution]
        blanks = tuple(i for i, v in enumerate(puzzle) if v == 0)
        labels = {
            "cell": LabelSpan(tuple(range(len(target))), tuple(target)),
            "blank": LabelSpan(blanks, tuple(target[i] for i in blanks)),
        }
        return prompt, target, labels

    # -- input-only controls (issue #12) -------------------------------------------------------
    def givens_features(self, example: Example) -> Float[np.ndarray, "cell size"]:
        """The candidate mask of every cell, (cells, size) float32: 1 where digit ``d`` (column ``d - 1``) is excluded.

        A blank cell excludes the digits of the givens in its row, column and box (one step of
        elimination, no solving); a given cell excludes every digit but its own.
        """
        grid = self._digits(example.prompt)
        excluded = np.zeros((len(grid), self.size), dtype=np.float32)
        for cell, value in enumerate(grid):
            if value:
                excluded[cell] = 1.0
                excluded[cell, value - 1] = 0.0
            else:
                for digit in {grid[p] for p in self._peers[cell]} - {0}:
                    excluded[cell, digit - 1] = 1.0
        return excluded

    def difficulty(self, example: Example) -> Int[np.ndarray, " cell"]:
        """The round of naked-single elimination that fills each cell, from the prompt alone, (cells,) int64.

        0: a given, which the target only copies. Round ``r >= 1``: the cells left with exactly one
        candidate once the givens and the cells of rounds ``< r`` are filled in (all filled at
        once). -1: a cell naked singles never fill (it needs a harder technique, or the puzzle
        has several solutions there).
        """
        grid = self._digits(example.prompt)
        rounds = np.where(np.asarray(grid) > 0, 0, -1)
        digits = set(range(1, self.size + 1))
        current = 0
        while True:
            current += 1
            singles = {}
            for cell in np.flatnonzero(rounds < 0):
                left = digits - {grid[p] for p in self._peers[cell]}
                if len(left) == 1:
                    singles[cell] = left.pop()
            if not singles:
                return rounds.astype(np.int64)
            for cell, digit in singles.items():
                grid[cell] = digit
                rounds[cell] = current

    def difficulty_name(self, value: int) -> str:
        return {0: "given", -1: "beyond naked singles"}.get(int(value), f"round {int(value)}")


class SudokuChoice(Sudoku):
    """Sudoku with several valid solutions: free choices where a hidden code could live.

    The same grids as :class:`Sudoku`, but ``blanks`` random cells are emptied and the puzzle is
    kept only if it has between ``min_solutions`` and ``max_solutions`` completions.
    :meth:`verify` accepts any of them. :meth:`free_cells` lists the blanks whose digit differs
    between solutions: a paraphrase test that remasks those (see ``dlmprobe.sampling.callbacks.RemaskCommitted``) can
    detect a code hidden in which solution a model picks.
    """

    name = "sudoku_choice"

    def __init__(self, size: int = 4, blanks: int | None = None, min_solutions: int = 2, max_solutions: int = 8):
        super().__init__(size, blanks)
        if not 2 <= min_solutions <= max_solutions:
            raise DlmprobeInputError(
                f"sudoku_choice needs 2 <= min_solutions <= max_solutions, got {min_solutions} and {max_solutions}"
            )
        self.min_solutions, self.max_solutions = min_solutions, max_solutions

    def params(self) -> dict[str, Any]:
        return {**super().params(), "min_solutions": self.min_solutions, "max_solutions": self.max_solutions}

    def _generate(self, rng: random.Random) -> tuple[list[int], list[int], dict[str, LabelSpan]]:
        cells = self.size * self.size
        for _ in range(1000):
            solution = self._solved_grid(rng)
            puzzle = list(solution)
            for cell in rng.sample(range(cells), self.blanks):
                puzzle[cell] = 0
            found = count_solutions(puzzle, self.size, self._peers, limit=self.max_solutions + 1)
            if self.min_solutions <= found <= self.max_solutions:
                break
        else:
            raise DlmprobeInputError(
                f"sudoku_choice found no puzzle with {self.min_solutions}..{self.max_solutions} solutions "
                f"in 1000 tries with {self.params()}: change blanks or the solution bounds"
            )
        return self._tokens_and_labels(puzzle, solution)

    def free_cells(self, example: Example) -> tuple[int, ...]:
        """Target positions of the blanks that hold a different digit in some other solution."""
        grid = self._digits(example.prompt)
        solution = self._digits(example.target)
        free = []
        for cell in (c for c, v in enumerate(grid) if v == 0):
            for digit in set(range(1, self.size + 1)) - {grid[p] for p in self._peers[cell]} - {solution[cell]}:
                grid[cell] = digit
                if count_solutions(grid, self.size, self._peers, limit=1):
                    free.append(cell)
                    break
            grid[cell] = 0
        return tuple(free)
