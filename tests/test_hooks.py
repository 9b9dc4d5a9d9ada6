import pytest
import torch

from dlmprobe.hooks import ActivationEditor, ActivationRecorder, layer_of, resolve_sites
from dlmprobe.models import build_native, random_model
from dlmprobe.sampling import generate


@pytest.fixture
def diffusion(tiny_config):
    return random_model(tiny_config)


def _installed_hooks(model) -> int:
    points = {id(point): point for point in model.hook_dict.values()}  # aliases share a hook point
    return sum(len(point._forward_hooks) for point in points.values())


def test_recorded_steps_equal_run_with_cache_on_each_canvas(diffusion):
    task, model = diffusion.task, diffusion.model
    examples = task.sample(5, "eval")
    with ActivationRecorder(model, ["blocks.*.hook_resid_post", "blocks.0.attn.hook_out"]) as rec:
        trajectory = generate(rec.model, task, examples, "diffusion", observers=[rec])
        capture = rec.pop()
    assert capture.steps == list(range(task.target_length))
    for step in capture.steps:
        _, cache = model.run_with_cache(trajectory.canvases[:, step])
        for site, acts in capture.activations.items():
            assert torch.equal(acts[:, step], cache[site]), (site, step)


def test_no_hook_survives_the_block_even_when_it_raises(diffusion):
    model = diffusion.model
    assert _installed_hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationRecorder(model, "blocks.*.hook_resid_post"):
            assert _installed_hooks(model) == 2
            raise RuntimeError("boom")
    assert _installed_hooks(model) == 0


def test_step_and_position_selection(diffusion):
    task, model = diffusion.task, diffusion.model
    positions = [task.target_start, task.target_start + 2]
    with ActivationRecorder(model, "blocks.1.hook_resid_post", steps=2, positions=positions) as rec:
        trajectory = generate(rec.model, task, task.sample(3, "eval"), "diffusion", observers=[rec])
        capture = rec.pop()
    assert capture.steps == [0, 2]
    acts = capture.activations["blocks.1.hook_resid_post"]
    assert acts.shape == (3, 2, 2, model.cfg.d_model)
    _, cache = model.run_with_cache(trajectory.canvases[:, 2])
    assert torch.equal(acts[:, 1], cache["blocks.1.hook_resid_post"][:, positions])
    with ActivationRecorder(model, "blocks.1.hook_resid_post", steps=[1]) as rec:
        generate(rec.model, task, task.sample(3, "eval"), "diffusion", observers=[rec])
        assert rec.pop().steps == [1]


def test_nnsight_backend_gives_the_same_numbers(diffusion):
    """The same model, addressed by module path through nnsight, records exactly the same values."""
    task, model = diffusion.task, diffusion.model
    examples = task.sample(4, "eval")
    with ActivationRecorder(model, "blocks.*.hook_resid_post") as rec:
        reference = generate(rec.model, task, examples, "diffusion", observers=[rec])
        expected = rec.pop().activations
    paths = {f"blocks.{i}.hook_resid_post": f"blocks.{i}.hook_out" for i in range(2)}
    with ActivationRecorder(model, paths, backend="nnsight") as rec:
        trajectory = generate(rec.model, task, examples, "diffusion", observers=[rec])
        got = rec.pop().activations
    assert torch.equal(trajectory.canvases, reference.canvases)
    for site in paths:
        assert torch.equal(got[site], expected[site])


def test_nnsight_backend_on_a_plain_torch_module(diffusion):
    """Any torch module: the unwrapped native model, by its own module paths (layers.i)."""
    task = diffusion.task
    examples = task.sample(4, "eval")
    with ActivationRecorder(diffusion.model, "blocks.*.hook_resid_post") as rec:
        generate(rec.model, task, examples, "diffusion", observers=[rec])
        expected = rec.pop().activations
    plain = build_native(diffusion.config)  # same seed, same weights, no TransformerLens wrapper
    with ActivationRecorder(plain, {"blocks.0.hook_resid_post": "layers.0", "blocks.1.hook_resid_post": "layers.1"}) as rec:
        assert rec.backend == "nnsight"
        generate(rec.model, task, examples, "diffusion", observers=[rec])
        got = rec.pop().activations
    for site, value in expected.items():
        assert torch.allclose(got[site], value, atol=1e-4)


