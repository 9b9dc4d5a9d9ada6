"""The HDF5 activation store: one file per sampling run, readable with plain h5py or xarray.

The schema (version :data:`SCHEMA_VERSION`) is documented in ``docs/hdf5-schema.md``.
:class:`ActivationWriter` preallocates the whole file and writes batches of examples from a
background thread; :class:`ActivationDataset` reads a finished or interrupted file lazily into
probe-ready ``(X, y, groups)``; :func:`merge_shards` joins the files of parallel shards into one.

Example:
    >>> with ActivationWriter("run.h5", config=cfg, n_examples=512, **sizes) as writer:
    ...     for batch in batches(start=writer.n_complete):
    ...         writer.write_batch(batch)
    >>> data = ActivationDataset("run.h5")
    >>> X, y, groups = data.get("blocks.1.hook_resid_post", step=8, position="label", label="answer")
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence, TypedDict

import h5py
import numpy as np
from jaxtyping import Bool, Float, Int

from dlmprobe import __version__
from dlmprobe.choices import ACTIVATION_DTYPES

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
# The label rule reads whole (example, step) chunks; this caps how many it holds at once.
_READ_BYTES = 64 * 2**20


class StoreError(ValueError):
    """A store that is missing, damaged, of another schema version, or lacks what was asked for."""


class Batch(TypedDict):
    """What :meth:`ActivationWriter.write_batch` takes: ``b`` examples, each field's leading axis."""

    uid: Sequence[str]
    prompt: Int[np.ndarray, "b prompt"]
    target: Int[np.ndarray, "b target"]
    output: Int[np.ndarray, "b target"]
    solved: Bool[np.ndarray, "b"]
    canvas: Int[np.ndarray, "b step_plus_one pos"]
    commit_step: Int[np.ndarray, "b pos"]
    prediction: Int[np.ndarray, "b step pos"]
    confidence: Float[np.ndarray, "b step pos"]
    labels: Mapping[str, tuple[Int[np.ndarray, "b k"], Int[np.ndarray, "b k"]]]
    activations: Mapping[str, Float[np.ndarray, "b stored_step stored_pos d"]]


