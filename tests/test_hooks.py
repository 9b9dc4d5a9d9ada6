import pytest
import torch

from dlmprobe.hooks import ActivationRecorder, layer_of, resolve_sites
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
        trajectory = generate(rec.model, task, examples, "diffusion")
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
        trajectory = generate(rec.model, task, task.sample(3, "eval"), "diffusion")
        capture = rec.pop()
    assert capture.steps == [0, 2]
    acts = capture.activations["blocks.1.hook_resid_post"]
    assert acts.shape == (3, 2, 2, model.cfg.d_model)
    _, cache = model.run_with_cache(trajectory.canvases[:, 2])
    assert torch.equal(acts[:, 1], cache["blocks.1.hook_resid_post"][:, positions])
    with ActivationRecorder(model, "blocks.1.hook_resid_post", steps=[1]) as rec:
        generate(rec.model, task, task.sample(3, "eval"), "diffusion")
        assert rec.pop().steps == [1]


def test_nnsight_backend_gives_the_same_numbers(diffusion):
    """The same model, addressed by module path through nnsight, records exactly the same values."""
    task, model = diffusion.task, diffusion.model
    examples = task.sample(4, "eval")
    with ActivationRecorder(model, "blocks.*.hook_resid_post") as rec:
        reference = generate(rec.model, task, examples, "diffusion")
        expected = rec.pop().activations
    paths = {f"blocks.{i}.hook_resid_post": f"blocks.{i}.hook_out" for i in range(2)}
    with ActivationRecorder(model, paths, backend="nnsight") as rec:
        trajectory = generate(rec.model, task, examples, "diffusion")
        got = rec.pop().activations
    assert torch.equal(trajectory.canvases, reference.canvases)
    for site in paths:
        assert torch.equal(got[site], expected[site])


def test_nnsight_backend_on_a_plain_torch_module(diffusion):
    """Any torch module: the unwrapped native model, by its own module paths (layers.i)."""
    task = diffusion.task
    examples = task.sample(4, "eval")
    with ActivationRecorder(diffusion.model, "blocks.*.hook_resid_post") as rec:
        generate(rec.model, task, examples, "diffusion")
        expected = rec.pop().activations
    plain = build_native(diffusion.config)  # same seed, same weights, no TransformerLens wrapper
    with ActivationRecorder(plain, {"blocks.0.hook_resid_post": "layers.0", "blocks.1.hook_resid_post": "layers.1"}) as rec:
        assert rec.backend == "nnsight"
        generate(rec.model, task, examples, "diffusion")
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
