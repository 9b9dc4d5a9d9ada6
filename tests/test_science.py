"""Controls a reviewer demands (issue #12): each must tell a planted effect from none.

Input-only baselines, difficulty strata, the logit lens, the schedule's null lead, displacement
matching, and a paraphrase with power (free choices, a perturbed commit pattern).
"""

import numpy as np
import pytest
import torch

from dlmprobe.analyses import seed_spread
from dlmprobe.analyses.lead import first_stable_step
from dlmprobe.analyses.nulls import (
    displacement,
    matching_scale,
    null_leads,
    schedule_nulls,
)
from dlmprobe.capture import CacheConfig, run_cache
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models import (
    ModelConfig,
    build_native,
    from_checkpoint,
    load_model,
    save_checkpoint,
    to_bridge,
)
from dlmprobe.probes import ProbeGrid
from dlmprobe.probes.baselines import (
    accuracy_by_stratum,
    baseline_table,
    input_baselines,
    label_rows,
    margin_over_baselines,
    per_example_feature,
    strongest_baseline,
)
from dlmprobe.probes.lens import lens_predictions, lens_table, model_readout, readout_of
from dlmprobe.sampling import DiffusionSamplerConfig, prefixes
from dlmprobe.sampling.callbacks import RemaskCommitted
from dlmprobe.sampling.sampler import make_canvas, sample
from dlmprobe.store import ActivationDataset, ActivationWriter, StoreLayout
from dlmprobe.tasks import Example, get_task
from dlmprobe.tasks.sudoku import SudokuChoice, count_solutions

SUDOKU = get_task("sudoku", size=4)


def _task_store(path, task, examples, label, values=None, d=8, plant=0.0):
    """A store of real puzzles, every target masked at step 0, noise activations.

    ``values`` replaces the label's values (a label that owes nothing to the input); ``plant``
    adds that much of a one-hot of each label position's value to its activations.
    """
    n, vocab = len(examples), task.vocab
    k = len(examples[0].labels[label].positions)
    slots = np.array([ex.labels[label].positions for ex in examples])
    truth = np.array([ex.labels[label].values for ex in examples]) if values is None else values
    final = np.array([ex.sequence(vocab) for ex in examples])
    final[np.arange(n)[:, None], task.target_start + slots] = truth
    start = final.copy()
    start[:, task.target_start : task.target_start + task.target_length] = vocab.mask_id
    canvas = np.stack([start, final], axis=1)
    positions = list(range(task.target_start, task.target_start + task.target_length))
    site = "blocks.0.hook_resid_post"
    acts = np.random.default_rng(1).normal(size=(n, 1, len(positions), d))
    acts[np.arange(n)[:, None], 0, slots, truth % d] += plant
    layout = StoreLayout(n_examples=n, n_steps=1, canvas_length=final.shape[1], prompt_length=task.prompt_length,
                         target_length=task.target_length, labels={label: k}, sites={site: d}, steps=[0],
                         positions=positions, dtype="float32")
    with ActivationWriter(path, layout, config={"task": {"answer_label": label}, "model": {"kind": "diffusion"}}, mask_id=vocab.mask_id) as writer:
        writer.write_batch({
            "uid": [ex.uid for ex in examples], "prompt": np.array([ex.prompt for ex in examples]),
            "target": np.array([ex.target for ex in examples]), "output": final[:, task.target_start : -1],
            "solved": np.ones(n, bool), "canvas": canvas, "commit_step": np.where(start == vocab.mask_id, 0, -1),
            "prediction": final[:, None, :], "confidence": np.ones((n, 1, final.shape[1]), np.float16),
            "labels": {label: (slots, truth)}, "activations": {site: acts},
        })
    return ActivationDataset(path)


@pytest.fixture(scope="module")
def sudoku_examples():
    return SUDOKU.sample(150, "eval", seed=0)


# -- tasks: givens features, difficulty, free choices -------------------------------------------
def test_candidate_mask_by_hand():
    rows = ["1 _ _ _", "_ _ 3 _", "_ 4 _ _", "_ _ _ 2"]
    prompt = SUDOKU.vocab.encode(" ".join(rows).split())
    ex = Example(tuple(prompt), tuple(prompt))
    mask = SUDOKU.givens_features(ex)  # (16, 4): 1 = digit excluded
    assert mask.shape == (16, 4)
    assert mask[0].tolist() == [0, 1, 1, 1]  # a given excludes all but itself
    assert mask[1].tolist() == [1, 0, 0, 1]  # row {1}, column {4}, box {1}
    assert mask[5].tolist() == [1, 0, 1, 1]  # row {3}, column {4}, box {1}: a naked single, 2
    assert mask[15].tolist() == [1, 0, 1, 1]  # the given 2 of cell 15 excludes 1, 3 and 4
    assert mask[10].tolist() == [0, 1, 1, 1]  # row {4}, column {3}, box {2}
    difficulty = SUDOKU.difficulty(ex)
    assert difficulty[[0, 6, 9, 15]].tolist() == [0, 0, 0, 0]
    assert difficulty[5] == 1 and difficulty[10] == 1


