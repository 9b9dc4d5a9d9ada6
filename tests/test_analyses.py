"""Analyses 1-4 and 8, the report and the analyze/report commands, on stores of the shipped models."""

import base64
import re

import numpy as np
import pytest

from dlmprobe.analyses import (
    commit_order,
    compare_runs,
    decodability,
    load_result,
    planning_lead,
    trajectory_view,
)
from dlmprobe.analyses.lead import first_stable_step
from dlmprobe.capture import CacheConfig, run_cache
from dlmprobe.cli import main
from dlmprobe.probes.features import frontier_positions
from dlmprobe.report import write_report
from dlmprobe.store import ActivationDataset

SITES = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """arith denoiser (own positions), its twin and the denoiser left to right (with <sep>), sudoku."""
    folder = tmp_path_factory.mktemp("stores")
    specs = {
        "diffusion": CacheConfig(model="arith-diffusion", n=96, sites=SITES, positions="target"),
        "autoregressive": CacheConfig(model="arith-autoregressive", n=96, sites=SITES, positions="sep+target"),
        "left_to_right": CacheConfig(model="arith-diffusion", n=96, sites=SITES, positions="sep+target",
                                     sampler={"block_length": 1}),
        "sudoku": CacheConfig(model="sudoku-diffusion", n=24, sites=SITES[1:], steps=6, positions="target"),
    }
    out = {}
    for name, config in specs.items():
        run_cache(config, folder / f"{name}.h5", progress=False)
        out[name] = ActivationDataset(folder / f"{name}.h5")
    return out


def test_first_stable_step_by_hand():
    steps = np.arange(5)
    correct = np.array([
        [True, False, True, True, True],    # wrong at step 1: stable from 2
        [True, True, True, True, True],     # known from 0
        [False, False, False, False, False],  # never: the commit step
        [False, True, False, True, True],   # commit at 3: stable run before it is only step... none at 2
    ])
    commit = np.array([4, 4, 3, 3])
    assert first_stable_step(correct, commit, steps).tolist() == [2, 0, 3, 3]


def test_frontier_is_the_last_written_position(stores):
    data = stores["autoregressive"]
    for step in data.steps:
        assert (frontier_positions(data, int(step)) == data.target_start + int(step) - 1).all()


def test_decodability_table_figure_and_summary_agree(stores):
    data = stores["diffusion"]
    result = decodability(data, label="answer", bootstrap=50, progress=False)
    table = result.table
    assert set(table["layer"]) == {1, 3}
    assert len(table) <= 2 * data.n_steps  # the last step has no masked answer left in most rows
    assert ((table["accuracy"] >= 0) & (table["accuracy"] <= 1)).all()
    # The summary quotes the first step of the best layer from the table, not a typed number.
    best = table[table["site"] == table.groupby("site")["accuracy"].mean().idxmax()].sort_values("step").iloc[0]
    assert f"{100 * best['accuracy']:.0f}% (95% CI {100 * best['ci_low']:.0f}%" in result.summary
    assert f"(`{best['strongest_baseline']}`): {100 * best['strongest_baseline_accuracy']:.0f}%" in result.summary
    assert len(result.figure.axes) >= 3
    # The logit lens at the last block is the model's own read-out, row for row.
    last = table[table["site"] == SITES[1]]
    assert (last["lens_accuracy"] == last["readout_accuracy"]).all()
    assert {"baseline_position_accuracy", "baseline_givens_accuracy", "baseline_embedding_accuracy"} <= set(table.columns)
    assert (table["control_draws"] == 3).all()
    # Per difficulty stratum: the strata of each cell add up to the cell's rows.
    strata = result.tables["strata"]
    probe = strata[strata["reader"] == "probe"].groupby(["site", "step"])["n_rows"].sum()
    assert probe.to_dict() == table.set_index(["site", "step"])["n_rows"].to_dict()
    assert set(strata["stratum_name"]) <= {"constant (after * 0)"} | {f"depth {d}" for d in range(1, 10)}
    assert "By difficulty" in result.summary
    assert set(result.tables["clock"]["site"]) == set(SITES) and "Clock check" in result.summary


def test_planning_lead_matches_the_trajectory(stores):
    data = stores["diffusion"]
    result = planning_lead(data, label="answer", site=SITES[1], progress=False)
    rows = result.tables["rows"]
    assert len(rows) == data.n_examples  # one answer position per puzzle
    for _, row in rows.head(10).iterrows():
        i, pos = int(row["example"]), int(row["position"])
        commit = data.commit_step[i, pos]
        final = data.canvas[i, -1, pos]
        hits = [data.prediction[i, s, pos] == final for s in range(commit)]
        # first stable step of the argmax, recomputed by a loop
        first = commit
        for s in range(commit - 1, -1, -1):
            if not hits[s]:
                break
            first = s
        assert row["first_argmax_step"] == first and row["lead_argmax"] == commit - first
    assert set(result.table["reader"]) == {"probe", "argmax", "lens"}
    # Against the schedule: the oracle read at every step leads by the commit step itself.
    schedule = result.tables["schedule"]
    overall = schedule[schedule["stratum"] == "all"].set_index("reader")
    assert overall.loc["argmax", "oracle_lead"] == pytest.approx(rows["commit_step"].mean())
    assert overall.loc["argmax", "lead"] == pytest.approx(rows["lead_argmax"].mean())
    assert (schedule["lead"] <= schedule["oracle_lead"] + 1e-9).all() and (schedule["uninformed_lead"] == 0).all()
    assert f"at most {rows['commit_step'].mean():.1f} steps" in result.summary


