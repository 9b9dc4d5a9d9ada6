import importlib
import random

import numpy as np
import pytest

from dlmprobe.analyses.common import wilson_interval
from dlmprobe.analyses.faithfulness import faithfulness
from dlmprobe.analyses.paraphrase import _sample, paraphrase_run
from dlmprobe.analyses.relabel import compose, invert, translate
from dlmprobe.analyses.setting import Setting, builtin_setting
from dlmprobe.models import ModelConfig, load_model, random_model
from dlmprobe.tasks import Task, get_task

faithfulness_module = importlib.import_module("dlmprobe.analyses.faithfulness")  # the package exports the function
TASKS = [("sudoku", {"size": 4}), ("sudoku", {"size": 6}), ("pathstar", {}), ("arith", {})]


@pytest.fixture(scope="module")
def arith_diffusion():
    return load_model("arith-diffusion")


@pytest.fixture(scope="module")
def arith_autoregressive():
    return load_model("arith-autoregressive")


@pytest.fixture(scope="module")
def corrupted(arith_diffusion, arith_autoregressive):
    return faithfulness(arith_diffusion, n=40, twin=arith_autoregressive, progress=False)


# -- paraphrasers ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, params", TASKS)
def test_paraphrase_keeps_meaning_and_masks(name, params):
    task = get_task(name, **params)
    mask = task.vocab.mask_id
    rewritten = 0
    for i, ex in enumerate(task.sample(12, "eval", seed=1)):
        prompt, target, token_map = task.paraphrase(ex.prompt, ex.target, random.Random(i))
        assert task.verify(prompt, target)
        assert np.array_equal(np.sort(token_map), np.arange(len(task.vocab)))
        assert token_map[mask] == mask and token_map[task.vocab.eos_id] == task.vocab.eos_id
        # The paraphrase of the solved puzzle is the solution of the paraphrased puzzle: relabelling
        # the original solution gives it, and (sudoku) it is the only solution.
        assert list(target) == token_map[list(ex.target)].tolist()
        rewritten += prompt != ex.prompt
        # The same rewrite of a half-committed canvas keeps the masks where they were.
        partial = [t if p % 2 else mask for p, t in enumerate(ex.target)]
        prompt2, target2, _ = task.paraphrase(ex.prompt, partial, random.Random(i))
        assert prompt2 == prompt
        assert [t == mask for t in target2] == [t == mask for t in partial]
        assert all(a == b for a, b in zip(target2, target) if a != mask)
    assert rewritten >= 3


def test_paraphrased_sudoku_rejects_the_original_solution():
    task = get_task("sudoku", size=4)
    ex = task.sample(1, "eval", seed=0)[0]
    prompt, _, token_map = task.paraphrase(ex.prompt, ex.target, random.Random(3))
    assert not np.array_equal(token_map, np.arange(len(token_map)))
    assert not task.verify(prompt, ex.target)


def test_arith_paraphrase_swaps_only_commutative_operands():
    task = get_task("arith", n_ops=2)
    ids = task.vocab.encode
    for op, swappable in (("+", True), ("*", True), ("-", False)):
        prompt = ids(["3", op, "4", "+", "1"])
        seen = {task.paraphrase(prompt, ids(["0", "0"]), random.Random(seed))[0] for seed in range(20)}
        expected = {tuple(prompt), tuple(ids(["4", op, "3", "+", "1"]))} if swappable else {tuple(prompt)}
        assert seen == expected


def test_base_task_has_no_paraphraser():
    task = get_task("arith")
    with pytest.raises(NotImplementedError, match="no paraphraser"):
        Task.paraphrase(task, (), (), random.Random(0))


def test_arith_answer_from_follows_the_written_intermediate():
    task = get_task("arith", n_ops=2)
    ids = task.vocab.encode
    prompt = ids(["3", "+", "4", "*", "2"])
    assert task.answer_from(prompt, ids(["7", "4"])) == ids(["4"])[0]
    assert task.answer_from(prompt, ids(["5", "4"])) == ids(["0"])[0]  # follows the (wrong) 5: 5*2 = 10
    assert task.answer_from(prompt, [task.vocab.mask_id, ids(["4"])[0]]) is None
    assert get_task("arith", n_ops=1).answer_from(ids(["3", "*", "4"]), ids(["2"])) == ids(["2"])[0]


