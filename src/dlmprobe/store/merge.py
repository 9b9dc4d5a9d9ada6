"""Join the HDF5 stores of a run's parallel shards into one file that reads like any other store."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.store.layout import (
    GROUPS,
    StoreError,
    dataset_paths,
    file_signature,
    first_difference,
    label_axes,
    short,
    write_new,
    write_scales,
)
from dlmprobe.store.schema import open_store


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
        raise DlmprobeInputError("merge_shards needs at least one shard path, got none")
    if any(path.resolve() == out.resolve() for path in paths):
        raise DlmprobeInputError(f"the merged file {out} must not be one of the shards")
    with ExitStack() as stack:
        files, headers = [], []
        for path in paths:
            file, header = open_store(path, "r")
            files.append(stack.enter_context(file))
            headers.append(header)
        order = _shard_order(paths, [header.config for header in headers])
        paths, files, headers = [paths[i] for i in order], [files[i] for i in order], [headers[i] for i in order]
        configs = [header.config for header in headers]
        base = {key: value for key, value in configs[0].items() if key != "shard"}
        first_signature = file_signature(files[0])
        for path, file, config in zip(paths[1:], files[1:], configs[1:]):
            for prefix, expected_values, given_values in (
                ("config key ", base, {key: value for key, value in config.items() if key != "shard"}),
                ("", first_signature, file_signature(file)),
            ):
                difference = first_difference(expected_values, given_values)
                if difference:
                    key, expected, given = difference
                    raise StoreError(
                        f"shard {path} does not match shard {paths[0]}: {prefix}{key!r} is "
                        f"{short(given)}, not {short(expected)}"
                    )
        counts = [header.n_complete for header in headers]
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
            write_scales(merged, total, first["dims/step"][()], first["dims/position"][()])
            for path in dataset_paths(first):
                template = first[path]
                layout = h5py.VirtualLayout(shape=(total, *template.shape[1:]), dtype=template.dtype)
                row = 0
                for file, source, count in zip(files, sources, counts):
                    if count:
                        layout[row : row + count] = h5py.VirtualSource(source, path, shape=file[path].shape)[:count]
                        row += count
                dataset = merged.create_virtual_dataset(path, layout)
                label_axes(merged, dataset, [dim.label for dim in template.dims])

        write_new(out, build)
    return out


def _shard_order(paths: list[Path], configs: list[dict[str, Any]]) -> list[int]:
    """Indices that sort the shards by their ``config["shard"] = [i, n]``, checking the set is whole."""
    shards = []
    for path, config in zip(paths, configs):
        shard = config.get("shard")
        if not (isinstance(shard, list) and len(shard) == 2 and all(isinstance(v, int) for v in shard)):
            raise StoreError(f"{path} has no config['shard'] = [i, n] entry, got {short(shard)}")
        shards.append(tuple(shard))
    counts = {n for _, n in shards}
    indices = sorted(i for i, _ in shards)
    if len(counts) != 1 or indices != list(range(next(iter(counts)))):
        raise StoreError(f"expected shards 0 to n-1 of one n, each once, got [i, n] = {sorted(shards)}")
    return sorted(range(len(shards)), key=lambda k: shards[k][0])


def _source_name(shard: Path, out: Path) -> str:
    """How the merged file names a shard: HDF5 looks up relative names in the merged file's folder."""
    shard, folder = shard.resolve(), out.resolve().parent
    return shard.name if shard.parent == folder else str(shard)
