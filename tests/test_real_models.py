"""`dlmprobe cache` on tiny offline stand-ins for Hugging Face diffusion and causal LMs.

LLaDA- and Dream-shaped remote-code models, ModernBERT (masked LMs) and Llama/Qwen2 (causal LMs):
the store's activations at step t equal the model's own hidden states recomputed on the stored
canvas of step t; shards merge to the unsharded run; bad --model values are one line, exit 2.
"""

import h5py
import numpy as np
import pytest
import torch
from hf_fixtures import save_dream, save_llada, save_llama, save_modernbert, save_qwen2

from dlmprobe.cli import main
from dlmprobe.models.huggingface import load_hf_model
from dlmprobe.store import ActivationDataset

SAVERS = {"llada": save_llada, "dream": save_dream, "modernbert": save_modernbert, "llama": save_llama, "qwen2": save_qwen2}
SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: save(tmp_path_factory.mktemp(name)) for name, save in SAVERS.items()}


def _cache(folder, out, *extra):
    return main(["cache", "--model", str(folder), "--trust-remote-code", "--task", "arith", "--task-param", "n_ops=2",
                 "--n", "6", "--batch-size", "4", "--dtype", "float32", "--quiet", "--out", str(out), *extra])


FORCED = ("--template", "forced-answer", "--reasoning-length", "3", "--positions", "all")


@pytest.mark.parametrize("name", list(SAVERS))
def test_cached_activations_equal_a_recomputation_on_the_stored_canvas(folders, tmp_path, name, capsys):
    out = tmp_path / "run.h5"
    assert _cache(folders[name], out, *FORCED) == 0
    handle = load_hf_model(folders[name], trust_remote_code=True)
    pad = handle.tokenizer.pad_token_id
    with ActivationDataset(out) as data:
        config = data.config
        assert config["model"]["kind"] == ("autoregressive" if name in ("llama", "qwen2") else "diffusion")
        assert config["read_offset"] == (-1 if name in ("dream", "llama", "qwen2") else 0)
        assert config["task"]["template"]["answer_prefix"] == "The answer is"
        assert config["mask_id"] == data.mask_id == (handle.mask_id if handle.mask_id is not None else pad)
        canvas, positions = data.canvas, data.positions
        gen_start = config["canvas"]["gen_start"]
        # fixed tokens (prompt, template text, closing EOS) never change; every masked slot gets filled
        fixed = canvas[:, 0] != data.mask_id
        assert (canvas[:, -1][fixed] == canvas[:, 0][fixed]).all()
        assert (canvas[:, -1, gen_start:] != data.mask_id).all()
        # labels sit on the answer slot, after the fixed "The answer is"
        slots, _ = data.label(config["task"]["answer_label"])
        assert (data.target_start + slots >= config["canvas"]["answer_start"]).all()
        compared = 0
        for step in data.steps:
            ids = torch.from_numpy(canvas[:, step].astype(np.int64))
            mask = torch.ones_like(ids)
            mask[:, :gen_start] = ids[:, :gen_start] != pad  # left padding of the prompt
            _, acts = handle.run_with_cache(ids, SITES, mask)
            for site in SITES:
                stored = data.activations(site, int(step))
                expected = acts[site][:, positions].float().numpy()
                seen = ~np.isnan(stored)  # a causal LM's not-yet-computed positions are NaN
                assert seen.any()
                assert np.abs(stored[seen] - expected[seen]).max() <= 1e-6
                compared += 1
        assert compared == 2 * len(data.steps)


@pytest.mark.parametrize("name", ["llada", "llama"])
def test_answer_slot_positions_keep_the_predicting_state(folders, tmp_path, name):
    out = tmp_path / "run.h5"
    assert _cache(folders[name], out, "--template", "forced-answer", "--reasoning-length", "2", "--positions", "answer-slot") == 0
    with ActivationDataset(out) as data:
        # the column before the slot for every model: a shifted model's predicting state, a causal LM's read-ahead point
        start = data.config["canvas"]["answer_start"] - 1
        assert data.positions.tolist() == list(range(start, data.canvas.shape[2] - 1))
        X, y, _ = data.get(SITES[1], int(data.steps[-1]), "label", label="answer")
        assert X.shape[0] == y.shape[0] > 0


