import pytest

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.tasks import TASKS, get_task, split_of
from dlmprobe.tasks.sudoku import count_solutions

ALL_TASKS = [("sudoku", {"size": 4}), ("sudoku", {"size": 6}), ("sudoku", {"size": 9}), ("pathstar", {}), ("arith", {})]


@pytest.mark.parametrize("name,params", ALL_TASKS)
def test_sampling_is_deterministic_and_split_by_hash(name, params):
    task = get_task(name, **params)
    n = 4 if params.get("size") == 9 else 40
    train = task.sample(n, "train", seed=3)
    assert [ex.uid for ex in train] == [ex.uid for ex in task.sample(n, "train", seed=3)]
    assert [ex.uid for ex in train] != [ex.uid for ex in task.sample(n, "train", seed=4)]
    evals = task.sample(n, "eval", seed=3)
    assert all(split_of(ex.uid) == "train" for ex in train)
    assert all(split_of(ex.uid) == "eval" for ex in evals)
    assert not {ex.uid for ex in train} & {ex.uid for ex in evals}
    assert len({ex.uid for ex in train}) == n


@pytest.mark.parametrize("name,params", ALL_TASKS)
def test_examples_verify_and_wrong_outputs_do_not(name, params):
    task = get_task(name, **params)
    for ex in task.sample(3, "eval", seed=0):
        assert len(ex.prompt) == task.prompt_length and len(ex.target) == task.target_length
        assert task.verify(ex.prompt, ex.target)
        wrong = list(ex.target)
        # Change the token at a label position to another token of the target's alphabet.
        pos = next(iter(ex.labels.values())).positions[-1]
        wrong[pos] = next(t for t in sorted(set(ex.target) | set(ex.prompt)) if t != wrong[pos] and t > 4)
        assert not task.verify(ex.prompt, wrong)
        assert not task.verify(ex.prompt, ex.target[:-1])
        seq = ex.sequence(task.vocab)
        assert len(seq) == task.sequence_length
        assert seq[task.target_start : task.target_start + task.target_length] == list(ex.target)
        assert task.render(ex.prompt, ex.target)


@pytest.mark.parametrize("size", [4, 6, 9])
def test_sudoku_puzzles_have_unique_solutions_and_requested_blanks(size):
    task = get_task("sudoku", size=size)
    blank = task.vocab.id("_")
    for ex in task.sample(2 if size == 9 else 10, "eval", seed=1):
        digits = [0 if t == blank else int(task.vocab.tokens[t]) for t in ex.prompt]
        assert digits.count(0) == task.blanks
        assert count_solutions(digits, size, task._peers) == 1
        assert ex.labels["blank"].positions == tuple(i for i, d in enumerate(digits) if d == 0)
        assert ex.labels["cell"].values == ex.target


def test_pathstar_labels_point_at_the_arm_and_goal_decides_it():
    task = get_task("pathstar", arms=3, arm_length=4, n_nodes=20)
    for ex in task.sample(20, "eval", seed=0):
        start, goal = ex.prompt[-2], ex.prompt[-1]
        assert ex.target[0] == start and ex.target[-1] == goal
        assert ex.labels["arm"].values == (ex.target[1],)
        edges = set(zip(ex.prompt[0:24:2], ex.prompt[1:24:2]))
        assert (start, ex.target[1]) in edges
        assert sum(1 for a, _ in edges if a == start) == 3  # the centre has one edge per arm


def test_arith_writes_each_intermediate_result():
    task = get_task("arith", n_ops=3, modulus=10, ops="+*")
    v = task.vocab
    prompt = v.encode(["7", "+", "5", "*", "3", "+", "9"])
    assert task.evaluate(prompt) == [2, 6, 5]
    ex = task.sample(1, "eval", seed=0)[0]
    assert ex.labels["answer"].positions == (2,)
    assert ex.labels["intermediate"].positions == (0, 1)
    assert [ex.labels[f"step{i}"].values[0] for i in (1, 2, 3)] == list(ex.target)


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("sudoku", {"size": 5}, "size must be one of"),
        ("sudoku", {"size": 4, "blanks": 16}, "blanks must be between"),
        ("pathstar", {"arms": 3, "arm_length": 4, "n_nodes": 5}, "n_nodes must be"),
        ("arith", {"ops": "+/"}, "ops must be"),
        ("arith", {"colour": 3}, "bad parameters"),
        ("chess", {}, "unknown task"),
    ],
)
def test_bad_task_parameters_are_one_line_errors(name, params, message):
    with pytest.raises(DlmprobeInputError, match=message) as err:
        get_task(name, **params)
    assert "\n" not in str(err.value)


def test_vocab_round_trip_and_specials():
    task = get_task("arith")
    v = task.vocab
    assert v.tokens[:5] == ("<pad>", "<bos>", "<sep>", "<eos>", "<mask>")
    assert v.decode(v.encode(["3", "+", "4"])) == ["3", "+", "4"]
    with pytest.raises(DlmprobeInputError, match="unknown token"):
        v.encode(["x"])
    assert set(TASKS) == {"sudoku", "sudoku_choice", "pathstar", "arith"}
