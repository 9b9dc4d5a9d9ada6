"""Where the time of a capture run goes: each stage of ``run_cache``'s path timed on its own.

    python benchmarks/capture_profile.py [--model sudoku-diffusion] [--n 128] [--batch-size 64] [--threads 1]

Runs the batches of one capture job stage by stage, with the same recorder, sampler and writer as
``run_cache``, and reports per stage the wall and CPU seconds of the thread that runs it:

* ``plain``: ``generate`` without hooks (what the capture overhead is measured against);
* ``hooked``: ``generate`` with the recorder attached (hooks + the per-step copy/conversion);
* ``pop``: the recorder's captures stacked into one tensor per site;
* ``record``: the store batch made (``capture._batch_record``: tensors to numpy, verification);
* ``prepare``: ``ActivationWriter.write_batch``'s checks and copies in the caller's thread;
* ``write``: the writer thread's HDF5 writes and fsyncs (its own thread time, measured there).

The hooked run minus the plain run is the cost of the hooks and copies; ``pop + record + prepare``
run in the sampling thread between batches; ``write`` overlaps the next batch on a second core.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

import dlmprobe.store.writer as writer_module
from dlmprobe.capture import CacheConfig, _batch_record, plan_cache
from dlmprobe.hooks import ActivationRecorder
from dlmprobe.sampling import generate
from dlmprobe.store import ActivationWriter


class Stopwatch:
    """Wall and CPU time (of the calling thread) summed per stage."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._lock = threading.Lock()

    def time(self, stage: str, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        out = fn(*args, **kwargs)
        with self._lock:
            self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - wall
            self.cpu[stage] = self.cpu.get(stage, 0.0) + time.thread_time() - cpu
        return out


def profile(model: str, n: int, batch_size: int) -> dict:
    plan = plan_cache(CacheConfig(model=model, n=n, sites=["blocks.*.hook_resid_post"], positions="all",
                                  batch_size=batch_size))
    ckpt = plan.checkpoint
    # As run_cache builds it.
    recorder = ActivationRecorder(ckpt.model, list(plan.sites), steps=plan.steps, positions=plan.positions,
                                  dtype=getattr(torch, plan.config.dtype))
    clock = Stopwatch()
    original_write = ActivationWriter._write

    def timed_write(self, *args):
        return clock.time("write", original_write, self, *args)

    writer_module.ActivationWriter._write = timed_write
    try:
        with tempfile.TemporaryDirectory(prefix="dlmprobe-profile-") as tmp:
            with ActivationWriter(Path(tmp) / "profile.h5", plan.layout, config=plan.store_config(),
                                  mask_id=plan.task.vocab.mask_id) as writer:
                for begin in range(0, len(plan.examples), batch_size):
                    examples = plan.examples[begin : begin + batch_size]
                    sampler = replace(plan.sampler, seed=plan.sampler.seed * 1_000_003 + begin)
                    clock.time("plain", generate, ckpt.model, plan.task, examples, ckpt.kind, sampler,
                               batch_size=len(examples))
                    with recorder:
                        trajectory = clock.time("hooked", generate, recorder.model, plan.task, examples, ckpt.kind,
                                                sampler, batch_size=len(examples), observers=[recorder])
                        activations = clock.time("pop", recorder.pop).activations
                    batch = clock.time("record", _batch_record, plan, examples, trajectory, activations)
                    clock.time("prepare", writer.write_batch, batch, copy=False)
            # The writer's thread has joined: every write is counted.
    finally:
        writer_module.ActivationWriter._write = original_write
    plain = clock.wall["plain"]
    return {
        "model": model, "n": n, "batch_size": batch_size, "threads": torch.get_num_threads(),
        "describe": plan.describe(),
        "wall_s": {k: round(v, 3) for k, v in clock.wall.items()},
        "cpu_s": {k: round(v, 3) for k, v in clock.cpu.items()},
        "over_plain_wall": {k: round(v / plain, 3) for k, v in clock.wall.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sudoku-diffusion")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = profile(args.model, args.n, args.batch_size)
    print(result["describe"])
    print(f"{'stage':<8} {'wall s':>8} {'cpu s':>8} {'/ plain':>8}")
    for stage, wall in result["wall_s"].items():
        print(f"{stage:<8} {wall:>8.2f} {result['cpu_s'][stage]:>8.2f} {result['over_plain_wall'][stage]:>8.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
