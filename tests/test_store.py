"""The HDF5 activation store, on real files in tmp_path: writer, reader, crash safety and merging."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.store import (
    SCHEMA_VERSION,
    ActivationDataset,
    ActivationWriter,
    Batch,
    StoreError,
    StoreLayout,
    merge_shards,
)

MASK_ID = 4
SITES = {"blocks.0.hook_resid_post": 8, "blocks.1.hook_resid_post": 8}
# canvas = <bos> prompt(3) <sep> target(6) <eos>: the target starts at canvas position 5.
SIZES: dict[str, Any] = {
    "n_examples": 6,
    "n_steps": 4,
    "canvas_length": 12,
    "prompt_length": 3,
    "target_length": 6,
    "labels": {"answer": 2, "carry": 1},
    "sites": SITES,
    "steps": [0, 2, 3],
    "positions": [4, 5, 6, 7, 8, 9, 10],
}
TARGET_START = 5
CONFIG = {"task": {"name": "arith", "digits": 3}, "model": "tiny", "seed": 0}


def make_batch(start: int, rows: int, sizes: dict[str, Any] = SIZES) -> Batch:
    """Random but reproducible examples ``start .. start + rows - 1``, in the dtypes a sampler gives."""
    rng = np.random.default_rng([start, rows])
    s, length, t = sizes["n_steps"], sizes["canvas_length"], sizes["target_length"]
    canvas = rng.integers(5, 20, (rows, s + 1, length))
    canvas[(rng.random(canvas.shape) < 0.5) & (np.arange(s + 1) < s)[:, None]] = MASK_ID  # final canvas unmasked
    confidence = rng.random((rows, s, length), dtype=np.float32)
    confidence[confidence < 0.1] = np.nan
    target = rng.integers(5, 20, (rows, t))
    output = np.where(rng.random((rows, t)) < 0.8, target, 5)
    return {
        "uid": [f"puzzle-{start + i}" for i in range(rows)],
        "prompt": rng.integers(5, 20, (rows, sizes["prompt_length"])),
        "target": target,
        "output": output,
        "solved": (output == target).all(axis=1),
        "canvas": canvas,
        "commit_step": rng.integers(-1, s, (rows, length)),
        "prediction": rng.integers(-1, 20, (rows, s, length)),
        "confidence": confidence,
        "labels": {
            name: (np.sort(rng.choice(t, (rows, k)), axis=1), rng.integers(5, 20, (rows, k)))
            for name, k in sizes["labels"].items()
        },
        "activations": {
            site: rng.standard_normal((rows, len(sizes["steps"]), len(sizes["positions"]), d), dtype=np.float32)
            for site, d in sizes["sites"].items()
        },
    }


def open_writer(path: Path, config: dict[str, Any] = CONFIG, **kwargs: Any) -> ActivationWriter:
    """A writer of the SIZES layout; ``kwargs`` replace sizes (and ``dtype``) or set writer options."""
    sizes = {key: kwargs.pop(key) for key in list(kwargs) if key in SIZES or key == "dtype"}
    return ActivationWriter(path, StoreLayout(**{**SIZES, **sizes}), config=config, mask_id=MASK_ID, **kwargs)


def write_run(path: Path, batch_size: int = 2, config: dict[str, Any] = CONFIG, **kwargs: Any) -> list[Batch]:
    sizes = {**SIZES, **{key: value for key, value in kwargs.items() if key in SIZES}}
    batches = [make_batch(start, batch_size, sizes) for start in range(0, sizes["n_examples"], batch_size)]
    with open_writer(path, config, **kwargs) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return batches


def concat(batches: list[Batch], key: str) -> np.ndarray:
    return np.concatenate([np.asarray(batch[key]) for batch in batches])


def concat_activations(batches: list[Batch], site: str) -> np.ndarray:
    return np.concatenate([batch["activations"][site] for batch in batches])


def concat_label(batches: list[Batch], name: str) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.concatenate([batch["labels"][name][part] for batch in batches]) for part in (0, 1))


def read_everything(path: Path) -> dict[str, Any]:
    """Every dataset's raw bytes and every root attribute but `created`."""
    names: list[str] = []
    with h5py.File(path) as file:
        file.visit(names.append)
        found = {name: file[name][()].tobytes() for name in names if isinstance(file[name], h5py.Dataset)}
        found.update({f"@{key}": value for key, value in file.attrs.items() if key != "created"})
    return found


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(tmp_path: Path, dtype: str) -> None:
    path = tmp_path / "run.h5"
    batches = write_run(path, dtype=dtype)
    with ActivationDataset(path) as data:
        assert data.n_examples == 6 and data.n_steps == 4 and data.mask_id == MASK_ID
        assert data.config == CONFIG and data.target_start == TARGET_START
        assert data.sites == sorted(SITES) and data.label_names == ["answer", "carry"]
        assert data.steps.tolist() == [0, 2, 3] and data.positions.tolist() == list(range(4, 11))
        assert list(data.uid) == [f"puzzle-{i}" for i in range(6)]
        for key in ("prompt", "target", "output", "solved", "canvas", "commit_step", "prediction"):
            np.testing.assert_array_equal(getattr(data, key), concat(batches, key))
        np.testing.assert_array_equal(data.confidence, concat(batches, "confidence").astype(np.float16))
        for name in ("answer", "carry"):
            for got, expected in zip(data.label(name), concat_label(batches, name)):
                np.testing.assert_array_equal(got, expected)
    with h5py.File(path) as file:  # activations straight from h5py, as someone without dlmprobe reads them
        for site in SITES:
            stored = file[f"activations/{site}"]
            assert stored.dtype == dtype
            np.testing.assert_array_equal(stored[()], concat_activations(batches, site).astype(dtype))


