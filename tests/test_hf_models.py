"""The real-model layer on tiny offline stand-ins for LLaDA, Dream and ModernBERT, and text tasks."""

import json
import shutil

import pytest
import torch
from hf_fixtures import build_tokenizer, save_dream, save_llada, save_modernbert
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models import random_model, shipped_checkpoints
from dlmprobe.models.checkpoint import CHECKPOINT_DIR
from dlmprobe.models.handle import from_checkpoint
from dlmprobe.models.huggingface import load_hf_model
from dlmprobe.tasks import get_task
from dlmprobe.tasks.text import (
    ANSWER_PREFIX,
    BuiltinTextTask,
    CanvasTemplate,
    JsonlTask,
    encode,
    top_k_classes,
)

SAVERS = {"llada": save_llada, "dream": save_dream, "modernbert": save_modernbert}
AUTO = {"llada": AutoModelForCausalLM, "dream": AutoModel, "modernbert": AutoModelForMaskedLM}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: save(tmp_path_factory.mktemp(name)) for name, save in SAVERS.items()}


@pytest.fixture(scope="module")
def handles(folders):
    return {name: load_hf_model(folder, trust_remote_code=True) for name, folder in folders.items()}


def _ids(handle, batch=2, length=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, handle.vocab_size - 1, (batch, length), generator=generator)


def _reference(folders, name):
    """The same folder loaded by transformers alone, without dlmprobe or TransformerLens."""
    return AUTO[name].from_pretrained(folders[name], trust_remote_code=True).eval()


@pytest.mark.parametrize("name", list(SAVERS))
def test_handle_matches_the_module_loaded_by_transformers(folders, handles, name):
    handle, ids = handles[name], _ids(handles[name])
    expected_backend = "nnsight" if name == "modernbert" else "transformer_lens"
    assert (handle.backend, handle.kind, handle.n_layers, handle.d_model) == (expected_backend, "diffusion", 2, 32)
    with torch.no_grad():
        out = _reference(folders, name)(input_ids=ids, output_hidden_states=True)
    raw = out.logits
    expected = torch.cat([raw[:, :1], raw[:, :-1]], dim=1) if name == "dream" else raw
    logits, acts = handle.run_with_cache(ids, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    assert (logits - expected).abs().max() <= 1e-5
    assert (handle.logits(ids) - expected).abs().max() <= 1e-5
    assert (acts["blocks.0.hook_resid_post"] - out.hidden_states[1]).abs().max() <= 1e-5
    # The last block's output is before the final norm; transformers' last hidden state is after it.
    assert (acts["blocks.1.hook_resid_post"] - out.hidden_states[2]).abs().max() > 1e-3


def test_remote_code_loads_never_ask_on_stdin(folders, monkeypatch):
    # transformers asks "Do you wish to run the custom code? [y/N]" through input() and, when that
    # fails, TransformerLens silently carries on: a prompt would only show up as a 15 s stall.
    asked = []
    monkeypatch.setattr("builtins.input", lambda *args: asked.append(args) or "n")
    load_hf_model(folders["llada"], trust_remote_code=True)
    assert asked == []


def test_dream_logits_are_shifted_and_position_rules_read_one_back(folders, handles):
    dream, llada = handles["dream"], handles["llada"]
    ids = _ids(dream)
    with torch.no_grad():
        raw = _reference(folders, "dream")(input_ids=ids).logits
    logits = dream.logits(ids)
    assert torch.allclose(logits[:, 1:], raw[:, :-1], atol=1e-5)
    assert torch.allclose(logits[:, 0], raw[:, 0], atol=1e-5)
    assert (dream.shifted, dream.read_offset) == (True, -1)
    assert (llada.shifted, llada.read_offset) == (False, 0)


def test_mask_ids_come_from_config_and_tokenizer(folders, handles):
    for name, handle in handles.items():
        config = json.loads((folders[name] / "config.json").read_text())
        assert handle.mask_id == handle.tokenizer.mask_token_id == handle.vocab_size - 1 != 4
        assert config.get("mask_token_id") == (None if name == "modernbert" else handle.mask_id)


def test_conflicting_mask_ids_are_refused(folders, tmp_path):
    folder = shutil.copytree(folders["llada"], tmp_path / "llada")
    config = json.loads((folder / "config.json").read_text())
    config["mask_token_id"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DlmprobeInputError, match="one mask token"):
        load_hf_model(folder, trust_remote_code=True)


@pytest.mark.parametrize("name", list(SAVERS))
def test_random_copy_has_the_same_shapes_and_new_weights(handles, name):
    handle = handles[name]
    copy, again = handle.random_copy(seed=1), handle.random_copy(seed=1)
    params = dict(handle.module.named_parameters())
    fresh = dict(copy.module.named_parameters())
    assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in fresh.items()}
    weights = [k for k in params if k.endswith("weight") and params[k].ndim == 2]
    assert weights and all(not torch.equal(params[k], fresh[k]) for k in weights)
    ids = _ids(handle)
    assert torch.equal(copy.logits(ids), again.logits(ids))  # the seed decides the weights
    assert copy.describe()["random_weights_seed"] == 1 and copy.mask_id == handle.mask_id


