"""Probes: the estimator contract, agreement with scikit-learn, and grids that find planted signals."""

import json
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.probes import LinearProbe, ProbeGrid, clock_table
from dlmprobe.store import ActivationDataset, ActivationWriter, StoreLayout


def _blobs(n=600, d=16, classes=4, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * 2
    y = rng.integers(0, classes, size=n)
    return centres[y] + noise * rng.normal(size=(n, d)), y


def test_linear_probe_follows_the_estimator_contract(tmp_path):
    X, y = _blobs()
    probe = LinearProbe(C=0.5)
    assert probe.get_params()["C"] == 0.5
    scores = cross_val_score(make_pipeline(StandardScaler(), probe), X, y, cv=3)
    assert scores.mean() > 0.8
    probe.fit(X, y)
    assert probe.coef_.shape == (4, 16) and probe.intercept_.shape == (4,)
    assert np.allclose(probe.predict_proba(X).sum(1), 1)
    probe.save(tmp_path / "p")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.safetensors"]
    loaded = LinearProbe.load(tmp_path / "p")
    assert np.array_equal(loaded.predict(X), probe.predict(X))
    assert json.loads((tmp_path / "p.json").read_text())["params"]["C"] == 0.5


@parametrize_with_checks([LinearProbe()])
def test_linear_probe_passes_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_linear_probe_unfitted_and_binary_scores():
    X, y = _blobs(n=300, d=8, classes=2)
    with pytest.raises(NotFittedError):
        LinearProbe().predict(X)
    probe = LinearProbe().fit(X, y)
    assert probe.decision_function(X).shape == (300,) and probe.coef_.shape == (1, 8) and probe.n_iter_[0] >= 1
    assert np.array_equal(probe.predict(X), probe.classes_[(probe.predict_proba(X)[:, 1] > 0.5).astype(int)])
    assert cross_val_score(LinearProbe(), X, y, cv=3, scoring="roc_auc").mean() > 0.9


@pytest.mark.parametrize("classes", [2, 4])
def test_linear_probe_C_is_sklearns_C(classes):
    """Same coefficients as LogisticRegression(C) on standardised features; with two classes too
    (where the kit's C once was scikit-learn's 2C: that fit is measurably different)."""
    X, y = _blobs(n=400, d=6, classes=classes, noise=2.0, seed=1)
    X = StandardScaler().fit_transform(X)  # our own standardisation is then the identity
    C = 0.02  # strong regularisation: C and 2C give clearly different weights
    ours = LinearProbe(C=C, tol=1e-6, max_iter=500).fit(X, y)
    theirs = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(X, y)
    doubled = LogisticRegression(C=2 * C, tol=1e-10, max_iter=10_000).fit(X, y)
    scale = np.abs(theirs.coef_).max()
    assert ours.coef_.shape == theirs.coef_.shape
    assert np.abs(ours.coef_ - theirs.coef_).max() <= 2e-3 * scale
    assert np.abs(ours.intercept_ - theirs.intercept_).max() <= 2e-3 * scale
    assert np.abs(doubled.coef_ - theirs.coef_).max() > 0.1 * scale
    assert abs(ours.score(X, y) - theirs.score(X, y)) <= 0.005


def test_linear_probe_warns_when_it_stops_at_max_iter():
    X, y = _blobs(n=300, d=8, classes=3, noise=0.5)
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        LinearProbe(C=100.0, max_iter=2).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        LinearProbe().fit(X, y)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda meta, weights: "{not json", "expected JSON"),
        (lambda meta, weights: json.dumps({**meta, "classes": [1]}), "field 'classes'"),
        (lambda meta, weights: json.dumps({**meta, "params": {"C": 1.0, "bogus": 2}}), "field 'params'"),
        (lambda meta, weights: json.dumps({**meta, "n_features_in": "16"}), "field 'n_features_in'"),
        (lambda meta, weights: json.dumps({**meta, "n_features_in": 15}), "tensor 'coef' must have shape"),
    ],
)
def test_linear_probe_load_refuses_bad_files(tmp_path, edit, message):
    X, y = _blobs()
    path = LinearProbe().fit(X, y).save(tmp_path / "p")
    meta_path = path.with_suffix(".json")
    meta_path.write_text(edit(json.loads(meta_path.read_text()), None))
    with pytest.raises(DlmprobeInputError, match=message) as err:
        LinearProbe.load(path)
    assert "\n" not in str(err.value) and ("p.json" in str(err.value) or "p.safetensors" in str(err.value))


