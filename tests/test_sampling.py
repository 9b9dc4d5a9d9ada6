from types import SimpleNamespace

import pytest
import torch

from dlmprobe.models import random_model
from dlmprobe.sampling import (
    NOT_COMMITTED,
    AutoregressiveSamplerConfig,
    DiffusionSamplerConfig,
    generate,
    make_canvas,
    prefixes,
    sample,
    summarise,
    tokens_per_step,
)
from dlmprobe.sampling.diffusion import _scores


@pytest.fixture
def diffusion(tiny_config):
    return random_model(tiny_config)


@pytest.fixture
def autoregressive(tiny_config):
    return random_model(tiny_config.twin())


def test_budget_is_even_with_remainder_first():
    assert tokens_per_step(10, 4) == [3, 3, 2, 2]
    assert tokens_per_step(4, 4) == [1, 1, 1, 1]
    assert sum(tokens_per_step(37, 5)) == 37


def _check_trajectory(tr, mask_id):
    gen = tr.gen_slice
    assert (tr.canvases[:, 0, gen] == mask_id).all()
    assert (tr.canvases[:, -1, gen] != mask_id).all()
    # A committed token never changes afterwards.
    for s in range(tr.n_steps):
        before, after = tr.canvases[:, s], tr.canvases[:, s + 1]
        committed = before != mask_id
        assert torch.equal(before[committed], after[committed])
    # commit_step agrees with the canvases.
    steps = tr.target_commit_step
    assert (steps >= 0).all()
    for s in range(tr.n_steps):
        newly = (tr.canvases[:, s, gen] == mask_id) & (tr.canvases[:, s + 1, gen] != mask_id)
        assert torch.equal(newly, steps == s)
    assert (tr.commit_step[:, : tr.gen_start] == NOT_COMMITTED).all()


@pytest.mark.parametrize("order", ["confidence", "margin", "entropy", "random"])
def test_diffusion_commits_every_token_once_and_keeps_it(diffusion, order):
    task = diffusion.task
    exs = task.sample(6, "eval")
    tr = generate(diffusion.model, task, exs, "diffusion", DiffusionSamplerConfig(order=order))
    assert tr.n_steps == task.target_length
    assert tr.canvases.shape == (6, task.target_length + 1, task.sequence_length)
    _check_trajectory(tr, task.vocab.mask_id)
    # One token per step with the default budget.
    assert all(sorted(row.tolist()) == list(range(task.target_length)) for row in tr.target_commit_step)
    # Predictions and confidences are recorded for every position at every step.
    assert (tr.confidence > 0).all() and (tr.confidence <= 1).all()


def test_confidence_order_commits_the_most_confident_position(diffusion):
    task = diffusion.task
    tr = generate(diffusion.model, task, task.sample(4, "eval"), "diffusion")
    gen = tr.gen_slice
    for s in range(tr.n_steps):
        conf = tr.confidence[:, s, gen].clone()
        conf[tr.canvases[:, s, gen] != task.vocab.mask_id] = -1
        chosen = (tr.target_commit_step == s).float().argmax(-1)
        assert torch.equal(chosen, conf.argmax(-1))


def test_blocks_are_filled_left_to_right(diffusion):
    task = diffusion.task  # 3 target tokens: use one-token blocks
    config = DiffusionSamplerConfig(steps=3, block_length=1)
    tr = generate(diffusion.model, task, task.sample(5, "eval"), "diffusion", config)
    assert (tr.target_commit_step == torch.arange(3)).all()


def test_several_tokens_per_step(diffusion):
    task = diffusion.task
    config = DiffusionSamplerConfig(steps=2)
    tr = generate(diffusion.model, task, task.sample(5, "eval"), "diffusion", config)
    counts = [(tr.target_commit_step == s).sum(-1).tolist() for s in range(2)]
    assert counts == [[2] * 5, [1] * 5]


