"""Write one sampling run to an HDF5 activation store, batch by batch, from a background thread.

:class:`ActivationWriter` preallocates the whole file (its shape a :class:`StoreLayout`), reserves
its disk space and writes batches of examples while the caller samples the next; a run killed at
any moment, or stopped by a write error, can be resumed.

Example:
    >>> with ActivationWriter("run.h5", layout, config=cfg, mask_id=4) as writer:
    ...     for batch in batches(start=writer.n_complete):
    ...         writer.write_batch(batch)
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Self, TypedDict

import h5py
import numpy as np
from jaxtyping import Bool, Float, Int

from dlmprobe import __version__
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.store.disk import WriteLock, reserve_space, write_error
from dlmprobe.store.layout import (
    EXAMPLE_FIELDS,
    GROUPS,
    SCHEMA_VERSION,
    TRAJECTORY_FIELDS,
    UID_BYTES,
    DatasetSpec,
    StoreError,
    StoreLayout,
    check_count,
    file_signature,
    first_difference,
    label_axes,
    short,
    write_new,
    write_scales,
)
from dlmprobe.store.schema import open_store


class Batch(TypedDict):
    """What :meth:`ActivationWriter.write_batch` takes: ``b`` examples, each field's leading axis."""

    uid: Sequence[str]
    prompt: Int[np.ndarray, "b prompt"]
    target: Int[np.ndarray, "b target"]
    output: Int[np.ndarray, "b target"]
    solved: Bool[np.ndarray, " b"]
    canvas: Int[np.ndarray, "b step_plus_one pos"]
    commit_step: Int[np.ndarray, "b pos"]
    prediction: Int[np.ndarray, "b step pos"]
    confidence: Float[np.ndarray, "b step pos"]
    labels: Mapping[str, tuple[Int[np.ndarray, "b k"], Int[np.ndarray, "b k"]]]
    activations: Mapping[str, Float[np.ndarray, "b stored_step stored_pos d"]]