def test_difficulty_rounds_are_naked_singles(sudoku_examples):
    seen = set()
    for ex in sudoku_examples[:40]:
        rounds, solution = SUDOKU.difficulty(ex), SUDOKU._digits(ex.target)
        givens = np.array(SUDOKU._digits(ex.prompt))
        assert ((rounds == 0) == (givens > 0)).all()
        for r in range(1, rounds.max() + 1):
            # Fill the cells of earlier rounds with the solution: every round-r cell has one candidate, its digit.
            grid = np.where((rounds >= 0) & (rounds < r), solution, 0)
            mask = SUDOKU.givens_features(Example(tuple(np.where(grid > 0, np.array(SUDOKU._digit_ids)[grid - 1], 5)), ex.target))
            for cell in np.flatnonzero(rounds == r):
                assert mask[cell].sum() == 3 and mask[cell, solution[cell] - 1] == 0
        seen |= set(rounds.tolist())
    assert {0, 1, 2} <= seen and SUDOKU.difficulty_name(1) == "round 1" and SUDOKU.difficulty_name(0) == "given"


def test_arith_and_pathstar_features_and_difficulty():
    arith = get_task("arith", n_ops=4)
    ex = Example(tuple(arith.vocab.encode(["3", "*", "0", "+", "2", "-", "1", "*", "5"])), (0, 0, 0, 0))
    assert arith.difficulty(ex).tolist() == [0, 1, 2, 3]
    features = arith.givens_features(ex)
    n_ops, m = len(arith.ops), arith.modulus
    assert features.shape == (4, n_ops + 2 * m) and (features.sum(axis=1) == 3).all()
    assert features[1, arith.ops.index("+")] == 1 and features[1, n_ops + 2] == 1 and features[1, n_ops + m + 3] == 1
    star = get_task("pathstar")
    for ex in star.sample(20, "eval", seed=0):
        features = star.givens_features(ex)
        goal, parent = (star.vocab.id(f"n{i}") for i in (features[0, :10].argmax(), features[0, 10:].argmax()))
        assert goal == ex.target[-1] and parent == ex.target[-2]
        assert star.difficulty(ex).tolist() == [3, 2, 1, 0]


def _all_solutions(task, prompt):
    """Every completion, by plain backtracking over the blanks in order (independent of count_solutions)."""
    grid = task._digits(prompt)
    blanks = [c for c, v in enumerate(grid) if v == 0]
    out = []

    def fill(i):
        if i == len(blanks):
            out.append([task._digit_ids[v - 1] for v in grid])
            return
        cell = blanks[i]
        for digit in range(1, task.size + 1):
            if all(grid[p] != digit for p in task._peers[cell]):
                grid[cell] = digit
                fill(i + 1)
                grid[cell] = 0

    fill(0)
    return out


def test_sudoku_choice_has_several_solutions_and_names_the_free_cells():
    task = SudokuChoice(size=4, blanks=8, min_solutions=2, max_solutions=4)
    assert task.params()["min_solutions"] == 2
    for ex in task.sample(6, "eval", seed=0):
        solutions = _all_solutions(task, ex.prompt)
        assert 2 <= len(solutions) <= 4
        assert count_solutions(task._digits(ex.prompt), 4, task._peers, limit=10) == len(solutions)
        assert list(ex.target) in solutions and all(task.verify(ex.prompt, s) for s in solutions)
        varying = {c for c in range(16) if len({s[c] for s in solutions}) > 1}
        assert set(task.free_cells(ex)) == varying and varying
    with pytest.raises(DlmprobeInputError, match="min_solutions"):
        SudokuChoice(min_solutions=1)


