"""Damaged files, impossible parameters, unusable devices and killed runs: one line, never a mess.

Every file kind the kit reads, damaged or edited, gives one DlmprobeInputError line naming it; a
fuzz test throws malformed JSON and bytes at the loaders; training killed between the files of one
save, or at a random moment, resumes to bit-identical weights.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from safetensors.torch import load_file

from dlmprobe.analyses import AnalysisResult, load_result
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.files import atomic_file, atomic_write_text, load_json_object, read_json
from dlmprobe.models import build_native, load_model, load_native, save_checkpoint
from dlmprobe.models.device import resolve_device
from dlmprobe.tasks import get_task
from dlmprobe.training import TrainConfig, train
from dlmprobe.training.state import read_state, read_train_log

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line_error(call, match: str = "") -> str:
    """Run ``call``; it must raise DlmprobeInputError with a one-line message (containing ``match``)."""
    with pytest.raises(DlmprobeInputError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and message and match in message, message
    return message


@pytest.fixture
def checkpoint(tiny_config, tmp_path):
    return save_checkpoint(build_native(tiny_config), tiny_config, tmp_path / "ckpt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-save training run of the tiny model (built here: module-scoped fixtures cannot use tiny_config)."""
    from dlmprobe.models import ModelConfig

    model = ModelConfig(task="arith", task_params={"n_ops": 3}, n_layers=2, d_model=32, n_heads=2, d_mlp=64)
    config = TrainConfig(model, steps=4, batch_size=4, warmup=1, eval_every=2, eval_n=2)
    return config, train(config, tmp_path_factory.mktemp("run") / "run", progress=False)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --- every damaged or edited file kind: one line naming the file and field ---------------------

@pytest.mark.parametrize("edit,match", [
    (lambda d: d["model"].update(n_layers="2"), "field 'n_layers' should be an integer, found a string ('2')"),
    (lambda d: d["model"].update(task_params=[1]), "field 'task_params' should be an object"),
    (lambda d: d.pop("model"), "missing field 'model'"),
    (lambda d: d.update(model=[]), "field 'model' should be an object"),
    (lambda d: d["model"].update(task_params={"n_ops": 10**9}), "n_ops must be between"),
])
def test_edited_checkpoint_config_is_one_line(checkpoint, edit, match):
    _edit_json(checkpoint / "config.json", edit)
    message = one_line_error(lambda: load_model(checkpoint), match)
    assert "config.json" in message


@pytest.mark.parametrize("content,match", [("[1, 2]", "expected a JSON object, found a list"),
                                           ('{"model": ', "expected JSON"), ("", "expected JSON")])
def test_config_that_is_not_a_json_object_is_one_line(checkpoint, content, match):
    (checkpoint / "config.json").write_text(content)
    one_line_error(lambda: load_model(checkpoint), match)


def test_tampered_weights_with_intact_header_are_caught_unless_verify_is_off(checkpoint, tiny_config):
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # a tensor byte: the header and every shape stay valid
    weights.write_bytes(bytes(data))
    one_line_error(lambda: load_model(checkpoint), "do not match the sha256 recorded")
    loaded = load_model(checkpoint, verify=False)  # for weights edited on purpose
    assert loaded.config == tiny_config


def test_weights_of_another_shape_are_refused_before_building(checkpoint):
    _edit_json(checkpoint / "config.json", lambda d: (d["model"].update(d_model=2**20, d_mlp=2**22, n_heads=1),
                                                      d.pop("weights_sha256")))
    began = time.perf_counter()  # a config edited to a huge size must not allocate it first
    one_line_error(lambda: load_native(checkpoint), "expected the tensors of arith-diffusion")
    assert time.perf_counter() - began < 5


