"""Tasks as text for a real tokenizer, and the canvas a real model denoises.

A :class:`TextTask` yields :class:`TextExample` s: a prompt string, the answer as a tuple of items
(one string per target token of a built-in task; the whole answer string for a JSONL task) and its
probe labels as item indices. Two sources: every built-in task (sudoku, pathstar, arith) through
:class:`BuiltinTextTask`, and a user's JSONL file of ``{"prompt", "answer"}`` (optional
``"reasoning"``) through :class:`JsonlTask`.

:func:`encode` lays examples out for one tokenizer following a :class:`CanvasTemplate`::

    prompt | [MASK] * reasoning_length | answer_prefix | [MASK] * answer_length

The generated region is everything after the prompt. Template text inside it (``answer_prefix``,
e.g. ``"The answer is"``: the forced answer slot of the early-answer literature) is *fixed*: it is
never masked and never committed. Prompts are left-padded, so every example's region starts at
the same column.

**Labels on tokens.** Each answer item is tokenized on its own, with a leading space, and the
answer slot is the concatenation of the items' tokens (EOS-padded to ``answer_length``). An item
is labelled at its *first distinguishing token*: the first token after the prefix that the
tokenizations of every item of the task's answer set share (Qwen-style tokenizers give ``" "`` then
``"7"`` for ``" 7"``; the label sits on ``"7"``). The label's value is that token's id, so it can be
compared with the model's own argmax there. A built-in task's answer set must get distinct labelled
tokens (checked: :class:`DlmprobeInputError` otherwise); a JSONL task's labels are the first token
of a possibly multi-token answer, and answers may share it.

Example:
    >>> task = BuiltinTextTask(get_task("arith", n_ops=2))
    >>> canvas = encode(task, task.sample(4, "eval"), tokenizer, mask_id, CanvasTemplate.forced_answer())
    >>> canvas.labels[0]["answer"].positions       # canvas columns of the answer's labelled token
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.tasks.task import LabelSpan, Split, Task, puzzle_uid, split_of

ANSWER_PREFIX = "The answer is"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class TextExample:
    """One example as text; ``labels`` maps a label name to indices into ``answer``."""

    prompt: str
    answer: tuple[str, ...]
    labels: dict[str, tuple[int, ...]]
    reasoning: str = ""
    uid: str = ""


class TextTask(Protocol):
    name: str
    answer_label: str
    #: every answer item this task can produce: the probe classes before tokenization
    answer_set: tuple[str, ...]
    #: whether the answer set must get distinct labelled tokens in every tokenizer
    strict_labels: bool

    def sample(self, n: int, split: Split = "eval", seed: int = 0) -> list[TextExample]: ...

    def describe(self) -> dict[str, Any]: ...


class BuiltinTextTask:
    """A built-in task rendered as words; the answer items are its target tokens."""

    strict_labels = True

    def __init__(self, task: Task):
        self.task = task
        self.name, self.answer_label = task.name, task.answer_label
        words = self._words()
        self.answer_set = tuple(dict.fromkeys(words[t] for t in self._answer_token_ids()))

    def _words(self) -> dict[int, str]:
        """Task token id -> word. Path-star nodes become letters: one token in common tokenizers."""
        tokens = self.task.vocab.tokens
        if self.task.name == "pathstar" and self.task.n_nodes <= len(LETTERS):
            return {i: LETTERS[int(t[1:])] if t.startswith("n") and t[1:].isdigit() else t for i, t in enumerate(tokens)}
        return dict(enumerate(tokens))

    def _answer_token_ids(self) -> list[int]:
        name = self.task.name
        if name == "sudoku":
            return [self.task.vocab.id(str(d)) for d in range(1, self.task.size + 1)]
        if name == "arith":
            return [self.task.vocab.id(str(v)) for v in range(self.task.modulus)]
        if name == "pathstar":
            return [self.task.vocab.id(f"n{i}") for i in range(self.task.n_nodes)]
        raise DlmprobeInputError(f"no text rendering for task {name!r}; expected one of sudoku, pathstar, arith")

    def _prompt(self, prompt: Sequence[int]) -> str:
        words, task = self._words(), self.task
        w = [words[int(t)] for t in prompt]
        if task.name == "arith":
            return f"Compute {' '.join(w)} modulo {task.modulus}, left to right, writing every intermediate result."
        if task.name == "sudoku":
            rows = [" ".join(w[r * task.size : (r + 1) * task.size]) for r in range(task.size)]
            return f"Solve this {task.size}x{task.size} sudoku, _ is a blank cell. " + " / ".join(rows) + "."
        n_edge_tokens = 2 * task.arms * task.arm_length
        edges = ", ".join(f"{a} > {b}" for a, b in zip(w[0:n_edge_tokens:2], w[1:n_edge_tokens:2]))
        return f"Edges: {edges}. Write the path from {w[-2]} to {w[-1]}."

    def sample(self, n: int, split: Split = "eval", seed: int = 0) -> list[TextExample]:
        words, out = self._words(), []
        for ex in self.task.sample(n, split=split, seed=seed):
            labels = {}
            for label, span in ex.labels.items():
                if any(ex.target[p] != v for p, v in zip(span.positions, span.values)):
                    raise DlmprobeInputError(f"{self.name} label {label!r} is not a target token; a text task labels answer items")
                labels[label] = span.positions
            answer = tuple(words[int(t)] for t in ex.target)
            out.append(TextExample(self._prompt(ex.prompt), answer, labels, uid=ex.uid))
        return out

    def describe(self) -> dict[str, Any]:
        return {"source": "builtin", "task": self.name, "params": self.task.params()}


class JsonlTask:
    """A user's JSONL file, one ``{"prompt", "answer"}`` object a line (optional ``"reasoning"``)."""

    answer_label = "answer"
    strict_labels = False

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.stem
        if not self.path.is_file():
            raise DlmprobeInputError(f"expected a JSONL file of {{'prompt', 'answer'}} objects, got missing path {str(path)!r}")
        self.examples = [self._parse(i, line) for i, line in enumerate(self.path.read_text().splitlines(), 1) if line.strip()]
        if not self.examples:
            raise DlmprobeInputError(f"expected at least one {{'prompt', 'answer'}} line in {self.path}, got none")
        self.answer_set = tuple(dict.fromkeys(ex.answer[0] for ex in self.examples))

    def _parse(self, number: int, line: str) -> TextExample:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DlmprobeInputError(f"{self.path}:{number}: expected a JSON object, got invalid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "answer")):
            raise DlmprobeInputError(f"{self.path}:{number}: expected string fields 'prompt' and 'answer', got {line[:80]!r}")
        if not isinstance(row.get("reasoning", ""), str):
            raise DlmprobeInputError(f"{self.path}:{number}: expected 'reasoning' to be a string, got {row['reasoning']!r}")
        uid = puzzle_uid([row["prompt"]])
        return TextExample(row["prompt"], (row["answer"],), {"answer": (0,)}, row.get("reasoning", ""), uid)

    def sample(self, n: int, split: Split = "eval", seed: int = 0) -> list[TextExample]:
        """``n`` examples of one split (hash of the prompt, as for built-in tasks), shuffled by ``seed``."""
        pool = [ex for ex in self.examples if split_of(ex.uid) == split]
        if n > len(pool):
            raise DlmprobeInputError(f"{self.path} has {len(pool)} {split} examples, {n} requested")
        random.Random(seed).shuffle(pool)
        return pool[:n]

    def describe(self) -> dict[str, Any]:
        return {"source": "jsonl", "path": str(self.path), "n_examples": len(self.examples)}


@dataclass(frozen=True)
class CanvasTemplate:
    """Layout of the generated region: ``[MASK]*reasoning_length, answer_prefix, [MASK]*answer_length``.

    ``None`` lengths take the longest reference reasoning / answer of the batch, in tokens.
    """

    reasoning_length: int | None = 0
    answer_prefix: str = ""
    answer_length: int | None = None

    @classmethod
    def forced_answer(cls, reasoning_length: int | None = None, answer_length: int | None = None) -> CanvasTemplate:
        """The early-answer layout: free reasoning, then ``"The answer is"``, then the answer slot."""
        return cls(reasoning_length, ANSWER_PREFIX, answer_length)

    def to_dict(self) -> dict[str, Any]:
        return {"reasoning_length": self.reasoning_length, "answer_prefix": self.answer_prefix, "answer_length": self.answer_length}


@dataclass
class TextCanvas:
    """A batch of examples laid out for one tokenizer (see the module docstring)."""

    canvas: Int[Tensor, "batch pos"]  # starting canvas: masks in the region except fixed tokens
    target: Int[Tensor, "batch pos"]  # the reference: reasoning (if any) and answer written in
    attention_mask: Int[Tensor, "batch pos"]  # 0 on left padding
    fixed: Bool[Tensor, "batch pos"]  # never masked or committed: padding, prompt, template text
    gen_start: int
    answer_start: int
    labels: list[dict[str, LabelSpan]]  # canvas columns and token ids
    classes: dict[str, Any]  # the probe classes over the vocabulary, for the store
    template: CanvasTemplate = field(default_factory=CanvasTemplate)

    @property
    def gen_length(self) -> int:
        return self.canvas.shape[1] - self.gen_start

    @property
    def answer_length(self) -> int:
        return self.canvas.shape[1] - self.answer_start


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def item_tokens(tokenizer: Any, items: Sequence[str]) -> tuple[list[list[int]], int]:
    """Each item's token ids (with a leading space) and the length of the prefix they all share."""
    tokens = [_ids(tokenizer, " " + item) for item in items]
    if any(not t for t in tokens):
        raise DlmprobeInputError(f"expected every answer item to give at least one token, got none for {items}")
    shared = 0
    while all(len(t) > shared + 1 for t in tokens) and len({t[shared] for t in tokens}) == 1:
        shared += 1
    return tokens, shared


def answer_classes(task: TextTask, tokenizer: Any) -> dict[str, Any]:
    """The probe classes of ``task`` in ``tokenizer``: each answer item's labelled token id."""
    tokens, shared = item_tokens(tokenizer, task.answer_set)
    ids = [t[shared] for t in tokens]
    if task.strict_labels and len(set(ids)) != len(ids):
        clash = sorted({task.answer_set[i] for i, t in enumerate(ids) if ids.count(t) > 1})
        raise DlmprobeInputError(f"{task.name}: expected answer items with distinct first tokens in this tokenizer, got a clash among {clash}")
    return {"rule": "answer_set", "items": list(task.answer_set), "token_ids": ids, "shared_prefix_tokens": shared}


def top_k_classes(committed: Int[Tensor, "batch pos"], positions: Sequence[int], k: int) -> dict[str, Any]:
    """Probe classes as the ``k`` most frequent tokens committed at ``positions`` (others: not a class)."""
    if k < 1:
        raise DlmprobeInputError(f"expected k >= 1 for top-k classes, got {k}")
    values, counts = committed[:, list(positions)].reshape(-1).unique(return_counts=True)
    order = counts.argsort(descending=True, stable=True)[:k]
    return {"rule": "top_k", "k": k, "token_ids": values[order].tolist()}


def encode(
    task: TextTask, examples: Sequence[TextExample], tokenizer: Any, mask_id: int, template: CanvasTemplate | None = None
) -> TextCanvas:
    """Lay ``examples`` of ``task`` out as canvases for ``tokenizer``; ``mask_id`` comes from the model."""
    template = template or CanvasTemplate()
    if not examples:
        raise DlmprobeInputError("expected at least one example to encode, got none")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if eos is None:
        raise DlmprobeInputError("expected a tokenizer with an EOS or padding token to fill unused slots, got neither")
    classes = answer_classes(task, tokenizer)
    shared = classes["shared_prefix_tokens"]
    prompts = [_ids(tokenizer, ex.prompt, special=True) for ex in examples]
    reasonings = [_ids(tokenizer, " " + ex.reasoning) if ex.reasoning else [] for ex in examples]
    answers = [[_ids(tokenizer, " " + item) for item in ex.answer] for ex in examples]
    prefix = _ids(tokenizer, " " + template.answer_prefix) if template.answer_prefix else []
    r = max(map(len, reasonings)) if template.reasoning_length is None else template.reasoning_length
    a = max(sum(map(len, items)) for items in answers) if template.answer_length is None else template.answer_length
    width = max(map(len, prompts))
    gen_start, answer_start = width, width + r + len(prefix)

    rows, targets, masks, fixed, labels = [], [], [], [], []
    for ex, prompt, reasoning, items in zip(examples, prompts, reasonings, answers):
        answer = [t for item in items for t in item]
        if len(reasoning) > r or len(answer) > a:
            raise DlmprobeInputError(
                f"example {ex.uid}: expected reasoning <= {r} and answer <= {a} tokens, got {len(reasoning)} and {len(answer)}"
            )
        lead = [pad] * (width - len(prompt)) + prompt
        rows.append(lead + [mask_id] * r + prefix + [mask_id] * a)
        targets.append(lead + reasoning + [eos] * (r - len(reasoning)) + prefix + answer + [eos] * (a - len(answer)))
        masks.append([0] * (width - len(prompt)) + [1] * (len(rows[-1]) - width + len(prompt)))
        fixed.append([True] * width + [False] * r + [True] * len(prefix) + [False] * a)
        starts = [answer_start + sum(map(len, items[:i])) for i in range(len(items))]
        columns = [start + min(shared, len(item) - 1) for start, item in zip(starts, items)]
        labels.append(
            {
                name: LabelSpan(tuple(columns[i] for i in idx), tuple(targets[-1][columns[i]] for i in idx))
                for name, idx in ex.labels.items()
            }
        )
    return TextCanvas(
        torch.tensor(rows),
        torch.tensor(targets),
        torch.tensor(masks),
        torch.tensor(fixed),
        gen_start,
        answer_start,
        labels,
        classes,
        template,
    )


def close_canvas(encoded: TextCanvas, eos: int) -> TextCanvas:
    """Append one fixed ``eos`` column: the store's layout ends with it (``<bos> prompt <sep> target <eos>``)."""
    n = encoded.canvas.shape[0]
    column = torch.full((n, 1), eos, dtype=encoded.canvas.dtype)
    return replace(
        encoded,
        canvas=torch.cat([encoded.canvas, column], 1), target=torch.cat([encoded.target, column], 1),
        attention_mask=torch.cat([encoded.attention_mask, torch.ones_like(column)], 1),
        fixed=torch.cat([encoded.fixed, torch.ones((n, 1), dtype=torch.bool)], 1),
    )


def encode_for_canvas(task: TextTask, examples: Sequence[TextExample], tokenizer: Any, template: CanvasTemplate,
                      canvas_length: int) -> TextCanvas:
    """:func:`~dlmprobe.tasks.text.encode` laid out so that the generated region and one closing column
    are a model's fixed-size canvas (``canvas_length`` tokens; DiffusionGemma's decoder canvas).

    Without ``template.answer_length`` the answer slot (EOS-padded) is widened to fill the canvas;
    a layout that does not fit, or an explicit one of another size, is refused. The closing column
    is the decoder's last position: generated, not fixed.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DlmprobeInputError("expected a tokenizer with a padding or EOS token to fill unused slots, got neither")
    # The region's placeholder is never read: the model draws its own random canvas.
    encoded = encode(task, examples, tokenizer, pad, template)
    region = canvas_length - 1
    if encoded.gen_length != region:
        answer = encoded.answer_length + region - encoded.gen_length
        if template.answer_length is not None or answer < encoded.answer_length:
            raise DlmprobeInputError(
                f"expected a generated region of canvas_length - 1 = {region} tokens (the model's canvas), got "
                f"{encoded.gen_length} ({encoded.answer_start - encoded.gen_start} before the answer slot and "
                f"{encoded.answer_length} in it); choose --reasoning-length/--answer-length to fit")
        encoded = encode(task, examples, tokenizer, pad, replace(template, answer_length=answer))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad
    closed = close_canvas(encoded, eos)
    closed.fixed[:, -1] = False
    return closed
