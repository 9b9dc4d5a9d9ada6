"""Cost of recording activations while sampling, through the real ``dlmprobe cache`` pipeline.

Measures, on a shipped model (``sudoku-diffusion`` by default), the worst case of the pipeline: every
layer's residual stream (``blocks.*.hook_resid_post``) at every denoising step and canvas position:

1. capture overhead: wall time of ``run_cache`` (sampling + hooks + HDF5 writing) over wall time
   of plain ``generate`` on the same examples, batch size and torch thread count. The two are
   alternated over ``--repeats`` runs after a warm-up; medians are reported (goal: <= 1.10x);
2. peak memory: max RSS of a capture run of ``--memory-n`` and of 10x as many examples, each in a
   fresh process (goal: the ratio stays near 1, memory does not grow with the run);
3. HDF5 write throughput: ``ActivationWriter`` writing already captured batches into a fresh file,
   file size over wall time. Nothing is fsynced, so this is the rate while RAM holds the pages.

Model loading and example generation are outside every timer. Sizes are in MiB (2**20 bytes)
and rates in MB/s (10**6 bytes). Absolute numbers are only meaningful on an idle machine.

Run (about 5 minutes on 2 idle cores; --quick is a ~30 s smoke run):
    python benchmarks/capture_overhead.py [--model sudoku-diffusion] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dlmprobe.capture import CacheConfig, CachePlan, capture_batch, plan_cache, run_cache
from dlmprobe.hooks import ActivationRecorder
from dlmprobe.models import shipped_checkpoints
from dlmprobe.sampling import generate
from dlmprobe.store import ActivationWriter

SITES = ["blocks.*.hook_resid_post"]
OVERHEAD_GOAL = 1.10
MEMORY_SCALE = 10
# Sizes of a default and of a --quick run; an option given on the command line wins over both.
# The memory runs default to fewer examples than the timed ones: at 10x they dominate the run time.
DEFAULTS = {"n": 256, "batch_size": 64, "repeats": 3, "memory_n": 64}
QUICK = {"n": 8, "batch_size": 4, "repeats": 1, "memory_n": 4}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sudoku-diffusion", choices=shipped_checkpoints())
    parser.add_argument("--n", type=positive_int, help=f"examples per timed run (default {DEFAULTS['n']})")
    parser.add_argument("--batch-size", type=positive_int, help=f"default {DEFAULTS['batch_size']}")
    parser.add_argument("--repeats", type=positive_int,
                        help=f"timed plain/capture pairs (default {DEFAULTS['repeats']})")
    parser.add_argument("--memory-n", type=positive_int,
                        help=f"examples of the smaller memory run; the other has {MEMORY_SCALE}x "
                             f"(default {DEFAULTS['memory_n']})")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="where the model samples (cpu, cuda); captures go to the CPU")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the peak-memory runs (2 and 3 above)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    # Set when the script re-invokes itself to measure one capture run's memory in a fresh process.
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def cache_config(model: str, n: int, batch_size: int) -> CacheConfig:
    return CacheConfig(model=model, n=n, sites=SITES, positions="all", batch_size=batch_size)


def max_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def time_plain(plan: CachePlan) -> tuple[float, float]:
    """Wall and CPU seconds (every thread of this process) of plain sampling."""
    ckpt = plan.checkpoint
    start, cpu = time.perf_counter(), time.process_time()
    generate(ckpt.model, plan.task, plan.examples, ckpt.kind, plan.sampler, batch_size=plan.config.batch_size)
    return time.perf_counter() - start, time.process_time() - cpu


def time_capture(plan: CachePlan, folder: Path) -> tuple[float, float]:
    """Wall and CPU seconds (the writer's thread included) of ``run_cache``."""
    out = folder / "capture.h5"
    start, cpu = time.perf_counter(), time.process_time()
    run_cache(plan.config, out, progress=False, plan=plan)
    elapsed = time.perf_counter() - start, time.process_time() - cpu
    # Deleting at once also drops its dirty pages, so their write-back cannot slow the next run.
    out.unlink()
    return elapsed


def capture_in_memory(plan: CachePlan) -> list[dict[str, Any]]:
    """The store batches of ``plan``'s examples, captured as ``run_cache`` does but kept in memory.

    The recorder is built as in ``run_cache``, which does not hand out its batches.
    """
    ckpt = plan.checkpoint
    recorder = ActivationRecorder(ckpt.model, list(plan.sites), steps=plan.steps if ckpt.kind == "diffusion" else None,
                                  positions=plan.positions, dtype=getattr(torch, plan.config.dtype))
    size = plan.config.batch_size
    return [capture_batch(plan, recorder, plan.examples[begin : begin + size], plan.offset + begin)
            for begin in range(0, len(plan.examples), size)]


def time_write(plan: CachePlan, batches: list[dict[str, Any]], folder: Path) -> tuple[float, int]:
    """Seconds to create a store (as ``run_cache`` does) and write ``batches`` into it, and its size."""
    out = folder / "write.h5"
    start = time.perf_counter()
    with ActivationWriter(out, plan.layout, config=plan.store_config(), mask_id=plan.task.vocab.mask_id) as writer:
        for batch in batches:
            writer.write_batch(batch)
    elapsed = time.perf_counter() - start
    size = out.stat().st_size
    out.unlink()
    return elapsed, size


def memory_child(args: argparse.Namespace) -> None:
    """One capture run of ``args.n`` examples; prints its peak RSS (after loading, at the end) as JSON."""
    config = cache_config(args.model, args.n, args.batch_size)
    plan = plan_cache(config)
    loaded = max_rss_mib()
    with tempfile.TemporaryDirectory(prefix="dlmprobe-bench-") as folder:
        run_cache(config, Path(folder) / "memory.h5", progress=False, plan=plan)
    print(json.dumps({"n": args.n, "loaded_mib": loaded, "peak_mib": max_rss_mib()}))


def measure_memory(args: argparse.Namespace, n: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--memory-child", "--model", args.model, "--n", str(n),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # stderr passes through
    if result.returncode != 0:
        raise SystemExit(f"the memory run of {n} examples failed with exit code {result.returncode}")
    return json.loads(result.stdout.splitlines()[-1])


def machine_facts() -> dict[str, Any]:
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": sys.version.split()[0], "load_average": [round(x, 2) for x in os.getloadavg()]}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    machine = machine_facts()
    print(f"torch {machine['torch']}, {machine['torch_threads']} torch threads, {machine['cpus']} CPUs, "
          f"python {machine['python']}, load average {machine['load_average']}")
    plan = plan_cache(cache_config(args.model, args.n, args.batch_size))
    plan.checkpoint.model.to(args.device)  # the sampler and the recorder follow the model's device
    print(f"{plan.describe()}, batch size {args.batch_size}, on {args.device}")

    with tempfile.TemporaryDirectory(prefix="dlmprobe-bench-") as tmp:
        folder = Path(tmp)
        # Warm-up: capturing the batches for the write test runs the hooked sampler, writing them
        # warms HDF5, and one plain batch warms the unhooked path.
        batches = capture_in_memory(plan)
        write_s, file_bytes = time_write(plan, batches, folder)
        del batches  # every example's float32 activations: free them before timing
        time_plain(replace(plan, examples=plan.examples[: args.batch_size]))

        plain, capture = [], []
        for repeat in range(args.repeats):
            # Swap the order every repeat, so a drift in machine load hits both measurements alike.
            if repeat % 2 == 0:
                plain.append(time_plain(plan))
                capture.append(time_capture(plan, folder))
            else:
                capture.append(time_capture(plan, folder))
                plain.append(time_plain(plan))
            print(f"repeat {repeat + 1}/{args.repeats}: plain {plain[-1][0]:.2f} s (CPU {plain[-1][1]:.2f} s), "
                  f"capture {capture[-1][0]:.2f} s (CPU {capture[-1][1]:.2f} s)")
        (plain_s, plain_cpu), (capture_s, capture_cpu) = zip(*plain), zip(*capture)

    memory = None
    if not args.skip_memory:
        small = measure_memory(args, args.memory_n)
        large = measure_memory(args, MEMORY_SCALE * args.memory_n)
        memory = {"small": small, "large": large, "ratio": large["peak_mib"] / small["peak_mib"]}
    return {
        "machine": machine,
        "settings": {"model": args.model, "device": args.device, "n": args.n, "batch_size": args.batch_size, "repeats": args.repeats,
                     "memory_n": args.memory_n, "sites": list(plan.sites), "positions": "all",
                     "steps": len(plan.steps), "dtype": plan.config.dtype},
        "overhead": {
            "plain_s": list(plain_s), "capture_s": list(capture_s),
            "plain_median_s": statistics.median(plain_s), "capture_median_s": statistics.median(capture_s),
            "ratio_median": statistics.median(c / p for c, p in zip(capture_s, plain_s)), "goal": OVERHEAD_GOAL,
            # On a shared machine wall time also counts other jobs' turns on the cores; CPU time does not.
            "plain_cpu_s": list(plain_cpu), "capture_cpu_s": list(capture_cpu),
            "cpu_ratio_median": statistics.median(c / p for c, p in zip(capture_cpu, plain_cpu)),
        },
        "memory": memory,
        "write": {"seconds": write_s, "bytes": file_bytes, "mb_per_s": file_bytes / write_s / 1e6,
                  "mb_per_example": file_bytes / len(plan.examples) / 1e6},
    }


def report(results: dict[str, Any]) -> None:
    overhead, memory, write = results["overhead"], results["memory"], results["write"]
    rows = [
        ("plain sampling, median", f"{overhead['plain_median_s']:.2f} s", ""),
        ("sampling + capture + write, median", f"{overhead['capture_median_s']:.2f} s", ""),
        ("capture overhead, median ratio", f"{overhead['ratio_median']:.2f}x", f"<= {OVERHEAD_GOAL}x"),
        ("capture overhead, CPU time ratio", f"{overhead['cpu_ratio_median']:.2f}x", "(writer thread included)"),
        *((f"peak RSS, {run['n']} examples", f"{run['peak_mib']:.0f} MiB", f"(loaded: {run['loaded_mib']:.0f} MiB)")
          for run in ((memory["small"], memory["large"]) if memory else ())),
        *((("peak RSS ratio", f"{memory['ratio']:.2f}x", "~1x"),) if memory else ()),
        ("HDF5 write throughput", f"{write['mb_per_s']:.0f} MB/s", ""),
        ("file size per example", f"{write['mb_per_example']:.2f} MB", ""),
    ]
    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'metric':<{width}}  {'value':>10}  goal / note")
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value:>10}  {goal}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    results = benchmark(args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