def test_shipped_checkpoints_record_their_weights_sha256():
    from dlmprobe.models import CHECKPOINT_DIR, shipped_checkpoints

    card = {c["name"]: c["weights_sha256"] for c in json.loads((CHECKPOINT_DIR / "model_card.json").read_text())}
    for name in shipped_checkpoints():
        assert json.loads((CHECKPOINT_DIR / name / "config.json").read_text())["weights_sha256"] == card[name]


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(step="2"), "field 'step' should be an integer"),
    (lambda d: d.pop("optimizer_sha256"), "missing field 'optimizer_sha256'"),
    (lambda d: d.update(weights="../../model.safetensors"), "should name a file like"),
    (lambda d: d["train_config"].update(lr="fast"), "field 'lr' should be a number"),
    (lambda d: d["scalars"].update({"x.step": 1.0}), "optimiser entries should be named"),
])
def test_edited_training_state_is_one_line(run, tmp_path, edit, match):
    import shutil

    config, out = run
    copy = shutil.copytree(out, tmp_path / "run")
    _edit_json(copy / "train_state" / "state.json", edit)
    message = one_line_error(lambda: train(config, copy, resume=True, progress=False), match)
    assert "state.json" in message


def test_truncated_optimizer_file_is_one_line(run, tmp_path):
    import shutil

    config, out = run
    copy = shutil.copytree(out, tmp_path / "run")
    state = json.loads((copy / "train_state" / "state.json").read_text())
    moments = copy / "train_state" / state["optimizer"]
    moments.write_bytes(moments.read_bytes()[:100])
    one_line_error(lambda: train(config, copy, resume=True, progress=False), "do not match the sha256")
    one_line_error(lambda: read_state(copy / "train_state", verify=False), "expected a safetensors file")


def test_damaged_training_log_is_one_line(run, tmp_path):
    _, out = run
    assert [r["step"] for r in read_train_log(out / "train_log.jsonl")] == [2, 4]
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 2, "loss": 1.0}\n')
    one_line_error(lambda: read_train_log(log), "line 1: missing field 'lr'")
    log.write_text('{"step": 2\n')
    one_line_error(lambda: read_train_log(log), "line 1 should be a JSON object")


def _result() -> AnalysisResult:
    return AnalysisResult("demo", "A demo", pd.DataFrame({"x": [1, 2]}), None, "two rows",
                          {"extra": pd.DataFrame({"y": [3]})}, {"n": 2})


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.pop("summary"), "missing field 'summary'"),
    (lambda d: d.update(title=3), "field 'title' should be a string"),
    (lambda d: d.update(tables=["../../secret"]), "plain table names"),
])
def test_edited_analysis_result_is_one_line(tmp_path, edit, match):
    folder = _result().save(tmp_path)
    _edit_json(folder / "result.json", edit)
    message = one_line_error(lambda: load_result(folder), match)
    assert "result.json" in message


def test_analysis_folder_is_saved_whole_or_not_at_all(tmp_path):
    first = _result().save(tmp_path / "results")
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    broken = Figure()
    broken.add_subplot().set_title(r"$\frac{$")  # bad mathtext: savefig fails half-way through the save
    failing = _result()
    failing.figure, failing.tables = broken, {}
    with pytest.raises(ValueError):
        failing.save(tmp_path / "results")
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # the earlier save, untouched
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["demo"]  # no temporary folder left
    with pytest.raises(ValueError):
        failing.save(tmp_path / "new" / "results")
    assert not (tmp_path / "new").exists()  # no empty output folder either


def test_atomic_file_keeps_the_old_content_when_a_write_fails(tmp_path):
    target = atomic_write_text(tmp_path / "a.json", '{"step": 1}')
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text('{"st')
        raise RuntimeError("disk full")
    assert load_json_object(target, {"step": int}) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# --- property: whatever the bytes, one line or success -----------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


def _mutated_json(valid: dict) -> st.SearchStrategy:
    """A valid file with one field replaced or removed, or JSON-looking garbage."""
    def mutate(draw_key, value, drop):
        data = json.loads(json.dumps(valid))
        target = data["model"] if "model" in data and draw_key.startswith("model.") else data
        key = draw_key.split(".", 1)[-1]
        if drop:
            target.pop(key, None)
        else:
            target[key] = value
        return json.dumps(data)

    keys = [f"model.{k}" for k in valid.get("model", {})] + list(valid)
    return st.one_of(st.builds(mutate, st.sampled_from(keys), json_values, st.booleans()),
                     json_values.map(json.dumps), st.text(max_size=40))


