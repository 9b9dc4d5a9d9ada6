"""Sudoku with unique solutions: 4×4 (2×2 boxes), 6×6 (2×3 boxes) and 9×9 (3×3 boxes).

The prompt is the grid read row by row with ``_`` for a blank; the target is the solved grid.
Labels: ``cell`` (every cell's value) and ``blank`` (only the cells the model has to find).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from dlmprobe.tasks.task import LabelSpan, Task, Vocab, check_int
from dlmprobe.errors import DlmprobeInputError

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
        blank_id = self.vocab.id("_")
        prompt = [blank_id if v == 0 else self._digit_ids[v - 1] for v in puzzle]
        target = [self._digit_ids[v - 1] for v in solution]
        blanks = tuple(i for i, v in enumerate(puzzle) if v == 0)
        labels = {
            "cell": LabelSpan(tuple(range(len(target))), tuple(target)),
            "blank": LabelSpan(blanks, tuple(target[i] for i in blanks)),
        }
        return prompt, target, labels

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