@pytest.mark.parametrize(
    "steps,block_length,message",
    [(3, 2, "block_length must divide"), (2, 1, "multiple of the number of blocks"), (4, None, "exceeds block_length")],
)
def test_bad_schedules_are_refused(diffusion, steps, block_length, message):
    task = diffusion.task
    with pytest.raises(ValueError, match=message):
        generate(diffusion.model, task, task.sample(2, "eval"), "diffusion",
                 DiffusionSamplerConfig(steps=steps, block_length=block_length))


def test_temperature_sampling_is_seeded(diffusion):
    task = diffusion.task
    exs = task.sample(16, "eval")
    a = generate(diffusion.model, task, exs, "diffusion", DiffusionSamplerConfig(temperature=1.0, seed=1))
    b = generate(diffusion.model, task, exs, "diffusion", DiffusionSamplerConfig(temperature=1.0, seed=1))
    c = generate(diffusion.model, task, exs, "diffusion", DiffusionSamplerConfig(temperature=1.0, seed=2))
    assert torch.equal(a.canvases, b.canvases)
    assert not torch.equal(a.canvases, c.canvases)


def test_batched_equals_one_by_one(diffusion):
    task = diffusion.task
    exs = task.sample(5, "eval")
    whole = generate(diffusion.model, task, exs, "diffusion")
    single = generate(diffusion.model, task, exs, "diffusion", batch_size=1)
    assert torch.equal(whole.canvases, single.canvases)
    assert torch.allclose(whole.confidence, single.confidence, atol=1e-5)


def test_callback_can_remask_and_the_sampler_refills(diffusion):
    task = diffusion.task
    mask = task.vocab.mask_id
    seen = []

    def remask_first_commit(step, rows, canvas):
        seen.append(step)
        if step == 0:
            canvas[:, task.target_start : task.target_start + task.target_length] = mask
            return canvas
        return None

    tr = generate(diffusion.model, task, task.sample(3, "eval"), "diffusion", callback=remask_first_commit)
    assert seen == [0, 1, 2]
    assert (tr.canvases[:, 1, tr.gen_slice] == mask).all()
    assert (tr.canvases[:, -1, tr.gen_slice] != mask).all()  # the last step commits what is left


def test_autoregressive_writes_left_to_right(autoregressive):
    task = autoregressive.task
    tr = generate(autoregressive.model, task, task.sample(4, "eval"), "autoregressive")
    assert (tr.target_commit_step == torch.arange(task.target_length)).all()
    _check_trajectory(tr, task.vocab.mask_id)
    # Only the written position carries a prediction at each step.
    written = tr.predictions[:, :, tr.gen_slice] >= 0
    assert torch.equal(written, torch.eye(task.target_length, dtype=torch.bool).expand(4, -1, -1))
    assert torch.equal(tr.predictions[:, :, tr.gen_slice].diagonal(dim1=1, dim2=2), tr.output)


def test_autoregressive_greedy_matches_full_sequence_argmax(autoregressive):
    task = autoregressive.task
    tr = generate(autoregressive.model, task, task.sample(4, "eval"), "autoregressive")
    logits = autoregressive.model(tr.canvases[:, -1])
    logits[..., task.vocab.mask_id] = float("-inf")  # the sampler never writes <mask>
    expected = logits[:, task.target_start - 1 : task.target_start + task.target_length - 1].argmax(-1)
    assert torch.equal(expected, tr.output)


def test_kind_and_sampler_must_match(diffusion):
    with pytest.raises(ValueError, match="needs a AutoregressiveSamplerConfig"):
        generate(diffusion.model, diffusion.task, diffusion.task.sample(1, "eval"), "autoregressive",
                 DiffusionSamplerConfig())


def test_prompt_longer_than_context_is_refused(diffusion):
    from dlmprobe.tasks import get_task

    longer = get_task("arith", n_ops=8)
    with pytest.raises(ValueError, match="the model's context is"):
        generate(diffusion.model, longer, longer.sample(1, "eval"), "diffusion")


