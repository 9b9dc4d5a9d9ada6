"""A store that never lies: write errors surface, one writer at a time, readers during a write,
space reserved up front, damaged files refused in one line, and `dlmprobe cache` killed or
stopped by a refused write resumes to the same file as an uninterrupted run.

The write errors are real OS errors: a file size limit (RLIMIT_FSIZE, which makes write(2) fail
with EFBIG) and a small tmpfs (skipped where mounting one is refused).
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_store import SIZES, make_batch, open_writer, read_everything, write_run

from dlmprobe.store import ActivationDataset, StoreError, StoreLayout, merge_shards
from dlmprobe.store.disk import reserve_space, write_error

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent
SITE = "blocks.0.hook_resid_post"


def subprocess_env() -> dict[str, str]:
    """This checkout's dlmprobe and tests first, one thread, unbuffered output (lines as they come)."""
    path = os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def end_of_rows(path: Path, rows: int) -> int:
    """The file offset just past the bytes of examples ``[0, rows)`` in every dataset."""
    ends = []
    with h5py.File(path, "r", locking=False) as file:
        for dataset in file["activations"].values():
            chunks = [dataset.id.get_chunk_info_by_coord((row, step, 0, 0))
                      for row in range(rows) for step in range(dataset.shape[1])]
            ends.append(max(chunk.byte_offset + chunk.size for chunk in chunks))
        for group in ("examples", "trajectory"):
            for dataset in file[group].values():
                row_bytes = dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))
                ends.append(dataset.id.get_offset() + rows * row_bytes)
    return max(ends)


def assert_rows_match(path: Path, expected: Path) -> int:
    """The complete rows of ``path`` equal the same rows of ``expected`` in every dataset; their count."""
    with ActivationDataset(path) as data:
        n = data.n_examples
    with h5py.File(path, "r", locking=False) as file, h5py.File(expected, "r") as reference:
        for name in ("examples", "trajectory", "labels", "activations"):
            file[name].visititems(
                lambda sub, item, group=name: np.testing.assert_array_equal(
                    item[:n], reference[f"{group}/{sub}"][:n], err_msg=f"{group}/{sub}"
                ) if isinstance(item, h5py.Dataset) else None
            )
    return n


# --- write errors ---------------------------------------------------------------------------

LIMITED_RUN = """
import resource, signal
from test_store import SIZES, make_batch, open_writer
from dlmprobe.store import StoreError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sizes = dict(SIZES, n_examples={n})
try:
    with open_writer({path!r}, n_examples={n}, resume=True) as writer:
        for start in range(writer.n_complete, {n}, 2):
            writer.write_batch(make_batch(start, 2, sizes))
except StoreError as err:
    print(err)
"""


