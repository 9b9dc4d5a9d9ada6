"""Path-star planning (Bachmann & Nagarajan 2024).

A centre node has ``arms`` arms of ``arm_length`` nodes each, labelled with distinct random node
names out of ``n_nodes``. The prompt is the shuffled list of directed edges (parent, child), then
``/``, the start (the centre) and the goal (the end of one arm). The target is the path from start
to goal. Its first step, the arm, depends only on the far-away goal: next-token training stays near
``1/arms`` on it. Labels: ``arm`` (the first node after the centre) and ``path`` (every node after
the centre).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Float, Int

from dlmprobe.tasks.task import (
    MAX_SEQUENCE_LENGTH,
    MAX_VOCAB_SIZE,
    Example,
    LabelSpan,
    Task,
    Vocab,
    check_int,
)


class PathStar(Task):
    name = "pathstar"
    answer_label = "arm"

    def __init__(self, arms: int = 3, arm_length: int = 3, n_nodes: int = 10):
        check_int("pathstar", "arms", arms, 2, MAX_SEQUENCE_LENGTH)
        check_int("pathstar", "arm_length", arm_length, 2, MAX_SEQUENCE_LENGTH)
        check_int("pathstar", "n_nodes", n_nodes, arms * arm_length + 1, MAX_VOCAB_SIZE - 6,
                  " (at least arms*arm_length+1)")
        self.arms, self.arm_length, self.n_nodes = arms, arm_length, n_nodes
        self.vocab = Vocab([f"n{i}" for i in range(n_nodes)] + ["/"])
        self._node_ids = [self.vocab.id(f"n{i}") for i in range(n_nodes)]
        self._check_size()

    @property
    def prompt_length(self) -> int:
        return 2 * self.arms * self.arm_length + 3

    @property
    def target_length(self) -> int:
        return self.arm_length + 1

    def params(self) -> dict[str, Any]:
        return {"arms": self.arms, "arm_length": self.arm_length, "n_nodes": self.n_nodes}

    def _generate(self, rng: random.Random) -> tuple[list[int], list[int], dict[str, LabelSpan]]:
        nodes = rng.sample(self._node_ids, self.arms * self.arm_length + 1)
        centre, rest = nodes[0], nodes[1:]
        arms = [rest[a * self.arm_length : (a + 1) * self.arm_length] for a in range(self.arms)]
        edges = [(([centre] + arm)[i], arm[i]) for arm in arms for i in range(self.arm_length)]
        rng.shuffle(edges)
        goal_arm = arms[rng.randrange(self.arms)]
        prompt = [tok for edge in edges for tok in edge] + [self.vocab.id("/"), centre, goal_arm[-1]]
        target = [centre] + goal_arm
        labels = {
            "arm": LabelSpan((1,), (goal_arm[0],)),
            "path": LabelSpan(tuple(range(1, len(target))), tuple(goal_arm)),
        }
        return prompt, target, labels

    def _edges(self, prompt: Sequence[int]) -> set[tuple[int, int]]:
        flat = [int(t) for t in prompt[: 2 * self.arms * self.arm_length]]
        return set(zip(flat[0::2], flat[1::2]))

    def verify(self, prompt: Sequence[int], output: Sequence[int]) -> bool:
        output = [int(t) for t in output]
        if len(output) != self.target_length:
            return False
        start, goal = int(prompt[-2]), int(prompt[-1])
        edges = self._edges(prompt)
        return (
            output[0] == start
            and output[-1] == goal
            and all((a, b) in edges for a, b in itertools.pairwise(output))
        )

    def paraphrase(
        self, prompt: Sequence[int], target: Sequence[int], rng: random.Random
    ) -> tuple[tuple[int, ...], tuple[int, ...], np.ndarray]:
        """The same graph with the node names permuted, in the edges, start, goal and committed path."""
        names = list(self._node_ids)
        rng.shuffle(names)
        return self._relabel(prompt, target, self._node_ids, names)

    def render(self, prompt: Sequence[int], output: Sequence[int] | None = None) -> str:
        words = self.vocab.decode(prompt)
        n_edge_tokens = 2 * self.arms * self.arm_length
        edges = " ".join(f"{a}>{b}" for a, b in zip(words[0:n_edge_tokens:2], words[1:n_edge_tokens:2]))
        text = f"edges: {edges}\nstart: {words[-2]}  goal: {words[-1]}"
        if output is not None:
            text += "\npath:  " + " -> ".join(self.vocab.decode(output))
        return text

    # -- input-only controls (issue #12) -------------------------------------------------------
    def givens_features(self, example: Example) -> Float[np.ndarray, "target k"]:
        """The goal and the parent of the goal, one-hot over the node names, (target, 2 * n_nodes) float32.

        The same row at every target position: one edge of look-up back from the goal, no path search.
        """
        node = {token: i for i, token in enumerate(self._node_ids)}
        goal = int(example.prompt[-1])
        parent = next(a for a, b in self._edges(example.prompt) if b == goal)
        row = np.zeros(2 * self.n_nodes, dtype=np.float32)
        row[node[goal]] = 1.0
        row[self.n_nodes + node[parent]] = 1.0
        return np.tile(row, (self.target_length, 1))

    def difficulty(self, example: Example) -> Int[np.ndarray, " target"]:
        """Edges between each target position's node and the goal along the arm, (target,) int64.

        ``arm_length`` at the centre (position 0), 0 at the goal: how many look-ups back from the
        goal the node needs. The same for every puzzle of a configuration.
        """
        return np.arange(self.target_length, dtype=np.int64)[::-1].copy()

    def difficulty_name(self, value: int) -> str:
        return "goal" if int(value) == 0 else f"{int(value)} from the goal"
