"""Between-steps callbacks for the samplers that perturb a run (see :class:`StepCallback`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dlmprobe.errors import DlmprobeInputError


@dataclass
class RemaskCommitted:
    """A sampler step callback that perturbs the commit pattern, not only token identities.

    At each step in ``steps`` it remasks ``k`` committed positions of every row, drawn at random
    among ``positions``, so the sampler decides them again later (a different position commits
    at a different time). A hidden code in *when* positions commit would not survive it; use it
    before the last step of a block, or the sampler has no step left to re-decide them.

    Args:
        mask_id: the model's mask token.
        positions: canvas positions that may be remasked, the same for every row (e.g.
            ``task.target_start + free cells``), or a (batch, pos) bool array, one row per puzzle.
        k: positions remasked per row and step (fewer where fewer are committed).
        steps: the sampler steps after which it acts.
        seed: seeds the draws; the same seed and step give the same positions.

    ``history`` records ``(step, remasked)`` per call, ``remasked`` a (batch, pos) bool array of that batch.

    Example:
        >>> shuffle = RemaskCommitted(task.vocab.mask_id, task.target_start + np.arange(4), k=2, steps=(3,))
        >>> trajectory = generate(model, task, examples, "diffusion", callback=shuffle)
    """

    mask_id: int
    positions: Sequence[int] | np.ndarray
    k: int = 1
    steps: Sequence[int] = (0,)
    seed: int = 0
    history: list[tuple[int, np.ndarray]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise DlmprobeInputError(f"RemaskCommitted needs k >= 1 positions to remask, got {self.k}")

    def _allowed(self, shape: tuple[int, int]) -> np.ndarray:
        positions = np.asarray(self.positions)
        if positions.dtype == bool:
            if positions.shape != shape:
                raise DlmprobeInputError(f"a positions mask must have the canvas shape {shape}, got {positions.shape}")
            return positions
        if positions.size and not (0 <= positions.min() and positions.max() < shape[1]):
            raise DlmprobeInputError(f"positions must be canvas positions in [0, {shape[1]}), got {positions.tolist()}")
        allowed = np.zeros(shape, dtype=bool)
        allowed[:, positions.astype(np.int64)] = True
        return allowed

    def __call__(self, step: int, rows: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        if step not in self.steps:
            return canvas
        tokens = canvas.cpu().numpy()
        candidates = self._allowed(tokens.shape) & (tokens != self.mask_id)  # (batch, pos)
        # Draws seeded per example, so the positions do not depend on how the run was batched.
        draws = np.stack([np.random.default_rng([self.seed, step, int(row)]).random(tokens.shape[1]) for row in rows])
        score = np.where(candidates, draws, -1.0)
        rank = np.argsort(np.argsort(-score, axis=1), axis=1)  # 0 = highest score
        remask = candidates & (rank < self.k)
        self.history.append((step, remask))
        return canvas.masked_fill(torch.as_tensor(remask, device=canvas.device), self.mask_id)