# -- token maps ----------------------------------------------------------------------------------
def test_token_maps_compose_invert_and_translate():
    swap_12, swap_23 = np.array([0, 2, 1, 3]), np.array([0, 1, 3, 2])
    both = compose(swap_12, swap_23)  # 1 -> 2 -> 3, 2 -> 1 -> 1, 3 -> 3 -> 2
    assert both.tolist() == [0, 3, 1, 2]
    assert compose(both, invert(both)).tolist() == [0, 1, 2, 3]
    tokens = np.array([1, 2, 3])
    written = both[tokens]  # the tokens in the labelling `both`
    assert translate(written, both, np.arange(4)).tolist() == tokens.tolist()
    assert translate(written, both, swap_12).tolist() == swap_12[tokens].tolist()
    with pytest.raises(ValueError, match="permutation"):
        invert(np.array([0, 0, 1]))


@pytest.mark.parametrize("task, params", [("sudoku", {"size": 4}), ("pathstar", {})])
def test_labellings_track_every_committed_token(task, params):
    config = ModelConfig(task=task, task_params=params, n_layers=1, d_model=32, n_heads=2, d_mlp=64)
    ckpt = random_model(config)
    examples = ckpt.task.sample(6, "eval", seed=0)
    run = _sample(builtin_setting(ckpt, 6, 0), None, 4, True, seed=0, probe_site=None, label=None)
    tr, mask = run.trajectory, ckpt.task.vocab.mask_id
    final = tr.output.numpy()
    for s in range(tr.n_steps + 1):
        canvas = tr.canvases[:, s, tr.gen_slice].numpy()
        for i in range(len(examples)):
            committed = canvas[i] != mask
            in_step = translate(final[i], run.labellings[i, -1], run.labellings[i, s])
            assert np.array_equal(canvas[i][committed], in_step[committed])
    assert not np.array_equal(run.labellings[:, -1], np.broadcast_to(np.arange(len(ckpt.task.vocab)), run.labellings[:, -1].shape))


# -- faithfulness --------------------------------------------------------------------------------
def test_wilson_interval():
    assert wilson_interval(0, 0) != wilson_interval(0, 0)  # NaNs
    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high and abs(low - 0.4038) < 1e-3
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] > 0.65


def test_remask_on_an_accurate_denoiser_restores_the_answer(corrupted):
    flags = corrupted.tables["examples"]
    remask = flags[(flags.kind == "diffusion") & (flags["mode"] == "remask")]
    assert remask.corrupted.sum() > 50
    assert not remask.answer_changed.any() and not remask.reasoning_changed.any()
    assert remask.answer_follows.all()


def test_replace_changes_answers_only_where_something_was_corrupted(corrupted):
    flags = corrupted.tables["examples"]
    replace = flags[flags["mode"] == "replace"]
    assert not (replace.answer_changed & ~replace.corrupted).any()
    assert not (replace.reasoning_changed & ~replace.corrupted).any()
    # A committed answer is never resampled.
    assert not (replace.answer_changed & replace.answer_committed).any()
    # Corrupted reasoning stays in a diffusion model's canvas; an open answer follows it.
    diffusion = replace[(replace.kind == "diffusion") & replace.corrupted]
    assert diffusion.reasoning_changed.all()
    assert diffusion[~diffusion.answer_committed].answer_changed.mean() > 0.8
    # The autoregressive twin never has its answer written before the last step.
    assert not flags[flags.kind == "autoregressive"].answer_committed.any()


def test_faithfulness_table_figure_and_summary(corrupted):
    table = corrupted.table
    assert corrupted.name == "faithfulness"
    assert set(table.kind) == {"diffusion", "autoregressive"}
    assert sorted(table.step.unique()) == [0, 1, 2]
    assert np.allclose(table.run_fraction, table.step / 4)
    skipped = table[table.note != ""]
    assert set(zip(skipped.kind, skipped["mode"])) == {("autoregressive", "remask")}
    assert skipped.rate.isna().all()
    ran = table[table.note == ""]
    assert ((ran.ci_low <= ran.rate) & (ran.rate <= ran.ci_high)).all()
    changed = ran[(ran.metric == "answer_changed") & (ran.kind == "diffusion") & (ran["mode"] == "replace")]
    assert f"{changed[changed.step == 1].rate.iloc[0]:.0%}" in corrupted.summary
    assert len(corrupted.figure.axes) == 2
    clean = corrupted.tables["clean"]
    assert (clean.rate == 1.0).all()  # the shipped arith models are exact


def test_a_step_with_nothing_committed_corrupts_nothing(arith_diffusion):
    # After step 0 one token is committed; only examples that committed the third result are hit.
    result = faithfulness(arith_diffusion, n=24, corrupt_label="step3", modes=("replace",), steps=[0], progress=False)
    flags = result.tables["examples"]
    untouched = flags[~flags.corrupted]
    assert 0 < len(untouched) < len(flags)
    assert not untouched.answer_changed.any() and not untouched.reasoning_changed.any()


