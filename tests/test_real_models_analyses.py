"""Analyses on Hugging Face runs: tiny LLaDA, Dream, Qwen2 and Llama on a text task, end to end through the CLI.

The stores are sampled at temperature 1 so that the random-weight models commit more than one
token class (a probe needs two). The matched pair is a tiny Dream initialised from the tiny
Qwen2's weights (:func:`hf_fixtures.save_dream_from_qwen2`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_fixtures import WEIGHTS, save_dream, save_dream_from_qwen2, save_llada, save_llama, save_modernbert, save_qwen2
from safetensors.torch import load_file
from transformers import AutoTokenizer

from dlmprobe.analyses.result import load_result
from dlmprobe.cli import main
from dlmprobe.models.huggingface import load_hf_model
from dlmprobe.probes import ProbeGrid, features
from dlmprobe.probes.features import RandomWeightsFeatures, padding_mask
from dlmprobe.probes.lens import lens_predictions, model_readout, readout_of, store_readers
from dlmprobe.store import ActivationDataset

SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    qwen2 = save_qwen2(root / "qwen2")
    folders = {"llada": save_llada(root / "llada"), "dream": save_dream(root / "dream"), "qwen2": qwen2,
               "llama": save_llama(root / "llama"),
               "dream_from_qwen2": save_dream_from_qwen2(root / "dream_from_qwen2", qwen2)}
    stores = {}
    for name, folder in folders.items():
        stores[name] = root / f"{name}.h5"
        code = main(["cache", "--model", str(folder), "--trust-remote-code", "--task", "arith", "--task-param", "n_ops=2",
                     "--n", "30", "--quiet", "--template", "forced-answer", "--reasoning-length", "2",
                     "--positions", "answer-slot", "--temperature", "1", "--out", str(stores[name])])
        assert code == 0
    return folders, stores


def _analyze(out, *argv):
    assert main(["analyze", "--quiet", "--out", str(out), *argv]) == 0


def test_matched_pair_fixture_starts_from_the_causal_lm(runs):
    folders, _ = runs
    qwen, dream = load_file(folders["qwen2"] / WEIGHTS), load_file(folders["dream_from_qwen2"] / WEIGHTS)
    assert set(qwen) == set(dream)
    for name, weight in qwen.items():
        assert torch.equal(dream[name][: weight.shape[0]], weight), name
    assert dream["model.embed_tokens.weight"].shape[0] == qwen["model.embed_tokens.weight"].shape[0] + 1  # [MASK]
    # The Qwen2 tokenizer reads back as saved (not mangled by Qwen2Tokenizer), and Dream's is the same plus [MASK].
    qwen_tok = AutoTokenizer.from_pretrained(folders["qwen2"])
    dream_tok = AutoTokenizer.from_pretrained(folders["dream_from_qwen2"], trust_remote_code=True)
    text = "Compute 3 + 4 . The answer is 7"
    assert qwen_tok.tokenize(text)[:1] == ["Compute"] and qwen_tok.decode(qwen_tok(text).input_ids) == text
    assert dream_tok(text).input_ids == qwen_tok(text).input_ids
    assert dream_tok.mask_token_id == len(qwen_tok)


@pytest.mark.parametrize("model", ["llada", "dream"])
def test_every_store_analysis_and_the_report_run_on_a_text_run(runs, tmp_path, model, capsys):
    _, stores = runs
    store = str(stores[model])
    out = tmp_path / "analyses"
    _analyze(out, "decodability", store, "--target", "truth")
    _analyze(out, "lead", store)
    _analyze(out, "order", store)
    _analyze(out, "trajectory", store, "--example", "1")
    decodability = load_result(out / "decodability")
    table = decodability.table
    assert {"lens_accuracy", "readout_accuracy", "random_weights_accuracy", "baseline_embedding_accuracy"} <= set(table)
    assert table["random_weights_accuracy"].notna().all() and table["lens_accuracy"].notna().all()
    assert "givens" in decodability.meta["readers_left_out"]  # a text run's prompt is tokenizer ids
    lead = load_result(out / "lead")
    assert set(lead.table["reader"]) == {"probe", "argmax", "lens"}
    order = load_result(out / "order")
    assert "answer" in set(order.table["label"])
    trajectory = load_result(out / "trajectory")
    assert {"The", "answer", "is"} <= set(trajectory.table["final"])  # tokens named by the stored tokenizer
    assert "The answer is" in trajectory.summary
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert all(name in page for name in ("decodability", "lead", "order", "trajectory"))


@pytest.mark.parametrize("model", ["dream", "qwen2"])
def test_random_weights_features_are_a_random_copy_run_on_the_stored_canvas(runs, model):
    folders, stores = runs
    with ActivationDataset(stores[model]) as data:
        step = int(data.steps[-1])
        features = RandomWeightsFeatures(data, SITES, seed=5)
        got = features(SITES[1], step)
        handle = load_hf_model(folders[model], trust_remote_code=True)
        fresh = handle.random_copy(5)
        canvas = data.canvas[:, step].astype(np.int64)
        mask = padding_mask(data, canvas, handle.tokenizer.pad_token_id)
        _, acts = fresh.run_with_cache(torch.from_numpy(canvas), SITES, torch.from_numpy(mask))
        expected = acts[SITES[1]][:, data.positions].float().numpy()
        seen = ~np.isnan(data.activations(SITES[1], step))
        assert np.isnan(got[~seen]).all()
        assert np.abs(got[seen] - expected[seen]).max() <= 1e-6
        assert np.abs(got[seen] - data.activations(SITES[1], step)[seen]).max() > 1e-2  # not the trained weights


@pytest.mark.parametrize("model", ["dream", "qwen2"])
def test_logit_lens_on_the_last_block_is_the_models_own_logits(runs, model):
    folders, stores = runs
    handle = load_hf_model(folders[model], trust_remote_code=True)
    readout = readout_of(handle)
    with ActivationDataset(stores[model]) as data:
        assert store_readers(data).readout is not None
        ids = torch.from_numpy(data.canvas[:4, -1].astype(np.int64))
    logits, acts = handle.run_with_cache(ids, [SITES[-1]])
    # Both are shifted: the last block's state at p - 1 predicts position p.
    lens = readout.logits(acts[SITES[-1]][:, :-1].reshape(-1, handle.d_model).float().numpy())
    assert np.abs(lens - logits[:, 1:].reshape(-1, handle.vocab_size).numpy()).max() <= 1e-4


def test_grid_lens_reads_the_state_before_the_position_on_a_shifted_model(runs, monkeypatch):
    """Dream predicts p from the hidden state at p - 1: on the last block the grid's lens is the model's own read-out."""
    folders, stores = runs
    loads = []
    monkeypatch.setattr(features, "load_hf_model", lambda *a, **k: loads.append(a) or load_hf_model(*a, **k))
    grid = ProbeGrid(label="answer", sites=[SITES[-1]], folds=2, min_rows=10, control=False, bootstrap=0)
    with ActivationDataset(stores["dream"]) as data:
        assert data.config["read_offset"] == -1
        table = grid.run(data, progress=False)
        assert len(loads) == 1  # one load for the lens, the embedding baseline and the random-weights copy
        assert {"lens_accuracy", "baseline_embedding_accuracy", "random_weights_accuracy"} <= set(table)
        readout = readout_of(load_hf_model(folders["dream"], trust_remote_code=True))
        differs = 0
        for (site, step, _), rows in grid.rows_.items():
            y = data.canvas[rows["example"], -1, rows["position"]]
            lens = lens_predictions(data, readout, site, step, rows)  # the store's offset, -1
            assert np.array_equal(rows["lens"], lens == y)
            if step < data.n_steps:
                assert np.array_equal(lens, model_readout(data, step, rows))
                differs += int((lens_predictions(data, readout, site, step, rows, read_offset=0) != lens).sum())
        assert differs > 0  # the state at the position itself says other tokens


def test_compare_a_diffusion_lm_with_the_causal_lm_it_was_initialised_from(runs, tmp_path, capsys):
    _, stores = runs
    out = tmp_path / "analyses"
    _analyze(out, "compare", f"diffusion={stores['dream_from_qwen2']}", f"autoregressive={stores['qwen2']}", "--shared-init")
    result = load_result(out / "compare")
    assert result.meta["shared_init"] is True
    models = result.tables["runs"].set_index("run")
    with ActivationDataset(stores["qwen2"]) as ar, ActivationDataset(stores["dream_from_qwen2"]) as diffusion:
        for run, data in (("autoregressive", ar), ("diffusion", diffusion)):
            assert models.loc[run, "task_accuracy"] == pytest.approx(float(np.mean(data.solved)))
            assert bool(models.loc[run, "shared_init"])
        # The matched pair shares its tokenizer, so both runs are read at the same canvas columns:
        # the same layout, stored positions and prompt tokens, the column before the answer slot among them.
        canvas = ar.config["canvas"]
        assert diffusion.config["canvas"] == canvas
        assert np.array_equal(ar.positions, diffusion.positions) and canvas["answer_start"] - 1 in ar.positions
        prompt = slice(0, canvas["gen_start"])
        assert np.array_equal(ar.canvas[:, 0, prompt], diffusion.canvas[:, 0, prompt])
        slots, _ = ar.label("answer")
        assert np.array_equal(slots, diffusion.label("answer")[0])
        writes_slot = canvas["answer_start"] - canvas["gen_start"]
    like = result.table[result.table["like_for_like"]]
    assert set(like["run"]) == {"diffusion", "autoregressive"}
    assert set(like.loc[like["run"] == "autoregressive", "step"]) == {writes_slot}
    assert like["lens_accuracy"].notna().all()  # the causal LM's lens through its raw Hugging Face module
    by_distance = result.tables["by_distance"]
    assert set(by_distance.groupby("run")["distance"].apply(frozenset)) == {frozenset(by_distance["distance"])}
    assert "share an initialisation" in result.summary and "Task accuracy" in result.summary
    capsys.readouterr()
    # LLaDA and Llama share the WordLevel tokenizer (Qwen2's byte-level one splits " 7" into "Ġ", "7").
    assert main(["analyze", "--quiet", "--out", str(tmp_path / "mixed"), "compare", f"diffusion={stores['llada']}",
                 f"autoregressive={stores['llama']}", "--no-shared-init"]) == 0
    assert load_result(tmp_path / "mixed" / "compare").meta["shared_init"] is False


def test_store_analyses_and_the_report_run_on_a_masked_lm_through_nnsight(tmp_path, capsys):
    """ModernBERT has no TransformerLens adapter: sites are module paths through nnsight, its lens is left out."""
    folder = save_modernbert(tmp_path / "modernbert")
    store = tmp_path / "modernbert.h5"
    assert main(["cache", "--model", str(folder), "--task", "arith", "--task-param", "n_ops=2", "--n", "30", "--quiet",
                 "--template", "forced-answer", "--reasoning-length", "2", "--positions", "answer-slot",
                 "--temperature", "1", "--out", str(store)]) == 0
    out = tmp_path / "analyses"
    for argv in (["decodability", str(store), "--target", "truth"], ["lead", str(store)], ["order", str(store)],
                 ["trajectory", str(store), "--example", "1"]):
        _analyze(out, *argv)
    table = load_result(out / "decodability").table
    assert table["accuracy"].between(0, 1).all() and table["random_weights_accuracy"].notna().all()
    assert {"The", "answer", "is"} <= set(load_result(out / "trajectory").table["final"])
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "decodability" in (out / "report.html").read_text()