def test_compare_reads_ahead_and_refuses_a_store_without_sep(stores):
    runs = {"diffusion": stores["diffusion"], "autoregressive": stores["autoregressive"],
            "diffusion, left-to-right": stores["left_to_right"]}
    result = compare_runs(runs, label="intermediate", bootstrap=20, progress=False)
    table = result.table
    assert {("diffusion", "own"), ("autoregressive", "frontier"), ("diffusion, left-to-right", "own"),
            ("diffusion, left-to-right", "frontier")} == set(map(tuple, table[["run", "read"]].drop_duplicates().to_numpy()))
    ahead = result.tables["by_distance"]
    one = ahead[(ahead["run"] == "autoregressive") & (ahead["distance"] == 1) & (ahead["site"] == SITES[1])
                & (ahead["target"] == "output")]
    # One position ahead of the last written token is the token the twin writes next: its last layer knows
    # it, and its own argmax is what it writes.
    assert one["accuracy"].item() > 0.9 and one["readout_accuracy"].item() == 1.0
    # Like for like: both runs with <sep> read at the same distances, on as many rows, with both labels.
    counts = ahead.pivot_table(index=["target", "site", "distance"], columns="run", values="n_rows")
    assert set(counts.columns) == {"autoregressive", "diffusion, left-to-right"} and (counts.nunique(axis=1) == 1).all()
    assert set(ahead["target"]) == {"output", "truth"}
    assert result.summary.index("Like for like") < result.summary.index("Not like for like")
    assert "lacks the `<sep>` position" in result.summary and "`diffusion`" in result.summary
    # Every run its own colour, the same in every panel.
    colours = {}
    for axis in result.figure.axes:
        for line in axis.get_lines():
            run = next((r for r in sorted(runs, key=len, reverse=True) if line.get_label().startswith(r)), None)
            if run is not None and line.get_linestyle() == "-":
                colours.setdefault(run, set()).add(line.get_color())
    assert set(colours) == set(runs) and all(len(c) == 1 for c in colours.values())
    assert len({next(iter(c)) for c in colours.values()}) == len(runs)
    with pytest.raises(ValueError, match="sep"):
        compare_runs({"autoregressive": ActivationDataset(stores["autoregressive"].path),
                      "bad": _ar_target_only(stores)}, progress=False)


def _ar_target_only(stores):
    path = stores["autoregressive"].path.parent / "ar-target.h5"
    if not path.exists():
        run_cache(CacheConfig(model="arith-autoregressive", n=16, sites=SITES[:1], positions="target"), path, progress=False)
    return ActivationDataset(path)


def test_commit_order_arith_and_sudoku(stores):
    arith = commit_order(stores["diffusion"], answer="answer", reasoning="intermediate")
    pairs = arith.tables["examples"]
    assert ((pairs["answer_step"] < pairs["first_reasoning_step"]) <= (pairs["answer_step"] < pairs["last_reasoning_step"])).all()
    sudoku = commit_order(stores["sudoku"], answer="blank")
    cells = sudoku.tables["candidates"]
    assert len(cells) == 24 * 20 and cells["candidates"].between(1, 6).all()
    assert "Spearman" in sudoku.summary
    with pytest.raises(ValueError, match="unknown label"):
        commit_order(stores["diffusion"], answer="nope")


def test_trajectory_view(stores):
    data = stores["sudoku"]
    result = trajectory_view(data, example=3)
    assert len(result.table) == data.n_steps * 36
    masked = result.table[result.table["masked"]]
    assert (masked["step"] <= masked["commit_step"]).all()  # canvas[s] is what step s saw
    with pytest.raises(ValueError, match="example must be"):
        trajectory_view(data, example=99)


def test_report_embeds_every_saved_analysis(stores, tmp_path):
    order = commit_order(stores["diffusion"], answer="answer", reasoning="intermediate")
    view = trajectory_view(stores["diffusion"], example=0)
    for result in (order, view):
        result.save(tmp_path)
    assert load_result(tmp_path / "order").summary == order.summary
    page = write_report(tmp_path).read_text()
    assert order.title in page and view.title in page
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 2 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert "http://" not in page and "https://" not in page  # self-contained
    with pytest.raises(FileNotFoundError, match="no saved analysis"):
        write_report(_empty(tmp_path))


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_analyze_and_report_commands(stores, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["analyze", "--out", str(out), "--quiet", "order", str(stores["diffusion"].path),
                 "--answer", "answer", "--reasoning", "intermediate"]) == 0
    saved = (out / "order" / "table.csv").read_bytes()
    # Existing output is kept unless --overwrite; bad input is one line and exit 2.
    assert main(["analyze", "--out", str(out), "order", str(stores["diffusion"].path)]) == 2
    assert (out / "order" / "table.csv").read_bytes() == saved
    assert main(["analyze", "--out", str(tmp_path / "x"), "lead", str(tmp_path / "missing.h5")]) == 2
    assert main(["report", str(out)]) == 0
    assert main(["report", str(out)]) == 2  # report.html exists now
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("dlmprobe ") for line in err)


def test_run_colours_are_distinct_and_keep_a_condition_colour():
    from dlmprobe.analyses.plotting import CONDITION_COLOURS, run_colours

    colours = run_colours(["diffusion", "Dream-7B", "Qwen2.5-7B", "diffusion, random order"])
    assert colours["diffusion"] == CONDITION_COLOURS["diffusion"] and len(set(colours.values())) == 4
    many = run_colours([f"run {i}" for i in range(12)])
    assert len(set(many.values())) == 12

