"""The command line: its parsers, a bug keeps its traceback, the commands run; and probe and analyze
killed at random moments or between two files of one save end, rerun, as an uninterrupted run.

The table of bad input (one line, exit 2, nothing touched) is test_bad_input.py.
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dlmprobe.analyses
from dlmprobe.analyses import AnalysisResult
from dlmprobe.choices import TASK_NAMES
from dlmprobe.cli import build_parser, main, store
from dlmprobe.cli.common import select_steps
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models import ModelConfig, build_native, save_checkpoint
from dlmprobe.store import ActivationWriter, StoreLayout
from dlmprobe.tasks import TASKS

HEAVY = ("torch", "transformer_lens", "transformers", "h5py", "pandas", "matplotlib", "sklearn", "nnsight")


def _write_bare_store(path: Path) -> None:
    """A schema-valid store whose run config has none of the keys ``dlmprobe cache`` writes."""
    n, steps, length, positions, d = 2, 3, 7, [3, 4], 4
    rng = np.random.default_rng(0)

    def ints(*shape):
        return np.ones(shape, np.int32)

    layout = StoreLayout(n_examples=n, n_steps=steps, canvas_length=length, prompt_length=1, target_length=3,
                         labels={"answer": 1}, sites={"blocks.0.hook_resid_post": d}, steps=[0, 2],
                         positions=positions)
    with ActivationWriter(path, layout, config={"note": "written by hand"}, mask_id=1) as writer:
        writer.write_batch({
            "uid": ["a", "b"], "prompt": ints(n, 1), "target": ints(n, 3), "output": ints(n, 3),
            "solved": np.ones(n, bool), "canvas": ints(n, steps + 1, length), "commit_step": ints(n, length),
            "prediction": ints(n, steps, length), "confidence": np.ones((n, steps, length), np.float32),
            "labels": {"answer": (ints(n, 1), ints(n, 1))},
            "activations": {"blocks.0.hook_resid_post": rng.standard_normal((n, 2, len(positions), d), np.float32)},
        })


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A checkpoint, a store it wrote and a store with a bare run config."""
    root = tmp_path_factory.mktemp("cli")
    config = ModelConfig(task="arith", task_params={"n_ops": 3}, n_layers=2, d_model=32, n_heads=2, d_mlp=64)
    save_checkpoint(build_native(config), config, root / "model")
    assert main(["cache", "--model", str(root / "model"), "--n", "40", "--out", str(root / "run.h5"), "--quiet"]) == 0
    _write_bare_store(root / "bare.h5")
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_bug_is_not_bad_input(capsys, monkeypatch, work):
    def broken(args):
        return 1 / 0

    monkeypatch.setattr(store, "cmd_info", broken)
    with pytest.raises(ZeroDivisionError):
        main(["info", str(work / "run.h5")])