def test_low_level_sampler_accepts_raw_prefixes(diffusion):
    canvas = make_canvas(torch.tensor([[1, 5, 6, 2]]), 3, 4)
    assert canvas.tolist() == [[1, 5, 6, 2, 4, 4, 4]]
    tr = sample(diffusion.model, canvas, 4, 3, 4, DiffusionSamplerConfig())
    assert tr.canvases.shape == (1, 4, 7) and (tr.output != 4).all()
    assert AutoregressiveSamplerConfig().temperature == 0


def test_fixed_tokens_in_the_generated_region_are_kept_and_never_committed(diffusion):
    """A canvas template `[MASK]*r fixed [MASK]*a`: the budget counts only the masked positions."""
    task, mask = diffusion.task, diffusion.task.vocab.mask_id
    prefix, suffix = prefixes(task, task.sample(4, "eval"))
    canvas = make_canvas(prefix, task.target_length, mask, suffix)
    fixed = task.target_start + 1
    canvas[:, fixed] = 7
    tr = sample(diffusion.model, canvas, task.target_start, task.target_length, mask, DiffusionSamplerConfig(steps=1))
    assert (tr.canvases[:, :, fixed] == 7).all() and (tr.commit_step[:, fixed] == NOT_COMMITTED).all()
    assert (tr.output != mask).all()
    # Two steps over two masked positions: one each (a budget from the block length would commit both at once).
    tr = sample(diffusion.model, canvas, task.target_start, task.target_length, mask, DiffusionSamplerConfig(steps=2))
    assert ((tr.target_commit_step == 0).sum(-1) == 1).all() and ((tr.target_commit_step == 1).sum(-1) == 1).all()
    ar = random_model(diffusion.config.twin())
    tr = sample(ar.model, canvas, task.target_start, task.target_length, mask, AutoregressiveSamplerConfig())
    assert (tr.canvases[:, -1, fixed] == 7).all() and (tr.commit_step[:, fixed] == NOT_COMMITTED).all()
    assert (tr.output != mask).all()


