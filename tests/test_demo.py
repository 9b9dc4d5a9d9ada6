"""The main job end to end, small: every analysis runs on the shipped models and lands in the report."""

import html
import json

import pytest

from dlmprobe.cli import main
from dlmprobe.demo import DemoConfig, run_demo
from dlmprobe.report import ORDER


@pytest.mark.slow
def test_demo_runs_the_whole_chain(tmp_path):
    config = DemoConfig(n=48, n_model=16, n_paraphrase=16, n_causal=10, record_every=12)
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
    # Seven datasets, and one step-0 dataset per extra training seed of the sudoku denoiser (seed 0's is the first).
    assert sum(s.startswith("cache ") and not s.endswith("-step0") for s in stages) == 7
    assert [s for s in stages if s.endswith("-step0")] == ["cache sudoku-diffusion-seed1-step0", "cache sudoku-diffusion-seed2-step0"]
    assert "7 causal check" in stages and "9 seed spread" in stages and stages[-1] == "report"
    assert all(row["wall_s"] >= 0 and row["cpu_s"] >= 0 for row in timings["stages"])
    # Two processes: each one's stages run one after another, within the whole run's wall time.
    processes = {row["process"] for row in timings["stages"]}
    assert processes == {"main", "worker"} and timings["total"]["processes"] == 2
    for process in processes:
        assert timings["total"]["wall_s"] >= sum(r["wall_s"] for r in timings["stages"] if r["process"] == process) - 1
    assert timings["total"]["cpu_s"] == pytest.approx(timings["total"]["cpu_main_s"] + timings["total"]["cpu_worker_s"],
                                                      abs=0.05)
    assert timings["total"]["cpu_s"] >= sum(row["cpu_s"] for row in timings["stages"]) - 1
    assert any(line.startswith("total ") for line in lines) and sum(s in " ".join(lines) for s in stages) == len(stages)


@pytest.mark.parametrize("argv, message", [
    (["demo", "--n", "5"], "n >= 10"),
    (["demo", "--record-every", "0"], "record_every must be >= 1"),
    (["demo", "--processes", "3"], "processes must be 1 or 2"),
])
def test_demo_bad_arguments(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_a_failing_worker_stops_the_demo_with_its_error(tmp_path):
    """The worker process's error reaches the caller as one exception; nothing waits forever."""
    config = DemoConfig(n=10, n_model=1, n_causal=1, record_every=12)
    config.compare_every = -1  # bypasses the config's check: the worker's first cache refuses it
    with pytest.raises(ValueError, match="k >= 1, got -12"):
        run_demo(tmp_path / "demo", config, log=lambda line: None)
    assert not (tmp_path / "demo" / "report.html").exists()
