"""Faithfulness, paraphrase and causal analyses on Hugging Face diffusion models (tiny LLaDA, and
Dream, whose logits are shifted) on arith rendered as text, through the Python API and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_fixtures import save_dream, save_llada

from dlmprobe.analyses import causal_check, faithfulness, paraphrase_run
from dlmprobe.analyses.faithfulness import _follows
from dlmprobe.analyses.paraphrase import _sample
from dlmprobe.analyses.result import load_result
from dlmprobe.analyses.setting import text_setting
from dlmprobe.cli import main
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models import load_hf_model
from dlmprobe.sampling import DiffusionSamplerConfig
from dlmprobe.store import ActivationDataset
from dlmprobe.tasks import get_task
from dlmprobe.tasks.text import BuiltinTextTask, CanvasTemplate, encode

torch.set_num_threads(1)
ARITH = BuiltinTextTask(get_task("arith", n_ops=3))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"llada": save_llada(root / "llada"), "dream": save_dream(root / "dream")}


@pytest.fixture(scope="module")
def stores(folders, tmp_path_factory):
    """Runs on arith as text, sampled at temperature 1: at temperature 0 a random tiny model commits
    one token everywhere, and a probe needs two classes."""
    root, stores = tmp_path_factory.mktemp("stores"), {}
    for name, folder in folders.items():
        stores[name] = root / f"{name}.h5"
        assert main(["cache", "--model", str(folder), "--trust-remote-code", "--task", "arith", "--task-param", "n_ops=2",
                     "--n", "30", "--quiet", "--template", "forced-answer", "--reasoning-length", "2", "--temperature",
                     "1", "--positions", "answer-slot", "--out", str(stores[name])]) == 0
    return stores


@pytest.fixture(scope="module")
def handles(folders):
    return {name: load_hf_model(folder, trust_remote_code=True) for name, folder in folders.items()}


def test_a_text_output_is_verified_by_the_builtin_rule(handles):
    setting = text_setting(handles["llada"], ARITH, 12, 0, None)
    assert all({"intermediate", "answer"} <= set(spans) for spans in setting.spans)
    examples = ARITH.sample(12, "eval", seed=0)
    reference = encode(ARITH, examples, handles["llada"].tokenizer, handles["llada"].mask_id,
                       CanvasTemplate.forced_answer()).target[:, setting.gen_start:]
    assert all(_follows(setting, None, i, row) for i, row in enumerate(reference.tolist()))
    assert all(_follows(setting, "answer", i, row) for i, row in enumerate(reference.tolist()))
    # Replacing the last intermediate result by another number: no longer the solution.
    last = setting.label_mask("intermediate").long().cumsum(1).argmax(1)
    digits = sorted({v for spans in setting.spans for v in spans["intermediate"].values})
    for i, row in enumerate(reference.tolist()):
        row[last[i]] = next(d for d in digits if d != row[last[i]])
        assert not _follows(setting, None, i, row)
    # A token outside the task's words is no answer at all.
    row = reference[0].tolist()
    row[int(last[0])] = handles["llada"].tokenizer.convert_tokens_to_ids("The")
    assert not _follows(setting, "answer", 0, row)


def _check_flags(result):
    examples = result.tables["examples"]
    assert examples.corrupted.any()
    untouched = examples[~examples.corrupted]
    assert not untouched.answer_changed.any() and not untouched.reasoning_changed.any()
    replaced = examples[examples["mode"] == "replace"]
    # A replaced token is never resampled: the reasoning changes exactly where something was corrupted.
    assert (replaced.reasoning_changed == replaced.corrupted).all()


@pytest.mark.parametrize("model", ["llada", "dream"])
def test_faithfulness_on_a_text_run(handles, model):
    result = faithfulness(handles[model], n=10, task=ARITH, progress=False)
    _check_flags(result)
    table = result.table
    assert set(table["mode"]) == {"replace", "remask"} and set(table["kind"]) == {"diffusion"}
    assert result.meta["template"]["answer_prefix"] == "The answer is"
    assert set(result.meta["replacement_values"]) <= {str(d) for d in range(10)}


def _analyze_llada(folders, tmp_path, name: str, n: int):
    """``dlmprobe analyze NAME`` on the tiny LLaDA with arith rendered as text; the saved result."""
    out = tmp_path / "analyses"
    assert main(["analyze", "--quiet", "--out", str(out), name, "--model", str(folders["llada"]),
                 "--trust-remote-code", "--task", "arith", "--task-param", "n_ops=3", "--n", str(n)]) == 0
    return load_result(out / name)


def test_faithfulness_text_run_through_the_cli(folders, tmp_path):
    result = _analyze_llada(folders, tmp_path, "faithfulness", 8)
    assert result.meta["n"] == 8 and "arith" in result.meta["task"]
    assert set(result.table["metric"]) >= {"answer_changed", "corrupted"}


def test_faithfulness_text_run_needs_its_task(handles):
    with pytest.raises(DlmprobeInputError, match="text task"):
        faithfulness(handles["llada"], n=4, progress=False)


def _greedy(data):
    return DiffusionSamplerConfig(**{**data.config["sampler"], "temperature": 0.0})


@pytest.mark.parametrize("model", ["llada", "dream"])
def test_causal_check_on_a_text_run(handles, stores, model):
    with ActivationDataset(stores[model]) as data:
        result = causal_check(handles[model], data, "blocks.1.hook_resid_post", n=8, start_steps=[0], alpha=300.0,
                              progress=False, sampler=_greedy(data))
    table = result.table.set_index(["intervention", "subspace", "matched_to"])
    # One answer token per example, still masked at step 0: every example is edited there.
    assert (table.n_positions == 8).all() and (table.displacement_run > 0).all()
    assert result.meta["label"] == "answer" and result.meta["puzzles_in_store"] == 0
    assert all(str(c).isdigit() for c in result.meta["classes"])  # tokenizer ids of the committed tokens
    if model == "llada":
        # Steered far along the class means, the answer token the model commits moves; an ablation does not.
        assert table.loc[("steer", "leace", ""), "changed"] == 1.0
        assert table.loc[("ablate", "leace", ""), "changed"] < 1.0


def test_causal_check_on_a_text_run_refuses_the_wrong_model(handles, stores):
    with ActivationDataset(stores["llada"]) as data:
        with pytest.raises(DlmprobeInputError, match="temperature 1.0, expected 0"):
            causal_check(handles["llada"], data, "blocks.1.hook_resid_post", n=4, progress=False)
        with pytest.raises(DlmprobeInputError, match="not from"):
            causal_check(handles["dream"], data, "blocks.1.hook_resid_post", n=4, progress=False, sampler=_greedy(data))


def test_causal_check_text_run_through_the_cli(folders, stores, tmp_path):
    out = tmp_path / "analyses"
    assert main(["analyze", "--quiet", "--out", str(out), "causal", str(stores["llada"]), "--model",
                 str(folders["llada"]), "--trust-remote-code", "--site", "blocks.1.hook_resid_post", "--n", "6",
                 "--greedy"]) == 0
    result = load_result(out / "causal")
    assert result.meta["n"] == 6 and result.meta["sampler"]["temperature"] == 0.0
    assert set(result.table["intervention"]) == {"ablate", "steer"}


def test_text_paraphrase_labellings_track_every_committed_token(handles):
    """Sudoku as text on Dream: the digits' token ids are permuted after every step, prompt and canvas."""
    sudoku = BuiltinTextTask(get_task("sudoku", size=4))
    template = CanvasTemplate.forced_answer()
    setting = text_setting(handles["dream"], sudoku, 6, 0, template)
    run = _sample(setting, None, 6, True, 0, None, None, text=sudoku, template=template)
    tr, relabel = run.trajectory, run.relabel
    final = tr.output.numpy()
    for s in range(tr.n_steps + 1):
        canvas = tr.canvases[:, s, tr.gen_slice].numpy()
        for i in range(6):
            committed = canvas[i] != setting.mask_id
            in_step = relabel.translate(final[i], run.labellings[i, -1], run.labellings[i, s])
            assert np.array_equal(canvas[i][committed], in_step[committed])
    assert all(p != q for p, q in zip(relabel.prompts, setting.prompts))  # a digit permutation rewrites the givens
    assert len(relabel.symbols) == 4 and (run.labellings[:, -1] != np.arange(4)).any()  # the digits' token ids
    # The prompt region of the last canvas is the rendering of the last paraphrased prompt.
    text = handles["dream"].tokenizer.decode(tr.canvases[0, -1, : setting.gen_start], skip_special_tokens=True)
    assert "".join(text.split()) == "".join(sudoku._prompt(relabel.prompts[0]).split())


def test_paraphrase_on_a_text_run(handles):
    result = paraphrase_run(handles["llada"], n=30, task=ARITH, probe_site="blocks.1.hook_resid_post",
                            paraphrases=("tokens", "commits"), progress=False)
    solve = result.tables["solve"].set_index(["run", "metric"]).rate
    # Arith's paraphrase swaps commutative operands in the prompt's text; the answer slot is untouched.
    assert 0 < solve["paraphrased", "prompt_rewritten"] < 1 and solve["plain", "prompt_rewritten"] == 0
    assert (result.tables["examples"].query("run == 'remasked'").n_remasked > 0).all()
    assert set(result.table.measure) == {"argmax", "probe"} and result.meta["template"]["answer_prefix"] == "The answer is"


def test_paraphrase_text_run_through_the_cli(folders, tmp_path):
    result = _analyze_llada(folders, tmp_path, "paraphrase", 6)
    assert result.meta["n"] == 6 and "Arith" in result.meta["task"]
    assert set(result.tables["solve"].run) == {"plain", "paraphrased"}


def test_paraphrase_text_run_needs_a_builtin_task(handles):
    with pytest.raises(DlmprobeInputError, match="built-in task rendered as text"):
        paraphrase_run(handles["llada"], n=4, progress=False)
