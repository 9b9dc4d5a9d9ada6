"""The Task interface shared by every reasoning task.

A task generates seeded, deterministic examples, each a fixed-length ``prompt`` and ``target`` of
token ids over the task's own :class:`Vocab`. Every example carries its probe labels: which target
positions hold a planned answer or goal, and their values. A model sees the sequence
``<bos> prompt <sep> target <eos>``; only the target is ever masked or generated.

Example:
    >>> from dlmprobe.tasks import get_task
    >>> task = get_task("arith")
    >>> ex = task.sample(1, split="eval", seed=0)[0]
    >>> task.verify(ex.prompt, ex.target)
    True
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int

from dlmprobe.errors import DlmprobeInputError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<sep>", "<eos>", "<mask>")
Split = Literal["train", "eval"]
SPLITS: tuple[str, ...] = ("train", "eval")
# One puzzle in ten goes to the evaluation split, decided by a hash of the prompt.
EVAL_FRACTION_DENOMINATOR = 10


class Vocab:
    """Special tokens first (pad, bos, sep, eos, mask), then the task's own tokens."""

    def __init__(self, tokens: Sequence[str]):
        self.tokens: tuple[str, ...] = SPECIAL_TOKENS + tuple(tokens)
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError(f"vocabulary tokens must be unique, got {list(tokens)}")
        self._ids = {tok: i for i, tok in enumerate(self.tokens)}

    pad_id = property(lambda self: self._ids["<pad>"])
    bos_id = property(lambda self: self._ids["<bos>"])
    sep_id = property(lambda self: self._ids["<sep>"])
    eos_id = property(lambda self: self._ids["<eos>"])
    mask_id = property(lambda self: self._ids["<mask>"])

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def id(self, token: str) -> int:
        try:
            return self._ids[token]
        except KeyError:
            raise DlmprobeInputError(f"unknown token {token!r}; expected one of {list(self.tokens)}") from None

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.id(t) for t in tokens]

    def decode(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.tokens):
                raise DlmprobeInputError(f"token id {i} is outside the vocabulary of size {len(self.tokens)}")
            out.append(self.tokens[i])
        return out


@dataclass(frozen=True)
class LabelSpan:
    """Target positions that hold one kind of planned answer, and the token ids they hold."""

    positions: tuple[int, ...]
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.positions) != len(self.values):
            raise ValueError(
                f"a label needs one value per position, got {len(self.positions)} positions "
                f"and {len(self.values)} values"
            )


@dataclass(frozen=True)
class Example:
    """One puzzle: prompt and target token ids, and the probe labels of the target."""

    prompt: tuple[int, ...]
    target: tuple[int, ...]
    labels: dict[str, LabelSpan] = field(default_factory=dict)
    uid: str = ""

    def sequence(self, vocab: Vocab) -> list[int]:
        """``<bos> prompt <sep> target <eos>`` as token ids."""
        return [vocab.bos_id, *self.prompt, vocab.sep_id, *self.target, vocab.eos_id]


def puzzle_uid(prompt: Sequence[int]) -> str:
    """A stable identifier of a puzzle, a hash of its prompt tokens."""
    return hashlib.sha256(",".join(map(str, prompt)).encode()).hexdigest()[:16]


def split_of(uid: str) -> Split:
    """Hash-based split: a puzzle is in exactly one split whatever seed produced it."""
    return "eval" if int(uid, 16) % EVAL_FRACTION_DENOMINATOR == 0 else "train"


