"""The bad-input table: every subcommand, given bad flags, bad values, impossible task parameters,
unusable devices or damaged files of each kind the kit reads, ends in exactly one line on stderr and
exit code 2, and leaves every file already there byte-identical and nothing new behind.

The calls run in-process through ``dlmprobe.cli.main`` (the console script is that function, see
test_cli.py); every pre-existing output lives in one module-scoped folder whose bytes are compared
before and after each call.
"""

import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch

from dlmprobe.cli import analyze, main

# A two-layer, 32-wide arithmetic model: trains, samples and caches in about a second.
TINY = ["--task", "arith", "--task-param", "n_ops=3", "--kind", "diffusion", "--n-layers", "2", "--d-model", "32",
        "--n-heads", "2", "--d-mlp", "64", "--batch-size", "4", "--warmup", "1", "--eval-every", "2", "--eval-n", "2",
        "--train-steps", "2"]
NO_CUDA = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"  # a device not here


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _copy(root: Path, source: str, name: str) -> Path:
    src = root / source
    return Path(shutil.copytree(src, root / name) if src.is_dir() else shutil.copy(src, root / name))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Outputs of every kind, sound and damaged: a checkpoint, a training run, stores, probe tables,
    saved analyses and a report, a plain file and a folder."""
    root = tmp_path_factory.mktemp("bad_input")
    assert main(["train", *TINY, "--out", str(root / "model")]) == 0
    assert main(["cache", "--model", str(root / "model"), "--n", "40", "--out", str(root / "run.h5"), "--quiet"]) == 0
    assert main(["probe", str(root / "run.h5"), "--out", str(root / "probes"), "--folds", "2", "--no-control",
                 "--no-random-baseline", "--quiet"]) == 0
    assert main(["analyze", "--out", str(root / "analyses"), "trajectory", str(root / "run.h5")]) == 0
    assert main(["report", str(root / "analyses")]) == 0
    assert main(["cache", "--model", str(root / "model"), "--n", "4", "--out", str(root / "small.h5"), "--quiet"]) == 0
    (root / "notes.txt").write_text("not a store\n")
    (root / "folder").mkdir()
    (root / "folder" / "keep.txt").write_text("kept\n")

    _edit_json(_copy(root, "model", "typed-config") / "config.json", lambda d: d["model"].update(n_layers="2"))
    (_copy(root, "model", "garbage-config") / "config.json").write_text('{"model": ')
    weights = _copy(root, "model", "tampered") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 0xFF]))  # a tensor byte
    weights = _copy(root, "model", "truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (_copy(root, "model", "no-weights") / "model.safetensors").unlink()
    _edit_json(_copy(root, "model", "typed-state") / "train_state" / "state.json", lambda d: d.update(step="2"))

    (_copy(root, "run.h5", "truncated.h5")).write_bytes((root / "run.h5").read_bytes()[:4096])
    with h5py.File(_copy(root, "run.h5", "no-trajectory.h5"), "r+") as file:
        del file["trajectory"]
    with h5py.File(_copy(root, "run.h5", "garbage-config.h5"), "r+") as file:
        file.attrs["config"] = '{"task": '
    with h5py.File(_copy(root, "run.h5", "list-config.h5"), "r+") as file:
        file.attrs["config"] = "[1, 2]"
    _edit_json(_copy(root, "analyses", "damaged-analyses") / "trajectory" / "result.json", lambda d: d.pop("summary"))
    (root / "damaged-analyses" / "report.html").unlink()
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


MODEL_FLAGS = ["--n", "2", "--quiet"]
BAD = [  # (argv with {w} for the work folder, a part of the one-line message)
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["eval", "{w}/model", "--n", "2", "--block-length", "2"], "block_length must divide"),
    # train
    (["train", "--task", "chess", "--kind", "diffusion"], "invalid choice: 'chess'"),
    (["train", "--task", "arith", "--kind", "diffusion", "--task-param", "size"], "expected KEY=VALUE, got 'size'"),
    (["train", "--task", "arith", "--kind", "diffusion", "--train-steps", "0"], "--train-steps: expected an integer >= 1"),
    (["train", "--task", "arith", "--kind", "diffusion", "--lr", "fast"], "--lr: invalid float value: 'fast'"),
    (["train", "--task", "arith", "--kind", "diffusion", "--d-model", "30", "--n-heads", "4"], "must be divisible"),
    (["train", "--task", "sudoku", "--kind", "diffusion", "--task-param", "size=6", "--task-param", "blanks=35"],
     "blanks=35"),
    (["train", "--task", "arith", "--kind", "diffusion", "--task-param", "n_ops=0"], "n_ops must be >= 1"),
    (["train", *TINY, "--out", "{w}/model"], "already exists; pass --resume"),
    (["train", "--task", "arith", "--kind", "diffusion", "--resume", "--overwrite"], "not allowed with argument"),
    (["train", "--task", "arith", "--kind", "diffusion", "--init-from", "/no/such/model"], "no checkpoint at '/no/such"),
    (["train", "--task", "pathstar", "--kind", "diffusion", "--train-steps", "1", "--init-from", "arith-autoregressive",
      "--out", "{w}/fresh"], "cannot initialise from 'arith-autoregressive'"),
    (["train", *TINY, "--resume", "--out", "{w}/typed-state"], "state.json: field 'step' should be an integer"),
    (["train", *TINY, "--out", "{w}/fresh", "--init-from", "{w}/tampered"], "do not match the sha256 recorded"),
    # eval and sample, on sound and damaged checkpoints
    (["eval", "/no/such/model"], "no checkpoint at '/no/such/model'"),
    (["eval", "{w}/model", "--n", "0"], "--n: expected an integer >= 1, got '0'"),
    (["eval", "{w}/model", "--order", "sideways"], "invalid choice: 'sideways'"),
    (["eval", "{w}/model", "--n", "2", "--task-param", "n_ops=9"], "the model's context is"),
    (["eval", "{w}/model", "--device", "nonsense"], "device: expected cpu, cuda, cuda:0 or mps, got 'nonsense'"),
    (["eval", "{w}/model", "--device", NO_CUDA], f"device: '{NO_CUDA}' was requested"),
    (["eval", "{w}/typed-config"], "config.json field 'model': field 'n_layers' should be an integer"),
    (["eval", "{w}/garbage-config"], "config.json: expected JSON"),
    (["eval", "{w}/tampered", *MODEL_FLAGS], "do not match the sha256 recorded"),
    (["eval", "{w}/truncated", "--no-verify", *MODEL_FLAGS], "expected a safetensors file"),
    (["eval", "{w}/no-weights"], "has no model.safetensors"),
    (["sample", "arith-autoregressive", "--block-length", "2"], "--block-length is for diffusion models"),
    (["sample", "{w}/model", "--temperature", "hot"], "--temperature: invalid float value: 'hot'"),
    (["sample", "{w}/tampered"], "do not match the sha256 recorded"),
    (["sample", "{w}/model", "--device", "cuda:x"], "got 'cuda:x'"),
    # tasks
    (["tasks", "--seed", "one"], "--seed: invalid int value: 'one'"),
    (["tasks", "arith"], "unrecognized arguments: arith"),
    # cache
    (["cache", "--model", "{w}/model", "--out", "{w}/run.h5"], "run.h5 already exists; pass --resume"),
    (["cache", "--model", "{w}/model", "--out", "{w}/x.h5", "--record-steps", "every:0"], "expected 'all', 'every:K'"),
    (["cache", "--model", "{w}/model", "--out", "{w}/x.h5", "--shard", "2/2"], "shard must be i/n with 0 <= i < n"),
    (["cache", "--model", "{w}/model", "--out", "{w}/x.h5", "--n", "2", "--task", "sudoku"], "does not match the model"),
    (["cache", "--model", "{w}/model", "--out", "{w}/x.h5", "--sites", "blocks.7.*"], "blocks.7.*"),
    (["cache", "--model", "{w}/model", "--out", "{w}/x.h5", "--device", NO_CUDA], f"device: '{NO_CUDA}' was requested"),
    (["cache", "--model", "{w}/tampered", "--out", "{w}/x.h5"], "do not match the sha256 recorded"),
    (["cache", "--model", "{w}/model", "--out", "{w}/notes.txt/x.h5"], "notes.txt is a file, not a folder"),
    # merge and info
    (["merge", "{w}/run.h5", "--out", "{w}/truncated.h5"], "truncated.h5 already exists; pass --overwrite"),
    (["merge", "{w}/missing.h5", "--out", "{w}/merged.h5"], "got '{w}/missing.h5' (no such file)"),
    (["merge", "{w}/notes.txt", "--out", "{w}/merged.h5"], "not a readable HDF5 file"),
    (["info", "{w}/folder"], "got '{w}/folder' (a folder)"),
    (["info", "{w}/run.h5", "--device", "cpu"], "unrecognized arguments: --device cpu"),
    (["info", "{w}/notes.txt"], "not a readable HDF5 file"),
    (["info", "{w}/truncated.h5"], "not a readable HDF5 file"),
    (["info", "{w}/no-trajectory.h5"], "trajectory"),
    (["info", "{w}/garbage-config.h5"], "config"),
    # probe
    (["probe", "{w}/run.h5", "--out", "{w}/probes"], "already exists; pass --overwrite"),
    (["probe", "{w}/run.h5", "--out", "{w}/p", "--steps", "99"], "--steps expects stored steps"),
    (["probe", "{w}/run.h5", "--out", "{w}/p", "--read", "sideways"], "expected one of own, pooled, frontier"),
    (["probe", "{w}/run.h5", "--out", "{w}/p", "--label", "nope"], "unknown label 'nope'"),
    (["probe", "{w}/run.h5", "--out", "{w}/p", "--folds", "-1"], "--folds: expected an integer >= 1, got '-1'"),
    (["probe", "{w}/run.h5", "--out", "{w}/notes.txt/probes"], "notes.txt is a file, not a folder"),
    (["probe", "{w}/run.h5", "--out", "{w}/p", "--device", "nonsense"], "got 'nonsense'"),
    (["probe", "{w}/notes.txt", "--out", "{w}/p"], "not a readable HDF5 file"),
    (["probe", "{w}/small.h5", "--out", "{w}/p"], "4 examples are too few for 5-fold probing"),
    (["probe", "{w}/list-config.h5", "--out", "{w}/p"], "config"),
    # analyze, each analysis
    (["analyze", "--out", "{w}/analyses", "trajectory", "{w}/run.h5"], "trajectory already exists; pass --overwrite"),
    (["analyze", "--out", "{w}/a", "trajectory", "{w}/run.h5", "--example", "99"], "example must be in [0, 40)"),
    (["analyze", "--out", "{w}/a", "trajectory", "{w}/folder"], "got '{w}/folder' (a folder)"),
    (["analyze", "--out", "{w}/a", "decodability", "{w}/run.h5", "--steps", "every:x"], "got 'every:x'"),
    (["analyze", "--out", "{w}/a", "decodability", "{w}/run.h5", "--target", "truth?"], "invalid choice: 'truth?'"),
    (["analyze", "--out", "{w}/a", "lead", "{w}/run.h5", "--site", "blocks.9.x"], "unknown site 'blocks.9.x'"),
    (["analyze", "--out", "{w}/a", "compare", "a={w}/run.h5", "a={w}/run.h5"], "got 'a' twice"),
    (["analyze", "--out", "{w}/a", "compare", "{w}/run.h5"], "expected NAME=FILE.h5"),
    (["analyze", "--out", "{w}/a", "order", "{w}/run.h5", "--answer", "nope"], "nope"),
    (["analyze", "--out", "{w}/a", "faithfulness", "--model", "/no/such/model"], "no checkpoint at"),
    (["analyze", "--out", "{w}/a", "faithfulness", "--model", "{w}/model", "--device", NO_CUDA], "was requested"),
    (["analyze", "--out", "{w}/a", "paraphrase", "--model", "{w}/tampered", "--n", "2"], "do not match the sha256"),
    (["analyze", "--out", "{w}/a", "paraphrase", "--model", "{w}/model", "--n", "zero"], "--n: expected an integer"),
    (["analyze", "--out", "{w}/a", "causal", "{w}/run.h5", "--model", "{w}/model"], "required: --site"),
    (["analyze", "--out", "{w}/a", "causal", "{w}/run.h5", "--model", "{w}/model", "--site", "blocks.1.x",
      "--device", "nonsense"], "got 'nonsense'"),
    # report and demo
    (["report", "{w}/analyses"], "report.html already exists; pass --overwrite"),
    (["report", "{w}/nope"], "expected a folder of saved analyses"),
    (["report", "{w}/folder"], "holds no saved analysis"),
    (["report", "{w}/analyses", "--out", "{w}/folder", "--overwrite"], "Is a directory: {w}/folder"),
    (["report", "{w}/damaged-analyses"], "result.json: missing field 'summary'"),
    (["demo", "--n", "0"], "--n: expected an integer >= 1, got '0'"),
    (["demo", "--n", "5", "--out", "{w}/demo"], "needs n >= 10 puzzles, got 5"),
    (["demo", "--record-every", "0", "--out", "{w}/demo"], "record_every must be >= 1, got 0"),
    (["demo", "--out", "{w}/notes.txt"], "File exists: {w}/notes.txt"),
]


def _id(argv) -> str:
    return " ".join(a.replace("{w}/", "") for a in argv[:4])


@pytest.mark.parametrize("argv,message", BAD, ids=[_id(p.values[0] if hasattr(p, "values") else p[0]) for p in BAD])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(capsys, monkeypatch, tmp_path, work, argv, message):
    monkeypatch.chdir(tmp_path)  # default outputs (runs/...) would land here
    before = _snapshot(work)
    assert main([arg.replace("{w}", str(work)) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert message.replace("{w}", str(work)) in err and "Traceback" not in err, err
    assert _snapshot(work) == before  # every byte kept, nothing new (no output, no temporary)
    assert not any(tmp_path.iterdir())


def test_table_covers_every_subcommand_and_analysis():
    argvs = [p.values[0] if hasattr(p, "values") else p[0] for p in BAD]
    assert len(argvs) >= 40
    commands = {argv[0] for argv in argvs}
    assert {"train", "eval", "sample", "tasks", "cache", "merge", "info", "probe", "analyze", "report", "demo"} <= commands
    analyses = {argv[3] for argv in argvs if argv[0] == "analyze" and argv[1] == "--out"}
    assert analyses == {"decodability", "lead", "compare", "order", "faithfulness", "paraphrase", "causal", "trajectory"}


def test_debug_shows_the_traceback(capsys, work):
    assert main(["--debug", "info", str(work / "folder")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "DlmprobeInputError: expected an HDF5 activation dataset" in err


@pytest.mark.parametrize("filename,is_input", [("{w}/run.h5", True), ("{w}/analyses/x/table.csv", True),
                                               ("/usr/lib/somewhere/internal.json", False)])
def test_os_errors_are_input_only_on_paths_the_user_named(capsys, monkeypatch, work, filename, is_input):
    filename = filename.replace("{w}", str(work))

    def unreadable(args):
        raise PermissionError(13, "Permission denied", filename)

    monkeypatch.setattr(analyze, "cmd_analyze", unreadable)
    argv = ["analyze", "--out", str(work / "analyses"), "order", str(work / "run.h5")]
    if is_input:
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == f"dlmprobe analyze: error: Permission denied: {filename}"
    else:
        with pytest.raises(PermissionError):
            main(argv)


def test_no_verify_loads_weights_edited_on_purpose(capsys, work):
    assert main(["eval", str(work / "tampered"), "--n", "2", "--json", "--quiet", "--no-verify"]) == 0
    assert '"accuracy"' in capsys.readouterr().out
