"""The main job end to end, small: every analysis runs on the shipped models and lands in the report."""

import html
import json

import pytest

from dlmprobe.cli import main
from dlmprobe.demo import DemoConfig, run_demo
from dlmprobe.report import ORDER


@pytest.mark.slow
def test_demo_runs_the_whole_chain(tmp_path):
    config = DemoConfig(n=48, n_model=16, n_causal=10, record_every=12)
    lines = []
    report = run_demo(tmp_path / "demo", config, log=lines.append)
    page = report.read_text()
    results = tmp_path / "demo" / "results"
    for name in ORDER:  # the eight analyses (compare on sudoku and path-star, order on sudoku and arith)
        record = json.loads((results / name / "result.json").read_text())
        assert html.escape(record["title"]) in page and (results / name / "figure.png").stat().st_size > 1000
        # Summaries are computed: each quotes at least one number
        assert any(ch.isdigit() for ch in record["summary"])
    assert page.count("data:image/png;base64,") == len(ORDER)
    assert any("report written" in line for line in lines)
    # Every stage is timed, in the log's closing table and in results/timings.json.
    timings = json.loads((results / "timings.json").read_text())
    stages = [row["stage"] for row in timings["stages"]]
    assert sum(s.startswith("cache ") for s in stages) == 7 and "7 causal check" in stages and stages[-1] == "report"
    assert all(row["wall_s"] >= 0 and row["cpu_s"] >= 0 for row in timings["stages"])
    assert timings["total"]["wall_s"] >= sum(row["wall_s"] for row in timings["stages"]) - 1
    assert any(line.startswith("total ") for line in lines) and sum(s in " ".join(lines) for s in stages) == len(stages)


@pytest.mark.parametrize("argv, message", [
    (["demo", "--n", "5"], "n >= 10"),
    (["demo", "--record-every", "0"], "record_every must be >= 1"),
])
def test_demo_bad_arguments(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()  # refused before anything was written