def test_linear_probe_agrees_with_sklearn():
    X, y = _blobs(n=2000, d=32, classes=6, noise=3.0)
    train, test = slice(0, 1500), slice(1500, None)
    ours = LinearProbe(C=1.0).fit(X[train], y[train])
    theirs = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(X[train], y[train])
    assert abs(ours.score(X[test], y[test]) - theirs.score(X[test], y[test])) <= 0.01
    assert (ours.predict(X[test]) == theirs.predict(X[test])).mean() >= 0.98


@pytest.mark.parametrize(
    "X,y,message",
    [
        (np.ones((10, 3)), np.zeros(10), "at least 2 classes"),
        (np.full((10, 3), np.nan), np.arange(10) % 2, "NaN"),
    ],
)
def test_linear_probe_bad_input(X, y, message):
    with pytest.raises(DlmprobeInputError, match=message):
        LinearProbe().fit(X, y)


# -- a synthetic store with a planted signal ----------------------------------------------------
N, STEPS, D, T, P = 120, 4, 12, 3, 4  # examples, steps, width, target length, prompt length
L = P + T + 3
MASK = 4
PLANTED_SITE, PLANTED_STEP = "blocks.1.hook_resid_post", 2


def _synthetic_store(path, nan_site=False, answers=None, readout_step=None, position_code=False, clock_site=None):
    """Activations are noise, except at one site and step where the answer is linearly readable.

    Every target position stays masked until the last step, so every row is "before commit".
    ``answers`` (N, T) replaces the per-example answers; the model's recorded argmax names the
    answers at ``readout_step`` only (0, never an answer, elsewhere); ``position_code`` writes each
    target position's own direction into every activation; ``clock_site`` gets a direction of its
    own per step added at every row (a clock).
    """
    rng = np.random.default_rng(0)
    drawn = rng.integers(10, 14, size=N)  # 4 classes of token ids
    answers = np.repeat(drawn[:, None], T, 1) if answers is None else answers
    canvas = np.full((N, STEPS + 1, L), MASK)
    canvas[:, :, : P + 2] = 7
    canvas[:, :, -1] = 3
    canvas[:, -1, P + 2 : P + 2 + T] = answers
    canvas[:, :, 1] = rng.integers(20, 23, size=N)[:, None]  # a visible prompt token
    positions = list(range(P + 2, P + 2 + T))
    directions = rng.normal(size=(14, D))
    acts = {}
    for site in ("blocks.0.hook_resid_post", PLANTED_SITE):
        a = rng.normal(size=(N, STEPS, T, D))
        if site == PLANTED_SITE:
            a[:, PLANTED_STEP] += 3 * directions[answers]
        if position_code:
            a += 5 * np.eye(T, D)
        if site == clock_site:
            a += 4 * rng.normal(size=(STEPS, D))[None, :, None, :]
        if nan_site and site == "blocks.0.hook_resid_post":
            a[:, 0, 0, 0] = np.nan
        acts[site] = a
    layout = StoreLayout(n_examples=N, n_steps=STEPS, canvas_length=L, prompt_length=P, target_length=T,
                         labels={"answer": T}, sites={s: D for s in acts}, steps=range(STEPS), positions=positions,
                         dtype="float32")
    prediction = np.zeros((N, STEPS, L), int)
    if readout_step is not None:
        prediction[:, readout_step, P + 2 : P + 2 + T] = answers
    with ActivationWriter(path, layout, config={"task": {"answer_label": "answer"}}, mask_id=MASK) as writer:
        writer.write_batch({
            "uid": [f"ex{i}" for i in range(N)], "prompt": canvas[:, 0, 1 : P + 1], "target": answers,
            "output": answers, "solved": np.ones(N, bool), "canvas": canvas,
            "commit_step": np.full((N, L), -1), "prediction": prediction,
            "confidence": np.zeros((N, STEPS, L), np.float16),
            "labels": {"answer": (np.tile(np.arange(T), (N, 1)), answers)},
            "activations": acts,
        })
    return ActivationDataset(path), directions