def test_the_console_script_exits_2_with_one_line(work):
    result = subprocess.run([sys.executable, "-m", "dlmprobe.cli", "info", str(work / "missing.h5")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [(f"dlmprobe info: error: expected an HDF5 activation dataset written by "
                                           f"dlmprobe cache, got '{work / 'missing.h5'}' (no such file)")]


def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield [*prefix, name]
                yield from _subcommands(sub, (*prefix, name))


def test_every_command_has_help(capsys):
    commands = list(_subcommands(build_parser()))
    assert len(commands) == 11 + 8  # 11 commands, 8 analyses
    for command in commands:
        assert main([*command, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"usage: dlmprobe {' '.join(command)}")


def test_importing_the_cli_loads_no_heavy_library():
    code = ("import sys; from dlmprobe.cli import build_parser; build_parser(); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_choices_match_the_task_registry():
    assert sorted(TASKS) == list(TASK_NAMES)


def test_info_describes_a_cache_run_and_a_bare_store(capsys, work):
    assert main(["info", str(work / "run.h5")]) == 0
    out = capsys.readouterr().out
    assert "40 complete examples" in out and "model" in out and "task arith" in out and "(target)" in out
    assert main(["info", str(work / "bare.h5")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{work / 'bare.h5'}: 2 complete examples, solved 100.0%"
    assert out[1] == "no run description"
    assert out[-1] == "  blocks.0.hook_resid_post: 2 examples x 2 steps x 2 positions x 4"


def test_select_steps():
    assert select_steps("all", [0, 3, 6, 9]) is None
    assert select_steps(2, [0, 3, 6, 9]) == [0, 6]
    assert select_steps([3, 9], [0, 3, 6, 9]) == [3, 9]
    with pytest.raises(DlmprobeInputError, match=r"stored steps \[0, 3, 6, 9\], got 4"):
        select_steps([4], [0, 3, 6, 9])


def test_decodability_is_given_every_kth_stored_step(capsys, monkeypatch, tmp_path, work):
    given = {}

    def decodability(data, steps, **options):
        given["steps"], given["stored"] = steps, data.steps.tolist()
        return AnalysisResult(name="decodability", title="t", table=pd.DataFrame({"a": [1]}), figure=None, summary="s")

    monkeypatch.setattr(dlmprobe.analyses, "decodability", decodability)
    assert main(["analyze", "--out", str(tmp_path), "decodability", str(work / "run.h5"), "--steps", "every:2"]) == 0
    assert given["steps"] == given["stored"][::2] and len(given["stored"]) > 2


def test_eval_and_sample_run(capsys, work):
    assert main(["eval", str(work / "model"), "--n", "4", "--json", "--quiet"]) == 0
    assert '"accuracy"' in capsys.readouterr().out
    assert main(["sample", str(work / "model"), "--n", "2", "--trajectory"]) == 0
    out = capsys.readouterr().out
    assert "example 1" in out and "commit step" in out


# --- probe and analyze killed with SIGKILL, then rerun ------------------------------------------

# The child runs the real command line; with a seam named it stops there (prints PAUSED and waits
# for the kill) the first time the command reaches it.
KILL_CHILD = """
import os, sys, time
from pathlib import Path

seam, argv = sys.argv[1], sys.argv[2:]

def pause():
    print("PAUSED", flush=True)
    time.sleep(600)

if seam == "table-rename":  # probe: the settings and clock files renamed in, the table (commit marker) not
    replace = os.replace
    os.replace = lambda src, dst: (pause() if Path(dst).name.startswith("grid-") else None, replace(src, dst))[1]
elif seam == "figure":  # analyze: table.csv written in the folder being built, figure.png and result.json not
    from matplotlib.figure import Figure
    Figure.savefig = lambda *args, **kwargs: pause()
elif seam == "old-removal":  # analyze --overwrite: the new folder swapped in, the old one not yet deleted
    import shutil
    rmtree = shutil.rmtree
    shutil.rmtree = lambda path, *a, **k: (pause() if str(path).endswith(".tmp") else None, rmtree(path, *a, **k))[1]
print("STARTED", flush=True)
from dlmprobe.cli import main
sys.exit(main(argv))
"""


def _child(argv: list[str], seam: str = "none") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", KILL_CHILD, seam, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _kill_at(proc: subprocess.Popen, word: str) -> None:
    for line in proc.stdout:
        if line.strip() == word:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
    raise AssertionError(f"the child exited ({proc.wait()}) before printing {word}")


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, hidden temporaries included, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


PROBE = ["probe", "{w}/run.h5", "--folds", "2", "--no-control", "--no-random-baseline", "--quiet", "--out"]
ANALYZE = ["analyze", "--overwrite", "--out", "{out}", "trajectory", "{w}/run.h5"]


def _argv(template: list[str], work: Path, out: Path | None = None) -> list[str]:
    return [a.replace("{w}", str(work)).replace("{out}", str(out)) for a in template]


@pytest.fixture(scope="module")
def uninterrupted(work, tmp_path_factory):
    """What probe and analyze write when nothing stops them."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert main([*_argv(PROBE, work), str(root / "probes")]) == 0
    assert main(_argv(ANALYZE, work, root / "analyses")) == 0
    return {"probe": _tree(root / "probes"), "analyze": _tree(root / "analyses")}


def test_probe_killed_between_its_files_reruns_plainly_to_the_same_tables(work, uninterrupted, tmp_path):
    out = tmp_path / "probes"
    _kill_at(_child([*_argv(PROBE, work), str(out)], "table-rename"), "PAUSED")
    left = _tree(out)
    assert not any(name.startswith("grid-") and name.endswith(".csv") for name in left), left.keys()
    assert any(name.startswith(".grid-") for name in left)  # the table's temporary, written, not renamed
    assert main([*_argv(PROBE, work), str(out)]) == 0  # no table yet: not an existing result
    assert _tree(out) == uninterrupted["probe"]


def test_analyze_killed_inside_its_folder_save_reruns_to_the_same_folder(work, uninterrupted, tmp_path):
    out = tmp_path / "analyses"
    _kill_at(_child(_argv(ANALYZE, work, out), "figure"), "PAUSED")
    left = _tree(out)
    assert left and all(name.startswith(".trajectory.") for name in left), left.keys()  # only the temporary
    assert main(_argv(ANALYZE, work, out)) == 0
    assert _tree(out) == uninterrupted["analyze"]


def test_analyze_killed_after_swapping_in_its_folder_reruns_to_the_same_folder(work, uninterrupted, tmp_path):
    out = tmp_path / "analyses"
    assert main([*_argv(ANALYZE, work, out), "--example", "1"]) == 0  # an earlier save, different content
    _kill_at(_child(_argv(ANALYZE, work, out), "old-removal"), "PAUSED")
    assert {n for n in _tree(out) if not n.startswith(".")} == set(uninterrupted["analyze"])  # the new one, whole
    assert main(_argv(ANALYZE, work, out)) == 0
    assert _tree(out) == uninterrupted["analyze"]  # and the old one's leftover is gone


@pytest.mark.parametrize("existing", [False, True])
def test_probe_that_cannot_write_its_table_leaves_nothing(capsys, monkeypatch, work, uninterrupted, tmp_path, existing):
    out = tmp_path / "probes"
    if existing:  # an earlier result, which --overwrite must keep until the new one is whole
        assert main([*_argv(PROBE, work), str(out)]) == 0
    before = _tree(tmp_path)
    to_csv = pd.DataFrame.to_csv

    def disk_full(self, path, *args, **kwargs):
        if Path(path).name.startswith(".grid-"):
            raise OSError(28, "No space left on device", str(path))
        return to_csv(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)
    assert main([*_argv(PROBE, work), str(out), "--overwrite"]) == 2
    assert capsys.readouterr().err.startswith("dlmprobe probe: error: No space left on device: ")
    assert _tree(tmp_path) == before and out.exists() == existing  # no file replaced, no temporary, no folder


@pytest.mark.slow
@pytest.mark.parametrize("command", ["probe", "analyze"])
def test_killed_at_random_moments_reruns_to_the_same_outputs(work, uninterrupted, tmp_path, command):
    def cli(out: Path) -> list[str]:
        return [sys.executable, "-m", "dlmprobe.cli",
                *([*_argv(PROBE, work), str(out), "--overwrite"] if command == "probe" else _argv(ANALYZE, work, out))]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    began = time.perf_counter()
    subprocess.run(cli(tmp_path / "timing"), env=env, capture_output=True, check=True)
    duration, rng, delays = time.perf_counter() - began, random.Random(), []
    out = tmp_path / command
    for _ in range(3):  # each run starts from what the previous kill left
        child = subprocess.Popen(cli(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delays.append(round(rng.uniform(0, duration), 2))
        time.sleep(delays[-1])
        child.send_signal(signal.SIGKILL)
        child.wait()
    subprocess.run(cli(out), env=env, capture_output=True, check=True)
    assert _tree(out) == uninterrupted[command], f"killed after {delays} s"
