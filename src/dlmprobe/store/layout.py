"""The shape of an activation store on disk, and the file helpers its writer, reader and merge share.

:class:`StoreLayout` holds every size that fixes a store's shape (the schema, version
:data:`SCHEMA_VERSION`, is documented in ``docs/hdf5-schema.md``); :meth:`StoreLayout.bytes_needed`
tells a caller the disk space before a long run starts.

Example:
    >>> layout = StoreLayout(n_examples=512, n_steps=32, canvas_length=40, prompt_length=20,
    ...                      target_length=17, labels={"answer": 4}, sites={"blocks.0.hook_resid_post": 128},
    ...                      steps=range(32), positions=range(40))
    >>> layout.bytes_needed() // 2**20
    168
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from dlmprobe.choices import ACTIVATION_DTYPES
from dlmprobe.errors import DlmprobeInputError

SCHEMA_VERSION = 1

# Axes with a dimension scale in /dims; every other axis only carries a label.
SCALES = ("example", "step", "position")
GROUPS = ("dims", "examples", "trajectory", "labels", "activations")
EXAMPLE_FIELDS = ("uid", "prompt", "target", "output", "solved")
TRAJECTORY_FIELDS = ("canvas", "commit_step", "prediction", "confidence")

# uids are fixed-width: variable-length strings live on a heap, and a crash can keep rows that
# point into heap space it lost; resuming over those rows then fails ("bad heap index").
UID_BYTES = 64
# bytes_needed: what HDF5 spends besides raw data, per file and per activation chunk.
_METADATA_BYTES = 2**20
_CHUNK_INDEX_BYTES = 64


class StoreError(DlmprobeInputError):
    """A store that is missing, damaged, of another schema version, or lacks what was asked for."""


class DatasetSpec(NamedTuple):
    """How one dataset outside /dims is made: its shape, dtype, axis labels and chunks."""

    shape: tuple[int, ...]
    dtype: np.dtype
    dims: tuple[str, ...]
    chunks: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class StoreLayout:
    """Every size that fixes the shape of a store, checked once when made.

    Args:
        n_examples: rows of every dataset (examples planned for the run).
        n_steps: sampler steps; the canvas is stored ``n_steps + 1`` times, the last one final.
        canvas_length: length of ``<bos> prompt <sep> target <eos>``.
        prompt_length, target_length: prompt and target tokens.
        labels: label name -> its slots per example.
        sites: hook site -> its width ``d``.
        steps: the sampler steps whose activations are stored, increasing.
        positions: the canvas positions whose activations are stored, increasing.
        dtype: ``"float16"`` or ``"float32"``, the stored activations' dtype.
    """

    n_examples: int
    n_steps: int
    canvas_length: int
    prompt_length: int
    target_length: int
    labels: Mapping[str, int]
    sites: Mapping[str, int]
    steps: Sequence[int]
    positions: Sequence[int]
    dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("n_examples", "n_steps", "canvas_length", "prompt_length", "target_length"):
            check_count(name, getattr(self, name))
        needed = self.prompt_length + self.target_length + 3
        if self.canvas_length < needed:
            raise DlmprobeInputError(
                f"canvas_length must fit <bos> prompt <sep> target <eos> ({needed} tokens), "
                f"got {self.canvas_length!r}"
            )
        # Own copies, so a caller changing its arguments later cannot change the layout.
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "sites", dict(self.sites))
        object.__setattr__(self, "steps", _check_indices("steps", self.steps, self.n_steps))
        object.__setattr__(self, "positions", _check_indices("positions", self.positions, self.canvas_length))
        for kind, widths in (("label", self.labels), ("site", self.sites)):
            for name, width in widths.items():
                _check_name(kind, name)
                check_count(f"width of {kind} {name!r}", width)
        if self.dtype not in ACTIVATION_DTYPES:
            raise DlmprobeInputError(f"dtype must be one of {ACTIVATION_DTYPES}, got {self.dtype!r}")

    @property
    def target_start(self) -> int:
        """Canvas index of the first target token (the canvas ends with ``target <eos>``)."""
        return self.canvas_length - self.target_length - 1

    def datasets(self) -> dict[str, DatasetSpec]:
        """Path, shape, dtype, axis labels and chunks of every dataset outside /dims."""
        n, s, length = self.n_examples, self.n_steps, self.canvas_length
        i4 = np.dtype("int32")
        specs = {
            "examples/uid": DatasetSpec((n,), h5py.string_dtype("utf-8", UID_BYTES), ("example",)),
            "examples/prompt": DatasetSpec((n, self.prompt_length), i4, ("example", "prompt_position")),
            "examples/target": DatasetSpec((n, self.target_length), i4, ("example", "target_position")),
            "examples/output": DatasetSpec((n, self.target_length), i4, ("example", "target_position")),
            "examples/solved": DatasetSpec((n,), np.dtype(bool), ("example",)),
            "trajectory/canvas": DatasetSpec((n, s + 1, length), i4, ("example", "canvas_step", "canvas_position")),
            "trajectory/commit_step": DatasetSpec((n, length), i4, ("example", "canvas_position")),
            "trajectory/prediction": DatasetSpec((n, s, length), i4, ("example", "sampler_step", "canvas_position")),
            "trajectory/confidence": DatasetSpec(
                (n, s, length), np.dtype("float16"), ("example", "sampler_step", "canvas_position")
            ),
        }
        for name, k in self.labels.items():
            for part in ("positions", "values"):
                specs[f"labels/{name}/{part}"] = DatasetSpec((n, k), i4, ("example", "slot"))
        n_steps, n_positions = len(self.steps), len(self.positions)
        for site, d in self.sites.items():
            specs[f"activations/{site}"] = DatasetSpec(
                (n, n_steps, n_positions, d),  # example, stored step, stored position, d
                np.dtype(self.dtype),
                ("example", "step", "position", "d"),
                chunks=(1, 1, n_positions, d),  # one chunk per (example, step): a probe reads one step
            )
        return specs

    def signature(self, mask_id: int) -> dict[str, Any]:
        """What a file must match to be continued by this layout; compare with :func:`file_signature`."""
        found: dict[str, Any] = {
            path: (spec.shape[1:], spec.dtype.name) for path, spec in self.datasets().items()
        }
        found.update({"dims/step": tuple(self.steps), "dims/position": tuple(self.positions), "mask_id": mask_id})
        return found

    def describe(self) -> str:
        """Its sizes in one line, e.g. ``64 examples x 12/36 steps x 37 positions x 4 sites (float16) -> 95.3 MiB``."""
        return (f"{self.n_examples} examples x {len(self.steps)}/{self.n_steps} steps x {len(self.positions)} positions "
                f"x {len(self.sites)} sites ({self.dtype}) -> {self.bytes_needed() / 2**20:,.1f} MiB")

    def bytes_needed(self) -> int:
        """Disk bytes a store of this layout will take once full (an upper estimate, uncompressed)."""
        total = _METADATA_BYTES + 8 * self.n_examples + 4 * (len(self.steps) + len(self.positions))  # the scales
        for spec in self.datasets().values():
            total += math.prod(spec.shape) * spec.dtype.itemsize
            if spec.chunks:
                total += _CHUNK_INDEX_BYTES * (math.prod(spec.shape) // math.prod(spec.chunks))
        return total


def write_new(
    path: Path, build: Callable[[h5py.File], None], finish: Callable[[Path], None] | None = None
) -> None:
    """Build a file beside ``path`` and then move it there, so ``path`` never holds a half-made file.

    ``finish`` is called on the closed file before it is moved; if building or finishing fails,
    the file is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with h5py.File(partial, "w") as file:
            build(file)
        if finish is not None:
            finish(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def write_scales(file: h5py.File, n_examples: int, steps: Sequence[int], positions: Sequence[int]) -> None:
    """The /dims dimension scales: example index, stored sampler steps, stored canvas positions."""
    values = {
        "example": np.arange(n_examples, dtype=np.int64),
        "step": np.asarray(steps, dtype=np.int32),
        "position": np.asarray(positions, dtype=np.int32),
    }
    for name in SCALES:
        file.create_dataset(f"dims/{name}", data=values[name]).make_scale(name)


def label_axes(file: h5py.File, dataset: h5py.Dataset, labels: Sequence[str]) -> None:
    """Name every axis, attaching the /dims scale of the same name where there is one."""
    for axis, label in enumerate(labels):
        dataset.dims[axis].label = label
        if label in SCALES:
            dataset.dims[axis].attach_scale(file[f"dims/{label}"])


def dataset_paths(file: h5py.File) -> list[str]:
    """Paths of every dataset outside /dims, in file order."""
    paths: list[str] = []
    file.visititems(lambda name, obj: paths.append(name) if isinstance(obj, h5py.Dataset) else None)
    return [path for path in paths if not path.startswith("dims/")]


def file_signature(file: h5py.File) -> dict[str, Any]:
    """What two stores must share to hold parts of one run: shapes past axis 0, dtypes, scales."""
    found: dict[str, Any] = {path: (file[path].shape[1:], file[path].dtype.name) for path in dataset_paths(file)}
    found.update(
        {
            "dims/step": tuple(file["dims/step"][()].tolist()),
            "dims/position": tuple(file["dims/position"][()].tolist()),
            "mask_id": int(file.attrs["mask_id"]),
        }
    )
    return found


class _Absent:
    def __repr__(self) -> str:
        return "absent"


def first_difference(stored: Any, given: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first key (sorted, dotted through nested dicts) whose values differ, with both values."""
    if isinstance(stored, dict) and isinstance(given, dict):
        for name in sorted(stored.keys() | given.keys(), key=str):
            sub = f"{key}.{name}" if key else str(name)
            if name not in stored or name not in given:
                return sub, stored.get(name, _Absent()), given.get(name, _Absent())
            found = first_difference(stored[name], given[name], sub)
            if found:
                return found
        return None
    return None if stored == given else (key, stored, given)


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters for an error message."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_count(name: str, value: Any) -> None:
    """A DlmprobeInputError unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DlmprobeInputError(f"{name} must be a positive int, got {value!r}")



def _check_indices(name: str, values: Sequence[int], bound: int) -> tuple[int, ...]:
    indices = tuple(int(v) for v in values)
    if not indices or any(b <= a for a, b in itertools.pairwise(indices)) or indices[0] < 0 or indices[-1] >= bound:
        raise DlmprobeInputError(f"{name} must be increasing indices in [0, {bound}), got {short(list(values))}")
    return indices


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name == ".":
        raise DlmprobeInputError(f"{kind} name must be a non-empty str without '/', got {name!r}")
