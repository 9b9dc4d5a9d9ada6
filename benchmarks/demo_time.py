"""How long ``dlmprobe demo`` takes with its default settings, from a fresh output folder.

Runs ``python -m dlmprobe.cli demo --out FOLDER`` in a subprocess (a fresh interpreter: imports and
the demo's worker process count), on an empty temporary folder, and records the wall time of the
whole command, the demo's own stage table (``results/timings.json``: wall and CPU seconds of
every stage, which process ran it, the CPU of both processes), the load average before and after,
and the cores. Goal: <= 120 s wall on 2 idle cores. On a shared machine the wall time also counts
the other jobs' turns on the cores: read the CPU seconds beside it.

Run (about 2 minutes on 2 idle cores):
    python benchmarks/demo_time.py [--json benchmarks/results-demo_time.json] [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 120.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results-demo_time.json"))
    parser.add_argument("--keep", type=Path, help="run the demo into this (new) folder and keep it")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per demo process (the demo's default: 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.keep is not None and args.keep.exists():
        raise SystemExit(f"--keep expects a folder that does not exist yet, got {args.keep}")
    scratch = Path(tempfile.mkdtemp(prefix="dlmprobe-demo-time-"))
    out = args.keep or scratch / "demo"
    load_before = [round(x, 2) for x in os.getloadavg()]
    command = [sys.executable, "-m", "dlmprobe.cli", "demo", "--out", str(out), "--threads", str(args.threads)]
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    wall = time.perf_counter() - start
    load_after = [round(x, 2) for x in os.getloadavg()]
    try:
        if done.returncode != 0:
            raise SystemExit(f"dlmprobe demo failed (exit code {done.returncode}):\n{done.stdout[-3000:]}")
        timings = json.loads((out / "results" / "timings.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": load_after},
        "settings": {"command": "dlmprobe demo (default settings)", "torch_threads": args.threads, "goal_s": GOAL_S},
        "wall_s": round(wall, 1),
        "demo_wall_s": timings["total"]["wall_s"],
        "cpu_s": timings["total"]["cpu_s"],
        "cpu_by_process_s": {"main": timings["total"].get("cpu_main_s"), "worker": timings["total"].get("cpu_worker_s")},
        "within_goal": wall <= GOAL_S,
        "stages": timings["stages"],
    }
    width = max(len(row["stage"]) for row in timings["stages"])
    for row in timings["stages"]:
        print(f"{row['stage']:<{width}}  {row.get('process', 'main'):<7}  {row['wall_s']:7.1f} s wall  {row['cpu_s']:7.1f} s CPU")
    print(f"dlmprobe demo: {wall:.1f} s wall (command), {result['cpu_s']:.1f} s CPU over both processes; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; {os.cpu_count()} cores; goal <= {GOAL_S:.0f} s: "
          f"{'met' if result['within_goal'] else 'NOT met'}")
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
