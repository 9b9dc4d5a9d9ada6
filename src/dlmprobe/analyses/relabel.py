"""Token maps, and the paraphrases of a :class:`~dlmprobe.analyses.setting.Setting`'s canvas: by its
task's relabelling (:class:`Relabeller`), and of its commit pattern (where :class:`Remask` remasks).

A built-in checkpoint's canvas holds task ids: the task's paraphraser rewrites the prompt and the
generated region and gives the token map over the whole vocabulary. A Hugging Face model's canvas
holds tokenizer ids of a built-in task rendered as text: the paraphrased prompt (task ids) is
rendered and tokenized again (arith: the commutative operands swapped in the text), and the token
map is carried over to the answer items' token ids (sudoku: a digit permutation through the
tokenizer's digit ids), which is all a relabelling may move in the generated region.

Either way a labelling maps the indices of an alphabet (``symbols``: the token ids a relabelling
may move) to the indices used at one step; a token outside the alphabet is never relabelled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from dlmprobe.analyses.setting import Setting
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.tasks import Task
from dlmprobe.tasks.text import BuiltinTextTask, CanvasTemplate, answer_classes, encode


def compose(first: np.ndarray, then: np.ndarray) -> np.ndarray:
    """The token map of relabelling by ``first`` and then by ``then``."""
    return then[first]


def invert(token_map: np.ndarray) -> np.ndarray:
    """The inverse of a token map; it must be a permutation of the vocabulary."""
    if not np.array_equal(np.sort(token_map), np.arange(len(token_map))):
        raise DlmprobeInputError(f"a token map must be a permutation of 0..{len(token_map) - 1}, got {token_map.tolist()}")
    inverse = np.empty_like(token_map)
    inverse[token_map] = np.arange(len(token_map))
    return inverse


def translate(tokens: np.ndarray, source: np.ndarray, destination: np.ndarray) -> np.ndarray:
    """``tokens`` written in the labelling ``source`` rewritten in the labelling ``destination``.

    A labelling is a token map from the original ids to the ids used in it.
    """
    return destination[invert(source)[tokens]]


class Relabeller:
    """The task's paraphrases of a setting's canvas rows, one seeded random stream per example.

    ``text``: the built-in task rendered as text behind a Hugging Face setting (laid out by
    ``template``); None for a built-in checkpoint's setting.
    """

    def __init__(self, setting: Setting, seed: int, text: BuiltinTextTask | None = None,
                 template: CanvasTemplate | None = None):
        task = setting.task
        if task is None:
            raise DlmprobeInputError("a paraphrase needs a built-in task (rendered as text for a Hugging Face model), got a JSONL task")
        self.setting, self.task, self.text, self.template = setting, task, text, template
        n = len(setting.canvas)
        if text is None:
            self.symbols = np.arange(len(task.vocab))
            self.task_ids = self.symbols
        else:
            classes = answer_classes(text, setting.handle.tokenizer)
            id_of_word = {word: i for i, word in text._words().items()}
            self.symbols = np.asarray(classes["token_ids"])
            self.task_ids = np.array([id_of_word[item] for item in classes["items"]])
            self.examples = text.sample(n, split="eval", seed=seed)  # the setting's examples, as text
            self._prompt_tokens: dict[tuple[int, ...], Tensor] = {}
        size = max(setting.handle.vocab_size, int(self.symbols.max()) + 1, int(setting.canvas.max()) + 1)
        self.index = np.full(size, -1)
        self.index[self.symbols] = np.arange(len(self.symbols))
        self.position = np.full(len(task.vocab), -1)  # task id -> alphabet index
        self.position[self.task_ids] = np.arange(len(self.symbols))
        self.rngs = [random.Random(f"paraphrase|{seed}|{i}") for i in range(n)]
        self.prompts = [tuple(p) for p in setting.prompts]
        self.labellings = [[np.arange(len(self.symbols))] for _ in range(n)]

    @property
    def n_classes(self) -> int:
        """Probe classes: the alphabet, and for a text setting one more for every other token."""
        return len(self.symbols) + (self.text is not None)

    def classes(self, tokens: np.ndarray) -> np.ndarray:
        """Each token's class: its alphabet index (a text setting's other tokens: the last class)."""
        index = self.index[tokens]
        return np.where(index >= 0, index, len(self.symbols))

    def translate(self, tokens: np.ndarray, source: np.ndarray, destination: np.ndarray) -> np.ndarray:
        """:func:`translate` on the alphabet's tokens; the others are kept."""
        index, out = self.index[tokens], tokens.copy()
        inside = index >= 0
        out[inside] = self.symbols[translate(index[inside], source, destination)]
        return out

    def __call__(self, step: int, rows: Int[Tensor, " batch"], canvas: Int[Tensor, "batch pos"]) -> Tensor:
        """A fresh paraphrase of every row (a sampler callback)."""
        edited, setting = canvas.cpu(), self.setting
        gen = slice(setting.gen_start, setting.gen_start + setting.gen_length)
        for row, i in enumerate(rows.tolist()):
            if self.text is None:
                prompt_slice = slice(1, 1 + self.task.prompt_length)
                prompt, target, token_map = self.task.paraphrase(edited[row, prompt_slice].tolist(),
                                                                 edited[row, gen].tolist(), self.rngs[i])
                edited[row, prompt_slice], edited[row, gen] = torch.tensor(prompt), torch.tensor(target)
            else:
                blank = [self.task.vocab.mask_id] * self.task.target_length
                prompt, _, token_map = self.task.paraphrase(self.prompts[i], blank, self.rngs[i])
                token_map = self.position[np.asarray(token_map)[self.task_ids]]
                edited[row, : setting.gen_start] = self._prompt(i, tuple(prompt))
                tokens = edited[row, gen].numpy()
                edited[row, gen] = torch.from_numpy(self.translate(tokens, np.arange(len(token_map)), token_map))
            self.prompts[i] = tuple(int(t) for t in prompt)
            self.labellings[i].append(compose(self.labellings[i][-1], token_map))
        return edited

    def _prompt(self, i: int, prompt: tuple[int, ...]) -> Tensor:
        """Example ``i``'s prompt region with ``prompt`` rendered and tokenized in place of its own."""
        key = (i, prompt)
        if key not in self._prompt_tokens:
            setting = self.setting
            example = replace(self.examples[i], prompt=self.text._prompt(prompt))
            encoded = encode(self.text, [example], setting.handle.tokenizer, setting.mask_id, self.template)
            tokens = encoded.canvas[0, : encoded.gen_start]
            region = setting.canvas[i, : setting.gen_start].clone()
            length = int(setting.attention_mask[i, : setting.gen_start].sum())
            if len(tokens) != length:
                raise DlmprobeInputError(f"the paraphrased prompt of example {i} tokenizes to {len(tokens)} tokens, "
                                         f"expected {length} as the original: the canvas cannot keep its layout")
            region[setting.gen_start - length :] = tokens
            self._prompt_tokens[key] = region
        return self._prompt_tokens[key]


