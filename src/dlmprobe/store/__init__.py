"""The HDF5 activation store: one file per sampling run, readable with plain h5py or xarray.

The schema (version :data:`SCHEMA_VERSION`) is documented in ``docs/hdf5-schema.md``.
:class:`StoreLayout` fixes a store's sizes; :class:`ActivationWriter` preallocates the file,
reserves its disk space and writes batches of examples from a background thread, one writer per
file; :class:`ActivationDataset` checks a finished, interrupted or still-written file against the
schema and reads it lazily into probe-ready ``(X, y, groups)``; :func:`merge_shards` joins the
files of parallel shards into one.

Example:
    >>> with ActivationWriter("run.h5", layout, config=cfg, mask_id=4) as writer:
    ...     for batch in batches(start=writer.n_complete):
    ...         writer.write_batch(batch)
    >>> data = ActivationDataset("run.h5")
    >>> X, y, groups = data.get("blocks.1.hook_resid_post", step=8, position="label", label="answer")
"""

from dlmprobe.store.layout import SCHEMA_VERSION, StoreError, StoreLayout
from dlmprobe.store.merge import merge_shards
from dlmprobe.store.reader import ActivationDataset
from dlmprobe.store.writer import ActivationWriter, Batch

__all__ = [
    "SCHEMA_VERSION", "ActivationDataset", "ActivationWriter", "Batch", "StoreError", "StoreLayout", "merge_shards",
]