def _either_loads_or_one_line(call) -> None:
    try:
        call()
    except DlmprobeInputError as err:
        assert "\n" not in str(err)


@FUZZ
@given(data=st.data())
def test_fuzzed_checkpoint_config(checkpoint, data):
    if not (checkpoint / "valid.json").exists():  # the examples share one folder: keep the valid config aside
        (checkpoint / "valid.json").write_bytes((checkpoint / "config.json").read_bytes())
    text = data.draw(_mutated_json(json.loads((checkpoint / "valid.json").read_text())))
    (checkpoint / "config.json").write_text(text)
    _either_loads_or_one_line(lambda: load_native(checkpoint))


@FUZZ
@given(data=st.data())
def test_fuzzed_training_state_and_result(run, tmp_path, data):
    import shutil

    _, out = run
    folder = tmp_path / "state"
    if not folder.exists():
        shutil.copytree(out / "train_state", folder)
        _result().save(tmp_path)
    state = json.loads((out / "train_state" / "state.json").read_text())
    (folder / "state.json").write_text(data.draw(_mutated_json(state)))
    _either_loads_or_one_line(lambda: read_state(folder))
    (tmp_path / "demo" / "result.json").write_text(data.draw(_mutated_json({"name": "demo", "title": "t", "summary": "s",
                                                                            "tables": ["extra"], "meta": {}})))
    _either_loads_or_one_line(lambda: load_result(tmp_path / "demo"))
    (tmp_path / "log.jsonl").write_bytes(data.draw(st.binary(max_size=64)))
    _either_loads_or_one_line(lambda: read_train_log(tmp_path / "log.jsonl"))
    (tmp_path / "any.json").write_bytes(data.draw(st.binary(max_size=64)))
    _either_loads_or_one_line(lambda: read_json(tmp_path / "any.json"))


@FUZZ
@given(data=st.data())
def test_fuzzed_weights_file(checkpoint, data):
    weights = checkpoint / "model.safetensors"
    if not (checkpoint / "original").exists():
        (checkpoint / "original").write_bytes(weights.read_bytes())
    original = (checkpoint / "original").read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    cut = data.draw(st.integers(0, len(original)))
    spot = data.draw(st.integers(0, header_end + 64))
    damaged = data.draw(st.sampled_from([
        original[:cut],                                                         # truncated
        original[:spot] + bytes([original[spot] ^ 0x5A]) + original[spot + 1:],  # a header or early tensor byte
        data.draw(st.binary(max_size=200)),                                     # not safetensors at all
    ]))
    weights.write_bytes(damaged)
    verify = data.draw(st.booleans())
    _either_loads_or_one_line(lambda: load_native(checkpoint, verify=verify))


# --- impossible parameters and devices: fail fast ----------------------------------------------

@pytest.mark.parametrize("name,params,match", [
    ("sudoku", {"size": 6, "blanks": 35}, "blanks=35"),
    ("sudoku", {"size": 9, "blanks": 70}, "blanks=70"),
    ("sudoku", {"size": 6, "blanks": 3.5}, "blanks=3.5"),
    ("sudoku", {"size": 6.0}, "size=6.0"),
    ("arith", {"modulus": 10**9}, "modulus=1000000000"),
    ("arith", {"n_ops": 10**7}, "n_ops=10000000"),
    ("pathstar", {"arms": 50, "arm_length": 50, "n_nodes": 2600}, "too large"),
])
def test_impossible_task_parameters_fail_before_any_work(name, params, match):
    began = time.perf_counter()
    one_line_error(lambda: get_task(name, **params), match)
    assert time.perf_counter() - began < 1