def test_remask_committed_perturbs_the_commit_pattern(tiny_config):
    canvas = torch.tensor([[1, 7, 8, 4, 4], [1, 7, 4, 9, 9]])
    shuffle = RemaskCommitted(mask_id=4, positions=[2, 3, 4], k=1, steps=(1,), seed=0)
    assert torch.equal(shuffle(0, torch.arange(2), canvas.clone()), canvas)  # not one of its steps
    edited = shuffle(1, torch.arange(2), canvas.clone())
    changed = (edited != canvas).numpy()
    assert changed.sum(axis=1).tolist() == [1, 1] and not changed[:, :2].any()
    assert (edited[torch.as_tensor(changed)] == 4).all() and shuffle.history[0][1].tolist() == changed.tolist()
    # In a real sampler run the remasked position is decided again, later.
    task = tiny_config.build_task()
    model = to_bridge(build_native(tiny_config), tiny_config)
    examples = task.sample(6, "eval", seed=0)
    prefix, suffix = prefixes(task, examples)
    gen = task.target_length
    target = list(range(prefix.shape[1], prefix.shape[1] + gen))
    shuffle = RemaskCommitted(task.vocab.mask_id, target, k=1, steps=(0,), seed=3)
    canvas = make_canvas(prefix, gen, task.vocab.mask_id, suffix)
    run = sample(model, canvas, prefix.shape[1], gen, task.vocab.mask_id, DiffusionSamplerConfig(), callback=shuffle)
    remasked = shuffle.history[0][1]  # (batch, pos)
    assert remasked.sum() == len(examples)  # one committed position per row, at step 0
    assert (run.canvases[:, 1].numpy()[remasked] == task.vocab.mask_id).all()
    assert (run.commit_step.numpy()[remasked] > 0).all()
    assert not (run.canvases[:, -1] == task.vocab.mask_id).any()


# -- baselines ------------------------------------------------------------------------------------
def test_baselines_find_a_planted_input_signal_and_not_a_random_label(tmp_path, sudoku_examples):
    data = _task_store(tmp_path / "truth.h5", SUDOKU, sudoku_examples, "blank")
    rows = label_rows(data, "blank", step=0)
    assert len(rows) == 150 * 8 and (rows["token"] == SUDOKU.vocab.mask_id).all()
    _, y, groups = data.get("blocks.0.hook_resid_post", 0, "label", label="blank", target="label", only_masked=True)
    assert np.array_equal(rows["truth"].to_numpy(), y) and np.array_equal(rows["example"].to_numpy(), groups)
    features = input_baselines(data, rows, task=SUDOKU, embedding=np.eye(len(SUDOKU.vocab)))
    table, hits = baseline_table(features, rows["truth"].to_numpy(), rows["example"].to_numpy(), folds=5)
    accuracy = table.set_index("baseline")["accuracy"]
    assert accuracy["givens"] > 0.6  # the candidate mask names most blanks' digits
    assert accuracy["position"] < 0.4 and accuracy["embedding"] < 0.4 and accuracy["majority"] < 0.4  # digits are shuffled per puzzle
    assert strongest_baseline(table)["baseline"] == "givens"
    assert margin_over_baselines(0.9, table)["margin"] == pytest.approx(0.9 - accuracy["givens"])
    # Round-1 cells are one naked single: the candidate mask names them all.
    strata = per_example_feature(rows, data.prompt, data.target, SUDOKU.difficulty)
    by_stratum = accuracy_by_stratum(hits, strata, SUDOKU.difficulty_name).set_index(["reader", "stratum_name"])
    assert by_stratum.loc[("givens", "round 1"), "accuracy"] > 0.97

    rng = np.random.default_rng(0)
    noise = rng.integers(6, 10, size=(150, 8))  # digits that owe nothing to the puzzle
    data = _task_store(tmp_path / "noise.h5", SUDOKU, sudoku_examples, "blank", values=noise)
    rows = label_rows(data, "blank", step=0)
    table, _ = baseline_table(input_baselines(data, rows, task=SUDOKU), rows["truth"].to_numpy(), rows["example"].to_numpy())
    assert (table["accuracy"] < 0.36).all()  # four classes: chance is 0.25


def test_position_baseline_reads_a_label_that_is_a_function_of_position(tmp_path, sudoku_examples):
    slots = np.array([ex.labels["blank"].positions for ex in sudoku_examples])
    data = _task_store(tmp_path / "position.h5", SUDOKU, sudoku_examples, "blank", values=6 + slots % 4)
    rows = label_rows(data, "blank", step=0)
    table, _ = baseline_table(input_baselines(data, rows), rows["truth"].to_numpy(), rows["example"].to_numpy())
    accuracy = table.set_index("baseline")["accuracy"]
    assert accuracy["position"] > 0.99 and accuracy["majority"] < 0.4


