"""DiffusionGemma from the command line (cache on text tasks, info, probe, analyze) and faithfulness on it."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from gemma_fixtures import (
    TEXT_CANVAS,
    build_diffusiongemma,
    fixture_task,
    recompute_decoder,
    save_text_diffusiongemma,
)
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from dlmprobe.analyses import faithfulness
from dlmprobe.analyses.faithfulness import NATIVE_REMASK_NOTE
from dlmprobe.analyses.setting import native_setting
from dlmprobe.cli import main
from dlmprobe.store import ActivationDataset

STEPS = 6
TASK = ["--task", "arith", "--task-param", "n_ops=3"]
FORCED = ["--template", "forced-answer"]  # no reasoning: "The answer is" (3 tokens), then a 4-token answer slot
FAITHFULNESS_COLUMNS = ["kind", "mode", "step", "run_fraction", "metric", "denominator", "k", "n", "rate", "ci_low",
                        "ci_high", "note"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny DiffusionGemma with a tokenizer of its own (a real checkpoint's situation)."""
    return str(save_text_diffusiongemma(tmp_path_factory.mktemp("gemma-model")))


@pytest.fixture(scope="module")
def store(folder, tmp_path_factory):
    """arith rendered as text, with the forced answer slot."""
    out = tmp_path_factory.mktemp("gemma-cli") / "gemma.h5"
    assert main(["cache", "--model", folder, *TASK, *FORCED, "--n", "64", "--steps", str(STEPS), "--batch-size", "32",
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


def _left_copy_model(task):
    """A planted DiffusionGemma whose every canvas position predicts the token its left neighbour reads.

    One embedding dimension per token plus one shared by all; the first layer's keys and queries
    are that shared dimension (the same for every token) rotated so that, under its rotary position
    embedding, each query matches the key one position to its left (a sharp softmax: large q/k
    norm weights); values carry the token dimensions, and the attention's write outweighs the
    position's own embedding. Everything else writes nothing. So the answer position copies the
    reasoning position before it: replacing that token just before the last step must change the answer.
    """
    model = build_diffusiongemma(task)
    language, width, n = model.model.encoder.language_model, 32, len(task.vocab)
    first = language.layers[0].self_attn  # sliding attention: plain rotary embedding over the whole head
    head = first.head_dim
    theta = first.config.rope_parameters["sliding_attention"]["rope_theta"] ** (-torch.arange(head // 2) * 2 / head)
    key, query = torch.zeros(head), torch.zeros(head)
    for i in range(3):  # the three fastest rotary planes: a query at p matches the key at p - 1
        key[i] = 1.0
        query[i], query[i + head // 2] = math.cos(theta[i]), -math.sin(theta[i])
    with torch.no_grad():
        embedding = torch.zeros(n, width)
        embedding[:, :n], embedding[:, -1] = torch.eye(n), 1.0
        language.embed_tokens.weight.copy_(embedding)
        for projection in (first.q_proj, first.k_proj, first.v_proj, first.o_proj):
            projection.weight.zero_()
        first.k_proj.weight[:, -1] = key
        first.q_proj.weight[:, -1] = query.repeat(first.q_proj.weight.shape[0] // head)
        first.v_proj.weight[:, :head] = torch.eye(head)  # token dims 0..15: every token the task writes
        first.o_proj.weight[:head, :head] = torch.eye(head)
        first.q_norm.weight.fill_(4.0)
        first.k_norm.weight.fill_(4.0)
        language.layers[0].post_attention_layernorm.weight.fill_(3.0)
        language.layers[1].self_attn.o_proj.weight.zero_()
        for layer in language.layers:
            layer.mlp.down_proj.weight.zero_()
            layer.experts.down_proj.zero_()
        model.model.decoder.self_conditioning.down_proj.weight.zero_()
    return model


def test_cache_info_probe_and_analyses_from_the_cli(store, tmp_path, capsys):
    with ActivationDataset(store) as data:
        assert data.n_examples == 64 and list(data.steps) == list(range(STEPS))
        assert data.config["commit_rule"] == "settle" and data.config["task"]["text_task"] == "arith"
        assert data.canvas.shape[2] == data.target_start + TEXT_CANVAS
        target = list(range(data.target_start, data.target_start + data.output.shape[1]))
        assert list(data.positions) == target and len(target) == TEXT_CANVAS - 1
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
    table = pd.read_csv(tmp_path / "analyses" / "decodability" / "table.csv")
    assert (table["n_rows"] > 0).any()


def test_text_store_equals_a_recomputation_and_holds_answer_slot_labels(folder, store):
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with ActivationDataset(store) as data:
        start, canvas = data.target_start, data.canvas[:16]
        spec = data.config["canvas"]
        assert spec["gen_start"] == start and spec["answer_start"] == start + 3
        # The encoder read the tokenized prompt (the tokenizer's own BOS first) ...
        prompts = torch.tensor(canvas[:, 0, :start], dtype=torch.long)
        assert (prompts[:, 0] == tokenizer.bos_token_id).all()
        # ... and the template text is held in the canvas at every step, never settling.
        prefix = tokenizer(" The answer is", add_special_tokens=False)["input_ids"]
        assert (canvas[:, :, start : start + 3] == prefix).all()
        assert (data.commit_step[:16, start : start + 3] == -1).all()
        recomputed = recompute_decoder(model, prompts, torch.tensor(canvas[:, :STEPS, start:], dtype=torch.long), STEPS)
        for step in (0, STEPS - 1):
            stored = data.activations("blocks.1.hook_resid_post", step)[:16]
            assert np.abs(stored - recomputed[1, :, step, : TEXT_CANVAS - 1].numpy()).max() <= 1e-6
        # Answer-slot labels: arith's three items, one token each, in the slot; their values are the
        # reference's token ids, among the probe classes (the tokenizer's ids of the answer set).
        classes = data.config["task"]["classes"]
        for i, name in enumerate(("step1", "step2", "answer")):
            columns, values = data.label(name)
            assert (columns == 3 + i).all()
            assert np.isin(values, classes["token_ids"]).all()
            assert (data.target[:, 3 + i] == values[:, 0]).all()
        assert classes["items"] == [str(v) for v in range(10)]


def test_cache_step_position_and_shard_selection(folder, store, tmp_path):
    out = tmp_path / "part.h5"
    assert main(["cache", "--model", folder, *TASK, *FORCED, "--n", "64", "--steps", str(STEPS), "--batch-size", "32",
                 "--dtype", "float32", "--record-steps", "every:2", "--positions", "answer-slot", "--shard", "1/2",
                 "--quiet", "--out", str(out)]) == 0
    with ActivationDataset(out) as part, ActivationDataset(store) as whole:
        assert part.n_examples == 32 and list(part.steps) == [0, 2, 4]
        slot = whole.config["canvas"]["answer_start"]
        assert list(part.positions) == list(range(slot - 1, whole.target_start + TEXT_CANVAS - 1))
        # The second shard is the whole run's examples 32..63, sampled with the same seeds.
        assert np.array_equal(part.canvas[:], whole.canvas[32:])
        columns = whole.position_index(part.positions)
        for step in (0, 4):
            np.testing.assert_array_equal(part.activations("blocks.1.hook_resid_post", step),
                                          whole.activations("blocks.1.hook_resid_post", step)[32:][:, columns])


def test_cache_a_jsonl_task_with_the_plain_template(folder, tmp_path):
    rows = [{"prompt": f"Compute {a} + {b} modulo 10 , left to right .", "answer": str((a + b) % 10)}
            for a in range(10) for b in range(10)]
    task_file = tmp_path / "sums.jsonl"
    task_file.write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "sums.h5"
    assert main(["cache", "--model", folder, "--task-file", str(task_file), "--n", "8", "--steps", "3",
                 "--positions", "answer-slot", "--dtype", "float32", "--quiet", "--out", str(out)]) == 0
    with ActivationDataset(out) as data:
        assert data.config["task"]["text"]["source"] == "jsonl"
        # Plain template: the answer slot is the whole canvas but its closing column (EOS-padded).
        assert data.config["canvas"]["answer_start"] == data.target_start
        assert list(data.positions) == list(range(data.target_start, data.target_start + TEXT_CANVAS - 1))
        columns, values = data.label("answer")
        assert (columns == 0).all() and (data.target[:, 0] == values[:, 0]).all()
        assert (data.target[:, 1:] == AutoTokenizer.from_pretrained(folder).eos_token_id).all()


@pytest.mark.parametrize("flags, expected", [
    (["--temperature", "0.5"], "--temperature does not apply"),
    (["--block-length", "2"], "--block-length does not apply"),
    (["--device-map", "auto"], "--device-map does not apply"),
    (["--positions", "all"], "expected --positions in"),
    (["--positions", "answer"], "expected --positions in"),
    (["--sites", "blocks.0.attn.hook_z"], "decoder site"),
    (["--answer-length", "3"], "canvas_length - 1 = 7"),
    ([*FORCED, "--reasoning-length", "2"], "canvas_length - 1 = 7"),
    (["--task-file", "missing.jsonl"], "got both"),
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
    # Without a mask token the summary speaks of settling, not of committing or masks.
    assert "had the answer settled already" in result.summary and "where it was not yet settled" in result.summary
    assert "committed" not in result.summary and "still masked" not in result.summary
    assert "corrupted, answer not yet settled" in set(table["denominator"])
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


def test_faithfulness_fires_where_the_answer_copies_the_reasoning():
    """The planted left-copy model: the answer position reads the reasoning position before it, so a
    replacement just before the last step reaches the answer in every run (the random-weights copy
    model above, where nothing moves between positions, shows 0 for the same edit)."""
    task = fixture_task()
    result = faithfulness(_left_copy_model(task), n=16, task=task, denoising_steps=4, progress=False)
    ran = result.table[result.table["note"] == ""].set_index(["step", "metric"])["rate"]
    assert ran[2, "corrupted"] == 1.0
    assert ran[2, "answer_changed"] == 1.0 and ran[2, "answer_changed_open"] == 1.0
    # In the clean run too, the answer is what the position before it read at the last step.
    setting = native_setting(_left_copy_model(task), task, n=16, seed=0, steps=4)
    run = setting.sample(None, 16)
    answer = setting.label_mask("answer")
    last_read = run.canvases[:, -2, setting.gen_start : setting.gen_start + setting.gen_length]
    assert torch.equal(run.output[answer], last_read[torch.roll(answer, -1, dims=1)])


def test_faithfulness_from_the_cli(folder, tmp_path, capsys):
    out = tmp_path / "analyses"
    argv = ["analyze", "--out", str(out), "--quiet", "faithfulness", "--model", folder, "--task-param", "n_ops=3",
            "--n", "8", "--denoising-steps", "3"]
    assert main(argv) == 0
    table = pd.read_csv(out / "faithfulness" / "table.csv", keep_default_na=False)
    assert list(table.columns) == FAITHFULNESS_COLUMNS and set(table["step"]) == {0, 1}
    # arith as text through the model's tokenizer: both intermediate results replaced in every run.
    ran = table[table["note"] == ""].set_index(["step", "metric"])
    assert (ran.xs("corrupted", level="metric")[["k", "n"]].to_numpy() == 8).all()
    assert "Remasking is not run on the model without a mask token" in capsys.readouterr().out
    assert main([*argv[:4], "--overwrite", "faithfulness", "--twin", "arith-autoregressive", *argv[5:]]) == 2
    assert "--twin does not apply" in capsys.readouterr().err
