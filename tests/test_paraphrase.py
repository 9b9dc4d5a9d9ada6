"""Paraphrase with power: puzzles with free choices and a paraphrase of the commit pattern."""

import numpy as np
import pytest
import torch

from dlmprobe.analyses.paraphrase import _sample, paraphrase_run
from dlmprobe.analyses.relabel import Remask, free_positions
from dlmprobe.analyses.setting import builtin_setting
from dlmprobe.models import ModelConfig, load_model, random_model
from dlmprobe.tasks import get_task
from dlmprobe.tasks.sudoku import SudokuChoice


@pytest.fixture(scope="module")
def tiny_sudoku():
    return random_model(ModelConfig(task="sudoku", task_params={"size": 4}, n_layers=1, d_model=32, n_heads=2, d_mlp=64))


def test_remasking_moves_only_free_cells_back_to_masked(tiny_sudoku):
    """The commit-pattern paraphrase: where the remasked run first departs from the plain one, the only
    difference is committed free cells masked again; the sampler then decides them again."""
    task = SudokuChoice(size=4, blanks=tiny_sudoku.task.blanks)
    examples = task.sample(6, split="eval", seed=1)
    free = free_positions(setting := builtin_setting(tiny_sudoku, 6, 1, task), task, None, 1)
    assert (free["n_free"] > 0).all() and free["positions"].sum() == free["n_free"].sum()
    remask = Remask(free["positions"], 1, tuple(range(12)))
    plain = _sample(setting, None, 4, False, 0, None, None).trajectory.canvases.numpy()
    run = _sample(setting, None, 4, False, 0, None, None, remask)
    canvases, mask = run.trajectory.canvases.numpy(), task.vocab.mask_id
    assert (run.remasked > 0).all()
    for i in range(len(examples)):
        first = np.flatnonzero((canvases[i] != plain[i]).any(axis=1))[0]
        differs = canvases[i, first] != plain[i, first]
        assert differs.any() and (canvases[i, first][differs] == mask).all()
        assert free["positions"][i][differs].all()
    assert (canvases[:, -1] != mask).all()  # every remasked cell decided again


def test_free_choices_on_the_shipped_sudoku_denoiser():
    """Whether the denoiser trained on unique-solution puzzles is usable on puzzles with several solutions."""
    ckpt = load_model("sudoku-diffusion")
    task = SudokuChoice(size=6, blanks=ckpt.task.blanks)
    result = paraphrase_run(ckpt, n=16, seed=3, task=task, paraphrases=("tokens", "commits"), label="blank",
                            progress=False)
    solve = result.tables["solve"].set_index(["run", "metric"]).rate
    examples = result.tables["examples"]
    assert set(examples.run) == {"plain", "paraphrased", "remasked"}
    assert (examples.loc[examples.run == "remasked", "n_remasked"] > 0).sum() >= 4
    assert (examples.loc[examples.run != "remasked", "n_remasked"] == 0).all()
    assert (examples.n_free > 0).all() and result.meta["free_choices"]
    assert solve["plain", "same_as_plain"] == 1.0 and 0 <= solve["remasked", "solved"] <= 1
    assert "free cells" in result.summary and "commit order" in result.summary
    assert f"{solve['plain', 'solved']:.0%}" in result.summary and "trained on" in result.summary
    print(result.tables["solve"].to_string(), result.summary, sep="\n")


def test_unique_solutions_say_what_the_test_cannot_detect():
    ckpt = load_model("sudoku-diffusion")
    result = paraphrase_run(ckpt, n=4, label="blank", progress=False)
    assert not result.meta["free_choices"] and "forced by the prompt" in result.summary
    assert "not tested" in result.summary and set(result.tables["examples"].run) == {"plain", "paraphrased"}


def test_bad_paraphrase_arguments(tiny_sudoku):
    ar = random_model(ModelConfig(task="sudoku", task_params={"size": 4}, kind="autoregressive", n_layers=1,
                                  d_model=32, n_heads=2, d_mlp=64))
    cases = [
        ((tiny_sudoku,), {"paraphrases": ("digits",)}, "paraphrases must be some of"),
        ((tiny_sudoku,), {"task": get_task("sudoku", size=6)}, "vocabulary and canvas layout"),
        ((ar,), {"paraphrases": ("commits",)}, "needs a diffusion model"),
        ((tiny_sudoku,), {"paraphrases": ("commits",), "remask_until": 0}, "remask_until"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            paraphrase_run(*args, n=4, progress=False, **kwargs)
        assert "\n" not in str(caught.value)
    assert torch.is_grad_enabled()
