"""Autoregressive sampling at real scale: a KV cache that changes nothing, and capture while sampling.

Tiny Llama and Qwen2 causal LMs built from their transformers configs; a left-padded batch, so the
attention mask goes through every forward pass (and the nnsight trace of the recorder).
"""

import pytest
import torch
from hf_fixtures import save_llama, save_qwen2

from dlmprobe.hooks import ActivationRecorder
from dlmprobe.models import random_model
from dlmprobe.models.handle import from_checkpoint
from dlmprobe.models.huggingface import load_hf_model
from dlmprobe.sampling import AutoregressiveSamplerConfig, generate, make_canvas, sample
from dlmprobe.sampling.forward import has_kv_cache

SAVERS = {"llama": save_llama, "qwen2": save_qwen2}
GEN = 6


@pytest.fixture(scope="module", params=list(SAVERS))
def handle(request, tmp_path_factory):
    return load_hf_model(SAVERS[request.param](tmp_path_factory.mktemp(request.param)))


def _batch(handle):
    """Two prompts of 5 and 3 tokens, left-padded; a placeholder id marks the generated region."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, handle.vocab_size, (2, 5), generator=generator)
    prompt[1, :2] = handle.tokenizer.pad_token_id
    attention = torch.ones(2, 5 + GEN, dtype=torch.long)
    attention[1, :2] = 0
    placeholder = handle.vocab_size - 1  # a causal LM has no mask token: any id stands for "not written"
    return make_canvas(prompt, GEN, placeholder), attention, placeholder


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_sampling_equals_recomputing_the_prefix(handle, temperature):
    assert handle.kind == "autoregressive" and has_kv_cache(handle.module)
    canvas, attention, placeholder = _batch(handle)
    runs = [sample(handle, canvas, 5, GEN, placeholder, AutoregressiveSamplerConfig(temperature, seed=2, use_cache=cache),
                   attention_mask=attention) for cache in (True, False)]
    assert torch.equal(runs[0].canvases, runs[1].canvases)
    assert torch.equal(runs[0].predictions, runs[1].predictions)
    assert torch.allclose(runs[0].confidence, runs[1].confidence, atol=1e-5, equal_nan=True)


def test_kv_cache_is_dropped_when_a_callback_edits_a_cached_position(handle):
    canvas, attention, placeholder = _batch(handle)

    def edit(step, rows, canvas):
        if step == 2:
            canvas[:, 6] = 7  # a position the cache already holds
            return canvas
        return None

    runs = [sample(handle, canvas, 5, GEN, placeholder, AutoregressiveSamplerConfig(use_cache=cache),
                   attention_mask=attention, callback=edit) for cache in (True, False)]
    assert torch.equal(runs[0].canvases, runs[1].canvases)


@pytest.mark.parametrize("use_cache", [True, False])
def test_incremental_capture_equals_one_forward_pass_over_the_final_sequence(handle, use_cache):
    canvas, attention, placeholder = _batch(handle)
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    length = canvas.shape[1]
    with ActivationRecorder(handle, sites, positions=range(length)) as recorder:
        run = sample(recorder.model, canvas, 5, GEN, placeholder, AutoregressiveSamplerConfig(use_cache=use_cache),
                     attention_mask=attention, observers=[recorder])
        capture = recorder.pop()
    _, exact = handle.run_with_cache(run.canvases[:, -1], sites, attention_mask=attention)
    for site in sites:
        got = capture.activations[site]  # (batch, step, pos, d)
        assert got.shape == (2, GEN, length, handle.d_model)
        for step in range(GEN):
            read = 5 + step  # the positions step s read before writing 5 + s
            assert (got[:, step, :read] - exact[site][:, :read].float()).abs().max() <= 1e-5
            assert got[:, step, read:].isnan().all()


def test_recording_the_builtin_twin_while_it_samples(tiny_config):
    ckpt = random_model(tiny_config.twin())
    task = ckpt.task
    examples = task.sample(3, "eval")
    with ActivationRecorder(from_checkpoint(ckpt), "blocks.*.hook_resid_post") as recorder:
        run = generate(recorder.model, task, examples, "autoregressive", observers=[recorder])
        capture = recorder.pop()
    _, cache = ckpt.model.run_with_cache(run.canvases[:, -1])
    got = capture.activations["blocks.1.hook_resid_post"]
    for step in range(run.n_steps):
        read = task.target_start + step
        assert (got[:, step, :read] - cache["blocks.1.hook_resid_post"][:, :read]).abs().max() <= 1e-5
        assert got[:, step, read:].isnan().all()


def test_editor_by_site_name_on_a_handle_edits_kv_cached_steps(handle):
    from dlmprobe.hooks import ActivationEditor

    canvas, attention, placeholder = _batch(handle)
    config = AutoregressiveSamplerConfig()
    clean = sample(handle, canvas, 5, GEN, placeholder, config, attention_mask=attention)
    where = torch.zeros(canvas.shape, dtype=torch.bool)
    where[:, 5:] = True  # only generated positions: each is computed by one KV-cached pass
    seen = []

    def record(h, rows, positions):
        seen.extend(positions.tolist())
        return h

    with ActivationEditor(handle, "blocks.0.hook_resid_post", record, where) as editor:
        same = sample(handle, canvas, 5, GEN, placeholder, config, attention_mask=attention, observers=[editor])
    assert torch.equal(same.canvases, clean.canvases)
    assert sorted(set(seen)) == list(range(5, 5 + GEN - 1))  # the last written token is never read
    with ActivationEditor(handle, "blocks.0.hook_resid_post", lambda h, rows, positions: h * 0 + 3.0, where) as editor:
        edited = sample(handle, canvas, 5, GEN, placeholder, config, attention_mask=attention, observers=[editor])
    assert not torch.equal(edited.canvases, clean.canvases)