def test_bad_sites_are_one_line_errors(diffusion):
    with pytest.raises(ValueError, match="unknown site 'blocks.7.hook_resid_post'") as err:
        ActivationRecorder(diffusion.model, "blocks.7.hook_resid_post")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown module path 'layers.9'"):
        with ActivationRecorder(build_native(diffusion.config), ["layers.9"]):
            pass
    with pytest.raises(ValueError, match="matched no hook name"):
        ActivationRecorder(diffusion.model, lambda name: False)


def test_site_resolution_keeps_execution_order():
    available = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert resolve_sites(["blocks.1.hook_resid_post", "blocks.0.*"], available) == available[:2] + available[2:]
    assert resolve_sites(lambda n: n.endswith("post"), available) == available[1:]
    assert layer_of("blocks.12.attn.hook_out") == 12 and layer_of("hook_embed") is None


def test_recorder_takes_steps_and_rows_from_the_sampler_across_batches(diffusion):
    """Several batches in one generate call: one capture, rows in order, steps as the sampler numbered them."""
    task, model = diffusion.task, diffusion.model
    examples = task.sample(7, "eval")
    with ActivationRecorder(model, "blocks.0.hook_resid_post", steps=[0, 2]) as rec:
        trajectory = generate(rec.model, task, examples, "diffusion", batch_size=3, observers=[rec])
        capture = rec.pop()
    assert capture.steps == [0, 2] and capture.rows.tolist() == list(range(7))
    _, cache = model.run_with_cache(trajectory.canvases[:, 2])
    assert torch.equal(capture.activations["blocks.0.hook_resid_post"][:, 1], cache["blocks.0.hook_resid_post"])


def test_recorder_refuses_a_forward_pass_with_no_step(diffusion):
    task = diffusion.task
    with ActivationRecorder(diffusion.model, "blocks.0.hook_resid_post") as rec, \
            pytest.raises(RuntimeError, match="no step announced"):
        generate(rec.model, task, task.sample(2, "eval"), "diffusion")
    assert _installed_hooks(diffusion.model) == 0


def _target_positions(task, n):
    where = torch.zeros((n, task.sequence_length), dtype=torch.bool)
    where[:, task.target_start : task.target_start + task.target_length] = True
    return where


@pytest.mark.parametrize("start", [0, 1, 2])
def test_editor_edits_from_its_start_step_the_selected_still_masked_pairs(diffusion, start):
    task, model = diffusion.task, diffusion.model
    examples = task.sample(12, "eval", seed=0)
    where = _target_positions(task, len(examples))
    where[::2, task.target_start] = False  # positions outside `where` are never edited
    clean = generate(model, task, examples, "diffusion", batch_size=5)
    seen = []

    def record(h, rows, positions):
        seen.append(sorted(zip(rows.tolist(), positions.tolist())))
        return h

    with ActivationEditor(model, "blocks.1.hook_resid_post", record, where, start_step=start,
                          mask_id=task.vocab.mask_id) as editor:
        run = generate(model, task, examples, "diffusion", batch_size=5, observers=[editor])
    assert torch.equal(run.canvases, clean.canvases)
    masked = (clean.canvases == task.vocab.mask_id) & where.unsqueeze(1)  # (example, step, pos)
    expected = [
        sorted((e, p) for e in range(first, min(first + 5, len(examples))) for p in masked[e, step].nonzero().flatten().tolist())
        for first in range(0, len(examples), 5) for step in range(start, clean.n_steps)
    ]
    assert seen == expected  # one call per forward pass from the start step, rows of the whole call

    shift = torch.linspace(-3, 3, model.cfg.d_model)
    with ActivationEditor(model, "blocks.1.hook_resid_post", lambda h, r, p: h + shift, where, start_step=start,
                          mask_id=task.vocab.mask_id) as editor:
        shifted = generate(model, task, examples, "diffusion", batch_size=5, observers=[editor])
    assert torch.equal(shifted.confidence[:, :start], clean.confidence[:, :start])
    assert not torch.equal(shifted.confidence[:, start], clean.confidence[:, start])