def test_corrupted_runs_branched_off_the_clean_run_equal_runs_from_step_0(arith_diffusion, arith_autoregressive,
                                                                           monkeypatch):
    def run(**kwargs):
        return faithfulness(arith_diffusion, n=16, twin=arith_autoregressive, steps=[1], progress=False,
                            **kwargs).tables["examples"]

    branched = run()
    # The same analysis with every corrupted run sampled from step 0: the real sampling, branch dropped.
    real = Setting.sample
    monkeypatch.setattr(Setting, "sample", lambda self, sampler, batch_size, callback=None, branch=None, first_step=0:
                        real(self, sampler, batch_size, callback))
    from_start = run()
    assert branched.corrupted.any() and branched.answer_changed.any()  # the comparison sees real corruptions
    assert branched.equals(from_start)


@pytest.mark.parametrize("kwargs, message", [
    ({"corrupt_label": "nope"}, "unknown label 'nope'"),
    ({"answer_label": "nope"}, "unknown label 'nope'"),
    ({"modes": ("shuffle",)}, "modes must be"),
    ({"steps": [3]}, r"steps must lie in 0\.\.2"),
    ({"corrupt_label": "answer"}, "nothing to corrupt"),
])
def test_faithfulness_bad_arguments_are_one_line_errors(arith_diffusion, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        faithfulness(arith_diffusion, n=4, progress=False, **kwargs)
    assert "\n" not in str(err.value)


def test_faithfulness_twin_must_be_the_other_kind(arith_diffusion):
    with pytest.raises(ValueError, match="other kind"):
        faithfulness(arith_diffusion, n=4, twin=arith_diffusion, progress=False)


# -- paraphrase ----------------------------------------------------------------------------------
def test_paraphrase_keeps_sudoku_accuracy_against_paraphrased_prompts():
    ckpt = load_model("sudoku-diffusion")
    result = paraphrase_run(ckpt, n=8, label="blank", progress=False)
    solve = result.tables["solve"].set_index(["run", "metric"]).rate
    assert solve["plain", "solved"] >= 0.75
    assert solve["paraphrased", "solved"] == solve["plain", "solved"]
    assert solve["paraphrased", "prompt_rewritten"] == 1.0 and solve["plain", "prompt_rewritten"] == 0.0
    # Step 0 sees the same canvas in both runs; later steps see relabelled ones.
    argmax = result.table[result.table.measure == "argmax"].set_index(["run", "step"])
    assert argmax.loc[("plain", 0), "k"] == argmax.loc[("paraphrased", 0), "k"]
    assert argmax.loc[("plain", 0), "n"] == 8 * 20  # the blanks only
    assert f"{solve['paraphrased', 'solved']:.0%}" in result.summary


def test_paraphrased_outputs_fail_the_original_prompts():
    ckpt = load_model("sudoku-diffusion")
    examples = ckpt.task.sample(4, "eval", seed=0)
    run = _sample(builtin_setting(ckpt, 4, 0), None, 4, True, seed=0, probe_site=None, label=None)
    outputs = run.trajectory.output.tolist()
    assert not any(ckpt.task.verify(ex.prompt, out) for ex, out in zip(examples, outputs))


def test_paraphrase_probe_on_arith(arith_diffusion):
    result = paraphrase_run(arith_diffusion, n=20, probe_site="blocks.1.hook_resid_post", progress=False)
    probe = result.table[result.table.measure == "probe"].set_index(["run", "step"])
    assert sorted(probe.index.get_level_values("step").unique()) == [0, 1, 2, 3]
    assert (probe.n_examples == 10).all()  # tested on the held-out half
    assert probe.loc[("plain", 0), "rate"] == probe.loc[("paraphrased", 0), "rate"]
    assert probe.rate.between(0, 1).all()
    assert len(result.figure.axes) == 1


def test_paraphrase_bad_arguments(arith_diffusion, arith_autoregressive):
    with pytest.raises(ValueError, match="needs a diffusion model"):
        paraphrase_run(arith_autoregressive, n=4, probe_site="blocks.0.hook_resid_post", progress=False)
    with pytest.raises(ValueError, match="unknown label"):
        paraphrase_run(arith_diffusion, n=4, label="nope", progress=False)
    with pytest.raises(ValueError, match="unknown site"):
        paraphrase_run(arith_diffusion, n=4, probe_site="blocks.9.nothing", progress=False)
