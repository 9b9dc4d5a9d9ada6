"""The command line: bad input of any kind is a one-line error with exit code 2."""

import subprocess
import sys

import pytest

from dlmprobe.cli import main
from dlmprobe.models import build_native, save_checkpoint


@pytest.fixture
def checkpoint(tiny_config, tmp_path):
    return str(save_checkpoint(build_native(tiny_config), tiny_config, tmp_path / "model"))


def _bad(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--task", "chess", "--kind", "diffusion"], "invalid choice: 'chess'"),
        (["train", "--task", "arith", "--kind", "diffusion", "--task-param", "size"], "KEY=VALUE"),
        (["train", "--task", "arith", "--kind", "diffusion", "--task-param", "n_ops=0"], "n_ops must be >= 1"),
        (["train", "--task", "arith", "--kind", "diffusion", "--train-steps", "0"], "steps must be a positive"),
        (["eval", "/no/such/model"], "no checkpoint at '/no/such/model'"),
        (["train", "--task", "arith", "--kind", "diffusion", "--init-from", "/no/such/model"],
         "no checkpoint at '/no/such/model'"),
        (["train", "--task", "pathstar", "--kind", "diffusion", "--init-from", "arith-autoregressive"],
         "cannot initialise from 'arith-autoregressive'"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments(capsys, argv, message):
    if argv[0] == "frobnicate":
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
    else:
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own checks
            code = exit_.code
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert message in err


def test_steps_that_do_not_divide(capsys, checkpoint):
    _bad(capsys, ["eval", checkpoint, "--n", "2", "--block-length", "2"], "block_length must divide")


def test_prompt_longer_than_the_context(capsys, checkpoint):
    _bad(capsys, ["eval", checkpoint, "--n", "2", "--task-param", "n_ops=9"], "the model's context is")


def test_existing_training_output_is_kept(capsys, tmp_path, checkpoint):
    before = (tmp_path / "model" / "model.safetensors").read_bytes()
    _bad(capsys, ["train", "--task", "arith", "--kind", "diffusion", "--out", checkpoint], "--resume")
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == before


def test_eval_and_sample_run(capsys, checkpoint):
    assert main(["eval", checkpoint, "--n", "4", "--json"]) == 0
    assert '"accuracy"' in capsys.readouterr().out
    assert main(["sample", checkpoint, "--n", "2", "--trajectory"]) == 0
    out = capsys.readouterr().out
    assert "example 1" in out and "commit step" in out


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "dlmprobe.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("demo", "train", "eval", "sample", "tasks"):
        assert command in result.stdout
