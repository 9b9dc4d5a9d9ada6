"""DiffusionGemma (no mask token) through its own generate loop: capture, settle steps, store, analyses."""

import numpy as np
import pytest
import torch
from gemma_fixtures import build_diffusiongemma, fixture_task, recompute_decoder, save_diffusiongemma
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from dlmprobe.analyses import commit_order, decodability, planning_lead, trajectory_view
from dlmprobe.capture_native import NO_MASK, capture_native
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.probes.baselines import label_rows
from dlmprobe.probes.features import frontier_positions
from dlmprobe.sampling import NOT_COMMITTED
from dlmprobe.sampling.native import run_native, settle_steps
from dlmprobe.store import ActivationDataset

STEPS = 6
TEMPERATURES = {"t_min": 0.4, "t_max": 0.8}
EDIT_POSITION, EDIT_TOKEN = -2, 11  # canvas column overwritten by the faithfulness callback, with the token "6"


@pytest.fixture(scope="module")
def task():
    return fixture_task()


@pytest.fixture(scope="module")
def model(task):
    return build_diffusiongemma(task)


def _prompts(task, n=3):
    vocab = task.vocab
    return torch.tensor([[vocab.bos_id, *ex.prompt, vocab.sep_id] for ex in task.sample(n, split="eval", seed=1)])


def _edit(step, rows, canvas):
    edited = canvas.clone()
    edited[:, EDIT_POSITION] = EDIT_TOKEN
    return edited


@pytest.fixture(scope="module")
def store(tmp_path_factory, model, task):
    path = tmp_path_factory.mktemp("gemma") / "gemma.h5"
    return capture_native(model, task, path, n=24, steps=STEPS, batch_size=8, dtype="float32", model_name="tiny-gemma",
                          **TEMPERATURES)


def _recompute(model, prompts, canvases, steps):
    return recompute_decoder(model, prompts, canvases, steps, **TEMPERATURES)


def test_bidirectional_encoder_config_fails_in_this_transformers(task):
    # Why the fixture keeps a causal encoder (see gemma_fixtures): if this starts passing, switch it.
    model = build_diffusiongemma(task, bidirectional_encoder=True)
    with pytest.raises(TypeError, match="is_causal"):
        model.generate(_prompts(task, 1), max_new_tokens=task.target_length + 1, max_denoising_steps=2)


def test_saved_fixture_loads_with_the_task_vocabulary(tmp_path, task):
    folder = save_diffusiongemma(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder)
    assert tokenizer.convert_ids_to_tokens(list(range(len(task.vocab)))) == list(task.vocab.tokens)
    assert model.config.canvas_length == task.target_length + 1
    assert model.config.get_text_config().vocab_size == len(task.vocab)


def test_native_run_is_the_models_own_generate(model, task):
    prompts = _prompts(task)
    run = run_native(model, prompts, ["blocks.*.hook_resid_post"], steps=STEPS, seed=5, **TEMPERATURES)
    torch.manual_seed(5)
    plain = model.generate(prompts, max_new_tokens=model.config.canvas_length, max_denoising_steps=STEPS,
                           stability_threshold=STEPS + 1, **TEMPERATURES).sequences
    t = run.trajectory
    assert torch.equal(t.canvases[:, -1], plain)
    assert t.canvases.shape == (3, STEPS + 1, prompts.shape[1] + model.config.canvas_length)
    assert (t.canvases[:, :, : t.gen_start] == prompts[:, None]).all()
    assert t.commit_rule == "settle"
    # The random initial canvas is not the output, and the canvas changes between steps.
    assert not torch.equal(t.canvases[:, 0, t.gen_slice], t.output)
    assert (t.predictions[:, :, : t.gen_start] == -1).all() and (t.predictions[:, :, t.gen_slice] >= 0).all()
    confidence = t.confidence[:, :, t.gen_slice]
    assert ((confidence > 0) & (confidence <= 1)).all() and t.confidence[:, :, : t.gen_start].isnan().all()
    assert set(run.activations) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    assert run.activations["blocks.1.hook_resid_post"].shape == (3, STEPS, model.config.canvas_length, 32)


def test_settle_steps_by_hand():
    # One position: tokens 5, 7, 5, 5 (final 5): it differs last at canvas 1, so step 1 settled it.
    # Another: 9 everywhere, never differs; another changes at the very last canvas.
    canvases = torch.tensor([[[5, 9, 1], [7, 9, 1], [5, 9, 1], [5, 9, 2]]])
    assert settle_steps(canvases).tolist() == [[1, NOT_COMMITTED, 2]]
    with pytest.raises(DlmprobeInputError):
        settle_steps(torch.zeros((1, 1, 3), dtype=torch.long))


def test_settle_steps_agree_with_stored_canvases(store):
    with ActivationDataset(store) as data:
        canvas, commit = data.canvas, data.commit_step
        assert data.mask_id == NO_MASK and data.config["commit_rule"] == "settle"
        final = canvas[:, -1]
        steps = np.arange(canvas.shape[1])[None, :, None]
        settled = canvas == final[:, None]
        # From commit_step + 1 on the canvas holds the final token; at commit_step it does not.
        assert settled[steps > commit[:, None]].all()
        rows, pos = np.nonzero(commit >= 0)
        assert not settled[rows, commit[rows, pos], pos].any()
        assert (commit[:, : data.target_start] == NOT_COMMITTED).all()  # the prompt never changes
        assert (commit[:, data.target_start :] >= 0).mean() > 0.5  # most generated positions settle during the run


