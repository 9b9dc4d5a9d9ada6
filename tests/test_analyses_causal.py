"""Causal check of probes: subspaces, hooked sampling with edits from a given step, the analysis."""

import numpy as np
import pytest
import torch

from dlmprobe.analyses.causal import ablation_edit, causal_check, sample_conditions
from dlmprobe.capture import CacheConfig, run_cache
from dlmprobe.hooks import ActivationEditor
from dlmprobe.models import load_model, random_model
from dlmprobe.probes.linear import LinearProbe
from dlmprobe.probes.subspaces import (
    leace_subspace,
    pca_subspace,
    probe_subspace,
    random_subspace,
)
from dlmprobe.sampling import DiffusionSamplerConfig, generate
from dlmprobe.store import ActivationDataset

SITE = "blocks.3.hook_resid_post"


def _no_hooks(model) -> bool:
    return all(not point.fwd_hooks for point in model.hook_dict.values())


def _target_positions(task, n):
    where = torch.zeros((n, task.sequence_length), dtype=torch.bool)
    where[:, task.target_start : task.target_start + task.target_length] = True
    return where


@pytest.fixture
def tiny(tiny_config):
    ckpt = random_model(tiny_config)
    return ckpt, ckpt.task.sample(12, split="eval", seed=0)


@pytest.fixture(scope="module")
def sudoku(tmp_path_factory):
    """The shipped sudoku denoiser and a small store of its last residual stream."""
    path = tmp_path_factory.mktemp("causal") / "sudoku.h5"
    run_cache(CacheConfig(model="sudoku-diffusion", n=24, sites=[SITE], positions="target", dtype="float32"),
              path, progress=False)
    data = ActivationDataset(path)
    yield load_model("sudoku-diffusion"), data
    data.close()


def test_probe_subspace_is_centred_orthonormal_and_blinds_the_probe():
    rng = np.random.default_rng(0)
    coef = rng.standard_normal((4, 16))
    space = probe_subspace(coef)
    U = space.read.double().numpy()
    assert space.rank == 3 and np.allclose(U.T @ U, np.eye(3), atol=1e-6)
    X = torch.as_tensor(rng.standard_normal((50, 16)), dtype=torch.float32)
    logits = space.move(X, torch.zeros(16)).double().numpy() @ coef.T
    assert np.allclose(logits - logits[:, :1], (logits - logits[:, :1])[0], atol=1e-4)  # the same for every row
    assert probe_subspace(np.tile(coef[:1], (4, 1))).rank == 0  # identical classes: nothing to remove


def test_leace_gives_every_class_the_same_mean_and_a_blind_probe():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=600)
    X = rng.standard_normal((600, 12)) * np.linspace(0.1, 3, 12) + rng.standard_normal((4, 12))[y]
    space = leace_subspace(X, y)
    erased = space.move(torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(X.mean(0), dtype=torch.float32)).numpy()
    means = np.stack([erased[y == c].mean(0) for c in range(4)])
    assert space.rank == 3 and np.abs(means - means.mean(0)).max() < 1e-3
    assert LinearProbe().fit(X[:400], y[:400]).score(X[400:], y[400:]) > 0.8
    assert LinearProbe().fit(erased[:400], y[:400]).score(erased[400:], y[400:]) < 0.4


def test_random_subspace_is_orthonormal_and_seeded():
    space = random_subspace(16, 5, seed=3)
    U = space.read.double().numpy()
    assert np.allclose(U.T @ U, np.eye(5), atol=1e-6)
    assert torch.equal(space.read, random_subspace(16, 5, seed=3).read)
    assert not torch.equal(space.read, random_subspace(16, 5, seed=4).read)


def test_pca_subspace_finds_the_highest_variance_axes():
    X = np.random.default_rng(0).standard_normal((500, 6)) * np.array([1, 5, 1, 4, 1, 1])
    U = pca_subspace(X, 2).read.numpy()
    assert set(np.abs(U).argmax(axis=0)) == {1, 3} and np.allclose(U.T @ U, np.eye(2), atol=1e-6)


def test_a_zero_rank_ablation_changes_nothing(tiny):
    ckpt, examples = tiny
    task, d = ckpt.task, ckpt.config.d_model
    clean = generate(ckpt.model, task, examples, "diffusion", batch_size=5)
    edit = ablation_edit(probe_subspace(np.ones((3, d))), torch.zeros(d))
    (run,) = sample_conditions(ckpt.model, task, examples, "blocks.1.hook_resid_post",
                               _target_positions(task, len(examples)), [(edit, 1)], DiffusionSamplerConfig(), clean, 5)
    for field in ("canvases", "predictions", "confidence"):
        assert torch.equal(getattr(run, field), getattr(clean, field)), field


