"""DiffusionGemma beside a causal LM of its tokenizer (`analyze compare`), and its text capture on prompts of
different lengths (left padding), end to end through the CLI on tiny random-weight models."""

import json

import numpy as np
import pytest
import torch
from gemma_fixtures import TEXT_CANVAS, recompute_decoder, save_gemma_causal, save_text_diffusiongemma
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from dlmprobe.analyses.result import load_result
from dlmprobe.cli import main
from dlmprobe.models.huggingface import load_hf_model
from dlmprobe.probes.lens import native_readers, readout_of
from dlmprobe.store import ActivationDataset

STEPS = 6
N = 40
LAST = "blocks.1.hook_resid_post"
TASK = ["--task", "arith", "--task-param", "n_ops=3", "--n", str(N), "--dtype", "float32", "--quiet"]
FORCED = ["--template", "forced-answer", "--positions", "answer-slot"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DiffusionGemma and a Gemma causal LM sharing its tokenizer, both on arith with the forced answer slot."""
    root = tmp_path_factory.mktemp("gemma-compare")
    folders = {"diffusion": save_text_diffusiongemma(root / "diffusiongemma"),
               "autoregressive": save_gemma_causal(root / "gemma")}
    stores = {name: root / f"{name}.h5" for name in folders}
    assert main(["cache", "--model", str(folders["diffusion"]), *TASK, *FORCED, "--steps", str(STEPS),
                 "--out", str(stores["diffusion"])]) == 0
    # The causal LM's own answer slot (3 tokens; DiffusionGemma's is widened to fill its canvas) starts
    # at the same column: the two are read at the same token, "is".
    assert main(["cache", "--model", str(folders["autoregressive"]), *TASK, *FORCED, "--temperature", "1",
                 "--out", str(stores["autoregressive"])]) == 0
    return folders, stores


def test_compare_diffusiongemma_with_a_causal_gemma_like_for_like(runs, tmp_path, capsys):
    folders, stores = runs
    out = tmp_path / "analyses"
    assert main(["analyze", "--quiet", "--out", str(out), "compare", f"diffusion={stores['diffusion']}",
                 f"autoregressive={stores['autoregressive']}", "--no-shared-init"]) == 0
    result = load_result(out / "compare")
    assert result.meta["like_for_like_runs"] == ["diffusion", "autoregressive"]
    assert AutoTokenizer.from_pretrained(folders["diffusion"]).get_vocab() == \
        AutoTokenizer.from_pretrained(folders["autoregressive"]).get_vocab()
    table = result.table
    like = table[table["like_for_like"]]
    assert set(like["run"]) == {"diffusion", "autoregressive"}
    assert like["lens_accuracy"].notna().all()  # DiffusionGemma's decoder read-out and the Gemma's
    with ActivationDataset(stores["diffusion"]) as dg, ActivationDataset(stores["autoregressive"]) as ar:
        spec, ar_spec = dg.config["canvas"], ar.config["canvas"]
        read = spec["answer_start"] - 1
        # The same prompt columns and the same read column, on DiffusionGemma's decoder canvas (not its encoder).
        assert (spec["gen_start"], spec["answer_start"]) == (ar_spec["gen_start"], ar_spec["answer_start"])
        assert spec["gen_start"] <= read and read in dg.positions and read in ar.positions
        np.testing.assert_array_equal(dg.canvas[:, 0, : spec["gen_start"]], ar.canvas[:, 0, : spec["gen_start"]])
        # The causal LM is read at the step it writes the slot's first token ...
        assert set(like.loc[like["run"] == "autoregressive", "step"]) == {spec["answer_start"] - spec["gen_start"]}
        # ... DiffusionGemma at every stored step, on exactly the examples whose answer had not yet settled there.
        answer = dg.target_start + dg.label("answer")[0][:, 0]
        models = result.tables["runs"].set_index("run")
        for run, data in (("diffusion", dg), ("autoregressive", ar)):
            assert models.loc[run, "task_accuracy"] == pytest.approx(float(np.mean(data.solved)))
        pending = {step: int((step <= dg.commit_step[np.arange(N), answer]).sum()) for step in dg.steps.tolist()}
    assert 0 < min(pending.values()) and max(pending.values()) <= N
    diffusion = like[(like["run"] == "diffusion") & (like["site"] == LAST)].set_index(["target", "step"])["n_rows"]
    for target in ("output", "truth"):
        counted = {step: int(diffusion[target, step]) for step in pending if (target, step) in diffusion.index}
        assert counted and counted == {step: pending[step] for step in counted}
    by_distance = result.tables["by_distance"]
    assert set(by_distance["distance"]) == {3}  # "is" -> step1, step2, answer: the answer is three ahead
    assert "do not share an initialisation" in result.summary and "cannot load model" not in result.summary


def test_logit_lens_on_the_last_block_is_each_models_own_read_out(runs):
    folders, stores = runs
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folders["diffusion"]).eval()
    readout = native_readers(model).readout
    with ActivationDataset(stores["diffusion"]) as data:
        for step in (0, STEPS - 1):
            lens = readout.predict(data.activations(LAST, step).reshape(-1, 32))
            own = data.prediction[:, step, data.positions].reshape(-1)
            assert np.array_equal(lens, own.astype(np.int64))
    handle = load_hf_model(folders["autoregressive"])
    norm = handle.module.get_submodule("model.norm")
    assert norm.weight.abs().min() > 0  # Gemma's 1 + weight differs from weight everywhere
    with ActivationDataset(stores["autoregressive"]) as data:
        ids = torch.from_numpy(data.canvas[:4, -1].astype(np.int64))
    logits, acts = handle.run_with_cache(ids, [LAST])
    # The handle's logits are shifted: the last block's state at p - 1 predicts position p.
    lens = readout_of(handle).logits(acts[LAST][:, :-1].reshape(-1, 32).float().numpy())
    assert np.abs(lens - logits[:, 1:].reshape(-1, handle.vocab_size).numpy()).max() <= 1e-4


def test_compare_refuses_diffusiongemma_read_in_its_encoder(runs, tmp_path, capsys):
    """With the plain template the column before the answer slot is the prompt's last token, which
    DiffusionGemma's encoder reads once: one line, exit 2, nothing written."""
    folders, stores = runs
    plain = tmp_path / "plain.h5"
    assert main(["cache", "--model", str(folders["diffusion"]), *TASK[:4], "--n", "8", "--steps", "2",
                 "--positions", "answer-slot", "--quiet", "--out", str(plain)]) == 0
    capsys.readouterr()
    out = tmp_path / "analyses"
    assert main(["analyze", "--quiet", "--out", str(out), "compare", f"diffusion={plain}",
                 f"autoregressive={stores['autoregressive']}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "in DiffusionGemma's encoder" in err and "--template forced-answer" in err, err
    assert not (out / "compare").exists()


def test_text_capture_of_prompts_of_different_lengths(tmp_path):
    """Left-padded prompts of 8 to 16 tokens in one batch: the stored activations equal a recomputation
    with the attention mask, each row's are those of its prompt alone (unpadded), and the labels sit
    on each row's answer slot."""
    folder = save_text_diffusiongemma(tmp_path / "model")
    terms = [[a, b] * half for a in range(10) for b in range(10) for half in (1, 2, 3)]
    rows = [{"prompt": "Compute " + " + ".join(map(str, t)) + " modulo 10 .", "answer": str(sum(t) % 10)} for t in terms]
    task_file = tmp_path / "sums.jsonl"
    task_file.write_text("\n".join(json.dumps(row) for row in rows))
    out, steps = tmp_path / "sums.h5", 3
    assert main(["cache", "--model", str(folder), "--task-file", str(task_file), "--n", "12", "--steps", str(steps),
                 "--batch-size", "12", "--template", "forced-answer", "--positions", "target", "--dtype", "float32",
                 "--quiet", "--out", str(out)]) == 0
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = {tuple(tokenizer(row["prompt"])["input_ids"]): row["answer"] for row in rows}
    with ActivationDataset(out) as data:
        start, pad = data.target_start, tokenizer.pad_token_id
        prompts = torch.tensor(data.canvas[:, 0, :start], dtype=torch.long)
        mask = (prompts != pad).long()
        lengths = mask.sum(1)
        assert len(set(lengths.tolist())) == 3 and int(lengths.max()) == start  # three prompt lengths, the longest unpadded
        # Left padding: each row's pads come first, then its tokenized prompt.
        assert torch.equal(mask, (torch.arange(start)[None, :] >= start - lengths[:, None]).long())
        answers = []
        for row, length in zip(prompts, lengths.tolist()):
            assert tuple(row[start - length :].tolist()) in encoded
            answers.append(encoded[tuple(row[start - length :].tolist())])
        canvases = torch.tensor(data.canvas[:, :steps, start:], dtype=torch.long)
        recomputed = recompute_decoder(model, prompts, canvases, steps, attention_mask=mask)
        alone = [recompute_decoder(model, prompts[i : i + 1, start - n :], canvases[i : i + 1], steps)
                 for i, n in enumerate(lengths.tolist())]
        for step in range(steps):
            stored = data.activations(LAST, step)
            assert np.abs(stored - recomputed[1, :, step, : TEXT_CANVAS - 1].numpy()).max() <= 1e-6
            unpadded = torch.cat([a[1, :, step, : TEXT_CANVAS - 1] for a in alone]).numpy()
            assert np.abs(stored - unpadded).max() <= 1e-4
        # Labels: the answer slot follows "The answer is" on every row, whatever its prompt's length.
        spec = data.config["canvas"]
        assert spec["answer_start"] == start + 3
        columns, values = data.label("answer")
        assert (columns == 3).all()
        assert values[:, 0].tolist() == [tokenizer.convert_tokens_to_ids(a) for a in answers]
        assert (data.target[:, 3] == values[:, 0]).all()