@pytest.mark.parametrize("callback", [None, _edit], ids=["plain", "edited"])
def test_activations_equal_a_recomputation_on_each_steps_canvas(model, task, callback):
    prompts = _prompts(task)
    run = run_native(model, prompts, ["blocks.*.hook_resid_post"], steps=STEPS, seed=2, callback=callback, **TEMPERATURES)
    t = run.trajectory
    canvases = t.canvases[:, :STEPS, t.gen_slice]
    if callback is not None:
        # The edit is what the decoder read from step 1 on, and the model's loop carried it.
        assert (canvases[:, 1:, EDIT_POSITION] == EDIT_TOKEN).all()
        assert (canvases[:, 0, EDIT_POSITION] != EDIT_TOKEN).any()
    recomputed = _recompute(model, prompts, canvases, STEPS)
    for layer in range(2):
        stored = run.activations[f"blocks.{layer}.hook_resid_post"]
        assert (stored - recomputed[layer]).abs().max() <= 1e-5


def test_store_activations_equal_the_runs(store, model, task):
    with ActivationDataset(store) as data:
        assert data.n_examples == 24 and list(data.steps) == list(range(STEPS))
        assert list(data.positions) == list(range(data.target_start, data.target_start + task.target_length))
        prompts = torch.tensor(data.canvas[:8, 0, : data.target_start], dtype=torch.long)
        canvases = torch.tensor(data.canvas[:8, :STEPS, data.target_start :], dtype=torch.long)
        recomputed = _recompute(model, prompts, canvases, STEPS)
        for step in (0, STEPS - 1):
            stored = data.activations("blocks.1.hook_resid_post", step)[:8]
            assert np.abs(stored - recomputed[1, :, step, : task.target_length].numpy()).max() <= 1e-5


def test_commit_order_and_trajectory_view_read_the_store(store):
    with ActivationDataset(store) as data:
        order = commit_order(data, reasoning="intermediate")
        assert set(order.table["label"]) >= {"answer", "intermediate"}
        assert order.table["n_positions"].sum() > 0
        view = trajectory_view(data, example=0)
        assert len(view.table) == STEPS * data.output.shape[1]
        commit = data.commit_step[0, data.target_start : data.target_start + data.output.shape[1]]
        assert (view.table["commit_step"].to_numpy() == commit[view.table["position"].to_numpy()]).all()
        # "masked" is "not yet settled" here: the canvas never holds a mask token.
        pending = view.table["step"].to_numpy() <= view.table["commit_step"].to_numpy()
        assert (view.table["masked"].to_numpy() == pending).all() and pending.any() and not pending.all()


def test_rows_before_commit_follow_the_settle_rule(store):
    with ActivationDataset(store) as data:
        slots, _ = data.label("answer")
        commit = data.commit_step[np.arange(data.n_examples)[:, None], data.target_start + slots]
        target = data.commit_step[:, data.target_start : data.target_start + data.output.shape[1]]
        for step in range(STEPS):
            assert len(label_rows(data, "answer", step)) == (step <= commit).sum() > 0
            # The frontier is the position before the first target position not yet settled.
            pending = step <= target
            first = np.where(pending.any(axis=1), pending.argmax(axis=1), target.shape[1])
            assert (frontier_positions(data, step) == data.target_start - 1 + first).all()


def test_decodability_before_settle(store):
    """Without a mask token "before commit" is "not yet settled": step <= commit_step."""
    with ActivationDataset(store) as data:
        result = decodability(data, folds=2, control=False, random_baseline=False, bootstrap=10, progress=False)
        slots, _ = data.label(data.config["task"]["answer_label"])
        commit = data.commit_step[np.arange(data.n_examples)[:, None], data.target_start + slots]
        table = result.table
        assert (commit >= 0).any() and ((commit < STEPS - 1) & (commit >= 0)).any()  # rows settle at different steps
        assert 0 in set(table["step"])
        for step, rows in table.groupby("step")["n_rows"]:
            assert (rows == (step <= commit).sum()).all(), step
        lead = planning_lead(data, folds=2, progress=False).tables["rows"]
        assert len(lead) == (commit >= 0).sum() and (lead["lead_probe"] >= 0).all()


def test_decodability_with_its_default_controls(store):
    """Control task and input baselines run; the lens and the random-weights baseline are named as left out."""
    with ActivationDataset(store) as data:
        result = decodability(data, folds=2, bootstrap=10, progress=False)
        table = result.table
        assert {"control_accuracy", "majority", "baseline_position_accuracy", "baseline_givens_accuracy",
                "readout_accuracy"} <= set(table)
        assert table["baseline_givens_accuracy"].notna().all()
        left_out = result.meta["readers_left_out"]
        assert "no logit lens" in left_out and "no random-weights baseline" in left_out and "generate loop" in left_out
        assert "random_weights_accuracy" not in table and "lens_accuracy" not in table


def test_bad_arguments_are_refused(model, task, tmp_path):
    prompts = _prompts(task, 1)
    with pytest.raises(DlmprobeInputError, match="decoder site"):
        run_native(model, prompts, ["blocks.0.attn.hook_z"], steps=2)
    with pytest.raises(DlmprobeInputError, match="steps"):
        run_native(model, prompts, steps=0)
    with pytest.raises(DlmprobeInputError, match="max_denoising_steps"):
        run_native(model, prompts, steps=2, max_denoising_steps=3)
    with pytest.raises(DlmprobeInputError, match="prompt unchanged"):
        run_native(model, prompts, steps=2, callback=lambda step, rows, canvas: torch.zeros_like(canvas))
    from dlmprobe.tasks import get_task
    with pytest.raises(DlmprobeInputError, match="canvas"):
        capture_native(model, get_task("arith", n_ops=4), tmp_path / "x.h5", n=2, steps=2)