@pytest.mark.parametrize("name", list(SAVERS))
def test_edits_change_the_output_and_identity_edits_do_not(handles, name):
    handle, ids = handles[name], _ids(handles[name])
    site = handle.resid_site(0)
    assert torch.allclose(handle.run_with_hooks(ids, {site: lambda a: a}), handle.logits(ids), atol=1e-6)
    zeroed, acts = handle.run_with_hooks(ids, {site: torch.zeros_like}, record=[site])
    assert not torch.allclose(zeroed, handle.logits(ids), atol=1e-3)
    assert acts[site].abs().max() == 0


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_left_padding_leaves_the_real_positions_unchanged(handles, name):
    handle = handles[name]
    ids = _ids(handle, batch=1, length=7)
    padded = torch.cat([torch.full((1, 3), handle.tokenizer.pad_token_id), ids], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    assert torch.allclose(handle.logits(padded, mask)[:, 3 + 1 :], handle.logits(ids)[:, 1:], atol=1e-5)


def test_builtin_checkpoint_wrap(tiny_config):
    ckpt = random_model(tiny_config)
    handle = from_checkpoint(ckpt)
    ids = torch.randint(0, tiny_config.d_vocab, (2, 6))
    assert torch.equal(handle.logits(ids), ckpt.model(ids))
    assert (handle.mask_id, handle.tokenizer, handle.read_offset) == (ckpt.task.vocab.mask_id, None, 0)
    twin = from_checkpoint(random_model(tiny_config.twin()))
    assert torch.equal(twin.logits(ids)[:, 1:], twin.module(ids)[:, :-1]) and twin.read_offset == -1
    assert not torch.allclose(handle.random_copy(5).logits(ids), handle.logits(ids))


# -- text tasks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize(("name", "params"), [("arith", {"n_ops": 3}), ("sudoku", {"size": 4}), ("pathstar", {})])
def test_text_labels_sit_on_the_answer_items(tokenizer, name, params):
    task = BuiltinTextTask(get_task(name, **params))
    examples = task.sample(3, "eval")
    canvas = encode(task, examples, tokenizer, tokenizer.mask_token_id)
    assert (canvas.canvas[:, canvas.answer_start :] == tokenizer.mask_token_id).all()
    for ex, row, labels in zip(examples, canvas.target, canvas.labels):
        assert set(labels) == set(ex.labels)
        for label, items in ex.labels.items():
            span = labels[label]
            assert tokenizer.convert_ids_to_tokens(row[list(span.positions)].tolist()) == [ex.answer[i] for i in items]
            assert list(span.values) == row[list(span.positions)].tolist()
    assert canvas.classes["items"] == list(task.answer_set)
    assert tokenizer.convert_ids_to_tokens(canvas.classes["token_ids"]) == list(task.answer_set)


def test_arith_answer_is_the_last_item(tokenizer):
    task = BuiltinTextTask(get_task("arith", n_ops=3))
    ex = task.sample(1, "eval")[0]
    canvas = encode(task, [ex], tokenizer, tokenizer.mask_token_id)
    (position,) = canvas.labels[0]["answer"].positions
    assert position == canvas.target.shape[1] - 1
    assert tokenizer.convert_ids_to_tokens([int(canvas.target[0, position])]) == [ex.answer[-1]]


def test_canvas_template_keeps_fixed_tokens_in_place(tokenizer):
    task = BuiltinTextTask(get_task("arith", n_ops=3))
    examples = task.sample(2, "eval")
    template = CanvasTemplate.forced_answer(reasoning_length=4)
    canvas = encode(task, examples, tokenizer, tokenizer.mask_token_id, template)
    prefix = tokenizer(" " + ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    start = canvas.gen_start + 4
    assert canvas.answer_start == start + len(prefix)
    for row in (canvas.canvas, canvas.target):
        assert (row[:, start : canvas.answer_start] == torch.tensor(prefix)).all()
    region = canvas.canvas[:, canvas.gen_start :]
    fixed = canvas.fixed[:, canvas.gen_start :]
    assert (region[~fixed] == tokenizer.mask_token_id).all() and (region[fixed] != tokenizer.mask_token_id).all()
    assert fixed.sum(dim=1).tolist() == [len(prefix)] * 2
    assert torch.equal(canvas.canvas[:, : canvas.gen_start], canvas.target[:, : canvas.gen_start])
    assert canvas.fixed[:, : canvas.gen_start].all()
    # Labels sit in the answer slot, after the fixed text.
    assert min(canvas.labels[0]["answer"].positions) >= canvas.answer_start


def _jsonl(tmp_path, rows):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_task_multi_token_answers_label_the_first_distinguishing_token(tmp_path):
    rows = [{"prompt": f"Which node {i} is next", "answer": f"n{i}", "reasoning": "follow the edges"} for i in range(40)]
    tokenizer = build_tokenizer(split_digits=True, corpus=[r["prompt"] + " " + r["answer"] + " follow the edges" for r in rows])
    task = JsonlTask(_jsonl(tmp_path, rows))
    examples = task.sample(3, "train")
    canvas = encode(task, examples, tokenizer, tokenizer.mask_token_id, CanvasTemplate.forced_answer(reasoning_length=None))
    assert canvas.classes["shared_prefix_tokens"] == 1  # every answer starts with the token "n"
    for ex, row, labels in zip(examples, canvas.target, canvas.labels):
        (position,) = labels["answer"].positions
        assert position == canvas.answer_start + 1
        assert tokenizer.convert_ids_to_tokens([int(row[position])]) == [ex.answer[0][1]]
        reasoning = tokenizer(" " + ex.reasoning, add_special_tokens=False)["input_ids"]
        assert row[canvas.gen_start : canvas.gen_start + len(reasoning)].tolist() == reasoning
    assert (canvas.attention_mask.sum(dim=1) <= canvas.canvas.shape[1]).all()
    assert top_k_classes(canvas.target, [canvas.answer_start + 1], k=2)["token_ids"][0] in canvas.classes["token_ids"]


def test_clashing_answer_tokens_are_refused_for_builtin_tasks():
    task = BuiltinTextTask(get_task("pathstar", n_nodes=30))  # nodes n0..n29: "n1" and "n12" share "1"
    tokenizer = build_tokenizer(split_digits=True, corpus=[" ".join(task.answer_set)])
    with pytest.raises(DlmprobeInputError, match="distinct first tokens"):
        encode(task, task.sample(1, "eval"), tokenizer, tokenizer.mask_token_id)


@pytest.mark.parametrize(
    ("line", "match"),
    [("not json", "invalid JSON"), ('{"prompt": "p"}', "'prompt' and 'answer'"), ('{"prompt": "p", "answer": "a", "reasoning": 3}', "reasoning")],
)
def test_bad_jsonl_lines_give_one_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DlmprobeInputError, match=match) as err:
        JsonlTask(path)
    assert "\n" not in str(err.value)


# -- bad --model values ------------------------------------------------------------------------------


def _bad_model_cases(folders, tmp_path):
    (tmp_path / "empty").mkdir()
    no_mask = save_modernbert(tmp_path / "no-mask", mask=False)
    return {
        "missing folder": ((str(tmp_path / "nowhere"),), {}, "missing folder"),
        "folder without config": ((tmp_path / "empty",), {}, "without one"),
        "dlmprobe checkpoint folder": ((CHECKPOINT_DIR / shipped_checkpoints()[0],), {}, "Hugging Face config"),
        "remote code without the flag": ((folders["llada"],), {}, "--trust-remote-code"),
        "no mask token": ((no_mask,), {}, "no mask token"),
        "unknown hub id offline": (("nobody-here/no-such-model",), {"local_files_only": True}, "no such model"),
        "unknown dtype": ((folders["modernbert"],), {"dtype": "float8"}, "dtype"),
    }


def test_bad_models_give_one_line(folders, tmp_path):
    for case, (args, kwargs, match) in _bad_model_cases(folders, tmp_path).items():
        with pytest.raises(DlmprobeInputError, match=match) as err:
            load_hf_model(*args, **kwargs)
        assert "\n" not in str(err.value), case