def test_sudoku_generation_is_bounded(monkeypatch):
    from dlmprobe.tasks import sudoku

    monkeypatch.setattr(sudoku, "MAX_PASSES", 1)  # at the blank limit one pass in four succeeds
    task = get_task("sudoku", size=6, blanks=sudoku.MAX_BLANKS[6])
    one_line_error(lambda: task.sample(20, "train"), "blanks=27")


def test_devices_are_checked_up_front():
    assert resolve_device("cpu") == torch.device("cpu")
    one_line_error(lambda: resolve_device("nonsense"), "got 'nonsense'")
    if not torch.cuda.is_available():
        one_line_error(lambda: resolve_device("cuda"), "no usable CUDA device")
    else:
        one_line_error(lambda: resolve_device(f"cuda:{torch.cuda.device_count()}"), "CUDA device(s)")


# --- training killed in a subprocess, then resumed ---------------------------------------------

CHILD = """
import sys, time
import torch
torch.set_num_threads(1)
import dlmprobe.training.state as state
from dlmprobe.models import ModelConfig
from dlmprobe.training import TrainConfig, train

out, resume, pause_at = sys.argv[1], sys.argv[2] == "resume", int(sys.argv[3])
commit = state.commit

def pausing_commit(folder, record):  # the real seam: the unit's files are written, the marker is not
    if record["step"] == pause_at:
        print("PAUSED", flush=True)
        time.sleep(600)
    commit(folder, record)

state.commit = pausing_commit
model = ModelConfig(task="arith", task_params={"n_ops": 3}, n_layers=2, d_model=32, n_heads=2, d_mlp=64)
print("STARTED", flush=True)
train(TrainConfig(model, steps=12, batch_size=8, warmup=2, eval_every=2, eval_n=4), out, resume=resume, progress=False)
"""


def _child(out: Path, resume: bool, pause_at: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(out), "resume" if resume else "fresh", str(pause_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def _wait_for(proc: subprocess.Popen, word: str) -> None:
    for line in proc.stdout:
        if line.strip() == word:
            return
    raise AssertionError(f"the child exited ({proc.wait()}) before printing {word}")


def _straight(tiny_config, tmp_path) -> tuple[TrainConfig, dict[str, torch.Tensor], float]:
    config = TrainConfig(tiny_config, steps=12, batch_size=8, warmup=2, eval_every=2, eval_n=4)
    began = time.perf_counter()
    out = train(config, tmp_path / "straight", progress=False)
    return config, load_file(str(out / "model.safetensors")), time.perf_counter() - began


def _assert_resumes_to(config, out: Path, expected: dict[str, torch.Tensor]) -> None:
    train(config, out, resume=True, progress=False)
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert [r["step"] for r in read_train_log(out / "train_log.jsonl")] == list(range(2, 13, 2))


@pytest.mark.slow
def test_train_killed_between_the_files_of_one_save_resumes_bit_identical(tiny_config, tmp_path):
    config, expected, _ = _straight(tiny_config, tmp_path)
    out = tmp_path / "killed"
    child = _child(out, resume=False, pause_at=6)
    _wait_for(child, "PAUSED")
    child.send_signal(signal.SIGKILL)
    child.wait()
    state = json.loads((out / "train_state" / "state.json").read_text())
    assert state["step"] == 4 and (out / "train_state" / "step-00000006.model.safetensors").exists()
    _assert_resumes_to(config, out, expected)


@pytest.mark.slow
def test_train_killed_at_random_moments_resumes_bit_identical(tiny_config, tmp_path):
    config, expected, duration = _straight(tiny_config, tmp_path)
    out, rng = tmp_path / "killed", random.Random()
    delays, landed = [], 0
    for _ in range(3):  # kill, resume and kill again: each resume starts from what a kill left
        child = _child(out, resume=(out / "train_state").is_dir())
        _wait_for(child, "STARTED")
        delays.append(rng.uniform(0, duration))
        time.sleep(delays[-1])
        landed += child.poll() is None
        child.send_signal(signal.SIGKILL)
        child.wait()
    if not landed or not (out / "train_state").is_dir():
        pytest.skip(f"no kill landed during training (delays {delays})")
    _assert_resumes_to(config, out, expected)