class _HuggingFaceStyle(torch.nn.Module):
    """A model whose forward returns an object with ``.logits``, as Hugging Face models do."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, tokens):
        return SimpleNamespace(logits=self.inner(tokens))


def test_a_model_returning_an_object_with_logits_samples_the_same(diffusion):
    task = diffusion.task
    exs = task.sample(3, "eval")
    expected = generate(diffusion.model, task, exs, "diffusion")
    got = generate(_HuggingFaceStyle(diffusion.model), task, exs, "diffusion")
    assert torch.equal(got.canvases, expected.canvases)


def test_observers_and_callbacks_are_told_the_step_and_the_rows(diffusion):
    task = diffusion.task
    told = []

    class Observer:
        def begin_step(self, step, rows, canvas):
            told.append(("observer", step, rows.tolist(), canvas.shape[0]))

    def callback(step, rows, canvas):
        told.append(("callback", step, rows.tolist(), canvas.shape[0]))

    generate(diffusion.model, task, task.sample(5, "eval"), "diffusion", batch_size=3, callback=callback,
             observers=[Observer()])
    expected = [(who, step, rows, len(rows)) for rows in ([0, 1, 2], [3, 4]) for step in range(3)
                for who in ("observer", "callback")]
    assert told == expected


@pytest.mark.parametrize("order", ["confidence", "margin", "entropy"])
def test_commit_scores_equal_their_softmax_definitions(order, monkeypatch):
    """Over the full vocabulary softmax, mask included (as LLaDA and Dream compute them), chunked."""
    monkeypatch.setattr("dlmprobe.sampling.scores.CHUNK_VALUES", 22)  # 2 positions a chunk: chunks are exercised
    logits = torch.randn(3, 5, 11) * 4
    mask_id = 2
    logits[0, 0, mask_id] = 50.0  # the mask is the argmax here: never chosen, still in the softmax
    probs = torch.softmax(logits, -1)
    allowed = probs.clone()
    allowed[..., mask_id] = 0
    top2 = allowed.topk(2, -1).values
    expected = {
        "confidence": top2[..., 0],
        "margin": top2[..., 0] - top2[..., 1],
        "entropy": (probs * torch.log(probs + 1e-10)).sum(-1),
    }[order]
    exact = summarise(logits, mask_id, 0.0, torch.Generator(), entropy=True)
    assert (exact.chosen != mask_id).all() and torch.equal(exact.chosen, allowed.argmax(-1))
    assert torch.allclose(_scores(order, exact, torch.Generator()), expected, atol=1e-6)


def test_autoregressive_remasked_positions_stay_masked(autoregressive):
    """The autoregressive sampler never revisits a position it has passed."""
    task, mask = autoregressive.task, autoregressive.task.vocab.mask_id

    def remask_first(step, rows, canvas):
        if step == 1:
            canvas[:, task.target_start] = mask
            return canvas
        return None

    tr = generate(autoregressive.model, task, task.sample(3, "eval"), "autoregressive", callback=remask_first)
    assert (tr.output[:, 0] == mask).all() and (tr.output[:, 1:] != mask).all()
    assert (tr.commit_step[:, task.target_start] == NOT_COMMITTED).all()


@pytest.mark.parametrize("kind,config,first_step", [
    ("diffusion", DiffusionSamplerConfig(), 1),
    ("diffusion", DiffusionSamplerConfig(order="margin", steps=3, block_length=3), 2),
    ("autoregressive", AutoregressiveSamplerConfig(), 2),
])
def test_a_branch_at_step_t_equals_the_run_from_step_0(diffusion, autoregressive, kind, config, first_step):
    ckpt = diffusion if kind == "diffusion" else autoregressive
    task = ckpt.task
    exs = task.sample(7, "eval")
    whole = generate(ckpt.model, task, exs, kind, config, batch_size=3)
    told = []

    class Observer:
        def begin_step(self, step, rows, canvas):
            told.append(step)

    branched = generate(ckpt.model, task, exs, kind, config, batch_size=3, branch=whole, first_step=first_step,
                        observers=[Observer()])
    for field in ("canvases", "predictions", "commit_step"):
        assert torch.equal(getattr(branched, field), getattr(whole, field)), field
    assert torch.allclose(branched.confidence, whole.confidence, rtol=0, atol=0, equal_nan=True)  # NaN: no prediction
    assert told == [s for _ in range(3) for s in range(first_step, whole.n_steps)]  # the steps before are not run


def test_a_branch_of_a_block_schedule_takes_up_the_budget_of_the_block_under_way(diffusion):
    task = diffusion.task
    exs = task.sample(4, "eval")
    config = DiffusionSamplerConfig(steps=2)  # commits 2 then 1: resuming at step 1 must commit 1, not 2
    whole = generate(diffusion.model, task, exs, "diffusion", config)
    branched = generate(diffusion.model, task, exs, "diffusion", config, branch=whole, first_step=1)
    assert torch.equal(branched.commit_step, whole.commit_step)


def test_branching_needs_a_deterministic_sampler_and_a_matching_run(diffusion):
    task = diffusion.task
    exs = task.sample(3, "eval")
    noisy = DiffusionSamplerConfig(temperature=1.0)
    run = generate(diffusion.model, task, exs, "diffusion", noisy)
    with pytest.raises(ValueError, match="deterministic sampler"):
        generate(diffusion.model, task, exs, "diffusion", noisy, branch=run, first_step=1)
    with pytest.raises(ValueError, match="needs a branch run of all 2 examples"):
        generate(diffusion.model, task, exs[:2], "diffusion", branch=run, first_step=1)