def test_file_is_self_describing(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    write_run(path)
    with h5py.File(path) as file:
        attrs = file.attrs
        assert attrs["schema_version"] == SCHEMA_VERSION and attrs["n_complete"] == attrs["n_examples"] == 6
        assert attrs["config"] == '{"model": "tiny", "seed": 0, "task": {"digits": 3, "name": "arith"}}'
        assert attrs["target_start"] == TARGET_START and attrs["mask_id"] == MASK_ID and attrs["created"]
        acts = file["activations/blocks.1.hook_resid_post"]
        assert [dim.label for dim in acts.dims] == ["example", "step", "position", "d"]
        assert acts.chunks == (1, 1, 7, 8)
        assert acts.id.get_create_plist().get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY
        assert acts.dims[0][0][()].tolist() == list(range(6))
        assert acts.dims[1][0][()].tolist() == [0, 2, 3]
        assert acts.dims[2][0][()].tolist() == list(range(4, 11))
        assert len(acts.dims[3]) == 0
        canvas = file["trajectory/canvas"]
        assert [dim.label for dim in canvas.dims] == ["example", "canvas_step", "canvas_position"]
        assert [len(dim) for dim in canvas.dims] == [1, 0, 0]
        prediction = file["trajectory/prediction"]
        assert [dim.label for dim in prediction.dims] == ["example", "sampler_step", "canvas_position"]


def test_bytes_needed_covers_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    write_run(path, n_examples=40, sites={"blocks.0.hook_resid_post": 256})
    size = path.stat().st_size
    needed = StoreLayout(**{**SIZES, "n_examples": 40, "sites": {"blocks.0.hook_resid_post": 256}}).bytes_needed()
    assert size <= needed <= size + 2**21


def test_refuses_an_existing_path(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    write_run(path)
    with pytest.raises(FileExistsError, match="run.h5 already exists; pass overwrite=True .* or resume=True"):
        open_writer(path)
    with open_writer(path, overwrite=True) as writer:
        assert writer.n_complete == 0
    with ActivationDataset(path) as data:
        assert data.n_examples == 0


def test_resume_checks_config_and_layout(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with open_writer(path) as writer:
        writer.write_batch(make_batch(0, 2))
    changed = {**CONFIG, "task": {"name": "arith", "digits": 4}}
    with pytest.raises(StoreError, match=r"config key 'task.digits' differs \(stored 3, given 4\)"):
        open_writer(path, changed, resume=True)
    with pytest.raises(StoreError, match="activations/blocks.0.hook_resid_post differs"):
        open_writer(path, resume=True, dtype="float32")
    batches = [make_batch(0, 2)]
    with open_writer(path, resume=True) as writer:
        assert writer.n_complete == 2
        for start in range(2, 6, 2):
            batches.append(make_batch(start, 2))
            writer.write_batch(batches[-1])
    with ActivationDataset(path) as data:
        np.testing.assert_array_equal(data.canvas, concat(batches, "canvas"))


def test_resume_of_a_missing_file_starts_fresh(tmp_path: Path) -> None:
    with open_writer(tmp_path / "new" / "run.h5", resume=True) as writer:
        assert writer.n_complete == 0


def test_batch_validation(tmp_path: Path) -> None:
    with open_writer(tmp_path / "run.h5") as writer:
        batch = make_batch(0, 2)
        with pytest.raises(ValueError, match=r"batch\['prompt'\] should have shape \(2, 3\), got \(2, 4\)"):
            writer.write_batch({**batch, "prompt": np.zeros((2, 4), int)})
        with pytest.raises(ValueError, match=r"batch\['canvas'\] should be castable to int32, got float64"):
            writer.write_batch({**batch, "canvas": batch["canvas"].astype(float)})
        with pytest.raises(ValueError, match=r"batch\['activations'\] should have keys"):
            one_site = {"blocks.0.hook_resid_post": batch["activations"]["blocks.0.hook_resid_post"]}
            writer.write_batch({**batch, "activations": one_site})
        with pytest.raises(ValueError, match="batch should have keys"):
            writer.write_batch({key: value for key, value in batch.items() if key != "solved"})
        with pytest.raises(ValueError, match="at most 64 UTF-8 bytes without NUL"):
            writer.write_batch({**batch, "uid": ["a\x00b", "c"]})
        writer.write_batch(make_batch(0, 4))
        with pytest.raises(ValueError, match="batch of 4 examples does not fit: 4 of the file's 6 rows"):
            writer.write_batch(make_batch(4, 4))


def test_sizes_are_validated(tmp_path: Path) -> None:
    with pytest.raises(DlmprobeInputError, match=r"steps must be increasing indices in \[0, 4\), got \[0, 4\]"):
        StoreLayout(**{**SIZES, "steps": [0, 4]})
    with pytest.raises(DlmprobeInputError, match=r"canvas_length must fit .* \(12 tokens\), got 11"):
        StoreLayout(**{**SIZES, "canvas_length": 11})
    with pytest.raises(DlmprobeInputError, match="site name must be a non-empty str without '/'"):
        StoreLayout(**{**SIZES, "sites": {"blocks/0": 8}})
    with pytest.raises(DlmprobeInputError, match="dtype must be one of"):
        StoreLayout(**SIZES, dtype="bfloat16")
    with pytest.raises(DlmprobeInputError, match="layout should be a StoreLayout, got dict"):
        ActivationWriter(tmp_path / "run.h5", SIZES, config=CONFIG, mask_id=MASK_ID)  # type: ignore[arg-type]
    assert not (tmp_path / "run.h5").exists()


def test_a_layout_owns_its_sizes() -> None:
    sites = dict(SITES)
    layout = StoreLayout(**{**SIZES, "sites": sites, "steps": range(0, 4, 2)})
    sites["blocks.2.hook_resid_post"] = 8
    assert list(layout.sites) == list(SITES) and layout.steps == (0, 2)
    assert layout == StoreLayout(**{**SIZES, "steps": [0, 2]})
    assert layout.target_start == TARGET_START


def test_unreadable_files_raise_one_line_store_errors(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    write_run(path)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (tmp_path / "notes.h5").write_text("not hdf5")
    for bad in (truncated, tmp_path / "notes.h5"):
        with pytest.raises(StoreError, match="is not a readable HDF5 file \\(truncated or damaged\\?\\)") as err:
            ActivationDataset(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(StoreError, match="no activation store at"):
        ActivationDataset(tmp_path / "missing.h5")
    with h5py.File(path, "r+") as file:
        file.attrs["schema_version"] = 2
    with pytest.raises(StoreError, match="has schema version 2, this dlmprobe reads 1"):
        ActivationDataset(path)


def test_unknown_names_list_what_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    write_run(path)
    with ActivationDataset(path) as data:
        with pytest.raises(StoreError, match=r"unknown site 'blocks.9.hook_resid_post'; .* has sites \['blocks.0"):
            data.get("blocks.9.hook_resid_post", 0, 5)
        with pytest.raises(StoreError, match=r"step 1 is not stored; stored steps: \[0, 2, 3\]"):
            data.get("blocks.0.hook_resid_post", 1, 5)
        with pytest.raises(StoreError, match="position 11 is not stored"):
            data.get("blocks.0.hook_resid_post", 0, 11)
        with pytest.raises(StoreError, match=r"unknown label 'sum'"):
            data.get("blocks.0.hook_resid_post", 0, "label", label="sum")


def test_get_fixed_position(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    batches = write_run(path, dtype="float32")
    site = "blocks.1.hook_resid_post"
    acts, canvas = concat_activations(batches, site), concat(batches, "canvas")
    with ActivationDataset(path) as data:
        X, y, groups = data.get(site, 2, 7)
        np.testing.assert_array_equal(X, acts[:, 1, 3])  # step 2 is stored step 1, position 7 stored position 3
        np.testing.assert_array_equal(y, canvas[:, -1, 7])
        np.testing.assert_array_equal(groups, np.arange(6))
        assert X.dtype == np.float32 and y.dtype == groups.dtype == np.int64

        X, y, groups = data.get(site, 2, 7, only_masked=True)
        masked = np.flatnonzero(canvas[:, 2, 7] == MASK_ID)
        assert 0 < len(masked) < 6
        np.testing.assert_array_equal(groups, masked)
        np.testing.assert_array_equal(X, acts[masked, 1, 3])
        np.testing.assert_array_equal(y, canvas[masked, -1, 7])


def test_get_label_positions(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    batches = write_run(path, dtype="float32")
    site = "blocks.0.hook_resid_post"
    acts, canvas = concat_activations(batches, site), concat(batches, "canvas")
    slots, values = concat_label(batches, "answer")
    rows = [(e, TARGET_START + p, v) for e in range(6) for p, v in zip(slots[e], values[e])]
    masked = [row for row in rows if canvas[row[0], 3, row[1]] == MASK_ID]
    assert 0 < len(masked) < len(rows)
    with ActivationDataset(path) as data:
        for keep, only_masked in ((rows, False), (masked, True)):
            X, y, groups = data.get(site, 3, "label", label="answer", only_masked=only_masked)
            np.testing.assert_array_equal(groups, [e for e, _, _ in keep])
            np.testing.assert_array_equal(y, [v for _, _, v in keep])
            np.testing.assert_array_equal(X, np.stack([acts[e, 2, p - 4] for e, p, _ in keep]))
        _, y, _ = data.get(site, 3, "label", label="answer", target="output")
        np.testing.assert_array_equal(y, [canvas[e, -1, p] for e, p, _ in rows])
        with pytest.raises(ValueError, match="position='label' needs label=<name>"):
            data.get(site, 3, "label")


def test_merge_two_shards(tmp_path: Path) -> None:
    shards = [tmp_path / "run" / f"run.{i}.h5" for i in range(2)]
    first = write_run(shards[0], config={**CONFIG, "shard": [0, 2]})
    second = [make_batch(100, 2), make_batch(102, 2)]
    with open_writer(shards[1], {**CONFIG, "shard": [1, 2]}) as writer:  # interrupted: 4 of 6 rows
        for batch in second:
            writer.write_batch(batch)
    merged = merge_shards([shards[1], shards[0]], tmp_path / "run" / "run.h5")
    moved = shutil.copytree(tmp_path / "run", tmp_path / "moved")  # shards are found by relative name
    for path in (merged, moved / "run.h5"):
        with ActivationDataset(path) as data:
            both = first + second
            assert data.n_examples == 10 and data.config == CONFIG
            assert list(data.uid) == [f"puzzle-{i}" for i in [*range(6), *range(100, 104)]]
            np.testing.assert_array_equal(data.canvas, concat(both, "canvas"))
            np.testing.assert_array_equal(data.label("carry")[1], concat_label(both, "carry")[1])
            X, _, groups = data.get("blocks.0.hook_resid_post", 0, 4)
            expected = concat_activations(both, "blocks.0.hook_resid_post")[:, 0, 0]
            np.testing.assert_array_equal(X, expected.astype(np.float16))
            np.testing.assert_array_equal(groups, np.arange(10))
    with h5py.File(merged) as file:
        acts = file["activations/blocks.0.hook_resid_post"]
        assert acts.is_virtual and {m.file_name for m in acts.virtual_sources()} == {"run.0.h5", "run.1.h5"}
        assert acts.dims[0][0][()].tolist() == list(range(10))
    shards[1].unlink()
    with pytest.raises(StoreError, match="merges shards, but its shard run.1.h5 is missing"):
        ActivationDataset(merged)


def test_merge_refuses_shards_that_disagree(tmp_path: Path) -> None:
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_run(a, config={**CONFIG, "shard": [0, 2]})
    write_run(b, config={**CONFIG, "seed": 1, "shard": [1, 2]})
    with pytest.raises(StoreError, match=r"shard .*b.h5 does not match shard .*a.h5: config key 'seed' is 1, not 0"):
        merge_shards([a, b], tmp_path / "merged.h5")
    with pytest.raises(StoreError, match=r"expected shards 0 to n-1 of one n, each once, got \[i, n\] = \[\(0, 2\)\]"):
        merge_shards([a], tmp_path / "merged.h5")
    write_run(b, config={**CONFIG, "shard": [1, 2]}, overwrite=True, dtype="float32")
    with pytest.raises(StoreError, match="'activations/blocks.0.hook_resid_post' is"):
        merge_shards([a, b], tmp_path / "merged.h5")
    assert not (tmp_path / "merged.h5").exists()


LOADED = "import sys, {module}; print(sorted(m for m in ('torch', 'h5py') if m in sys.modules))"


@pytest.mark.parametrize(
    "module,loaded",
    [("dlmprobe.store.reader", ["h5py"]), ("dlmprobe.tasks", []), ("dlmprobe.models", ["torch"])],
)
def test_each_stage_loads_only_what_it_needs(module: str, loaded: list[str]) -> None:
    """Reading a store needs no torch; tasks and models (stages before the store) need no h5py."""
    result = subprocess.run(
        [sys.executable, "-c", LOADED.format(module=module)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr(loaded)