def test_editor_start_step_per_row_and_no_mask_filter(diffusion):
    """Each row its own start step; without mask_id committed positions are edited too."""
    task, model = diffusion.task, diffusion.model
    examples = task.sample(4, "eval")
    where = _target_positions(task, 4)
    starts = torch.tensor([0, 1, 2, 3])  # 3: never, the run has 3 steps
    seen = []

    def record(h, rows, positions):
        seen.append((rows.unique().tolist(), len(rows)))
        return h

    with ActivationEditor(model, "blocks.0.hook_resid_post", record, where, start_step=starts) as editor:
        generate(model, task, examples, "diffusion", observers=[editor])
    length = task.target_length
    assert seen == [([0], length), ([0, 1], 2 * length), ([0, 1, 2], 3 * length)]


def test_editor_by_module_path_equals_the_hook_name(diffusion):
    """A plain torch module edited at a module path gives the numbers of the TransformerLens hook."""
    task = diffusion.task
    examples = task.sample(4, "eval")
    where = _target_positions(task, 4)

    def ablate(h, rows, positions):
        return torch.zeros_like(h)

    with ActivationEditor(diffusion.model, "blocks.0.hook_resid_post", ablate, where, start_step=1) as editor:
        expected = generate(diffusion.model, task, examples, "diffusion", observers=[editor])
    plain = build_native(diffusion.config)
    with ActivationEditor(plain, "layers.0", ablate, where, start_step=1) as editor:
        assert editor.backend == "module"
        got = generate(plain, task, examples, "diffusion", observers=[editor])
    assert not plain.layers[0]._forward_hooks
    assert torch.equal(got.canvases, expected.canvases)
    assert torch.allclose(got.confidence, expected.confidence, atol=1e-4)


def test_editor_hooks_are_removed_when_the_edit_raises(diffusion):
    task, model = diffusion.task, diffusion.model
    examples = task.sample(3, "eval")
    tokens = torch.tensor([ex.sequence(task.vocab) for ex in examples])
    before = model(tokens)

    def fail(h, rows, positions):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"), \
            ActivationEditor(model, "blocks.0.hook_resid_post", fail, _target_positions(task, 3)) as editor:
        assert _installed_hooks(model) == 1
        generate(model, task, examples, "diffusion", observers=[editor])
    assert _installed_hooks(model) == 0 and not model.training
    assert torch.equal(model(tokens), before)


def test_editor_refuses_bad_input_in_one_line(diffusion):
    model, task = diffusion.model, diffusion.task
    where = _target_positions(task, 2)
    cases = [
        (("blocks.9.hook_resid_post", where), {}, "unknown site"),
        (("blocks.0.hook_resid_post", where.long()), {}, "where must be a bool tensor"),
        (("blocks.0.hook_resid_post", where), {"start_step": torch.tensor([0, 1, 2])}, "one step per example"),
    ]
    for (site, mask), kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            ActivationEditor(model, site, lambda h, r, p: h, mask, **kwargs)
        assert "\n" not in str(caught.value)
    with ActivationEditor(model, "blocks.0.hook_resid_post", lambda h, r, p: h, where) as editor, \
            pytest.raises(ValueError, match="where covers 2 examples"):
        generate(model, task, task.sample(3, "eval"), "diffusion", observers=[editor])