class _Spec(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    dims: tuple[str, ...]
    chunks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class _Layout:
    """Every size that fixes the shape of a store, checked once; the writer and bytes_needed share it."""

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
            _check_count(name, getattr(self, name))
        needed = self.prompt_length + self.target_length + 3
        if self.canvas_length < needed:
            raise ValueError(
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
                _check_count(f"width of {kind} {name!r}", width)
        if self.dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"dtype must be one of {ACTIVATION_DTYPES}, got {self.dtype!r}")

    @property
    def target_start(self) -> int:
        """Canvas index of the first target token (the canvas ends with ``target <eos>``)."""
        return self.canvas_length - self.target_length - 1

    def datasets(self) -> dict[str, _Spec]:
        """Path, shape, dtype, axis labels and chunks of every dataset outside /dims."""
        n, s, length = self.n_examples, self.n_steps, self.canvas_length
        i4 = np.dtype("int32")
        specs = {
            "examples/uid": _Spec((n,), h5py.string_dtype("utf-8", UID_BYTES), ("example",)),
            "examples/prompt": _Spec((n, self.prompt_length), i4, ("example", "prompt_position")),
            "examples/target": _Spec((n, self.target_length), i4, ("example", "target_position")),
            "examples/output": _Spec((n, self.target_length), i4, ("example", "target_position")),
            "examples/solved": _Spec((n,), np.dtype(bool), ("example",)),
            "trajectory/canvas": _Spec((n, s + 1, length), i4, ("example", "canvas_step", "canvas_position")),
            "trajectory/commit_step": _Spec((n, length), i4, ("example", "canvas_position")),
            "trajectory/prediction": _Spec((n, s, length), i4, ("example", "sampler_step", "canvas_position")),
            "trajectory/confidence": _Spec(
                (n, s, length), np.dtype("float16"), ("example", "sampler_step", "canvas_position")
            ),
        }
        for name, k in self.labels.items():
            for part in ("positions", "values"):
                specs[f"labels/{name}/{part}"] = _Spec((n, k), i4, ("example", "slot"))
        n_steps, n_positions = len(self.steps), len(self.positions)
        for site, d in self.sites.items():
            specs[f"activations/{site}"] = _Spec(
                (n, n_steps, n_positions, d),  # example, stored step, stored position, d
                np.dtype(self.dtype),
                ("example", "step", "position", "d"),
                chunks=(1, 1, n_positions, d),  # one chunk per (example, step): a probe reads one step
            )
        return specs

    def signature(self, mask_id: int) -> dict[str, Any]:
        """What a file must match to be continued by this layout; compare with :func:`_signature`."""
        found: dict[str, Any] = {
            path: (spec.shape[1:], spec.dtype.name) for path, spec in self.datasets().items()
        }
        found.update({"dims/step": tuple(self.steps), "dims/position": tuple(self.positions), "mask_id": mask_id})
        return found


def bytes_needed(
    *,
    n_examples: int,
    n_steps: int,
    canvas_length: int,
    prompt_length: int,
    target_length: int,
    labels: Mapping[str, int],
    sites: Mapping[str, int],
    steps: Sequence[int],
    positions: Sequence[int],
    dtype: str = "float16",
) -> int:
    """Disk bytes a store with these sizes will take once full (an upper estimate, uncompressed).

    Takes the size arguments of :class:`ActivationWriter`, so a caller can check free disk space
    before it starts a long run.

    Example:
        >>> bytes_needed(n_examples=512, n_steps=32, canvas_length=40, prompt_length=20,
        ...              target_length=17, labels={"answer": 4}, sites={"blocks.0.hook_resid_post": 128},
        ...              steps=range(32), positions=range(40)) // 2**20
        168
    """
    layout = _Layout(
        n_examples, n_steps, canvas_length, prompt_length, target_length, labels, sites, steps, positions, dtype
    )
    total = _METADATA_BYTES + 8 * n_examples + 4 * (len(layout.steps) + len(layout.positions))  # the scales
    for spec in layout.datasets().values():
        total += math.prod(spec.shape) * spec.dtype.itemsize
        if spec.chunks:
            total += _CHUNK_INDEX_BYTES * (math.prod(spec.shape) // math.prod(spec.chunks))
    return total


class ActivationWriter:
    """Writes one sampling run to a preallocated HDF5 file, batch by batch, from a background thread.

    Every dataset is allocated in full when the file is made, so writing a batch only fills
    existing space; ``n_complete`` is then raised and flushed. A run killed at any moment leaves a
    file whose first ``n_complete`` examples are whole; ``resume=True`` continues it from there.
    ``write_batch`` only validates and queues (at most ``queue_size`` batches wait), so writing
    overlaps the sampling of the next batch; an error in the thread is raised by the next
    ``write_batch`` or by ``close``.

    Example:
        >>> with ActivationWriter("run.h5", config=cfg, n_examples=512, n_steps=32, canvas_length=40,
        ...                       prompt_length=20, target_length=17, mask_id=4, labels={"answer": 4},
        ...                       sites={"blocks.1.hook_resid_post": 128}, steps=range(0, 32, 4),
        ...                       positions=range(40), resume=True) as writer:
        ...     for start in range(writer.n_complete, 512, 64):
        ...         writer.write_batch(sample_batch(start, 64))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        config: Mapping[str, Any],
        n_examples: int,
        n_steps: int,
        canvas_length: int,
        prompt_length: int,
        target_length: int,
        mask_id: int,
        labels: Mapping[str, int],
        sites: Mapping[str, int],
        steps: Sequence[int],
        positions: Sequence[int],
        dtype: str = "float16",
        compression: str | int | None = None,
        overwrite: bool = False,
        resume: bool = False,
        queue_size: int = 2,
    ):
        self.path = Path(path)
        self.layout = _Layout(
            n_examples, n_steps, canvas_length, prompt_length, target_length, labels, sites, steps, positions, dtype
        )
        self._specs = self.layout.datasets()
        config_json = _config_json(config)
        if overwrite and resume:
            raise ValueError("pass overwrite=True or resume=True, not both")
        _check_count("queue_size", queue_size)
        if resume and self.path.exists():
            self._file = _open_store(self.path, "r+")
            try:
                self._check_resumable(config_json, mask_id)
            except BaseException:
                self._file.close()
                raise
        else:
            if self.path.exists() and not overwrite:
                raise FileExistsError(
                    f"{self.path} already exists; pass overwrite=True to replace it or resume=True to continue it"
                )
            _write_new(self.path, lambda file: self._build(file, config_json, mask_id, compression))
            self._file = h5py.File(self.path, "r+")
        self._n_complete = int(self._file.attrs["n_complete"])
        self._next_row = self._n_complete
        self._closed = False
        self._error: Exception | None = None
        self._queue: queue.Queue[tuple[int, dict[str, np.ndarray]] | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._drain, name=f"ActivationWriter({self.path.name})", daemon=True)
        self._thread.start()

    @property
    def n_complete(self) -> int:
        """Examples safely in the file: 0 for a new file, where to continue for a resumed one."""
        return self._n_complete

    def write_batch(self, batch: Batch) -> None:
        """Check a batch against the layout and queue it to be written after the rows already queued."""
        self._raise_if_failed()
        if self._closed:
            raise ValueError(f"the writer of {self.path} is closed")
        rows, arrays = self._prepare(batch)
        start = self._next_row
        self._next_row += rows
        self._queue.put((start, arrays))

    def close(self) -> None:
        """Write what is queued, close the file and raise any error of the writing thread."""
        self._shutdown()
        self._raise_if_failed()

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._shutdown()
        # A writing error is raised only if the block succeeded, so it never hides the caller's own.
        if exc_type is None:
            self._raise_if_failed()

    def _build(self, file: h5py.File, config_json: str, mask_id: int, compression: str | int | None) -> None:
        layout = self.layout
        for group in GROUPS:
            file.create_group(group)
        file.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "dlmprobe_version": __version__,
                "config": config_json,
                "n_examples": layout.n_examples,
                "n_complete": np.int64(0),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "target_start": layout.target_start,
                "mask_id": mask_id,
            }
        )
        _write_scales(file, layout.n_examples, layout.steps, layout.positions)
        for path, spec in self._specs.items():
            dataset = file.create_dataset(
                path,
                shape=spec.shape,
                dtype=spec.dtype,
                chunks=spec.chunks,
                compression=compression if spec.chunks else None,
                dcpl=_preallocated(),
            )
            _label_axes(file, dataset, spec.dims)

    def _check_resumable(self, config_json: str, mask_id: int) -> None:
        attrs = self._file.attrs
        difference = _first_difference(json.loads(attrs["config"]), json.loads(config_json))
        if difference:
            key, stored, given = difference
            raise StoreError(
                f"cannot resume {self.path}: config key {key!r} differs "
                f"(stored {_short(stored)}, given {_short(given)})"
            )
        stored_layout = {**_signature(self._file), "n_examples": int(attrs["n_examples"])}
        new_layout = {**self.layout.signature(mask_id), "n_examples": self.layout.n_examples}
        difference = _first_difference(stored_layout, new_layout)
        if difference:
            key, stored, given = difference
            raise StoreError(
                f"cannot resume {self.path}: {key} differs (stored {_short(stored)}, given {_short(given)})"
            )

    def _prepare(self, batch: Batch) -> tuple[int, dict[str, np.ndarray]]:
        """Validate a batch and copy it into the stored dtypes, keyed by dataset path."""
        _check_keys("batch", batch, EXAMPLE_FIELDS + TRAJECTORY_FIELDS + ("labels", "activations"))
        uid = batch["uid"]
        if isinstance(uid, (str, bytes)) or not all(isinstance(u, str) for u in uid):
            raise ValueError(f"batch['uid'] should be a sequence of str, got {_short(uid)}")
        encoded = [u.encode("utf-8") for u in uid]
        # A NUL would end the stored string early; longer uids would be cut.
        bad = [u for u, raw in zip(uid, encoded) if len(raw) > UID_BYTES or b"\x00" in raw]
        if bad:
            raise ValueError(
                f"batch['uid'] entries should be at most {UID_BYTES} UTF-8 bytes without NUL, got {_short(bad[0])}"
            )
        rows = len(uid)
        if rows == 0:
            raise ValueError("batch holds no examples (batch['uid'] is empty)")
        if self._next_row + rows > self.layout.n_examples:
            raise ValueError(
                f"batch of {rows} examples does not fit: {self._next_row} of the file's "
                f"{self.layout.n_examples} rows are already written or queued"
            )
        given: dict[str, tuple[str, Any]] = {"examples/uid": ("batch['uid']", np.array(encoded, dtype=f"S{UID_BYTES}"))}
        for group, fields in (("examples", EXAMPLE_FIELDS[1:]), ("trajectory", TRAJECTORY_FIELDS)):
            for key in fields:
                given[f"{group}/{key}"] = (f"batch[{key!r}]", batch[key])
        _check_keys("batch['labels']", batch["labels"], tuple(self.layout.labels))
        for name, pair in batch["labels"].items():
            if len(pair) != 2:
                raise ValueError(
                    f"batch['labels'][{name!r}] should be a (positions, values) pair, got {len(pair)} items"
                )
            for part, value in zip(("positions", "values"), pair):
                given[f"labels/{name}/{part}"] = (f"batch['labels'][{name!r}] {part}", value)
        _check_keys("batch['activations']", batch["activations"], tuple(self.layout.sites))
        for site, value in batch["activations"].items():
            given[f"activations/{site}"] = (f"batch['activations'][{site!r}]", value)
        return rows, {path: _cast(what, value, self._specs[path], rows) for path, (what, value) in given.items()}

    def _drain(self) -> None:
        """The writing thread: write queued batches in order until close() queues None."""
        while (item := self._queue.get()) is not None:
            # After a failure keep taking batches, so that write_batch never blocks on a full queue.
            if self._error is None:
                try:
                    self._write(*item)
                except Exception as err:  # handed to the caller's thread by _raise_if_failed
                    self._error = err

    def _write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        stop = start + len(arrays["examples/uid"])
        for path, array in arrays.items():
            self._file[path][start:stop] = array
        # Data first, then the commit marker, each flushed: killed in between, the new rows are
        # past n_complete and count as unwritten. modify() rewrites the attribute in place.
        self._file.flush()
        self._file.attrs.modify("n_complete", stop)
        self._file.flush()
        self._n_complete = stop

    def _shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
            self._file.close()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


class _Rows:
    """A dataset's complete rows as an attribute of :class:`ActivationDataset`, read on first use."""

    def __init__(self, path: str, doc: str):
        self.path = path
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, data: ActivationDataset | None, owner: type | None = None) -> Any:
        if data is None:
            return self
        dataset = data._file[self.path]
        if h5py.check_string_dtype(dataset.dtype):
            dataset = dataset.asstr()
        rows = dataset[: data.n_examples]
        data.__dict__[self.name] = rows  # later reads find it in the instance, not here
        return rows


class ActivationDataset:
    """Read-only view of a store's complete examples, giving probe datasets ``(X, y, groups)``.

    Small metadata is read when the file is opened; example and trajectory arrays (``uid``,
    ``canvas``, ...) on first use; activations only in :meth:`get`, one step of one site at a time.

    Example:
        >>> data = ActivationDataset("run.h5")
        >>> data.sites, data.steps, data.n_examples
        (['blocks.1.hook_resid_post'], array([ 0,  4,  8, 12], dtype=int32), 512)
        >>> X, y, groups = data.get("blocks.1.hook_resid_post", 8, "label", label="answer", only_masked=True)
        >>> X.shape, y.dtype, groups[:3]
        ((1391, 128), dtype('int64'), array([0, 0, 1]))
    """

    uid = _Rows("examples/uid", "Identifier of each example's puzzle, (n,) str.")
    prompt = _Rows("examples/prompt", "Prompt token ids, (n, prompt_length) int32.")
    target = _Rows("examples/target", "Reference answer token ids, (n, target_length) int32.")
    output = _Rows("examples/output", "The model's final answer token ids, (n, target_length) int32.")
    solved = _Rows("examples/solved", "Whether the output solves the puzzle, (n,) bool.")
    canvas = _Rows("trajectory/canvas", "Canvas seen at each step, the last one final, (n, n_steps + 1, L) int32.")
    commit_step = _Rows("trajectory/commit_step", "Step that committed each position, -1 if never masked, (n, L).")
    prediction = _Rows("trajectory/prediction", "Argmax at each step and position, -1 if none, (n, n_steps, L).")
    confidence = _Rows("trajectory/confidence", "Probability of the argmax, NaN if none, (n, n_steps, L) float16.")

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._file = _open_store(self.path, "r")
        try:
            _check_sources(self._file, self.path)
        except BaseException:
            self._file.close()
            raise
        attrs = self._file.attrs
        self.n_examples: int = int(attrs["n_complete"])
        self.config: dict[str, Any] = json.loads(attrs["config"])
        self.mask_id: int = int(attrs["mask_id"])
        self.target_start: int = int(attrs["target_start"])
        self.sites: list[str] = list(self._file["activations"])
        self.label_names: list[str] = list(self._file["labels"])
        self.steps: Int[np.ndarray, "stored_step"] = self._file["dims/step"][()]
        self.positions: Int[np.ndarray, "stored_pos"] = self._file["dims/position"][()]
        self.n_steps: int = self._file["trajectory/prediction"].shape[1]

    def label(self, name: str) -> tuple[Int[np.ndarray, "n k"], Int[np.ndarray, "n k"]]:
        """A label's target-relative positions and its values, each (n_examples, k)."""
        if name not in self.label_names:
            raise StoreError(f"unknown label {name!r}; {self.path} has labels {self.label_names}")
        group = self._file[f"labels/{name}"]
        return group["positions"][: self.n_examples], group["values"][: self.n_examples]

    def activations(self, site: str, step: int) -> Float[np.ndarray, "n stored_pos d"]:
        """Every stored position of one site at one stored step, (n_examples, positions, d) float32.

        One contiguous read (a row of chunks); callers that need many rows of one step read once.
        """
        if site not in self.sites:
            raise StoreError(f"unknown site {site!r}; {self.path} has sites {self.sites}")
        step_index = int(_lookup(self.steps, np.array([step]), "step")[0])
        return self._file[f"activations/{site}"][: self.n_examples, step_index].astype(np.float32)

    def position_index(self, canvas_positions: np.ndarray) -> np.ndarray:
        """Index along the stored-position axis of each canvas position (a StoreError if not stored)."""
        return _lookup(self.positions, np.asarray(canvas_positions), "position")

    def get(
        self,
        site: str,
        step: int,
        position: int | Literal["label"],
        *,
        label: str | None = None,
        target: Literal["label", "output"] | None = None,
        only_masked: bool = False,
    ) -> tuple[Float[np.ndarray, "row d"], Int[np.ndarray, "row"], Int[np.ndarray, "row"]]:
        """A probe dataset: activations ``X``, targets ``y`` and the example of each row.

        Args:
            site: a stored hook site, e.g. ``"blocks.1.hook_resid_post"``.
            step: a stored sampler step (one of :attr:`steps`).
            position: a canvas position (one row per example), or ``"label"``: the positions of
                ``label`` (one row per example and label slot).
            label: the label whose positions and values to use; needs ``position="label"``.
            target: ``"label"`` for the label values (the default with ``label``) or ``"output"``
                for the token finally committed at each row's position (the default otherwise).
            only_masked: keep only rows whose position is still masked in the canvas at ``step``.

        Returns ``X`` (rows, d) float32, ``y`` (rows,) int64 and ``groups`` (rows,) int64, the
        example index of each row: split by groups so no example is in train and test both.

        Example:
            >>> X, y, groups = data.get("blocks.0.hook_resid_post", 4, 22, only_masked=True)
        """
        if site not in self.sites:
            raise StoreError(f"unknown site {site!r}; {self.path} has sites {self.sites}")
        step_index = int(_lookup(self.steps, np.array([step]), "step")[0])
        n = self.n_examples
        fixed_index = None
        if isinstance(position, str) and position == "label":
            if label is None:
                raise ValueError(f"position='label' needs label=<name>; labels: {self.label_names}")
            slots, values = self.label(label)
            examples = np.repeat(np.arange(n), slots.shape[1])
            canvas_positions = (self.target_start + slots).reshape(-1)
            position_index = _lookup(self.positions, canvas_positions, "position")
            label_values = values.reshape(-1)
        elif isinstance(position, (int, np.integer)) and not isinstance(position, bool):
            if label is not None:
                raise ValueError(f"label={label!r} needs position='label', got position={position!r}")
            fixed_index = int(_lookup(self.positions, np.array([position]), "position")[0])
            examples = np.arange(n)
            canvas_positions = np.full(n, position)
            position_index = np.full(n, fixed_index)
            label_values = None
        else:
            raise ValueError(f"position must be a canvas position (int) or 'label', got {position!r}")

        target = target or ("label" if label is not None else "output")
        if target == "label":
            if label_values is None:
                raise ValueError("target='label' needs position='label' and label=<name>")
            y = label_values
        elif target == "output":
            final = self._file["trajectory/canvas"][:n, self.n_steps]  # (n, L)
            y = final[examples, canvas_positions]
        else:
            raise ValueError(f"target must be 'label' or 'output', got {target!r}")

        if only_masked:
            seen = self._file["trajectory/canvas"][:n, step]  # (n, L): the canvas the model saw
            keep = seen[examples, canvas_positions] == self.mask_id
            examples, position_index, y = examples[keep], position_index[keep], y[keep]

        activations = self._file[f"activations/{site}"]
        if fixed_index is None:
            X = _gather(activations, step_index, examples, position_index)
        else:
            # One position: read only its (example, d) slice, then keep the rows' examples.
            X = activations[:n, step_index, fixed_index][examples].astype(np.float32)
        return X, y.astype(np.int64), examples.astype(np.int64)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ActivationDataset:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ActivationDataset({str(self.path)!r}, n_examples={self.n_examples}, sites={self.sites}, "
            f"steps={self.steps.tolist()}, positions={self.positions.tolist()})"
        )


def merge_shards(
    shard_paths: Sequence[str | os.PathLike[str]], out_path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Join shard files into one file of virtual datasets that reads like any other store.

    Shards are the files of one run split with ``config["shard"] = [i, n]``: every other config
    entry, the schema and the shapes must agree, and each of shards ``0 .. n-1`` must be given
    once. The merged datasets concatenate each shard's complete rows in shard order without
    copying them; shards in the merged file's folder are referenced by name, so the folder can
    be moved, others by absolute path.

    Example:
        >>> merge_shards(["run.0.h5", "run.1.h5"], "run.h5")
        PosixPath('run.h5')
    """
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    paths = [Path(p) for p in shard_paths]
    if not paths:
        raise ValueError("merge_shards needs at least one shard path, got none")
    if any(path.resolve() == out.resolve() for path in paths):
        raise ValueError(f"the merged file {out} must not be one of the shards")
    with ExitStack() as stack:
        files = [stack.enter_context(_open_store(path, "r")) for path in paths]
        configs = [json.loads(file.attrs["config"]) for file in files]
        order = _shard_order(paths, configs)
        paths, files, configs = [paths[i] for i in order], [files[i] for i in order], [configs[i] for i in order]
        base = {key: value for key, value in configs[0].items() if key != "shard"}
        first_signature = _signature(files[0])
        for path, file, config in zip(paths[1:], files[1:], configs[1:]):
            for prefix, expected_values, given_values in (
                ("config key ", base, {key: value for key, value in config.items() if key != "shard"}),
                ("", first_signature, _signature(file)),
            ):
                difference = _first_difference(expected_values, given_values)
                if difference:
                    key, expected, given = difference
                    raise StoreError(
                        f"shard {path} does not match shard {paths[0]}: {prefix}{key!r} is "
                        f"{_short(given)}, not {_short(expected)}"
                    )
        counts = [int(file.attrs["n_complete"]) for file in files]
        total = sum(counts)
        if total == 0:
            raise StoreError(f"none of the shards {[str(p) for p in paths]} holds a complete example")
        sources = [_source_name(path, out) for path in paths]

        def build(merged: h5py.File) -> None:
            first = files[0]
            merged.attrs.update(dict(first.attrs))
            merged.attrs.update(
                {
                    "config": json.dumps(base, sort_keys=True),
                    "n_examples": total,
                    "n_complete": np.int64(total),
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
            )
            for group in GROUPS:
                merged.create_group(group)
            _write_scales(merged, total, first["dims/step"][()], first["dims/position"][()])
            for path in _dataset_paths(first):
                template = first[path]
                layout = h5py.VirtualLayout(shape=(total, *template.shape[1:]), dtype=template.dtype)
                row = 0
                for file, source, count in zip(files, sources, counts):
                    if count:
                        layout[row : row + count] = h5py.VirtualSource(source, path, shape=file[path].shape)[:count]
                        row += count
                dataset = merged.create_virtual_dataset(path, layout)
                _label_axes(merged, dataset, [dim.label for dim in template.dims])

        _write_new(out, build)
    return out


def _shard_order(paths: list[Path], configs: list[dict[str, Any]]) -> list[int]:
    """Indices that sort the shards by their ``config["shard"] = [i, n]``, checking the set is whole."""
    shards = []
    for path, config in zip(paths, configs):
        shard = config.get("shard")
        if not (isinstance(shard, list) and len(shard) == 2 and all(isinstance(v, int) for v in shard)):
            raise StoreError(f"{path} has no config['shard'] = [i, n] entry, got {_short(shard)}")
        shards.append(tuple(shard))
    counts = {n for _, n in shards}
    indices = sorted(i for i, _ in shards)
    if len(counts) != 1 or indices != list(range(next(iter(counts)))):
        raise StoreError(f"expected shards 0 to n-1 of one n, each once, got [i, n] = {sorted(shards)}")
    return sorted(range(len(shards)), key=lambda k: shards[k][0])


def _open_store(path: Path, mode: Literal["r", "r+"]) -> h5py.File:
    """Open a store of this schema version, turning every reason it cannot be read into a StoreError."""
    if not path.is_file():
        raise StoreError(f"no activation store at {path}")
    try:
        file = h5py.File(path, mode)
    except OSError as err:
        if "unable to lock file" in str(err):
            raise StoreError(f"{path} is open for writing in another process") from err
        raise StoreError(f"{path} is not a readable HDF5 file (truncated or damaged?)") from err
    version = file.attrs.get("schema_version")
    if version is None or int(version) != SCHEMA_VERSION:
        file.close()
        if version is None:
            raise StoreError(f"{path} is not a dlmprobe activation store (it has no schema_version attribute)")
        raise StoreError(f"{path} has schema version {int(version)}, this dlmprobe reads {SCHEMA_VERSION}")
    return file


def _check_sources(file: h5py.File, path: Path) -> None:
    """HDF5 reads zeros where a merged file's shard is missing, so refuse such a file instead."""
    dataset = file["examples/uid"]
    if dataset.is_virtual:
        for source in sorted({mapping.file_name for mapping in dataset.virtual_sources()}):
            if not (path.parent / source).is_file():  # an absolute source replaces path.parent
                raise StoreError(f"{path} merges shards, but its shard {source} is missing")


def _write_new(path: Path, build: Callable[[h5py.File], None]) -> None:
    """Build a file beside ``path`` and then move it there, so ``path`` never holds a half-made file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with h5py.File(partial, "w") as file:
        build(file)
    os.replace(partial, path)


def _write_scales(file: h5py.File, n_examples: int, steps: Sequence[int], positions: Sequence[int]) -> None:
    """The /dims dimension scales: example index, stored sampler steps, stored canvas positions."""
    values = {
        "example": np.arange(n_examples, dtype=np.int64),
        "step": np.asarray(steps, dtype=np.int32),
        "position": np.asarray(positions, dtype=np.int32),
    }
    for name in SCALES:
        file.create_dataset(f"dims/{name}", data=values[name]).make_scale(name)


def _label_axes(file: h5py.File, dataset: h5py.Dataset, labels: Sequence[str]) -> None:
    """Name every axis, attaching the /dims scale of the same name where there is one."""
    for axis, label in enumerate(labels):
        dataset.dims[axis].label = label
        if label in SCALES:
            dataset.dims[axis].attach_scale(file[f"dims/{label}"])


def _preallocated() -> h5py.h5p.PropDCID:
    """Creation properties that allocate all of a dataset's space when it is made.

    Writing a batch then never changes the file's structure, only fills space. Writing no fill
    values keeps creation fast (and the file sparse until written).
    """
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _dataset_paths(file: h5py.File) -> list[str]:
    """Paths of every dataset outside /dims, in file order."""
    paths: list[str] = []
    file.visititems(lambda name, obj: paths.append(name) if isinstance(obj, h5py.Dataset) else None)
    return [path for path in paths if not path.startswith("dims/")]


def _signature(file: h5py.File) -> dict[str, Any]:
    """What two stores must share to hold parts of one run: shapes past axis 0, dtypes, scales."""
    found: dict[str, Any] = {path: (file[path].shape[1:], file[path].dtype.name) for path in _dataset_paths(file)}
    found.update(
        {
            "dims/step": tuple(file["dims/step"][()].tolist()),
            "dims/position": tuple(file["dims/position"][()].tolist()),
            "mask_id": int(file.attrs["mask_id"]),
        }
    )
    return found


def _source_name(shard: Path, out: Path) -> str:
    """How the merged file names a shard: HDF5 looks up relative names in the merged file's folder."""
    shard, folder = shard.resolve(), out.resolve().parent
    return shard.name if shard.parent == folder else str(shard)


def _gather(
    activations: h5py.Dataset,
    step_index: int,
    examples: Int[np.ndarray, "row"],
    position_index: Int[np.ndarray, "row"],
) -> Float[np.ndarray, "row d"]:
    """Rows ``activations[examples[i], step_index, position_index[i]]``, examples increasing.

    Reads the (example, step) chunks a block of examples at a time, all positions each, which
    costs no more disk reads than picking positions and far fewer calls.
    """
    n_positions, d = activations.shape[2:]
    block = max(1, _READ_BYTES // (n_positions * d * activations.dtype.itemsize))
    X = np.empty((len(examples), d), dtype=np.float32)
    start = 0
    while start < len(examples):
        first = int(examples[start])
        stop = int(np.searchsorted(examples, first + block))
        chunk = activations[first : int(examples[stop - 1]) + 1, step_index]  # (examples, positions, d)
        X[start:stop] = chunk[examples[start:stop] - first, position_index[start:stop]]
        start = stop
    return X


def _lookup(stored: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Indices of ``wanted`` values in the increasing array ``stored``; a StoreError if one is not there."""
    index = np.minimum(np.searchsorted(stored, wanted), len(stored) - 1)
    missing = stored[index] != wanted
    if missing.any():
        raise StoreError(f"{what} {wanted[missing][0]} is not stored; stored {what}s: {stored.tolist()}")
    return index


def _cast(what: str, value: Any, spec: _Spec, rows: int) -> np.ndarray:
    array = np.asarray(value)
    expected = (rows, *spec.shape[1:])
    if array.shape != expected:
        raise ValueError(f"{what} should have shape {expected}, got {array.shape}")
    if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
        raise ValueError(f"{what} should be castable to {spec.dtype.name}, got {array.dtype.name}")
    # Always a copy: the caller may reuse its buffers while the batch waits in the queue.
    return array.astype(spec.dtype)


def _config_json(config: Mapping[str, Any]) -> str:
    if not isinstance(config, Mapping):
        raise ValueError(f"config should be a dict, got {type(config).__name__}")
    try:
        return json.dumps(dict(config), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config should be JSON-serializable: {err}") from None


class _Absent:
    def __repr__(self) -> str:
        return "absent"


def _first_difference(stored: Any, given: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first key (sorted, dotted through nested dicts) whose values differ, with both values."""
    if isinstance(stored, dict) and isinstance(given, dict):
        for name in sorted(stored.keys() | given.keys(), key=str):
            sub = f"{key}.{name}" if key else str(name)
            if name not in stored or name not in given:
                return sub, stored.get(name, _Absent()), given.get(name, _Absent())
            found = _first_difference(stored[name], given[name], sub)
            if found:
                return found
        return None
    return None if stored == given else (key, stored, given)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_keys(what: str, given: Mapping[str, Any], expected: Sequence[str]) -> None:
    if not isinstance(given, Mapping):
        raise ValueError(f"{what} should be a dict with keys {list(expected)}, got {type(given).__name__}")
    missing = [key for key in expected if key not in given]
    unknown = [key for key in given if key not in expected]
    if missing or unknown:
        raise ValueError(f"{what} should have keys {list(expected)}, got {list(given)}")


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_indices(name: str, values: Sequence[int], bound: int) -> tuple[int, ...]:
    indices = tuple(int(v) for v in values)
    if not indices or any(b <= a for a, b in zip(indices, indices[1:])) or indices[0] < 0 or indices[-1] >= bound:
        raise ValueError(f"{name} must be increasing indices in [0, {bound}), got {_short(list(values))}")
    return indices


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name == ".":
        raise ValueError(f"{kind} name must be a non-empty str without '/', got {name!r}")