def test_a_refused_write_stops_the_run_and_resume_completes_it(tmp_path: Path) -> None:
    n, good = 40, 20
    path, clean = tmp_path / "run.h5", tmp_path / "clean.h5"
    open_writer(path, n_examples=n).close()  # made and reserved without a limit
    limit = end_of_rows(path, good)  # every byte of rows >= 20 lies past it somewhere
    script = LIMITED_RUN.format(limit=limit, n=n, path=str(path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(),
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"file size limit reached while writing {path}: File too large ({good} examples are safely stored); "
        "raise the limit (ulimit -f) and rerun with --resume"
    )
    assert result.stderr == ""  # no tracebacks from h5py's deallocators
    assert not path.with_name("run.h5.lock").exists()
    write_run(clean, n_examples=n)
    assert assert_rows_match(path, clean) == good  # n_complete counts exactly the rows on disk
    with open_writer(path, n_examples=n, resume=True) as writer:
        assert writer.n_complete == good
        for start in range(good, n, 2):
            writer.write_batch(make_batch(start, 2, dict(SIZES, n_examples=n)))
    assert read_everything(path) == read_everything(clean)


def test_os_errors_are_named_with_what_to_do() -> None:
    path = Path("runs/run.h5")
    cases = {
        OSError(errno.ENOSPC, "No space left on device"): "disk full while writing runs/run.h5: No space left "
        "on device (3 examples are safely stored); free space and rerun with --resume",
        OSError(errno.EIO, "Input/output error"): "I/O error while writing runs/run.h5: Input/output error "
        "(3 examples are safely stored); check the disk and rerun with --resume",
        # h5py raises some failures as RuntimeError, the errno only in its message
        RuntimeError("Unable to flush file (file write failed: errno = 122, error message = 'Disk quota exceeded')"):
        "disk full while writing runs/run.h5: Disk quota exceeded (3 examples are safely stored); free space and "
        "rerun with --resume",
    }
    for err, message in cases.items():
        found = write_error(err, path, stored=3)
        assert isinstance(found, StoreError) and str(found) == message and found.__cause__ is err
    bug = TypeError("not an OS error")
    assert write_error(bug, path) is bug  # anything else keeps its type and traceback


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """A tmpfs of a given size (``remount(size)`` resizes it), unmounted afterwards."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is refused here: {mounted.stderr.strip()}")

    def remount(size: str) -> Path:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)
        return folder

    try:
        yield remount
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_run_that_does_not_fit_fails_before_it_starts(small_tmpfs: Callable[[str], Path]) -> None:
    folder = small_tmpfs("2m")
    path = folder / "run.h5"
    sizes = {"n_examples": 200, "sites": {SITE: 256}}
    assert StoreLayout(**{**SIZES, **sizes}).bytes_needed() > 2 * 2**20
    with pytest.raises(StoreError, match=r"not enough disk space for .*run.h5: it needs [\d.]+ MiB more, .* free; "
                                         r"free space and rerun$"):
        open_writer(path, **sizes)
    assert os.listdir(folder) == []  # no half-made file, no lock file
    small_tmpfs("8m")
    with open_writer(path, **sizes) as writer:
        writer.write_batch(make_batch(0, 2, {**SIZES, **sizes}))
    assert 512 * path.stat().st_blocks >= path.stat().st_size  # every block reserved, none left sparse


def test_reserving_checks_the_remaining_need(small_tmpfs: Callable[[str], Path]) -> None:
    folder = small_tmpfs("2m")
    path = folder / "sparse.bin"
    with path.open("wb") as file:  # 3 MiB long, its first 1.5 MiB on disk
        file.write(b"x" * (3 * 2**19))
        file.truncate(3 * 2**20)
    with pytest.raises(StoreError, match=r"it needs 1.5 MiB more, .* has 0.5 MiB free; free space and rerun with --resume"):
        reserve_space(path, resume=True)
    small_tmpfs("4m")
    reserve_space(path, resume=True)
    assert 512 * path.stat().st_blocks >= 3 * 2**20
    assert shutil.disk_usage(folder).free <= 2**20 + 2**16  # the reserved blocks are taken from the disk


# --- one writer, many readers ---------------------------------------------------------------

SLOW_RUN = """
import time
from test_store import SIZES, make_batch, open_writer
with open_writer({path!r}, n_examples={n}, resume=True) as writer:
    for start in range(writer.n_complete, {n}, 2):
        writer.write_batch(make_batch(start, 2, dict(SIZES, n_examples={n})))
        print(start, flush=True)
        time.sleep(0.05)
"""


def test_readers_work_during_a_write_and_a_second_writer_is_refused(tmp_path: Path) -> None:
    n = 400
    path, clean = tmp_path / "run.h5", tmp_path / "clean.h5"
    write_run(clean, n_examples=n)
    process = subprocess.Popen([sys.executable, "-c", SLOW_RUN.format(path=str(path), n=n)],
                               stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        seen = []
        for _ in range(4):
            for _ in range(5):
                assert process.stdout.readline(), "the writing process ended early"
            seen.append(assert_rows_match(path, clean))  # read while the writer writes
            with ActivationDataset(path) as data:
                assert data.n_planned == n and f"/{n} examples complete" in data.describe()
        assert seen == sorted(seen) and 0 < seen[-1] < n
        for mode in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(StoreError, match=rf"run.h5 is being written by another process \(pid {process.pid}\); "
                                                 "wait for it to finish or stop it, then rerun"):
                open_writer(path, n_examples=n, **mode)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    complete = assert_rows_match(path, clean)
    with open_writer(path, n_examples=n, resume=True) as writer:  # the killed writer's lock died with it
        assert writer.n_complete == complete
        for start in range(complete, n, 2):
            writer.write_batch(make_batch(start, 2, dict(SIZES, n_examples=n)))
    assert read_everything(path) == read_everything(clean)
    assert sorted(os.listdir(tmp_path)) == ["clean.h5", "run.h5"]


def test_the_lock_holds_within_a_process_and_is_released_on_close(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with open_writer(path) as writer:
        assert path.with_name("run.h5.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(StoreError, match=f"being written by another process \\(pid {os.getpid()}\\)"):
            open_writer(path, resume=True)
        writer.write_batch(make_batch(0, 2))
    assert not path.with_name("run.h5.lock").exists()
    with pytest.raises(FileExistsError):  # refused after taking the lock: the lock is released again
        open_writer(path)
    with open_writer(path, resume=True) as writer:
        assert writer.n_complete == 2


# --- files that are not what the schema declares ----------------------------------------------


def _replace(name: str, data: Any) -> Callable[[h5py.File], None]:
    def change(file: h5py.File) -> None:
        del file[name]
        file.create_dataset(name, data=data)
    return change


DAMAGE: dict[str, tuple[Callable[[h5py.File], None], str]] = {
    "group": (lambda f: f.__delitem__("trajectory"), "group /trajectory is missing"),
    "dataset": (lambda f: f.__delitem__("trajectory/canvas"), "dataset /trajectory/canvas is missing"),
    "label part": (lambda f: f.__delitem__("labels/answer/values"), "dataset /labels/answer/values is missing"),
    "dtype": (_replace("examples/prompt", np.zeros((6, 3))), "/examples/prompt should hold integers, got dtype float64"),
    "activation dtype": (_replace(f"activations/{SITE}", np.zeros((6, 3, 7, 8), np.int32)),
                         f"/activations/{SITE} should hold float16 or float32, got dtype int32"),
    "shape": (_replace("trajectory/canvas", np.zeros((6, 4, 12), np.int32)),
              r"/trajectory/canvas should have S\+1 = 5 along its axis 'S\+1', got shape \(6, 4, 12\)"),
    "rows": (_replace("examples/solved", np.zeros(5, bool)), r"/examples/solved should have N = 6 .* got shape \(5,\)"),
    "axes": (_replace(f"activations/{SITE}", np.zeros((6, 3, 7), np.float16)),
             rf"/activations/{SITE} should have 4 axes \(N, Ss, Ps, d of '{SITE}'\), got shape \(6, 3, 7\)"),
    "group for dataset": (lambda f: (f.__delitem__(f"activations/{SITE}"), f.create_group(f"activations/{SITE}")),
                          f"/activations/{SITE} should be a dataset, got a group"),
    "steps": (lambda f: f["dims/step"].__setitem__(slice(None), [0, 2, 9]),
              r"/dims/step should be increasing indices in \[0, 4\), got \[0, 2, 9\]"),
    "list config": (lambda f: f.attrs.__setitem__("config", "[1, 2]"),
                    r"root attribute 'config' should be a JSON object, got list \[1, 2\]"),
    "bad json": (lambda f: f.attrs.__setitem__("config", '{"model": '), "root attribute 'config' is not valid JSON"),
    "int config": (lambda f: f.attrs.__setitem__("config", 3), "root attribute 'config' should be JSON text, got"),
    "no mask_id": (lambda f: f.attrs.__delitem__("mask_id"), "root attribute 'mask_id' is missing"),
    "text count": (lambda f: f.attrs.__setitem__("n_examples", "six"),
                   "root attribute 'n_examples' should be an int, got 'six'"),
    "n_complete": (lambda f: f.attrs.__setitem__("n_complete", 7), r"n_complete should lie in \[0, n_examples = 6\], got 7"),
    "target_start": (lambda f: f.attrs.__setitem__("target_start", 4), "target_start should be L - T - 1 = 5, got 4"),
    "version": (lambda f: f.attrs.__setitem__("schema_version", "1"), "has schema version '1', this dlmprobe reads 1"),
}


@pytest.fixture(scope="module")
def valid_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("valid") / "run.h5"
    write_run(path)
    return path


def damaged_copy(valid: Path, folder: Path, change: Callable[[h5py.File], None]) -> Path:
    path = folder / f"{uuid.uuid4().hex}.h5"
    shutil.copyfile(valid, path)
    with h5py.File(path, "r+") as file:
        change(file)
    return path


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_store_is_one_line_naming_file_and_fault(valid_store: Path, tmp_path: Path, damage: str) -> None:
    change, message = DAMAGE[damage]
    path = damaged_copy(valid_store, tmp_path, change)
    with pytest.raises(StoreError, match=message) as err:
        ActivationDataset(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    with pytest.raises(StoreError, match=message):  # resuming and merging check the same way
        open_writer(path, resume=True)
    with pytest.raises(StoreError, match=message):
        merge_shards([path], tmp_path / "merged.h5")


def test_a_store_from_another_tool_needs_no_optional_config_key(valid_store: Path, tmp_path: Path) -> None:
    path = damaged_copy(valid_store, tmp_path, lambda f: (f.attrs.__setitem__("config", "{}"),
                                                          f.attrs.__delitem__("created"),
                                                          f.attrs.__delitem__("dlmprobe_version")))
    with ActivationDataset(path) as data:
        assert data.config == {} and data.config_entry("task", "answer_label") is None
        lines = data.describe().splitlines()
    assert lines[1:4] == ["model ? (?), task ? ?, sampler ?", "steps [0, 2, 3]", "positions (?) [4, 5, 6, 7, 8, 9, 10]"]
    with ActivationDataset(valid_store) as data:
        assert data.config_entry("task", "name") == "arith" and data.config_entry("model", "name") is None
        assert data.n_planned == data.n_examples == 6 and data.dtype == "float16"
        assert data.site_shape(SITE) == (6, 3, 7, 8)
        solved = np.mean([make_batch(start, 2)["solved"] for start in (0, 2, 4)])
        assert data.describe().splitlines()[0] == f"{valid_store}: 6/6 examples complete, solved {solved:.1%}"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
ATTRIBUTE_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.booleans(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.lists(st.integers(-10, 10), min_size=1, max_size=4).map(np.array),
    JSON.map(json.dumps),
    st.dictionaries(st.sampled_from(["model", "task", "sampler", "position_rule"]), JSON, max_size=4).map(json.dumps),
    st.just(h5py.Empty("f8")),
)
ROOT_ATTRIBUTES = ["schema_version", "config", "n_examples", "n_complete", "target_start", "mask_id", "created"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(ROOT_ATTRIBUTES), st.none() | ATTRIBUTE_VALUES), min_size=1, max_size=3))
def test_malformed_attributes_give_a_store_error_or_a_reading(valid_store: Path, changes: list[tuple[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.h5"
        shutil.copyfile(valid_store, path)
        with h5py.File(path, "r+") as file:
            for name, value in changes:
                try:
                    if value is None:
                        file.attrs.pop(name, None)
                    else:
                        file.attrs[name] = value
                except (TypeError, ValueError):  # h5py cannot store it: nothing to read back
                    assume(False)
        try:
            with ActivationDataset(path) as data:
                data.describe()
                X, y, groups = data.get(SITE, int(data.steps[0]), int(data.positions[0]))
                assert len(X) == len(y) == len(groups) == data.n_examples
        except StoreError as err:
            assert "\n" not in str(err) and str(path) in str(err)


# --- dlmprobe cache, killed or refused a write -------------------------------------------------

CACHE = [sys.executable, "-m", "dlmprobe.cli", "cache", "--model", "arith-diffusion", "--n", "96",
         "--batch-size", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store of an uninterrupted `dlmprobe cache` run."""
    out = tmp_path_factory.mktemp("clean") / "clean.h5"
    subprocess.run([*CACHE, "--out", str(out)], check=True, capture_output=True, env=subprocess_env())
    return out


@pytest.mark.slow
def test_cache_killed_at_random_moments_resumes_to_the_uninterrupted_store(clean_cache: Path, tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    out = tmp_path / "killed.h5"
    for _ in range(2):
        process = subprocess.Popen([*CACHE, "--out", str(out), "--resume"], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True, env=subprocess_env())
        assert process.stdout.readline(), f"cache ended before sampling (seed {seed})"  # its plan: sampling starts
        time.sleep(rng.uniform(0.0, 2.5))
        process.kill()
        process.wait()
        process.stdout.close()
        if out.exists():
            assert assert_rows_match(out, clean_cache) % 8 == 0, f"seed {seed}"
    result = subprocess.run([*CACHE, "--out", str(out), "--resume"], capture_output=True, text=True, env=subprocess_env(),
                            check=False)
    assert result.returncode == 0, result.stderr
    assert read_everything(out) == read_everything(clean_cache), f"seed {seed}"
    assert os.listdir(tmp_path) == ["killed.h5"], f"seed {seed}"  # no .partial or .lock left behind


# `python -m dlmprobe.cli` with SIGXFSZ ignored: a write past the file size limit then fails with EFBIG.
CACHE_REFUSABLE = [
    sys.executable, "-c",
    (
        "import runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); sys.argv[0] = 'dlmprobe'; "
        "runpy.run_module('dlmprobe.cli', run_name='__main__')"
    ),
    *CACHE[3:],
]


@pytest.mark.slow
def test_cache_refused_a_write_exits_2_in_one_line_and_resume_completes(clean_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    process = subprocess.Popen([*CACHE_REFUSABLE, "--out", str(out)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=subprocess_env())
    while not out.exists() and process.poll() is None:  # the file appears made and reserved, before sampling
        time.sleep(0.002)
    limit = end_of_rows(out, 48)
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (limit, limit))  # "the disk fills up" mid-run
    _, stderr = process.communicate()
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert stderr.splitlines()[-1] == (
        f"dlmprobe cache: error: file size limit reached while writing {out}: File too large "
        "(48 examples are safely stored); raise the limit (ulimit -f) and rerun with --resume"
    )
    assert assert_rows_match(out, clean_cache) == 48
    result = subprocess.run([*CACHE, "--out", str(out), "--resume"], capture_output=True, text=True, env=subprocess_env(),
                            check=False)
    assert result.returncode == 0, result.stderr
    assert read_everything(out) == read_everything(clean_cache)
