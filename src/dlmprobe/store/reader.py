"""Read an HDF5 activation store lazily into probe-ready ``(X, y, groups)``.

:class:`ActivationDataset` reads a finished, interrupted or merged store, or one still being
written; it needs only h5py and numpy (no torch), so reading a store stays light.

Example:
    >>> data = ActivationDataset("run.h5")
    >>> X, y, groups = data.get("blocks.1.hook_resid_post", step=8, position="label", label="answer")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Self

import h5py
import numpy as np
from jaxtyping import Float, Int

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.store.layout import StoreError
from dlmprobe.store.schema import open_store

# The label rule reads whole (example, step) chunks; this caps how many it holds at once.
_READ_BYTES = 64 * 2**20


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

    Opening checks the file against ``docs/hdf5-schema.md`` (a one-line StoreError names what is
    wrong) and reads its small metadata; example and trajectory arrays (``uid``, ``canvas``, ...)
    are read on first use, activations only in :meth:`get`, one step of one site at a time.

    A store can be read while ``dlmprobe cache`` still writes it: it is opened without HDF5's
    file lock, and only the examples complete when it was opened (:attr:`n_examples`) are read;
    the writer never changes those rows or the file's structure. Open it again to see more.

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
        self._file, header = open_store(self.path, "r")
        self.n_examples: int = header.n_complete
        """Examples complete when the file was opened (its ``n_complete``): the rows every array has."""
        self.n_planned: int = header.n_examples
        """Examples the run planned (the file's ``n_examples``); more than :attr:`n_examples` while
        a run is written or after it was interrupted."""
        self.config: dict[str, Any] = header.config
        """The run config, a dict; every key is optional (see :meth:`config_entry`)."""
        self.mask_id: int = header.mask_id
        self.target_start: int = header.target_start
        self.sites: list[str] = header.sites
        self.label_names: list[str] = header.labels
        self.steps: Int[np.ndarray, " stored_step"] = header.steps
        self.positions: Int[np.ndarray, " stored_pos"] = header.positions
        self.n_steps: int = header.n_steps
        self.dtype: str | None = header.dtype
        """The stored activations' dtype, ``"float16"`` or ``"float32"`` (None without sites)."""

    def config_entry(self, *keys: str) -> Any:
        """``config[keys[0]][keys[1]]...``, or None where a key is absent or a level is not a dict.

        A store written by another tool may lack any run-config key, so callers that only show
        or default a value use this rather than indexing :attr:`config`.

        Example:
            >>> data.config_entry("task", "answer_label")
            'answer'
        """
        value: Any = self.config
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    def site_shape(self, site: str) -> tuple[int, ...]:
        """The stored shape of a site's activations: (n_planned, stored steps, stored positions, d)."""
        if site not in self.sites:
            raise StoreError(f"unknown site {site!r}; {self.path} has sites {self.sites}")
        return self._file[f"activations/{site}"].shape

    def describe(self) -> str:
        """What ``dlmprobe info`` prints: counts, the run config's main entries, steps, positions, sites.

        Run-config entries the file lacks are shown as ``?``.
        """

        def entry(*keys: str) -> str:
            value = self.config_entry(*keys)
            return "?" if value is None else str(value)

        solved = f"solved {self.solved.mean():.1%}" if self.n_examples else "none solved yet"
        lines = [
            f"{self.path}: {self.n_examples}/{self.n_planned} examples complete, {solved}",
            (
                f"model {entry('model', 'name')} ({entry('model', 'kind')}), task {entry('task', 'name')} "
                f"{entry('task', 'params')}, sampler {entry('sampler')}"
            ),
            f"steps {self.steps.tolist()}",
            f"positions ({entry('position_rule')}) {self.positions.tolist()}",
            f"labels {self.label_names}",
        ]
        lines += [f"  {site}: {self.site_shape(site)} {self.dtype}" for site in self.sites]
        return "\n".join(lines)

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

    @property
    def commit_rule(self) -> str:
        """How ``commit_step`` was decided: ``"settle"`` for a model without a mask token (the run
        config says so), else ``"unmask"``."""
        return "settle" if self.config_entry("commit_rule") == "settle" else "unmask"

    def before_commit(self, step: int, examples: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Whether each (example, canvas position) was not yet committed in the canvas ``step`` read.

        Under the unmask rule: still the mask token in that canvas. Under the settle rule (no mask
        token): ``step <= commit_step``. For a masked run without remasking the two agree.
        """
        examples, positions = np.asarray(examples), np.asarray(positions)
        if self.commit_rule == "settle":
            return step <= self.commit_step[examples, positions]
        return self.canvas[examples, step, positions] == self.mask_id

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
    ) -> tuple[Float[np.ndarray, "row d"], Int[np.ndarray, " row"], Int[np.ndarray, " row"]]:
        """A probe dataset: activations ``X``, targets ``y`` and the example of each row.

        Args:
            site: a stored hook site, e.g. ``"blocks.1.hook_resid_post"``.
            step: a stored sampler step (one of :attr:`steps`).
            position: a canvas position (one row per example), or ``"label"``: the positions of
                ``label`` (one row per example and label slot).
            label: the label whose positions and values to use; needs ``position="label"``.
            target: ``"label"`` for the label values (the default with ``label``) or ``"output"``
                for the token finally committed at each row's position (the default otherwise).
            only_masked: keep only rows whose position was not yet committed at ``step``
                (:meth:`before_commit`: still masked, or under the settle rule not yet settled).

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
                raise DlmprobeInputError(f"position='label' needs label=<name>; labels: {self.label_names}")
            slots, values = self.label(label)
            examples = np.repeat(np.arange(n), slots.shape[1])
            canvas_positions = (self.target_start + slots).reshape(-1)
            position_index = _lookup(self.positions, canvas_positions, "position")
            label_values = values.reshape(-1)
        elif isinstance(position, (int, np.integer)) and not isinstance(position, bool):
            if label is not None:
                raise DlmprobeInputError(f"label={label!r} needs position='label', got position={position!r}")
            fixed_index = int(_lookup(self.positions, np.array([position]), "position")[0])
            examples = np.arange(n)
            canvas_positions = np.full(n, position)
            position_index = np.full(n, fixed_index)
            label_values = None
        else:
            raise DlmprobeInputError(f"position must be a canvas position (int) or 'label', got {position!r}")

        target = target or ("label" if label is not None else "output")
        if target == "label":
            if label_values is None:
                raise DlmprobeInputError("target='label' needs position='label' and label=<name>")
            y = label_values
        elif target == "output":
            final = self._file["trajectory/canvas"][:n, self.n_steps]  # (n, L)
            y = final[examples, canvas_positions]
        else:
            raise DlmprobeInputError(f"target must be 'label' or 'output', got {target!r}")

        if only_masked:
            keep = self.before_commit(step, examples, canvas_positions)
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ActivationDataset({str(self.path)!r}, n_examples={self.n_examples}, sites={self.sites}, "
            f"steps={self.steps.tolist()}, positions={self.positions.tolist()})"
        )


def _gather(
    activations: h5py.Dataset,
    step_index: int,
    examples: Int[np.ndarray, " row"],
    position_index: Int[np.ndarray, " row"],
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