def test_seed_spread_tells_seeds_that_agree_from_seeds_that_differ(tmp_path, sudoku_examples):
    """Two seeds that both carry the digit (planted) agree; a seed without it pulls the spread apart."""
    planted = [_task_store(tmp_path / f"planted{i}.h5", SUDOKU, sudoku_examples, "blank", plant=4.0) for i in range(2)]
    noise = _task_store(tmp_path / "noise.h5", SUDOKU, sudoku_examples, "blank")
    agree = seed_spread({0: planted[0], 1: planted[1]}, label="blank", target="truth", bootstrap=50)
    differ = seed_spread({0: planted[0], 1: noise}, label="blank", target="truth", bootstrap=50)
    probe = agree.tables["spread"].set_index("reader").loc["probe"]
    assert probe["mean"] > 0.95 and probe["sd"] < 0.02 and probe["n_seeds"] == 2
    per_seed = differ.table[differ.table["reader"] == "probe"].set_index("seed")["accuracy"]
    assert per_seed[0] > 0.95 and per_seed[1] < 0.5  # four digits: chance 0.25, the givens are not in the noise
    spread = differ.tables["spread"].set_index("reader").loc["probe"]
    assert spread["mean"] == pytest.approx(per_seed.mean()) and spread["sd"] == pytest.approx(per_seed.std(ddof=1))
    assert spread["low"] == pytest.approx(per_seed.min()) and spread["high"] == pytest.approx(per_seed.max())
    # The same numbers as a probe grid run on its own, and the input bar beside them.
    own = ProbeGrid(label="blank", target="truth", sites=["blocks.0.hook_resid_post"], steps=[0], control=False,
                    random_baseline=False, bootstrap=50).run(noise, progress=False).iloc[0]
    assert per_seed[1] == pytest.approx(own["accuracy"])
    baseline = differ.table[differ.table["reader"] == "strongest input baseline"].set_index("seed")["accuracy"]
    assert baseline[1] == pytest.approx(own["strongest_baseline_accuracy"])
    assert "probe minus strongest input baseline" in differ.summary
    with pytest.raises(DlmprobeInputError, match="at least 2 seeds"):
        seed_spread({0: noise})
    with pytest.raises(DlmprobeInputError, match="step 3 is not stored"):
        seed_spread({0: noise, 1: noise}, step=3)


# -- logit lens -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lens")
    config = ModelConfig(task="arith", task_params={"n_ops": 3}, n_layers=2, d_model=32, n_heads=2, d_mlp=64, seed=1)
    save_checkpoint(build_native(config), config, folder / "model")
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    run_cache(CacheConfig(model=str(folder / "model"), n=16, sites=sites, dtype="float32"), folder / "run.h5", progress=False)
    return load_model(folder / "model"), ActivationDataset(folder / "run.h5")