def test_shards_merge_to_the_unsharded_run(folders, tmp_path):
    whole = tmp_path / "whole.h5"
    assert _cache(folders["dream"], whole, "--positions", "answer-slot") == 0
    shards = [tmp_path / f"s{i}.h5" for i in range(2)]
    for i, shard in enumerate(shards):
        assert _cache(folders["dream"], shard, "--positions", "answer-slot", "--shard", f"{i}/2") == 0
    merged = tmp_path / "merged.h5"
    assert main(["merge", *map(str, shards), "--out", str(merged)]) == 0
    with h5py.File(whole) as a, h5py.File(merged) as b:
        for path in ("trajectory/canvas", f"activations/{SITES[1]}", "labels/answer/values"):
            assert np.array_equal(a[path][()], b[path][()], equal_nan=True), path


def test_device_map_auto_runs_on_cpu(folders, tmp_path):
    out = tmp_path / "run.h5"
    assert _cache(folders["modernbert"], out, "--device-map", "auto", "--positions", "answer-slot") == 0
    with ActivationDataset(out) as data:
        assert data.config["model"]["device_map"] == "auto"
        assert not np.isnan(data.activations(SITES[0], 0)).any()


def test_jsonl_task_file(folders, tmp_path):
    rows = [f'{{"prompt": "Compute {a} + {b} modulo 5 .", "answer": "{(a + b) % 5}"}}' for a in range(5) for b in range(5)]
    task_file = tmp_path / "sums.jsonl"
    task_file.write_text("\n".join(rows))
    out = tmp_path / "run.h5"
    code = main(["cache", "--model", str(folders["modernbert"]), "--task-file", str(task_file), "--n", "4", "--split", "train",
                 "--quiet", "--template", "forced-answer", "--positions", "answer-slot", "--out", str(out)])
    assert code == 0
    with ActivationDataset(out) as data:
        assert data.config["task"]["text"]["source"] == "jsonl"
        assert data.n_examples == 4


def _one_line_exit_2(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_model_values_give_one_line(folders, tmp_path, capsys):
    out = str(tmp_path / "run.h5")
    base = ["cache", "--task", "arith", "--n", "2", "--quiet", "--out", out]
    _one_line_exit_2(capsys, [*base, "--model", str(tmp_path / "missing")], "missing folder")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    _one_line_exit_2(capsys, [*base, "--model", str(junk)], "config.json")
    _one_line_exit_2(capsys, [*base, "--model", str(folders["llada"])], "--trust-remote-code")
    no_mask = save_modernbert(tmp_path / "nomask", mask=False)
    capsys.readouterr()  # the save's own progress bar
    _one_line_exit_2(capsys, [*base, "--model", str(no_mask)], "no mask token")
    _one_line_exit_2(capsys, ["cache", "--model", str(folders["llama"]), "--n", "2", "--out", out], "--task")
    _one_line_exit_2(capsys, [*base, "--model", "arith-diffusion", "--template", "forced-answer"], "Hugging Face")
    assert not (tmp_path / "run.h5").exists()


def test_probe_grid_runs_on_a_text_store(folders, tmp_path, capsys):
    out = tmp_path / "run.h5"
    code = main(["cache", "--model", str(folders["llada"]), "--trust-remote-code", "--task", "arith", "--task-param", "n_ops=2",
                 "--n", "24", "--quiet", "--template", "forced-answer", "--reasoning-length", "2", "--positions", "answer-slot",
                 "--out", str(out)])
    assert code == 0
    assert main(["probe", str(out), "--folds", "2", "--target", "truth", "--no-random-baseline", "--out", str(tmp_path / "p")]) == 0
    assert list((tmp_path / "p").glob("grid-answer-truth-*.csv"))
    assert main(["info", str(out)]) == 0
    assert "text task arith" in capsys.readouterr().out
