"""Multi-step modular arithmetic, evaluated left to right, every intermediate result written out.

Prompt: ``a0 op1 a1 op2 a2 … opk ak`` with operands in ``0..modulus-1``. Target: ``r1 r2 … rk``
with ``r1 = a0 op1 a1 (mod m)`` and ``ri = r(i-1) opi ai (mod m)``; ``rk`` is the answer. Labels:
``answer`` (the last target token), ``intermediate`` (all the others) and ``step{i}`` (each result
alone), so analyses can corrupt one intermediate result and watch the answer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Float, Int

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.tasks.task import (
    MAX_SEQUENCE_LENGTH,
    MAX_VOCAB_SIZE,
    Example,
    LabelSpan,
    Task,
    Vocab,
    check_int,
)

OPERATIONS = {
    "+": lambda a, b, m: (a + b) % m,
    "-": lambda a, b, m: (a - b) % m,
    "*": lambda a, b, m: (a * b) % m,
}


class Arith(Task):
    name = "arith"
    answer_label = "answer"

    def __init__(self, n_ops: int = 4, modulus: int = 10, ops: str = "+-*"):
        check_int("arith", "n_ops", n_ops, 1, (MAX_SEQUENCE_LENGTH - 4) // 3)
        check_int("arith", "modulus", modulus, 2, MAX_VOCAB_SIZE - 5 - len(OPERATIONS))
        if not isinstance(ops, str) or not ops or any(o not in OPERATIONS for o in ops) or len(set(ops)) != len(ops):
            raise DlmprobeInputError(f"arith ops must be distinct characters of {''.join(OPERATIONS)!r}, got ops={ops!r}")
        self.n_ops, self.modulus, self.ops = n_ops, modulus, ops
        self.vocab = Vocab([str(v) for v in range(modulus)] + list(ops))
        self._num_ids = [self.vocab.id(str(v)) for v in range(modulus)]
        self._check_size()

    @property
    def prompt_length(self) -> int:
        return 2 * self.n_ops + 1

    @property
    def target_length(self) -> int:
        return self.n_ops

    def params(self) -> dict[str, Any]:
        return {"n_ops": self.n_ops, "modulus": self.modulus, "ops": self.ops}

    def evaluate(self, prompt: Sequence[int]) -> list[int]:
        """The intermediate results and answer (as numbers) of a prompt."""
        words = self.vocab.decode(prompt)
        value, results = int(words[0]), []
        for op, operand in zip(words[1::2], words[2::2]):
            value = OPERATIONS[op](value, int(operand), self.modulus)
            results.append(value)
        return results

    def _generate(self, rng: random.Random) -> tuple[list[int], list[int], dict[str, LabelSpan]]:
        operands = [rng.randrange(self.modulus) for _ in range(self.n_ops + 1)]
        ops = [rng.choice(self.ops) for _ in range(self.n_ops)]
        prompt = [self._num_ids[operands[0]]]
        for op, operand in zip(ops, operands[1:]):
            prompt += [self.vocab.id(op), self._num_ids[operand]]
        target = [self._num_ids[v] for v in self.evaluate(prompt)]
        k = self.n_ops
        labels = {
            "answer": LabelSpan((k - 1,), (target[-1],)),
            "intermediate": LabelSpan(tuple(range(k - 1)), tuple(target[:-1])),
            **{f"step{i + 1}": LabelSpan((i,), (target[i],)) for i in range(k)},
        }
        return prompt, target, labels

    def verify(self, prompt: Sequence[int], output: Sequence[int]) -> bool:
        expected = [self._num_ids[v] for v in self.evaluate(prompt)]
        return [int(t) for t in output] == expected

    def answer_from(self, prompt: Sequence[int], output: Sequence[int]) -> int | None:
        """The answer token that follows from ``output``'s own last intermediate result.

        That is the prompt's last operation and operand applied to ``output[-2]`` (to ``a0`` when
        there is one operation), whatever the earlier results are; None if ``output[-2]`` is not a
        number (e.g. still masked).
        """
        words = self.vocab.decode(prompt)
        previous = words[0] if self.n_ops == 1 else self.vocab.decode([output[-2]])[0]
        if not previous.isdigit():
            return None
        return self._num_ids[OPERATIONS[words[-2]](int(previous), int(words[-1]), self.modulus)]

    def paraphrase(
        self, prompt: Sequence[int], target: Sequence[int], rng: random.Random
    ) -> tuple[tuple[int, ...], tuple[int, ...], np.ndarray]:
        """The same problem with ``a0`` and ``a1`` in random order when ``op1`` is ``+`` or ``*``.

        Only prompt tokens move: every result stays the same, so the target is unchanged and the
        token map is the identity.
        """
        prompt = [int(t) for t in prompt]
        swap = rng.random() < 0.5
        if swap and self.vocab.tokens[prompt[1]] in ("+", "*"):
            prompt[0], prompt[2] = prompt[2], prompt[0]
        return tuple(prompt), tuple(int(t) for t in target), np.arange(len(self.vocab))

    def render(self, prompt: Sequence[int], output: Sequence[int] | None = None) -> str:
        text = " ".join(self.vocab.decode(prompt)) + f"  (mod {self.modulus})"
        if output is not None:
            text += "  =>  " + " ".join(self.vocab.decode(output))
        return text

    # -- input-only controls (issue #12) -------------------------------------------------------
    def givens_features(self, example: Example) -> Float[np.ndarray, "target k"]:
        """Per result ``r_i``: its operation, its operand ``a_i`` and ``a0``, one-hot, (n_ops, len(ops) + 2 * modulus).

        What the prompt says at that step of the chain, without carrying the chain.
        """
        words = self.vocab.decode(example.prompt)
        n_ops, m = len(self.ops), self.modulus
        out = np.zeros((self.n_ops, n_ops + 2 * m), dtype=np.float32)
        for i, (op, operand) in enumerate(zip(words[1::2], words[2::2])):
            out[i, self.ops.index(op)] = 1.0
            out[i, n_ops + int(operand)] = 1.0
            out[i, n_ops + m + int(words[0])] = 1.0
        return out

    def difficulty(self, example: Example) -> Int[np.ndarray, " target"]:
        """Chain depth of each result, (n_ops,) int64: how many operations it depends on.

        ``r_i`` depends on operations 1..i, except that ``* 0`` makes a result 0 whatever came
        before: depth 0 there, counting up again after it.
        """
        words = self.vocab.decode(example.prompt)
        depth, out = 0, []
        for op, operand in zip(words[1::2], words[2::2]):
            depth = 0 if op == "*" and int(operand) == 0 else depth + 1
            out.append(depth)
        return np.asarray(out, dtype=np.int64)

    def difficulty_name(self, value: int) -> str:
        return "constant (after * 0)" if int(value) == 0 else f"depth {int(value)}"