def test_logit_lens_equals_the_model_and_a_manual_unembedding(tiny_run):
    ckpt, data = tiny_run
    handle = from_checkpoint(ckpt)
    readout = readout_of(handle)
    ids = torch.as_tensor(data.canvas[:4, 0], dtype=torch.long)
    logits, cache = handle.run_with_cache(ids, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    last = cache["blocks.1.hook_resid_post"].reshape(-1, handle.d_model).numpy()
    assert np.allclose(readout.logits(last), logits.reshape(-1, handle.vocab_size).numpy(), atol=1e-4)
    # Layer 0 by hand: LayerNorm with the final norm's weights, then the unembedding.
    first = cache["blocks.0.hook_resid_post"]
    norm = ckpt.model.ln_final._original_component
    with torch.no_grad():
        manual = torch.nn.functional.layer_norm(first, (handle.d_model,), norm.weight, norm.bias, norm.eps)
        manual = manual @ ckpt.model.unembed._original_component.weight.T
    assert np.allclose(readout.logits(first.reshape(-1, handle.d_model).numpy()), manual.reshape(-1, handle.vocab_size).numpy(), atol=1e-4)

    # On the store: the lens at the last block is the model's own read-out the sampler recorded.
    rows = label_rows(data, "answer", step=0)
    lens = lens_predictions(data, readout, "blocks.1.hook_resid_post", 0, rows)
    assert len(rows) == 16 and np.array_equal(lens, model_readout(data, 0, rows))
    table = lens_table(data, readout, "answer", step=0).set_index("site")
    assert table.loc["blocks.1.hook_resid_post", "lens_agrees_with_readout"] == 1.0
    assert table["readout_accuracy"].nunique() == 1
    with pytest.raises(DlmprobeInputError, match="width"):
        readout.logits(np.zeros((2, 5)))


# -- nulls ----------------------------------------------------------------------------------------
def test_schedule_nulls_on_a_hand_made_schedule():
    commit = np.array([0, 1, 3, 5, -1])
    oracle, uninformed = null_leads(commit, np.arange(6))
    assert oracle.tolist()[:4] == [0, 1, 3, 5] and (uninformed[:4] == 0).all()
    coarse, _ = null_leads(commit, np.array([2, 4]))  # a probe read at steps 2 and 4 only
    assert coarse.tolist()[:4] == [0, 0, 1, 3]
    table = schedule_nulls(commit, np.arange(6), {"probe": np.array([0, 1, 0, 5, 0])},
                           strata=np.array([0, 1, 1, 1, 0]), name_of=lambda v: "given" if v == 0 else "blank")
    table = table.set_index("stratum")
    assert table.loc["all", "n"] == 4 and table.loc["all", "oracle_lead"] == pytest.approx(9 / 4)
    assert table.loc["all", "probe_of_oracle"] == pytest.approx(6 / 9)
    assert table.loc["blank", "probe_of_oracle"] == pytest.approx(6 / 9) and table.loc["blank", "n"] == 3
    assert np.isnan(table.loc["given", "probe_of_oracle"])  # committed at step 0: no lead possible


def test_schedule_nulls_tell_a_planted_lead_from_none():
    rng = np.random.default_rng(0)
    commit, steps = rng.integers(0, 20, size=200), np.arange(20)
    knows = first_stable_step(np.ones((200, 20), bool), commit, steps)  # right from step 0
    guesses = first_stable_step(rng.random((200, 20)) < 0.25, commit, steps)  # a 1-in-4 guesser
    table = schedule_nulls(commit, steps, {"planted": commit - knows, "guess": commit - guesses})
    assert table.loc[0, "planted_of_oracle"] == 1.0 and table.loc[0, "guess_of_oracle"] < 0.1


def test_displacement_and_matching_scale():
    before = np.zeros((2, 2))
    after = np.array([[3.0, 4.0], [0.0, 0.0]])
    assert displacement(before, after) == 2.5
    scale = matching_scale(before, after, 10.0)
    assert scale == 4.0 and displacement(before, before + scale * (after - before)) == pytest.approx(10.0)
    with pytest.raises(DlmprobeInputError, match="moves no row"):
        matching_scale(before, before, 1.0)


def test_store_readers_load_the_stores_own_model_and_refuse_other_weights(tiny_run, tmp_path):
    from dlmprobe.probes.lens import readers_of, store_readers

    ckpt, data = tiny_run
    readers = store_readers(data)
    assert readers.note == "" and np.array_equal(readers.readout.W_U, readout_of(from_checkpoint(ckpt)).W_U)
    assert readers.embedding.shape == (ckpt.config.d_vocab, ckpt.config.d_model)
    assert readers.position_embedding.shape[1] == ckpt.config.d_model
    # The store names the checkpoint folder; retrained weights there are not the ones that wrote it.
    saved = {path: path.read_bytes() for path in ckpt.path.iterdir()}
    other = ModelConfig.from_dict({**ckpt.config.to_dict(), "seed": 7})
    save_checkpoint(build_native(other), other, ckpt.path)
    try:
        moved = store_readers(data)
        assert moved.readout is None and moved.embedding is None and "differ" in moved.note
    finally:
        for path, content in saved.items():
            path.write_bytes(content)
    assert store_readers(data).note == "" and readers_of(from_checkpoint(ckpt)).note == ""


def test_accuracy_by_stratum_intervals_resample_examples():
    from dlmprobe.probes.stats import ExampleBootstrap, bootstrap_by_example

    rng = np.random.default_rng(0)
    examples = np.repeat(np.arange(40), 3)
    strata = np.where(examples < 39, examples % 2, 2)  # stratum 2: a single example
    hits = {"planted": strata == 1, "coin": rng.random(len(examples)) < 0.5}
    table = accuracy_by_stratum(hits, strata, examples=examples, n_boot=300).set_index(["reader", "stratum"])
    assert table.loc[("planted", 1), "accuracy"] == 1.0 and table.loc[("planted", 0), "accuracy"] == 0.0
    low, high = table.loc[("coin", 0), ["ci_low", "ci_high"]]
    assert low < table.loc[("coin", 0), "accuracy"] < high and high - low > 0.1
    assert table.loc[("coin", 2), "n_examples"] == 1 and np.isnan(table.loc[("coin", 2), "ci_low"])
    # One set of resamples: an accuracy's interval is bootstrap_by_example's; a difference gets a paired one.
    boot = ExampleBootstrap(examples, 200, np.random.default_rng(3))
    assert boot.interval(hits["coin"]) == bootstrap_by_example(hits["coin"], examples, 200, np.random.default_rng(3))
    same_low, same_high = boot.interval(hits["coin"].astype(float) - hits["coin"])
    assert same_low == same_high == 0.0