def test_conditions_sampled_together_equal_each_condition_alone(tiny):
    """Rows of several conditions share batches; each condition's run is the one it gets alone."""
    ckpt, examples = tiny
    task, site = ckpt.task, "blocks.1.hook_resid_post"
    where = _target_positions(task, len(examples))
    where[::3, task.target_start + 1] = False
    conditions = [
        (lambda h, e, p: h + torch.linspace(-3, 3, h.shape[-1]), 0),
        (lambda h, e, p: h * (1 + e.unsqueeze(1) % 3), 1),  # a per-example edit: the rows' example indices
        (lambda h, e, p: -h, 1),
        (lambda h, e, p: -h, 2),
    ]
    clean = generate(ckpt.model, task, examples, "diffusion")
    together = sample_conditions(ckpt.model, task, examples, site, where, conditions, DiffusionSamplerConfig(), clean, 7)
    for (edit, start), run in zip(conditions, together):
        with ActivationEditor(ckpt.model, site, edit, where, start_step=start, mask_id=task.vocab.mask_id) as editor:
            alone = generate(ckpt.model, task, examples, "diffusion", batch_size=5, observers=[editor])
        assert torch.equal(run.canvases, alone.canvases) and torch.equal(run.predictions, alone.predictions)
        assert torch.allclose(run.confidence, alone.confidence, atol=1e-6)
    assert not torch.equal(together[0].canvases, together[3].canvases)  # the conditions do differ


def test_hooks_are_removed_and_the_model_unchanged_when_the_edit_raises(tiny):
    ckpt, examples = tiny
    model, task = ckpt.model, ckpt.task
    tokens = torch.tensor([ex.sequence(task.vocab) for ex in examples])
    before = model(tokens)

    def fail(h, example, position):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        sample_conditions(model, task, examples, "blocks.0.hook_resid_post", _target_positions(task, len(examples)),
                          [(fail, 0)], DiffusionSamplerConfig(), generate(model, task, examples, "diffusion"))
    assert _no_hooks(model) and not model.training
    assert torch.equal(model(tokens), before)


def test_causal_check_on_the_shipped_sudoku_denoiser(sudoku, tmp_path):
    ckpt, data = sudoku
    tokens = torch.as_tensor(data.canvas[:4, 10], dtype=torch.long)
    before = ckpt.model(tokens)
    result = causal_check(ckpt, data, SITE, label="blank", start_steps=[0], n=12, progress=False)
    assert _no_hooks(ckpt.model) and torch.equal(ckpt.model(tokens), before)

    table = result.table.set_index(["intervention", "subspace", "start_step"])
    assert len(table) == 6 and result.meta["ranks"] == {"probe": 5, "leace": 5, "random": 5, "pca": 5}
    assert table.loc[("ablate", "random", 0), "n_positions"] == 12 * ckpt.task.blanks  # every blank is masked at step 0
    assert (table["changed_low"] <= table["changed"]).all() and (table["changed"] <= table["changed_high"]).all()
    # The probe is blinded by removing its subspace and fooled by steering in it, on held-out stored rows.
    assert table.loc[("ablate", "probe", 0), "probe_after"] < 0.35 < table.loc[("ablate", "random", 0), "probe_after"]
    assert table.loc[("steer", "probe", 0), "probe_after"] > 0.9
    # Erasing what is linearly decodable changes the model's answers; controls of the same rank do not, a
    # random subspace nor the principal directions left after erasure, which move activations about as far.
    leace = table.loc[("ablate", "leace", 0)]
    for control in ("random", "pca"):
        assert leace["changed"] > table.loc[("ablate", control, 0), "changed"] + 0.25, control
    assert table.loc[("ablate", "pca", 0), "displacement"] > 0.5 * leace["displacement"]
    assert table.loc[("steer", "leace", 0), "steered"] > 0.8 > 1 / 6
    assert result.meta["clean_solved"] == 1.0 and leace["solved"] < 0.5
    assert f"{100 * leace['changed']:.0f}%" in result.summary
    assert len(result.tables["examples"]) == 6 * 12
    assert (result.save(tmp_path) / "figure.png").is_file()


def test_refuses_bad_inputs_in_one_line(sudoku):
    ckpt, data = sudoku
    cases = [
        ((ckpt, data, "blocks.0.hook_resid_post"), {}, "not in the store"),
        ((load_model("sudoku-autoregressive"), data, SITE), {}, "needs a diffusion checkpoint"),
        ((ckpt, data, SITE), {"start_steps": [36]}, r"start_steps must lie in \[0, 36\)"),
        ((ckpt, data, SITE), {"seed": 0}, "store's own puzzles"),
        ((ckpt, data, SITE), {"subspaces": ["pca"]}, "subspaces must be some of"),
        ((ckpt, data, SITE), {"label": "nope"}, "unknown label"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            causal_check(*args, n=4, progress=False, **kwargs)
        assert "\n" not in str(caught.value)
    assert _no_hooks(ckpt.model)


def test_before_commit_is_still_masked_on_a_masked_store(sudoku):
    """The settle rule (step <= commit_step) and the unmask rule (canvas == mask) agree without remasking."""
    _, data = sudoku
    assert data.commit_rule == "unmask"
    n, length = data.canvas.shape[0], data.canvas.shape[2]
    examples, positions = np.meshgrid(np.arange(n), np.arange(length), indexing="ij")
    for step in range(data.n_steps + 1):
        masked = data.canvas[:, step] == data.mask_id
        assert np.array_equal(data.before_commit(step, examples, positions), masked)
        assert np.array_equal(step <= data.commit_step, masked), step
    X, _, groups = data.get(SITE, int(data.steps[1]), "label", label="blank", only_masked=True)
    slots, _ = data.label("blank")
    assert len(X) == (data.canvas[np.arange(n)[:, None], data.steps[1], data.target_start + slots] == data.mask_id).sum()
