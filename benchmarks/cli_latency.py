"""How long the ``dlmprobe`` command line takes to answer when it has nothing heavy to do.

Times, each in a fresh Python process, ``--help``, every command's ``--help`` and a few argument
errors (goal: <= 1 s each), against ``python -c pass`` in the same run as the baseline (the
interpreter's own start). The median of ``--repeats`` runs is reported per invocation; runs of
all invocations are interleaved so that a busy moment of the machine does not fall on one only.

Run (about 20 s on 2 cores):
    python benchmarks/cli_latency.py [--repeats 5] [--json benchmarks/results-cli_latency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL_S = 1.0
COMMANDS = ["demo", "report", "analyze", "analyze decodability", "train", "eval", "sample", "tasks", "cache",
            "merge", "info", "probe"]
ARGUMENT_ERRORS = [
    "frobnicate",
    "train --task chess --kind diffusion",
    "eval arith-diffusion --n 0",
    "cache --model arith-diffusion --out x.h5 --shard 2/2",
    "probe x.h5 --out p --steps every:x",
    "analyze compare missing-equals-sign.h5",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each invocation (median reported)")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results-cli_latency.json"))
    return parser.parse_args(argv)


def _seconds(argv: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    code = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode
    return time.perf_counter() - start, code


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli = [sys.executable, "-m", "dlmprobe.cli"]
    cases = {"python -c pass": ([sys.executable, "-c", "pass"], 0), "dlmprobe --help": ([*cli, "--help"], 0)}
    cases.update({f"dlmprobe {c} --help": ([*cli, *c.split(), "--help"], 0) for c in COMMANDS})
    cases.update({f"dlmprobe {c}": ([*cli, *c.split()], 2) for c in ARGUMENT_ERRORS})
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (command, expected) in cases.items():
            seconds, code = _seconds(command)
            if code != expected:
                raise SystemExit(f"{name}: exit code {code}, expected {expected}")
            times[name].append(seconds)
    baseline = statistics.median(times["python -c pass"])
    rows = {name: {"median_s": round(statistics.median(t), 3), "over_baseline_s": round(statistics.median(t) - baseline, 3),
                   "runs_s": [round(s, 3) for s in t]} for name, t in times.items()}
    slowest = max((name for name in rows if name != "python -c pass"), key=lambda n: rows[n]["median_s"])
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "settings": {"repeats": args.repeats, "goal_s": GOAL_S},
        "baseline_s": round(baseline, 3),
        "slowest": {"invocation": slowest, **rows[slowest]},
        "all_within_goal": all(row["median_s"] <= GOAL_S for row in rows.values()),
        "invocations": rows,
    }
    for name, row in rows.items():
        print(f"{name:<62} {row['median_s']:6.3f} s  (+{row['over_baseline_s']:.3f} s over python -c pass)")
    print(f"slowest: {slowest} {rows[slowest]['median_s']:.3f} s; goal <= {GOAL_S} s: "
          f"{'met' if result['all_within_goal'] else 'NOT met'}")
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
