"""DiffusionGemma from the command line (cache, info, probe, analyze) and faithfulness on it."""

import numpy as np
import pandas as pd
import pytest
import torch
from gemma_fixtures import build_diffusiongemma, fixture_task, save_diffusiongemma

from dlmprobe.analyses import faithfulness
from dlmprobe.analyses.faithfulness import NATIVE_REMASK_NOTE
from dlmprobe.analyses.setting import native_setting
from dlmprobe.cli import main
from dlmprobe.store import ActivationDataset

STEPS = 6
TASK = ["--task", "arith", "--task-param", "n_ops=3"]
FAITHFULNESS_COLUMNS = ["kind", "mode", "step", "run_fraction", "metric", "denominator", "k", "n", "rate", "ci_low",
                        "ci_high", "note"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_diffusiongemma(tmp_path_factory.mktemp("gemma-model")))


@pytest.fixture(scope="module")
def store(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma-cli") / "gemma.h5"
    assert main(["cache", "--model", folder, *TASK, "--n", "64", "--steps", str(STEPS), "--batch-size", "32",
                 "--dtype", "float32", "--quiet", "--out", str(out)]) == 0
    return out


def _copy_model(task):
    """A planted DiffusionGemma that predicts, at every canvas position, the token it reads there.

    Orthonormal embeddings (tied to the unembedding) and every layer's writes to the residual stream
    set to zero: no information moves between positions, so an edit of one position reaches the
    output at that position and nowhere else.
    """
    model = build_diffusiongemma(task)
    language = model.model.encoder.language_model
    with torch.no_grad():
        basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
        language.embed_tokens.weight.copy_(basis[: len(task.vocab)] * 4.0)
        for layer in language.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            layer.experts.down_proj.zero_()
        model.model.decoder.self_conditioning.down_proj.weight.zero_()
    return model


def test_cache_info_probe_and_analyses_from_the_cli(store, tmp_path, capsys):
    with ActivationDataset(store) as data:
        assert data.n_examples == 64 and list(data.steps) == list(range(STEPS))
        assert data.config["commit_rule"] == "settle" and data.config["cache"]["task"] == "arith"
        target = list(range(data.target_start, data.target_start + data.output.shape[1]))
        assert list(data.positions) == target
    capsys.readouterr()
    assert main(["info", str(store)]) == 0
    assert "commit rule settle" in capsys.readouterr().out
    assert main(["probe", str(store), "--folds", "2", "--no-control", "--no-random-baseline", "--quiet",
                 "--out", str(tmp_path / "probes")]) == 0
    tables = sorted((tmp_path / "probes").glob("*.csv"))
    assert tables and len(pd.read_csv(tables[0])) > 0
    for analysis in ("decodability", "lead", "order", "trajectory"):
        assert main(["analyze", "--out", str(tmp_path / "analyses"), "--quiet", analysis, str(store)]) == 0, analysis
        assert (tmp_path / "analyses" / analysis / "table.csv").is_file()


def test_cache_step_position_and_shard_selection(folder, store, tmp_path):
    out = tmp_path / "part.h5"
    assert main(["cache", "--model", folder, *TASK, "--n", "64", "--steps", str(STEPS), "--batch-size", "32",
                 "--dtype", "float32", "--record-steps", "every:2", "--positions", "answer", "--shard", "1/2",
                 "--quiet", "--out", str(out)]) == 0
    with ActivationDataset(out) as part, ActivationDataset(store) as whole:
        assert part.n_examples == 32 and list(part.steps) == [0, 2, 4]
        answer = whole.target_start + 2  # arith n_ops=3: the answer is the last target token
        assert list(part.positions) == [answer]
        # The second shard is the whole run's examples 32..63, sampled with the same seeds.
        assert np.array_equal(part.canvas[:], whole.canvas[32:])
        for step in (0, 4):
            np.testing.assert_array_equal(part.activations("blocks.1.hook_resid_post", step)[:, 0],
                                          whole.activations("blocks.1.hook_resid_post", step)[32:, 2])


@pytest.mark.parametrize("flags, expected", [
    (["--temperature", "0.5"], "--temperature does not apply"),
    (["--block-length", "2"], "--block-length does not apply"),
    (["--template", "forced-answer"], "--template does not apply"),
    (["--task-file", "x.jsonl"], "--task-file does not apply"),
    (["--positions", "all"], "expected --positions in"),
    (["--sites", "blocks.0.attn.hook_z"], "decoder site"),
    (["--task-param", "n_ops=4"], "one canvas per example"),
])
def test_bad_cache_flags_exit_2_with_one_line_and_keep_the_output(folder, tmp_path, capsys, flags, expected):
    out = tmp_path / "kept.h5"
    out.write_bytes(b"earlier result")
    argv = ["cache", "--model", folder, *TASK, "--n", "4", "--steps", "2", "--overwrite", "--quiet",
            "--out", str(out), *flags]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert out.read_bytes() == b"earlier result"


def test_cache_needs_a_task(folder, tmp_path, capsys):
    assert main(["cache", "--model", folder, "--n", "4", "--steps", "2", "--out", str(tmp_path / "x.h5")]) == 2
    assert "expected --task" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


def test_faithfulness_detects_a_planted_edit_and_not_a_no_op():
    task = fixture_task()
    copy = _copy_model(task)
    # Reasoning edits reach the output, the answer (which reads no other position) never changes.
    result = faithfulness(copy, n=16, task=task, denoising_steps=4, progress=False)
    table = result.table
    assert list(table.columns) == FAITHFULNESS_COLUMNS
    ran = table[table["note"] == ""].set_index(["step", "metric"])["rate"]
    for step in range(3):
        assert ran[step, "corrupted"] == 1.0 and ran[step, "reasoning_changed"] == 1.0
        assert ran[step, "answer_changed"] == 0.0
    assert (table[table["mode"] == "remask"]["note"] == NATIVE_REMASK_NOTE).all()
    assert result.meta["commit_rule"] == "settle"
    # Through the same callback, an edit of the answer position itself must change the answer, and
    # on the random-weights model a no-op edit must change nothing (the runs share their seeds).
    setting = native_setting(copy, task, n=16, seed=0, steps=4)
    answer = setting.label_mask("answer")
    clean = setting.sample(None, 8).output
    column = setting.gen_start + int(answer[0].nonzero()[0, 0])

    def edit(step, rows, canvas):
        if step == 1:
            canvas[:, column] = torch.where(canvas[:, column] == 5, 6, 5)
        return canvas
    edited = setting.sample(None, 8, edit).output
    assert (edited[answer] != clean[answer]).all() and torch.equal(edited[~answer], clean[~answer])
    noisy = native_setting(build_diffusiongemma(task), task, n=16, seed=0, steps=4, generate_options={"t_min": 0.4})
    assert torch.equal(noisy.sample(None, 8, lambda step, rows, canvas: canvas).output, noisy.sample(None, 8).output)


def test_faithfulness_from_the_cli(folder, tmp_path, capsys):
    out = tmp_path / "analyses"
    argv = ["analyze", "--out", str(out), "--quiet", "faithfulness", "--model", folder, "--task-param", "n_ops=3",
            "--n", "8", "--denoising-steps", "3"]
    assert main(argv) == 0
    table = pd.read_csv(out / "faithfulness" / "table.csv", keep_default_na=False)
    assert list(table.columns) == FAITHFULNESS_COLUMNS and set(table["step"]) == {0, 1}
    assert "Remasking is not run on the model without a mask token" in capsys.readouterr().out
    assert main([*argv[:4], "--overwrite", "faithfulness", "--twin", "arith-autoregressive", *argv[5:]]) == 2
    assert "--twin does not apply" in capsys.readouterr().err
