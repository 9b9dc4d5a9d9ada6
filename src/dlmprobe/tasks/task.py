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
from jaxtyping import Float, Int

from dlmprobe.choices import SPLITS
from dlmprobe.errors import DlmprobeInputError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<sep>", "<eos>", "<mask>")
Split = Literal["train", "eval"]
# One puzzle in ten goes to the evaluation split, decided by a hash of the prompt.
EVAL_FRACTION_DENOMINATOR = 10
# Limits every task's parameters are checked against before any work: past them a model would not
# fit or a puzzle would take unbounded time to draw.
MAX_SEQUENCE_LENGTH = 4096
MAX_VOCAB_SIZE = 4096


def check_int(task: str, name: str, value: Any, low: int, high: int, why: str = "") -> int:
    """``value`` if it is an integer in ``low..high``; else one DlmprobeInputError line naming ``name=value``."""
    if isinstance(value, bool) or not isinstance(value, int):
        expected = f"an integer between {low} and {high}"
    elif value < low:
        expected = f">= {low}"
    elif value > high:
        expected = f"between {low} and {high}"
    else:
        return value
    raise DlmprobeInputError(f"{task} {name} must be {expected}{why}, got {name}={value!r}")


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

    def _check_size(self) -> None:
        """Refuse a configuration whose sequences or vocabulary exceed the kit's limits (call at the end of ``__init__``)."""
        if self.sequence_length > MAX_SEQUENCE_LENGTH or len(self.vocab) > MAX_VOCAB_SIZE:
            raise DlmprobeInputError(
                f"{self.name} with {self.params()} is too large: expected sequences of at most {MAX_SEQUENCE_LENGTH} "
                f"tokens and a vocabulary of at most {MAX_VOCAB_SIZE}, got {self.sequence_length} and {len(self.vocab)}")

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
            if attempts > 1000 * (n + 10):  # far past what any configuration with n puzzles needs
                raise DlmprobeInputError(
                    f"{self.name}: could only find {len(examples)} distinct {split} puzzles of "
                    f"n={n} requested with {self.params()}; the configuration has too few puzzles"
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
