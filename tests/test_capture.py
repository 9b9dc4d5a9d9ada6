"""dlmprobe cache: sampling with capture, streamed into the HDF5 store."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from dlmprobe.capture import CacheConfig, plan_cache, run_cache
from dlmprobe.cli import main
from dlmprobe.models import ModelConfig, build_native, load_model, save_checkpoint
from dlmprobe.store import ActivationDataset


@pytest.fixture
def checkpoints(tiny_config, tmp_path):
    paths = {}
    for config in (tiny_config, tiny_config.twin()):
        paths[config.kind] = str(save_checkpoint(build_native(config), config, tmp_path / config.kind))
    return paths


def _datasets(path):
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return out


def test_float32_store_equals_run_with_cache_on_every_step(checkpoints, tmp_path):
    config = CacheConfig(model=checkpoints["diffusion"], n=12, batch_size=12, dtype="float32",
                         sites=["blocks.*.hook_resid_post", "blocks.1.mlp.hook_out"], positions="all")
    run_cache(config, tmp_path / "run.h5", progress=False)
    model = load_model(checkpoints["diffusion"]).model
    with ActivationDataset(tmp_path / "run.h5") as data:
        assert data.n_examples == 12 and list(data.steps) == [0, 1, 2]
        canvas = torch.from_numpy(data.canvas).long()
        for step in data.steps:
            _, cache = model.run_with_cache(canvas[:, step])
            for site in data.sites:
                stored = data._file["activations"][site][:, step]
                assert np.array_equal(stored, cache[site].numpy()), (site, step)  # to the bit


def test_autoregressive_store_is_exact_at_the_positions_already_computed(checkpoints, tmp_path):
    config = CacheConfig(model=checkpoints["autoregressive"], n=6, dtype="float32", positions="all")
    run_cache(config, tmp_path / "ar.h5", progress=False)
    model = load_model(checkpoints["autoregressive"]).model
    with ActivationDataset(tmp_path / "ar.h5") as data:
        acts = data._file["activations"]["blocks.1.hook_resid_post"][()]
        canvas = torch.from_numpy(data.canvas).long()
        gen_start = data.target_start
        for step in data.steps:
            seen = gen_start + step  # the sampler's forward pass at this step covered positions < seen
            _, cache = model.run_with_cache(canvas[:, step, :seen])
            assert np.allclose(acts[:, step, :seen], cache["blocks.1.hook_resid_post"].numpy(), atol=1e-5)
            assert np.isnan(acts[:, step, seen:]).all()


def test_positions_rules_and_reader(checkpoints, tmp_path):
    # "masked" is an alias of "target": the same layout; reading chooses the still-masked rows.
    target, masked = (plan_cache(CacheConfig(model=checkpoints["diffusion"], n=8, positions=rule))
                      for rule in ("target", "masked"))
    assert masked.layout == target.layout and masked.bytes_needed == target.bytes_needed
    run_cache(masked.config, tmp_path / "m.h5", progress=False, plan=masked)
    with ActivationDataset(tmp_path / "m.h5") as data:
        task = load_model(checkpoints["diffusion"]).task
        assert list(data.positions) == list(range(task.target_start, task.target_start + task.target_length))
        X, y, groups = data.get("blocks.0.hook_resid_post", 1, "label", label="answer", only_masked=True)
        # One token is committed per step: the answer is still masked at step 1 unless it went first.
        first = data.commit_step[:, task.target_start + task.target_length - 1] == 0
        assert len(X) == int((~first).sum()) and X.shape[1] == 32
        assert set(groups) == set(np.flatnonzero(~first))
    plan = plan_cache(CacheConfig(model=checkpoints["diffusion"], n=4, positions="last_prompt", steps=2))
    assert plan.positions == [plan.task.target_start - 1] and plan.steps == [0, 2]


def _run_cli(args):
    return subprocess.run([sys.executable, "-m", "dlmprobe.cli", *args], capture_output=True, text=True)


def test_kill_then_resume_equals_an_uninterrupted_run(tmp_path):
    config = ModelConfig(task="sudoku", task_params={"size": 4}, n_layers=2, d_model=32, n_heads=2, d_mlp=64)
    model = str(save_checkpoint(build_native(config), config, tmp_path / "sudoku"))
    args = ["cache", "--model", model, "--n", "96", "--batch-size", "4", "--threads", "1"]
    straight = _run_cli([*args, "--out", str(tmp_path / "straight.h5")])
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-m", "dlmprobe.cli", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    written = 0
    while time.time() < deadline and proc.poll() is None:
        if out.exists():
            try:
                with h5py.File(out, "r", locking=False) as f:
                    written = int(f.attrs["n_complete"])
            except (OSError, KeyError):
                written = 0
            if written >= 12:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with h5py.File(out, "r", locking=False) as f:
        assert 12 <= int(f.attrs["n_complete"]) < 96

    resumed = _run_cli([*args, "--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = _datasets(tmp_path / "straight.h5"), _datasets(out)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), name


def test_shards_merge_into_the_unsharded_run(checkpoints, tmp_path, capsys):
    base = ["cache", "--model", checkpoints["diffusion"], "--n", "10", "--batch-size", "3"]
    assert main([*base, "--out", str(tmp_path / "whole.h5")]) == 0
    for i in range(2):
        assert main([*base, "--shard", f"{i}/2", "--out", str(tmp_path / f"part{i}.h5")]) == 0
    assert main(["merge", str(tmp_path / "part0.h5"), str(tmp_path / "part1.h5"), "--out", str(tmp_path / "merged.h5")]) == 0
    with ActivationDataset(tmp_path / "whole.h5") as whole, ActivationDataset(tmp_path / "merged.h5") as merged:
        assert merged.n_examples == 10
        assert list(merged.uid) == list(whole.uid)
        assert np.array_equal(merged.canvas, whole.canvas)
        # Batches differ between the runs (3 vs 5+5 rows), so float16 activations agree to rounding.
        a = whole.get("blocks.1.hook_resid_post", 2, "label", label="answer")[0]
        b = merged.get("blocks.1.hook_resid_post", 2, "label", label="answer")[0]
        assert np.allclose(a, b, atol=1e-2)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--sites", "blocks.5.hook_resid_post"], "unknown site 'blocks.5.hook_resid_post'"),
        (["--record-steps", "0,9"], "steps to record must lie in [0, 3)"),
        (["--steps", "2", "--block-length", "2"], "block_length must divide"),
        (["--shard", "2/2"], "shard must be i/n"),
        (["--task", "sudoku"], "does not match the model"),
        (["--task-param", "n_ops=9"], "the model's context is"),
    ],
)
def test_cache_bad_input_is_one_line(checkpoints, tmp_path, capsys, extra, message):
    out = tmp_path / "x.h5"
    assert main(["cache", "--model", checkpoints["diffusion"], "--n", "4", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_existing_file_is_kept_and_bad_files_are_one_line_errors(checkpoints, tmp_path, capsys):
    out = tmp_path / "run.h5"
    assert main(["cache", "--model", checkpoints["diffusion"], "--n", "4", "--out", str(out)]) == 0
    before = out.read_bytes()
    assert main(["cache", "--model", checkpoints["diffusion"], "--n", "4", "--out", str(out)]) == 2
    assert out.read_bytes() == before
    capsys.readouterr()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(before[: len(before) // 2])
    assert main(["info", str(truncated)]) == 2
    assert "truncated or damaged" in capsys.readouterr().err
    with h5py.File(out, "r+") as f:
        f.attrs["schema_version"] = 99
    assert main(["info", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "schema version 99" in err
