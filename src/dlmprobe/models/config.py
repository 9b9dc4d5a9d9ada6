"""Configuration of dlmprobe's built-in models: one transformer, two attention directions.

A diffusion denoiser (bidirectional attention, trained to unmask) and its autoregressive twin
(causal attention, trained on next tokens) share every other field, so they have the same
architecture and parameter count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from dlmprobe.choices import KINDS, POSITIONS
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.files import check_object

ModelKind = Literal["diffusion", "autoregressive"]
# The JSON type of every field, checked when a config is read from a file.
FIELD_TYPES: dict[str, type] = {"task": str, "kind": str, "task_params": dict, "n_layers": int, "d_model": int,
                                "n_heads": int, "d_mlp": int, "d_vocab": int, "n_ctx": int, "seed": int,
                                "positions": str}


@dataclass
class ModelConfig:
    """Architecture and task of a built-in model.

    ``d_vocab`` and ``n_ctx`` are derived from the task in ``__post_init__`` when left at 0.
    ``positions``: ``"learned"`` absolute position embeddings, or ``"rotary"`` (relative, on the
    queries and keys), which lets a head prefer "the token next to me" at any position. It did not
    teach a randomly started path-star denoiser its edge look-up (MODELS.md); starting from the
    autoregressive twin did (``TrainConfig.init_from``).
    """

    task: str
    kind: ModelKind = "diffusion"
    task_params: dict[str, Any] = field(default_factory=dict)
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    d_vocab: int = 0
    n_ctx: int = 0
    seed: int = 0
    positions: str = "learned"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DlmprobeInputError(f"model kind must be one of {KINDS}, got {self.kind!r}")
        if self.positions not in POSITIONS:
            raise DlmprobeInputError(f"model positions must be one of {POSITIONS}, got {self.positions!r}")
        for name in ("n_layers", "d_model", "n_heads", "d_mlp"):
            if int(getattr(self, name)) < 1:
                raise DlmprobeInputError(f"model {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("d_vocab", "n_ctx", "seed"):
            if int(getattr(self, name)) < 0:
                raise DlmprobeInputError(f"model {name} must be >= 0, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise DlmprobeInputError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        task = self.build_task()
        self.task_params = task.params()
        if not self.d_vocab:
            self.d_vocab = len(task.vocab)
        if not self.n_ctx:
            self.n_ctx = task.sequence_length

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def attention_dir(self) -> str:
        return "bidirectional" if self.kind == "diffusion" else "causal"

    def build_task(self):
        from dlmprobe.tasks import get_task

        return get_task(self.task, **self.task_params)

    def twin(self) -> ModelConfig:
        """The same architecture with the other attention direction."""
        other = "autoregressive" if self.kind == "diffusion" else "diffusion"
        return ModelConfig.from_dict({**self.to_dict(), "kind": other})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model config") -> ModelConfig:
        """The config ``data`` describes; ``where`` (e.g. a file name) starts any error line."""
        check_object(data, {"task": str}, where, optional=FIELD_TYPES)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise DlmprobeInputError(f"{where}: unknown model config fields {sorted(unknown)}; "
                                     f"expected a subset of {sorted(known)}")
        try:
            return cls(**data)
        except ValueError as err:  # a bad value: the task's or the architecture's one-line reason
            raise DlmprobeInputError(f"{where}: {err}") from None
