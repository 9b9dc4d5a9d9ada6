"""The GPU benchmark script, run at its tiny shape on the CPU: every section runs and reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GPU_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "results.json"
    done = subprocess.run([sys.executable, str(GPU_SCRIPT), "--shape", "tiny", "--json", str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    return json.loads(out.read_text())


def test_gpu_script_runs_every_section_at_tiny_shape(tiny_results):
    llada = tiny_results["llada"]
    assert llada["status"] == "ok", llada
    assert len(llada["plain_s"]) == len(llada["capture_s"]) == llada["shape"]["repeats"]
    assert llada["ratio_median"] > 0 and llada["store_bytes"] > 0
    grid = tiny_results["probe_grid"]
    assert grid["status"] == "ok", grid
    assert grid["result"]["device"] == "cpu" and grid["result"]["max_accuracy_difference"] <= 0.05
    for model, section in tiny_results["capture"].items():
        assert section["status"] == "ok", (model, section)
        assert section["result"]["overhead"]["ratio_median"] > 0 and section["result"]["memory"] is None


def test_gpu_script_without_a_gpu_says_so_and_exits_0(tmp_path):
    out = tmp_path / "results.json"
    # A full-shape run on a machine whose torch sees no GPU (CUDA hidden from the child).
    done = subprocess.run([sys.executable, str(GPU_SCRIPT), "--json", str(out)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0 and "no GPU here" in done.stdout and not out.exists()
