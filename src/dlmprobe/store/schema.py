"""Open a store and check it holds what ``docs/hdf5-schema.md`` declares required, nothing more.

:func:`open_store` is the one way the writer (resuming), the reader and merge open a store: every
reason a file cannot be used, a damaged file, a missing group, a wrong shape or dtype, a run config
that is not a JSON object, becomes one :class:`StoreError` line naming the file and what is wrong.
What it found is returned as a :class:`StoreHeader`.

Example:
    >>> file, header = open_store(Path("run.h5"), "r")
    >>> header.n_complete, header.sites
    (512, ['blocks.0.hook_resid_post'])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
from jaxtyping import Int

from dlmprobe.store.layout import (
    ACTIVATION_DTYPES,
    GROUPS,
    SCHEMA_VERSION,
    StoreError,
    short,
)

# Every dataset the schema requires outside /labels and /activations: its axes (symbols bound to
# sizes on first sight, see _Shapes) and the kind of its dtype.
_REQUIRED: dict[str, tuple[tuple[str, ...], str]] = {
    "dims/example": (("N",), "integer"),
    "dims/step": (("Ss",), "integer"),
    "dims/position": (("Ps",), "integer"),
    "examples/uid": (("N",), "string"),
    "examples/prompt": (("N", "P"), "integer"),
    "examples/target": (("N", "T"), "integer"),
    "examples/output": (("N", "T"), "integer"),
    "examples/solved": (("N",), "bool"),
    "trajectory/prediction": (("N", "S", "L"), "integer"),
    "trajectory/canvas": (("N", "S+1", "L"), "integer"),
    "trajectory/commit_step": (("N", "L"), "integer"),
    "trajectory/confidence": (("N", "S", "L"), "float"),
}


@dataclass(frozen=True)
class StoreHeader:
    """What :func:`open_store` checked and found: sizes, names and the run config of a store."""

    n_examples: int  # rows planned (every dataset has this many)
    n_complete: int  # rows fully written: only [:n_complete] may be read
    config: dict[str, Any]
    target_start: int
    mask_id: int
    n_steps: int
    steps: Int[np.ndarray, " stored_step"]
    positions: Int[np.ndarray, " stored_pos"]
    sites: list[str]
    labels: list[str]
    dtype: str | None  # the activations' dtype, None in a store without sites


def open_store(path: Path, mode: Literal["r", "r+"]) -> tuple[h5py.File, StoreHeader]:
    """Open a store of this schema version and check its structure; every failure is a StoreError.

    ``"r"`` opens without HDF5's file lock, so a store can be read while a writer fills it (the
    writer commits rows by raising ``n_complete`` after they are flushed; a reader trusts only
    the rows complete when it opened the file). ``"r+"`` takes HDF5's exclusive lock.
    """
    if not path.is_file():
        raise StoreError(f"no activation store at {path}")
    try:
        file = h5py.File(path, mode, locking=mode == "r+")
    except OSError as err:
        if "unable to lock file" in str(err):
            raise StoreError(f"{path} is open for writing in another process") from err
        raise StoreError(f"{path} is not a readable HDF5 file (truncated or damaged?)") from err
    try:
        return file, _check(file, path)
    except (OSError, RuntimeError) as err:  # h5py met damaged metadata or data while checking
        file.close()
        raise StoreError(f"{path} is damaged: {_first_line(err)}") from err
    except BaseException:
        file.close()
        raise


def _check(file: h5py.File, path: Path) -> StoreHeader:
    def bad(what: str) -> StoreError:
        return StoreError(f"{path} is not a valid activation store: {what}")

    version = _attr(file, "schema_version", bad)
    if version is None:
        raise StoreError(f"{path} is not a dlmprobe activation store (it has no schema_version attribute)")
    if _as_int(version) != SCHEMA_VERSION:
        found = short(_plain(version))
        raise StoreError(f"{path} has schema version {found}, this dlmprobe reads {SCHEMA_VERSION}")
    ints = {}
    for name in ("n_examples", "n_complete", "target_start", "mask_id"):
        value = _attr(file, name, bad)
        if value is None:
            raise bad(f"root attribute {name!r} is missing")
        ints[name] = _as_int(value)
        if ints[name] is None:
            raise bad(f"root attribute {name!r} should be an int, got {short(_plain(value))}")
    n = ints["n_examples"]
    if not 0 <= ints["n_complete"] <= n:
        raise bad(f"n_complete should lie in [0, n_examples = {n}], got {ints['n_complete']}")
    config = _config(_attr(file, "config", bad), bad)

    for group in GROUPS:
        if not isinstance(file.get(group), h5py.Group):
            raise bad(f"group /{group} is missing")
    shapes = _Shapes({"N": n}, bad)
    for name, (axes, kind) in _REQUIRED.items():
        shapes.check(name, _dataset(file, name, bad), axes, kind)
    labels = list(file["labels"])
    for label in labels:
        for part in ("positions", "values"):
            name = f"labels/{label}/{part}"
            shapes.check(name, _dataset(file, name, bad), ("N", f"k of label {label!r}"), "integer")
    sites = list(file["activations"])
    dtypes = set()
    for site in sites:
        dataset = _dataset(file, f"activations/{site}", bad)
        shapes.check(f"activations/{site}", dataset, ("N", "Ss", "Ps", f"d of {site!r}"), "activation")
        dtypes.add(dataset.dtype.name)
    if len(dtypes) > 1:
        raise bad(f"every /activations dataset should have one dtype, got {sorted(dtypes)}")

    sizes = shapes.sizes
    steps, positions = file["dims/step"][()], file["dims/position"][()]
    for what, values, bound in (("dims/step", steps, sizes["S"]), ("dims/position", positions, sizes["L"])):
        indices = values.astype(np.int64)
        if len(indices) == 0 or (np.diff(indices) <= 0).any() or indices[0] < 0 or indices[-1] >= bound:
            raise bad(f"/{what} should be increasing indices in [0, {bound}), got {short(values.tolist())}")
    if ints["target_start"] != sizes["L"] - sizes["T"] - 1:
        raise bad(f"target_start should be L - T - 1 = {sizes['L'] - sizes['T'] - 1}, got {ints['target_start']}")
    _check_sources(file, path)
    return StoreHeader(
        n_examples=n, n_complete=ints["n_complete"], config=config, target_start=ints["target_start"],
        mask_id=ints["mask_id"], n_steps=sizes["S"], steps=steps,
        positions=positions, sites=sites, labels=labels, dtype=dtypes.pop() if dtypes else None,
    )


class _Shapes:
    """Checks dataset shapes against symbolic axes, binding each symbol to the first size seen."""

    def __init__(self, sizes: dict[str, int], bad: Any):
        self.sizes = sizes
        self.bad = bad

    def check(self, name: str, dataset: h5py.Dataset, axes: tuple[str, ...], kind: str) -> None:
        shape = dataset.shape
        if shape is None or len(shape) != len(axes):
            raise self.bad(f"/{name} should have {len(axes)} axes ({', '.join(axes)}), got shape {shape}")
        for axis, size in zip(axes, shape):
            symbol, extra = (axis[:-2], 1) if axis.endswith("+1") else (axis, 0)
            expected = self.sizes.setdefault(symbol, size - extra) + extra
            if size != expected:
                raise self.bad(f"/{name} should have {axis} = {expected} along its axis {axis!r}, got shape {shape}")
        if not _is_kind(dataset.dtype, kind):
            raise self.bad(f"/{name} should hold {_KIND_NAMES[kind]}, got dtype {dataset.dtype}")


_KIND_NAMES = {
    "integer": "integers",
    "bool": "bools",
    "float": "floats",
    "string": "strings",
    "activation": " or ".join(ACTIVATION_DTYPES),
}


def _is_kind(dtype: np.dtype, kind: str) -> bool:
    if kind == "string":
        return h5py.check_string_dtype(dtype) is not None
    if kind == "activation":
        return dtype.name in ACTIVATION_DTYPES
    return bool(np.issubdtype(dtype, {"integer": np.integer, "bool": np.bool_, "float": np.floating}[kind]))


def _attr(file: h5py.File, name: str, bad: Any) -> Any:
    """A root attribute, None if absent; an attribute h5py cannot turn into a value is a StoreError."""
    try:
        return file.attrs.get(name)
    except (OSError, TypeError, ValueError) as err:
        raise bad(f"root attribute {name!r} cannot be read ({_first_line(err)})") from err


def _dataset(file: h5py.File, name: str, bad: Any) -> h5py.Dataset:
    found = file.get(name)
    if not isinstance(found, h5py.Dataset):
        raise bad(f"dataset /{name} is missing" if found is None else f"/{name} should be a dataset, got a group")
    return found


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is a scalar integer (not a bool), else None."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    return None


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds, so a message shows ``2.5``, not ``np.float64(2.5)``."""
    return value.item() if isinstance(value, np.generic) else value


def _config(value: Any, bad: Any) -> dict[str, Any]:
    if value is None:
        raise bad("root attribute 'config' is missing")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise bad("root attribute 'config' should be UTF-8 JSON text, got undecodable bytes") from None
    if not isinstance(value, str):
        raise bad(f"root attribute 'config' should be JSON text, got {short(_plain(value))}")
    try:
        config = json.loads(value)
    except (ValueError, RecursionError) as err:
        raise bad(f"root attribute 'config' is not valid JSON ({_first_line(err)})") from None
    if not isinstance(config, dict):
        raise bad(f"root attribute 'config' should be a JSON object, got {type(config).__name__} {short(config)}")
    return config


def _check_sources(file: h5py.File, path: Path) -> None:
    """HDF5 reads zeros where a merged file's shard is missing, so refuse such a file instead."""
    dataset = file["examples/uid"]
    if dataset.is_virtual:
        for source in sorted({mapping.file_name for mapping in dataset.virtual_sources()}):
            if not (path.parent / source).is_file():  # an absolute source replaces path.parent
                raise StoreError(f"{path} merges shards, but its shard {source} is missing")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