class ActivationWriter:
    """Writes one sampling run to a preallocated HDF5 file, batch by batch, from a background thread.

    One process at a time writes a store: the writer holds an exclusive lock on ``<path>.lock``
    until it is closed (or its process dies), and a second writer gets a one-line StoreError.
    Every dataset is allocated in full when the file is made and its disk blocks are reserved
    (:func:`~dlmprobe.store.disk.reserve_space`) before the first batch, so a run that does not
    fit fails before it starts. Writing a batch only fills existing space; the data is flushed to
    the disk, and only then ``n_complete`` is raised and flushed. A run killed at any moment
    leaves a file whose first ``n_complete`` examples are whole; ``resume=True`` continues it
    from there. ``write_batch`` only validates and queues (at most ``queue_size`` batches wait),
    so writing overlaps the sampling of the next batch. An error in the thread closes the file at
    once, and the next ``write_batch`` or ``close`` raises it: a one-line StoreError for an OS
    error (disk full, file size limit, I/O error) that says how many examples are safely stored.

    Example:
        >>> layout = StoreLayout(n_examples=512, n_steps=32, canvas_length=40, prompt_length=20,
        ...                      target_length=17, labels={"answer": 4}, sites={"blocks.1.hook_resid_post": 128},
        ...                      steps=range(0, 32, 4), positions=range(40))
        >>> with ActivationWriter("run.h5", layout, config=cfg, mask_id=4, resume=True) as writer:
        ...     for start in range(writer.n_complete, 512, 64):
        ...         writer.write_batch(sample_batch(start, 64))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        layout: StoreLayout,
        *,
        config: Mapping[str, Any],
        mask_id: int,
        compression: str | int | None = None,
        overwrite: bool = False,
        resume: bool = False,
        queue_size: int = 2,
    ):
        if not isinstance(layout, StoreLayout):
            raise DlmprobeInputError(f"layout should be a StoreLayout, got {type(layout).__name__}")
        self.path = Path(path)
        self.layout = layout
        self._specs = self.layout.datasets()
        config_json = _config_json(config)
        if overwrite and resume:
            raise DlmprobeInputError("pass overwrite=True or resume=True, not both")
        check_count("queue_size", queue_size)
        self._lock = WriteLock(self.path).acquire()
        try:
            if resume and self.path.exists():
                self._file, header = open_store(self.path, "r+")
                try:
                    self._check_resumable(header.config, config_json, mask_id)
                    reserve_space(self.path, resume=True)
                except BaseException:
                    self._file.close()
                    raise
                self._n_complete = header.n_complete
            else:
                if self.path.exists() and not overwrite:
                    raise FileExistsError(
                        f"{self.path} already exists; pass overwrite=True to replace it or resume=True to continue it"
                    )
                write_new(
                    self.path,
                    lambda file: self._build(file, config_json, mask_id, compression),
                    finish=lambda built: reserve_space(built, resume=False),
                )
                self._file = h5py.File(self.path, "r+")
                self._n_complete = 0
        except BaseException:
            self._lock.release()
            raise
        self._datasets = {path: _uncached(self._file, path) for path in self._specs}
        self._fd: int = self._file.id.get_vfd_handle()
        self._file_open = True
        self._next_row = self._n_complete
        self._closed = False
        self._error: BaseException | None = None
        self._queue: queue.Queue[tuple[int, dict[str, np.ndarray]] | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._drain, name=f"ActivationWriter({self.path.name})", daemon=True)
        self._thread.start()

    @property
    def n_complete(self) -> int:
        """Examples safely on disk: 0 for a new file, where to continue for a resumed one."""
        return self._n_complete

    def write_batch(self, batch: Batch, *, copy: bool = True) -> None:
        """Check a batch against the layout and queue it to be written after the rows already queued.

        The batch is copied, so the caller may reuse its buffers at once. ``copy=False`` hands its
        arrays over instead (converted only where the stored dtype differs): the caller must not
        change them afterwards, which saves a copy of every activation.
        """
        self._raise_if_failed()
        if self._closed:
            raise DlmprobeInputError(f"the writer of {self.path} is closed")
        rows, arrays = self._prepare(batch, copy)
        start = self._next_row
        self._next_row += rows
        self._queue.put((start, arrays))

    def close(self) -> None:
        """Write what is queued, close the file and raise any error of the writing thread."""
        self._shutdown()
        self._raise_if_failed()

    def __enter__(self) -> Self:
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
        write_scales(file, layout.n_examples, layout.steps, layout.positions)
        for path, spec in self._specs.items():
            dataset = file.create_dataset(
                path,
                shape=spec.shape,
                dtype=spec.dtype,
                chunks=spec.chunks,
                compression=compression if spec.chunks else None,
                dcpl=_preallocated(),
            )
            label_axes(file, dataset, spec.dims)

    def _check_resumable(self, stored_config: dict[str, Any], config_json: str, mask_id: int) -> None:
        attrs = self._file.attrs
        difference = first_difference(stored_config, json.loads(config_json))
        if difference:
            key, stored, given = difference
            raise StoreError(
                f"cannot resume {self.path}: config key {key!r} differs "
                f"(stored {short(stored)}, given {short(given)})"
            )
        stored_layout = {**file_signature(self._file), "n_examples": int(attrs["n_examples"])}
        new_layout = {**self.layout.signature(mask_id), "n_examples": self.layout.n_examples}
        difference = first_difference(stored_layout, new_layout)
        if difference:
            key, stored, given = difference
            raise StoreError(
                f"cannot resume {self.path}: {key} differs (stored {short(stored)}, given {short(given)})"
            )

    def _prepare(self, batch: Batch, copy: bool) -> tuple[int, dict[str, np.ndarray]]:
        """Validate a batch and convert it to the stored dtypes (copied if ``copy``), keyed by dataset path."""
        _check_keys("batch", batch, EXAMPLE_FIELDS + TRAJECTORY_FIELDS + ("labels", "activations"))
        uid = batch["uid"]
        if isinstance(uid, (str, bytes)) or not all(isinstance(u, str) for u in uid):
            raise DlmprobeInputError(f"batch['uid'] should be a sequence of str, got {short(uid)}")
        encoded = [u.encode("utf-8") for u in uid]
        # A NUL would end the stored string early; longer uids would be cut.
        bad = [u for u, raw in zip(uid, encoded) if len(raw) > UID_BYTES or b"\x00" in raw]
        if bad:
            raise DlmprobeInputError(
                f"batch['uid'] entries should be at most {UID_BYTES} UTF-8 bytes without NUL, got {short(bad[0])}"
            )
        rows = len(uid)
        if rows == 0:
            raise DlmprobeInputError("batch holds no examples (batch['uid'] is empty)")
        if self._next_row + rows > self.layout.n_examples:
            raise DlmprobeInputError(
                f"batch of {rows} examples does not fit: {self._next_row} of the file's "
                f"{self.layout.n_examples} rows are already written or queued"
            )
        uid_dtype = self._specs["examples/uid"].dtype  # h5py's string dtype: its metadata tells h5py the type
        given: dict[str, tuple[str, Any]] = {"examples/uid": ("batch['uid']", np.array(encoded, dtype=uid_dtype))}
        for group, fields in (("examples", EXAMPLE_FIELDS[1:]), ("trajectory", TRAJECTORY_FIELDS)):
            for key in fields:
                given[f"{group}/{key}"] = (f"batch[{key!r}]", batch[key])
        _check_keys("batch['labels']", batch["labels"], tuple(self.layout.labels))
        for name, pair in batch["labels"].items():
            if len(pair) != 2:
                raise DlmprobeInputError(
                    f"batch['labels'][{name!r}] should be a (positions, values) pair, got {len(pair)} items"
                )
            for part, value in zip(("positions", "values"), pair):
                given[f"labels/{name}/{part}"] = (f"batch['labels'][{name!r}] {part}", value)
        _check_keys("batch['activations']", batch["activations"], tuple(self.layout.sites))
        for site, value in batch["activations"].items():
            given[f"activations/{site}"] = (f"batch['activations'][{site!r}]", value)
        return rows, {path: _cast(what, value, self._specs[path], rows, copy) for path, (what, value) in given.items()}

    def _drain(self) -> None:
        """The writing thread: write queued batches in order until close() queues None."""
        while (item := self._queue.get()) is not None:
            # After a failure keep taking batches, so that write_batch never blocks on a full queue.
            if self._error is None:
                try:
                    self._write(*item)
                except Exception as err:  # noqa: BLE001 -- handed to the caller's thread by _raise_if_failed
                    self._error = write_error(err, self.path, stored=self._n_complete)
                    # Closed now, not by garbage collection at exit, where h5py can only print
                    # each failing flush of the broken file.
                    self._close_file()

    def _write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        stop = start + len(arrays["examples/uid"])
        for path, array in arrays.items():
            self._datasets[path][start:stop] = array
        # Data first, then the commit marker, each on the disk: killed or failing in between, the
        # new rows are past n_complete and count as unwritten. modify() rewrites the attribute in
        # place, so the file's structure never changes.
        self._sync()
        self._file.attrs.modify("n_complete", stop)
        self._sync()
        self._n_complete = stop

    def _sync(self) -> None:
        """HDF5's buffers to the OS (raising h5py's errors), then the OS's to the disk.

        ``fsync`` also reports errors a file system only meets when it writes its cache back.
        """
        self._file.flush()
        os.fsync(self._fd)

    def _close_file(self) -> None:
        """Close the HDF5 file once; an error closing it is kept unless an earlier one is."""
        if not self._file_open:
            return
        self._file_open = False
        self._datasets.clear()
        try:
            self._file.close()
        except Exception as err:  # noqa: BLE001 -- after a failed write, the first error is the one to report
            if self._error is None:
                self._error = write_error(err, self.path, stored=self._n_complete)

    def _shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
            self._close_file()
            self._lock.release()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def _uncached(file: h5py.File, path: str) -> h5py.Dataset:
    """Open a dataset without a chunk cache: a batch writes whole chunks, which then go straight
    to the file, and a failing write raises in the write itself instead of in a later eviction."""
    access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    access.set_chunk_cache(0, 0, 1.0)
    return h5py.Dataset(h5py.h5d.open(file.id, path.encode(), dapl=access))


def _preallocated() -> h5py.h5p.PropDCID:
    """Creation properties that allocate all of a dataset's space when it is made.

    Writing a batch then never changes the file's structure, only fills space. Writing no fill
    values keeps creation fast (and the file sparse until written).
    """
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _cast(what: str, value: Any, spec: DatasetSpec, rows: int, copy: bool) -> np.ndarray:
    array = np.asarray(value)
    expected = (rows, *spec.shape[1:])
    if array.shape != expected:
        raise DlmprobeInputError(f"{what} should have shape {expected}, got {array.shape}")
    if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
        raise DlmprobeInputError(f"{what} should be castable to {spec.dtype.name}, got {array.dtype.name}")
    # A copy unless handed over: the caller may reuse its buffers while the batch waits in the queue.
    return array.astype(spec.dtype, copy=copy)


def _config_json(config: Mapping[str, Any]) -> str:
    if not isinstance(config, Mapping):
        raise DlmprobeInputError(f"config should be a dict, got {type(config).__name__}")
    try:
        return json.dumps(dict(config), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise DlmprobeInputError(f"config should be JSON-serializable: {err}") from None


def _check_keys(what: str, given: Mapping[str, Any], expected: Sequence[str]) -> None:
    if not isinstance(given, Mapping):
        raise DlmprobeInputError(f"{what} should be a dict with keys {list(expected)}, got {type(given).__name__}")
    missing = [key for key in expected if key not in given]
    unknown = [key for key in given if key not in expected]
    if missing or unknown:
        raise DlmprobeInputError(f"{what} should have keys {list(expected)}, got {list(given)}")