class Task(ABC):
    """A seeded generator of reasoning puzzles with known answers.

    Subclasses set ``name``, build ``self.vocab`` in ``__init__`` and implement
    :meth:`_generate`, :meth:`verify` and :meth:`render`.
    """

    name: str = ""
    # The label that holds "the answer" (what a planning probe decodes first).
    answer_label: str = ""
    vocab: Vocab

    @property
    @abstractmethod
    def prompt_length(self) -> int:
        """Number of prompt tokens (fixed for a given configuration)."""

    @property
    @abstractmethod
    def target_length(self) -> int:
        """Number of target tokens (fixed for a given configuration)."""

    @property
    def sequence_length(self) -> int:
        """Length of ``<bos> prompt <sep> target <eos>``."""
        return self.prompt_length + self.target_length + 3

    @property
    def target_start(self) -> int:
        """Index of the first target token in the full sequence."""
        return self.prompt_length + 2

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The configuration that, passed back to the constructor, rebuilds this task."""

    @abstractmethod
    def _generate(self, rng: random.Random) -> tuple[list[int], list[int], dict[str, LabelSpan]]:
        """One random puzzle: prompt ids, target ids, labels."""

    @abstractmethod
    def verify(self, prompt: Sequence[int], output: Sequence[int]) -> bool:
        """Whether ``output`` (target-length token ids) is a correct solution of ``prompt``."""

    @abstractmethod
    def render(self, prompt: Sequence[int], output: Sequence[int] | None = None) -> str:
        """A human-readable picture of a puzzle and, if given, an output."""

    def answer_positions(self) -> tuple[int, ...]:
        """Target-relative positions of the answer label (the same for every example)."""
        return self.sample(1, split="eval", seed=0)[0].labels[self.answer_label].positions

    def label_names(self) -> list[str]:
        """Names of the probe labels every example of this task carries."""
        return list(self.sample(1, split="eval", seed=0)[0].labels)

    def sample(self, n: int, split: Split = "train", seed: int = 0) -> list[Example]:
        """``n`` distinct puzzles of one split; the same arguments give the same puzzles."""
        if split not in SPLITS:
            raise DlmprobeInputError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise DlmprobeInputError(f"number of examples must be >= 0, got {n}")
        # Seed from the split and task configuration too, so streams of different splits differ.
        rng = random.Random(f"{self.name}|{sorted(self.params().items())}|{split}|{seed}")
        examples: list[Example] = []
        seen: set[str] = set()
        attempts = 0
        while len(examples) < n:
            attempts += 1
            if attempts > 1000 * (n + 10):
                raise DlmprobeInputError(
                    f"{self.name}: could only find {len(examples)} distinct {split} puzzles of "
                    f"{n} requested with {self.params()}; the configuration has too few puzzles"
                )
            prompt, target, labels = self._generate(rng)
            uid = puzzle_uid(prompt)
            if uid in seen or split_of(uid) != split:
                continue
            seen.add(uid)
            examples.append(Example(tuple(prompt), tuple(target), labels, uid))
        return examples

    def paraphrase(
        self, prompt: Sequence[int], target: Sequence[int], rng: random.Random
    ) -> tuple[tuple[int, ...], tuple[int, ...], np.ndarray]:
        """A random meaning-preserving rewrite of a canvas: its prompt and (partly masked) target.

        Masked target positions stay masked. Returns the new prompt, the new target and
        ``token_map``, an int array over the vocabulary mapping every old token id to its new id
        (identity for tokens that are not relabelled).
        """
        raise NotImplementedError(f"task {self.name!r} has no paraphraser: implement {type(self).__name__}.paraphrase")

    def _relabel(
        self, prompt: Sequence[int], target: Sequence[int], old_ids: Sequence[int], new_ids: Sequence[int]
    ) -> tuple[tuple[int, ...], tuple[int, ...], np.ndarray]:
        """Prompt and target with every ``old_ids[i]`` replaced by ``new_ids[i]``, and that token map."""
        token_map = np.arange(len(self.vocab))
        token_map[np.asarray(old_ids)] = new_ids
        new_prompt, new_target = (tuple(token_map[np.asarray(ids, dtype=np.int64)].tolist()) for ids in (prompt, target))
        return new_prompt, new_target, token_map

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    # -- input-only controls (issue #12) -------------------------------------------------------
    def givens_features(self, example: Example) -> Float[np.ndarray, "target k"]:
        """An input-only feature of every target position, read from the prompt alone.

        Row ``j`` belongs to target position ``j`` (index it with a label's ``positions``). It is
        the "givens" baseline a probe must beat: what a shallow reading of the prompt tells about
        the position, without solving the puzzle.
        """
        raise NotImplementedError(f"task {self.name!r} has no givens feature: implement {type(self).__name__}.givens_features")

    def difficulty(self, example: Example) -> Int[np.ndarray, " target"]:
        """How hard each target position is from the prompt alone; :meth:`difficulty_name` names the values."""
        raise NotImplementedError(f"task {self.name!r} has no difficulty: implement {type(self).__name__}.difficulty")

    def difficulty_name(self, value: int) -> str:
        """The stratum a :meth:`difficulty` value stands for, e.g. ``"round 2"``."""
        return f"difficulty {value}"


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

    ``history`` records ``(step, remasked)`` with ``remasked`` a (batch, pos) bool array.

    Example:
        >>> shuffle = RemaskCommitted(task.vocab.mask_id, task.target_start + np.arange(4), k=2, steps=(3,))
        >>> trajectory = sample_diffusion(model, prefix, gen_length, mask_id, callback=shuffle)
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

    def __call__(self, step: int, canvas: torch.Tensor) -> torch.Tensor:
        if step not in self.steps:
            return canvas
        tokens = canvas.cpu().numpy()
        candidates = self._allowed(tokens.shape) & (tokens != self.mask_id)  # (batch, pos)
        rng = np.random.default_rng([self.seed, step])
        score = np.where(candidates, rng.random(tokens.shape), -1.0)
        rank = np.argsort(np.argsort(-score, axis=1), axis=1)  # 0 = highest score
        remask = candidates & (rank < self.k)
        self.history.append((step, remask))
        return canvas.masked_fill(torch.as_tensor(remask, device=canvas.device), self.mask_id)