def test_grid_finds_the_signal_where_it_is_planted_and_nowhere_else(tmp_path):
    data, _ = _synthetic_store(tmp_path / "s.h5")
    table = ProbeGrid(label="answer", target="truth", random_baseline=False, folds=4).run(data, progress=False)
    assert len(table) == 2 * STEPS
    planted = (table["site"] == PLANTED_SITE) & (table["step"] == PLANTED_STEP)
    assert table.loc[planted, "accuracy"].item() > 0.95
    assert (table.loc[~planted, "accuracy"] < 0.45).all()  # 4 balanced classes: chance is 0.25
    assert (table["majority"] < 0.4).all()
    # The control task cannot be read from noise; the planted cell is selective.
    assert table.loc[planted, "selectivity"].item() > 0.3
    assert (table.loc[~planted, "selectivity"] < 0.2).all()
    assert ((table["ci_low"] <= table["accuracy"]) & (table["accuracy"] <= table["ci_high"])).all()


def test_grid_matches_an_sklearn_loop_within_a_point(tmp_path):
    data, _ = _synthetic_store(tmp_path / "s.h5")
    table = ProbeGrid(label="answer", target="truth", random_baseline=False, control=False, folds=4,
                      seed=3).run(data, progress=False)
    fold_of = np.random.default_rng(3).permutation(N) % 4
    for _, row in table.iterrows():
        acts = data.activations(row.site, row.step)  # (N, T, D)
        X, y = acts.reshape(-1, D), np.repeat(data.label("answer")[1][:, :1], T, 1).reshape(-1)
        groups = np.repeat(np.arange(N), T)
        hits = []
        for f in range(4):
            train, test = fold_of[groups] != f, fold_of[groups] == f
            model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(X[train], y[train])
            hits.append(model.predict(X[test]) == y[test])
        assert abs(np.concatenate(hits).mean() - row.accuracy) <= 0.01, (row.site, row.step)


def test_phase_and_per_slot(tmp_path):
    data, _ = _synthetic_store(tmp_path / "s.h5")
    with pytest.raises(ValueError, match="no cell has enough rows"):
        ProbeGrid(label="answer", phase="after_commit", random_baseline=False).run(data, progress=False)
    table = ProbeGrid(label="answer", per_slot=True, random_baseline=False, control=False,
                      sites=[PLANTED_SITE], steps=[PLANTED_STEP]).run(data, progress=False)
    assert sorted(table["slot"]) == [0, 1, 2] and (table["n_rows"] == N).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"label": "nope"}, "unknown label 'nope'"),
        ({"label": "answer", "sites": ["blocks.9.hook_resid_post"]}, "unknown site"),
        ({"label": "answer", "steps": [7]}, "step 7 is not stored"),
        ({"label": "answer", "min_rows": 10_000}, "no cell has enough rows"),
    ],
)
def test_grid_bad_selections_are_one_line_errors(tmp_path, kwargs, message):
    data, _ = _synthetic_store(tmp_path / "s.h5")
    with pytest.raises(ValueError, match=message) as err:
        ProbeGrid(random_baseline=False, **kwargs).run(data, progress=False)
    assert "\n" not in str(err.value)


def test_nan_activations_and_single_class_are_refused(tmp_path):
    data, _ = _synthetic_store(tmp_path / "nan.h5", nan_site=True)
    with pytest.raises(ValueError, match="NaN or inf"):
        ProbeGrid(label="answer", random_baseline=False).run(data, progress=False)
    single, _ = _synthetic_store(tmp_path / "one.h5", answers=np.full((N, T), 11))
    with pytest.raises(ValueError, match="only one class"):
        ProbeGrid(label="answer", target="truth", random_baseline=False).run(single, progress=False)