@dataclass
class Remask:
    """The commit-pattern paraphrase: ``k`` of the committed ``positions[example]`` remasked after each of ``steps``."""

    positions: np.ndarray  # (example, canvas position) bool
    k: int
    steps: tuple[int, ...]


def free_positions(setting: Setting, task: Task | None, label: str | None, seed: int) -> dict:
    """Where a commit-pattern paraphrase remasks: the free cells of a task with free choices, else the
    label's positions (default: every target position of a built-in checkpoint's ``task``, every
    labelled answer item of a text setting). ``n_free``: free cells per example (0 without free choices)."""
    n = len(setting.canvas)
    positions = np.zeros(setting.canvas.shape, dtype=bool)
    free_cells = getattr(task, "free_cells", None)
    n_free = np.zeros(n, dtype=np.int64)
    if free_cells is not None:
        for i, example in enumerate(task.sample(n, split="eval", seed=seed)):
            cells = np.asarray(free_cells(example), dtype=np.int64)
            positions[i, setting.gen_start + cells] = True
            n_free[i] = len(cells)
    else:
        labels = [label] if label is not None else [] if task is not None else list(setting.spans[0])
        gen = slice(setting.gen_start, setting.gen_start + setting.gen_length)
        positions[:, gen] = np.any([setting.label_mask(name).numpy() for name in labels], axis=0) if labels else True
    return {"positions": positions, "n_free": n_free, "choices": free_cells is not None}
