"""Causal check of probes: subspaces, hooked sampling with edits from a given step, the analysis."""

import numpy as np
import pandas as pd
import pytest
import torch

from dlmprobe.analyses.causal import (
    _diagnostics,
    _other_classes,
    _ProbeFit,
    ablation_edit,
    causal_check,
    sample_conditions,
)
from dlmprobe.analyses.nulls import beside_controls, edit_conditions
from dlmprobe.analyses.setting import builtin_setting
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
    (run,) = sample_conditions(builtin_setting(ckpt, 12, 0), "blocks.1.hook_resid_post",
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
    together = sample_conditions(builtin_setting(ckpt, 12, 0), site, where, conditions, DiffusionSamplerConfig(), clean, 7)
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
        sample_conditions(builtin_setting(ckpt, 12, 0), "blocks.0.hook_resid_post", _target_positions(task, len(examples)),
                          [(fail, 0)], DiffusionSamplerConfig(), generate(model, task, examples, "diffusion"))
    assert _no_hooks(model) and not model.training
    assert torch.equal(model(tokens), before)


def test_causal_check_on_the_shipped_sudoku_denoiser(sudoku, tmp_path):
    ckpt, data = sudoku
    tokens = torch.as_tensor(data.canvas[:4, 10], dtype=torch.long)
    before = ckpt.model(tokens)
    result = causal_check(ckpt, data, SITE, label="blank", start_steps=[0], n=12, progress=False)
    assert _no_hooks(ckpt.model) and torch.equal(ckpt.model(tokens), before)

    table = result.table.set_index(["intervention", "subspace", "matched_to", "start_step"])
    # 2 effects x (ablate, steer), 3 controls beside each ablation, steering along the probe at LEACE's size.
    assert len(table) == 11 and result.meta["ranks"] == {name: 5 for name in ("probe", "leace", "random", "pca", "shuffled")}
    leace, probe = table.loc[("ablate", "leace", "", 0)], table.loc[("ablate", "probe", "", 0)]
    assert table.loc[("ablate", "random", "leace", 0), "n_positions"] == 12 * ckpt.task.blanks  # every blank masked at step 0
    assert (table["changed_low"] <= table["changed"]).all() and (table["changed"] <= table["changed_high"]).all()
    # Every control moves the held-out stored rows exactly as far as the effect it sits beside.
    for effect, row in (("leace", leace), ("probe", probe)):
        for control in ("random", "pca", "shuffled"):
            assert table.loc[("ablate", control, effect, 0), "displacement"] == pytest.approx(row["displacement"], rel=1e-3)
    assert table.loc[("steer", "probe", "leace", 0), "displacement"] == pytest.approx(leace["displacement"], rel=1e-3)
    # While sampling the displacements differ (other activations) but stay of one size.
    assert 0.5 < table.loc[("ablate", "random", "leace", 0), "displacement_run"] / leace["displacement_run"] < 2
    # The probe is blinded by removing its subspace and fooled by steering in it, on held-out stored rows;
    # after LEACE not even a fresh probe reads the token, after a random ablation of that size it still does.
    assert probe["probe_after"] < 0.35 < table.loc[("ablate", "random", "probe", 0), "probe_after"]
    assert table.loc[("steer", "probe", "", 0), "probe_after"] > 0.9
    assert leace["retrained_after"] < 0.4 < table.loc[("ablate", "random", "leace", 0), "retrained_after"]
    # Erasing what is linearly decodable changes more answers than any label-blind edit of the same size.
    assert leace["changed_beyond_control"] > 0.2
    assert leace["changed_beyond_control"] == pytest.approx(leace["changed"] - max(
        table.loc[("ablate", c, "leace", 0), "changed"] for c in ("random", "pca", "shuffled")))
    assert table.loc[("steer", "leace", "", 0), "steered"] > 0.8 > 1 / 6
    assert result.meta["clean_solved"] == 1.0 and leace["solved"] < 0.5
    assert f"{100 * leace['changed']:.0f}%" in result.summary and "label-specific part" in result.summary
    assert len(result.tables["examples"]) == 11 * 12
    assert (result.save(tmp_path) / "figure.png").is_file()


def test_refuses_bad_inputs_in_one_line(sudoku):
    ckpt, data = sudoku
    cases = [
        ((ckpt, data, "blocks.0.hook_resid_post"), {}, "not in the store"),
        ((load_model("sudoku-autoregressive"), data, SITE), {}, "needs a diffusion model"),
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


def _planted():
    """Activations whose label lies in class-mean directions, the probe, and edits matched on held-out rows."""
    rng = np.random.default_rng(0)
    means = rng.standard_normal((4, 16)) * 2
    y = rng.integers(0, 4, size=1200)
    X = (means[y] + rng.standard_normal((1200, 16)) * np.linspace(0.3, 2, 16)).astype(np.float32)
    train, check = slice(0, 800), slice(800, None)
    probe = LinearProbe().fit(X[train], y[train])
    class_means = np.stack([X[train][y[train] == c].mean(0) for c in range(4)])
    goal = _other_classes(y[check], 4, 0)
    conditions = edit_conditions(X[train], y[train], probe.coef_, X[check], class_means[goal], seed=0)
    fit = _ProbeFit(probe, probe.score(X[check], y[check]), X[train], y[train], X[check], y[check],
                    X[train].mean(0), class_means)
    return fit, conditions, goal


def test_matched_controls_tell_a_label_specific_effect_from_a_displacement_only_one():
    """Plant two responses to an edit: one reads the label (a linear read-out of the class), one only
    the edit's size. Only the first leaves an effect beyond the displacement-matched controls."""
    fit, conditions, goal = _planted()
    X, mean = torch.as_tensor(fit.X_test), torch.as_tensor(fit.mean)
    reads_label = fit.probe  # the "model" commits what a linear read-out of the label says
    responses = {
        "label": lambda before, after: reads_label.predict(after) != reads_label.predict(before),
        "size": lambda before, after: np.linalg.norm(after - before, axis=1) / 100.0,  # expected changes ∝ norm
    }
    beyond = {}
    for response, changed_by in responses.items():
        records = []
        for c in conditions:
            after = (c.move(X, mean) if c.intervention == "ablate"
                     else c.move(X, torch.as_tensor(fit.class_means[goal]))).numpy()
            changed = float(np.mean(changed_by(fit.X_test, after)))
            records.append({"intervention": c.intervention, "subspace": c.subspace, "matched_to": c.matched_to,
                            "start_step": 0, "changed": changed, "solved": 1 - changed})
        table = beside_controls(pd.DataFrame(records)).set_index(["intervention", "subspace", "matched_to"])
        beyond[response] = table.loc[("ablate", "leace", ""), "changed_beyond_control"]
        assert np.isnan(table.loc[("ablate", "random", "leace"), "changed_beyond_control"])
    assert beyond["label"] > 0.4
    assert abs(beyond["size"]) < 1e-4  # a size-only effect is all reached by the controls of that size


def test_retrained_probe_tells_erased_information_from_a_blinded_probe():
    """After LEACE no fresh probe reads the label; after ablating the probe's own subspace or a matched
    random one, a fresh probe still does (the information stays, only the old probe is blind)."""
    fit, conditions, goal = _planted()
    table = _diagnostics(fit, conditions, goal, 1.0).set_index(["intervention", "subspace", "matched_to"])
    assert fit.accuracy > 0.8
    assert table.loc[("ablate", "leace", ""), "retrained_after"] < 0.4
    assert table.loc[("ablate", "random", "leace"), "retrained_after"] > 0.8
    for control in ("random", "pca", "shuffled"):
        assert table.loc[("ablate", control, "leace"), "displacement"] == pytest.approx(
            table.loc[("ablate", "leace", ""), "displacement"], rel=1e-4)
    assert table.loc[("steer", "probe", "leace"), "displacement"] == pytest.approx(
        table.loc[("ablate", "leace", ""), "displacement"], rel=1e-4)
    assert table["retrained_after"].isna().sum() == 3  # steering rows: no retrained probe