def test_online_code_is_shorter_where_the_signal_is(tmp_path):
    data, _ = _synthetic_store(tmp_path / "s.h5")
    table = ProbeGrid(label="answer", target="truth", random_baseline=False, control=False, mdl=True,
                      steps=[0, PLANTED_STEP], sites=[PLANTED_SITE]).run(data, progress=False)
    bits = dict(zip(table["step"], table["mdl_bits"]))
    assert bits[PLANTED_STEP] < 0.5 * bits[0]
    assert bits[0] > 0.8 * table["uniform_bits"].iloc[0]  # noise compresses barely at all


def test_clock_table_reads_the_step_from_a_clock_signal(tmp_path):
    data, _ = _synthetic_store(tmp_path / "s.h5", clock_site="blocks.0.hook_resid_post")
    table = clock_table(data, "answer", folds=3).set_index("site")
    assert set(table.index) == {"blocks.0.hook_resid_post", PLANTED_SITE}
    assert (table["step_chance"] == 1 / STEPS).all()
    # The planted clock is read; the other site, noise plus an answer at one step, reads the step near chance.
    assert table.loc["blocks.0.hook_resid_post", "step_accuracy"] > 0.95
    assert table.loc[PLANTED_SITE, "step_accuracy"] < 0.5


def test_probe_command_end_to_end(tiny_config, tmp_path, capsys):
    from dlmprobe.cli import main
    from dlmprobe.models import build_native, save_checkpoint

    model = save_checkpoint(build_native(tiny_config), tiny_config, tmp_path / "model")
    run = tmp_path / "run.h5"
    assert main(["cache", "--model", str(model), "--n", "60", "--out", str(run)]) == 0
    assert main(["probe", str(run), "--label", "intermediate", "--target", "truth", "--folds", "3",
                 "--out", str(tmp_path / "probes")]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.hook_resid_post" in out and "clock acc" in out
    import pandas as pd

    table = pd.read_csv(tmp_path / "probes" / "grid-intermediate-truth-before_commit.csv")
    assert {"accuracy", "majority", "control_accuracy", "selectivity", "random_weights_accuracy",
            "ci_low", "ci_high", "committed_fraction"} <= set(table.columns)
    assert (tmp_path / "probes" / "clock-intermediate.csv").exists()
    assert main(["probe", str(run), "--label", "intermediate", "--target", "truth", "--folds", "3",
                 "--out", str(tmp_path / "probes")]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["probe", str(run), "--label", "nope", "--out", str(tmp_path / "p2")]) == 2
    assert "unknown label 'nope'" in capsys.readouterr().err


def test_per_distance_cells_find_a_read_ahead_planted_one_position_ahead(tmp_path):
    """The vector at the first target position holds the token one position further on, nothing else:
    per-distance probes read from there find it at distance 1 only."""
    rng = np.random.default_rng(1)
    answers = rng.integers(10, 14, size=(N, T))  # a different token at every slot
    canvas = np.full((N, STEPS + 1, L), MASK)
    canvas[:, :, : P + 2] = 7
    canvas[:, :, -1] = 3
    canvas[:, -1, P + 2 : P + 2 + T] = answers
    directions = rng.normal(size=(14, D))
    acts = rng.normal(size=(N, STEPS, T, D))
    acts[:, :, 0] += 3 * directions[answers[:, 1]][:, None, :]
    site = "blocks.0.hook_resid_post"
    path = tmp_path / "ahead.h5"
    layout = StoreLayout(n_examples=N, n_steps=STEPS, canvas_length=L, prompt_length=P, target_length=T,
                         labels={"answer": T}, sites={site: D}, steps=range(STEPS),
                         positions=list(range(P + 2, P + 2 + T)), dtype="float32")
    with ActivationWriter(path, layout, config={"task": {"answer_label": "answer"}}, mask_id=MASK) as writer:
        writer.write_batch({
            "uid": [f"ex{i}" for i in range(N)], "prompt": canvas[:, 0, 1 : P + 1], "target": answers,
            "output": answers, "solved": np.ones(N, bool), "canvas": canvas, "commit_step": np.full((N, L), -1),
            "prediction": np.zeros((N, STEPS, L), int), "confidence": np.zeros((N, STEPS, L), np.float16),
            "labels": {"answer": (np.tile(np.arange(T), (N, 1)), answers)}, "activations": {site: acts},
        })
    data = ActivationDataset(path)
    grid = ProbeGrid(label="answer", read=P + 2, per_distance=True, control=False, random_baseline=False, folds=4)
    table = grid.run(data, progress=False)
    assert sorted(table["distance"].unique()) == [0, 1, 2]
    assert (table.loc[table["distance"] == 1, "accuracy"] > 0.9).all()
    assert (table.loc[table["distance"] != 1, "accuracy"] < 0.45).all()
    # Every row's out-of-fold hit is kept per cell, keyed by (site, step, distance).
    rows = grid.rows_[(site, 0, 1)]
    assert len(rows) == N and abs(rows["probe"].mean() - table.query("step == 0 and distance == 1")["accuracy"].item()) < 1e-9
    with pytest.raises(ValueError, match="per_distance"):
        ProbeGrid(label="answer", read="pooled", per_distance=True)


def test_out_of_fold_reuses_what_run_fitted(tmp_path, monkeypatch):
    import dlmprobe.probes.stats as stats_module

    data, _ = _synthetic_store(tmp_path / "s.h5")
    fits = []
    original = stats_module.fit_logistic

    def counting(*args, **kwargs):
        fits.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(stats_module, "fit_logistic", counting)
    grid = ProbeGrid(label="answer", target="truth", random_baseline=False, folds=4)
    table = grid.run(data, progress=False)
    fitted = len(fits)
    predicted = grid.out_of_fold(data)
    assert fitted > 0 and len(fits) == fitted  # nothing fitted again
    truth = data.label("answer")[1]
    for row in table.itertuples():
        assert (predicted[row.site][:, row.step] == truth).mean() == pytest.approx(row.accuracy)
    alone = ProbeGrid(label="answer", target="truth", random_baseline=False, folds=4).out_of_fold(data)
    assert len(fits) > fitted and all((alone[s] == predicted[s]).mean() > 0.99 for s in data.sites)
    grid.C = 0.5  # other settings: fitted afresh
    fitted = len(fits)
    grid.out_of_fold(data)
    assert len(fits) > fitted


def test_shared_fits_fits_each_distinct_cell_once_with_the_same_predictions(monkeypatch):
    import dlmprobe.probes.stats as stats_module

    rng = np.random.default_rng(3)
    examples = np.repeat(np.arange(30), 2)
    fold_of = np.arange(30) % 3
    classes = np.array([4, 7, 9])
    X = [rng.standard_normal((60, 5)).astype(np.float32) for _ in range(2)]
    y = [classes[(x[:, 0] > 0).astype(int) + (x[:, 1] > 1)] for x in X]
    relabelled = classes[rng.integers(0, 3, 60)]
    fitted = []
    original = stats_module.fit_logistic

    def counting(*args, **kwargs):
        fitted.append(args[0].shape[0])  # cells in this fit
        return original(*args, **kwargs)

    monkeypatch.setattr(stats_module, "fit_logistic", counting)
    alone = stats_module.cross_validate([X[1], X[0], X[0]], [[y[1], y[0], relabelled]], [examples] * 3, fold_of,
                                        classes, 1.0, 100)[0]
    assert fitted == [3]
    with stats_module.shared_fits():
        stats_module.cross_validate(X, [y], [examples] * 2, fold_of, classes, 1.0, 100)
        with stats_module.shared_fits():  # nested: the same fits
            shared = stats_module.cross_validate([X[1], X[0], X[0], X[1]], [[y[1], y[0], relabelled, y[1]]],
                                                 [examples] * 4, fold_of, classes, 1.0, 100)[0]
    assert fitted == [3, 2, 1]  # only the relabelled cell is new, and it is fitted once
    for got, expected in zip(shared, [*alone, alone[0]]):
        np.testing.assert_array_equal(got, expected)
    assert stats_module._shared is None  # the scope's fits are dropped with it
    stats_module.cross_validate(X, [y], [examples] * 2, fold_of, classes, 1.0, 100)
    assert fitted[-1] == 2


def test_random_weights_features_run_one_forward_pass_per_step(tiny_config, tmp_path):
    from dlmprobe.capture import CacheConfig, run_cache
    from dlmprobe.models import build_native, save_checkpoint
    from dlmprobe.probes.features import RandomWeightsFeatures

    model = save_checkpoint(build_native(tiny_config), tiny_config, tmp_path / "model")
    run_cache(CacheConfig(model=str(model), n=8, steps=[0, 1]), tmp_path / "run.h5", progress=False)
    data = ActivationDataset(tmp_path / "run.h5")
    features = RandomWeightsFeatures(data, data.sites)
    passes = []
    features.model.embed.register_forward_hook(lambda module, args, output: passes.append(1))
    blocks = {(site, int(step)): features(site, int(step)) for step in data.steps for site in data.sites}
    assert len(data.sites) > 1 and len(passes) == len(data.steps)
    site, step = data.sites[-1], int(data.steps[-1])
    alone = RandomWeightsFeatures(data, [site])(site, step)
    assert np.allclose(alone, blocks[(site, step)], equal_nan=True)
    assert not np.allclose(blocks[(site, step)], data.activations(site, step), equal_nan=True)


# -- what the grid sets beside every probe: the model's read-out, input baselines, controls ----------
def test_lens_and_readout_columns_tell_a_model_that_says_it_from_one_that_does_not(tmp_path):
    from dlmprobe.probes.lens import ModelReaders, Readout

    data, directions = _synthetic_store(tmp_path / "s.h5", readout_step=PLANTED_STEP)
    vocab = int(data.canvas.max()) + 1
    aligned = np.zeros((D, vocab))
    aligned[:, :14] = directions.T  # the unembedding reads the planted directions: the lens names the answer
    unrelated = np.random.default_rng(5).normal(size=(D, vocab))
    tables = {}
    for name, W_U in (("aligned", aligned), ("unrelated", unrelated)):
        grid = ProbeGrid(label="answer", target="truth", random_baseline=False, control=False, folds=4, bootstrap=200)
        tables[name] = grid.run(data, progress=False, readers=ModelReaders(readout=Readout(W_U))).set_index(["site", "step"])
    planted, noise = (PLANTED_SITE, PLANTED_STEP), ("blocks.0.hook_resid_post", PLANTED_STEP)
    aligned, unrelated = tables["aligned"], tables["unrelated"]
    assert aligned.loc[planted, "lens_accuracy"] > 0.9 and aligned.loc[noise, "lens_accuracy"] < 0.35
    # Where the model says it, the probe knows no more: the paired interval holds 0.
    assert aligned.loc[planted, "probe_over_lens_ci_low"] <= 0 <= aligned.loc[planted, "probe_over_lens_ci_high"]
    # Where the unembedding reads something else, the probe knows more than the lens, measurably.
    assert unrelated.loc[planted, "lens_accuracy"] < 0.4 and unrelated.loc[planted, "probe_over_lens_ci_low"] > 0.4
    # The recorded argmax names the answer at the planted step only, at every site.
    readout = aligned["readout_accuracy"].unstack("step")
    assert (readout[PLANTED_STEP] == 1.0).all() and (readout.drop(columns=PLANTED_STEP) == 0.0).all().all()
    assert aligned.loc[planted, "probe_over_readout_ci_high"] <= 0.01
    assert aligned.loc[noise, "probe_over_readout"] < -0.5 and aligned.loc[noise, "probe_over_readout_ci_high"] < 0


def test_input_baselines_in_the_grid_set_the_bar_on_the_same_rows(tmp_path):
    """A label fixed by the position: the position baseline reads it and the probe, however good, is not
    selective against it; a label that owes nothing to the input: every baseline is at chance."""
    data, _ = _synthetic_store(tmp_path / "position.h5", answers=10 + np.tile(np.arange(T), (N, 1)))
    table = ProbeGrid(label="answer", target="truth", random_baseline=False, control=False, folds=4,
                      bootstrap=100).run(data, progress=False)
    assert (table["baseline_position_accuracy"] > 0.99).all() and (table["strongest_baseline"] == "position").all()
    assert (table["majority"] < 0.4).all()  # three positions, three values
    assert (table["baseline_selectivity"] < 0.01).all()  # nothing beyond the position, even where the probe is perfect
    planted = (table["site"] == PLANTED_SITE) & (table["step"] == PLANTED_STEP)
    assert table.loc[planted, "accuracy"].item() > 0.95

    data, _ = _synthetic_store(tmp_path / "noise.h5")  # one random answer per example, the same at every slot
    grid = ProbeGrid(label="answer", target="truth", random_baseline=False, control=False, folds=4, bootstrap=100)
    table = grid.run(data, progress=False)
    assert (table["strongest_baseline_accuracy"] < 0.4).all()  # four classes
    assert table.loc[planted, "baseline_selectivity_ci_low"].item() > 0.4
    assert (table.loc[~planted, "baseline_selectivity_ci_low"] < 0).all()
    assert "no givens baseline" in grid.readers_note_ and "no logit lens" in grid.readers_note_
    rows = grid.rows_[(PLANTED_SITE, PLANTED_STEP, -1)]
    assert {"probe", "readout", "majority", "baseline_position", "baseline_prompt+position"} <= set(rows.columns)
    assert rows["probe"].mean() == pytest.approx(table.loc[planted, "accuracy"].item())


def test_control_task_is_typed_by_position_and_catches_a_probe_that_memorises_positions(tmp_path):
    """Features that name the position, labels random per example: the control task (a random label per
    position) is easy to fit, the real one is not, so selectivity goes negative. Several draws, a spread."""
    data, _ = _synthetic_store(tmp_path / "coded.h5", position_code=True)
    table = ProbeGrid(label="answer", target="truth", random_baseline=False, folds=4, control_draws=4, lens=False,
                      baselines=(), sites=["blocks.0.hook_resid_post"], steps=[0]).run(data, progress=False)
    assert table["control_draws"].item() == 4 and np.isfinite(table["control_accuracy_sd"].item())
    assert table["control_accuracy"].item() > 0.95 and table["accuracy"].item() < 0.4
    assert table["selectivity"].item() < -0.5
    planted = ProbeGrid(label="answer", target="truth", random_baseline=False, folds=4, lens=False, baselines=(),
                        sites=[PLANTED_SITE], steps=[PLANTED_STEP]).run(data, progress=False)
    # The answer is there too, but a stream that names the position makes any label of it look unselective.
    assert planted["accuracy"].item() > 0.95 and abs(planted["selectivity"].item()) < 0.1


def test_max_rows_caps_every_cell_with_the_same_rows_for_every_site_and_target(tmp_path):
    data, _ = _synthetic_store(tmp_path / "s.h5")
    grid = ProbeGrid(label="answer", random_baseline=False, control=False, baselines=(), folds=4)
    assert grid.row_counts(data) == {(step, -1): N * T for step in range(STEPS)}
    capped = {}
    for target in ("output", "truth"):
        grid = ProbeGrid(label="answer", target=target, random_baseline=False, control=False, baselines=(), folds=4,
                         max_rows={(0, -1): 100, (1, -1): 0})
        table = grid.run(data, progress=False).set_index("step")
        assert table.loc[0, "n_rows"].min() == 100 and 1 not in table.index and table.loc[2, "n_rows"].min() == N * T
        capped[target] = {site: grid.rows_[(site, 0, -1)][["example", "position"]] for site in data.sites}
        assert grid.row_counts(data)[(0, -1)] == 100
    frames = [frame for per_target in capped.values() for frame in per_target.values()]
    assert all(frame.equals(frames[0]) for frame in frames)
