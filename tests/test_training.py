import json

import pytest
import torch
from safetensors.torch import load_file

from dlmprobe.cli import main
from dlmprobe.models import build_native
from dlmprobe.training import TrainConfig, diffusion_loss, plateau_verdict, read_curve, recent_gain, train


def test_diffusion_loss_only_counts_masked_target_positions(tiny_config):
    """Changing the logits anywhere but at masked target positions leaves the loss unchanged."""
    task = tiny_config.build_task()
    model = build_native(tiny_config)
    tokens = torch.tensor([ex.sequence(task.vocab) for ex in task.sample(8, "train")])
    mask_id = task.vocab.mask_id

    def loss(noise_where):
        def perturbed(x):
            logits = model(x)
            noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
            return logits + 5 * noise * noise_where(x).unsqueeze(-1)
        return diffusion_loss(perturbed, tokens, task.target_start, task.target_length, mask_id,
                              torch.Generator().manual_seed(0))

    with torch.no_grad():
        clean = loss(lambda x: torch.zeros_like(x, dtype=torch.bool))
        elsewhere = loss(lambda x: x != mask_id)  # prompt, unmasked target, <sep>, <eos>
        at_masks = loss(lambda x: x == mask_id)
    assert torch.allclose(clean, elsewhere) and not torch.allclose(clean, at_masks)
    assert clean > 0


@pytest.mark.parametrize("kind", ["diffusion", "autoregressive"])
def test_training_lowers_the_loss(tiny_config, tmp_path, kind):
    config = TrainConfig(tiny_config if kind == "diffusion" else tiny_config.twin(), steps=60, batch_size=32,
                         lr=3e-3, warmup=5, eval_every=30, eval_n=8)
    out = train(config, tmp_path / kind, progress=False)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [30, 60]
    assert log[-1]["loss"] < log[0]["loss"]
    info = json.loads((out / "config.json").read_text())["info"]
    assert info["steps_done"] == 60 and info["n_params"] > 0


class Crash(Exception):
    pass


@pytest.mark.parametrize("where,at_step", [("commit", 4), ("commit", 8), ("export", 8)])
def test_resume_ends_where_an_uninterrupted_run_ends(tiny_config, tmp_path, monkeypatch, where, at_step):
    """A save dies before its commit (at the very first save too) or between commit and export."""
    from dlmprobe.training import state, trainer

    config = TrainConfig(tiny_config, steps=8, batch_size=8, warmup=2, eval_every=4, eval_n=4)
    train(config, tmp_path / "straight", progress=False)

    module, name = (state, "commit") if where == "commit" else (trainer, "write_checkpoint")
    real = getattr(module, name)

    def die_at_step(*args):
        if (args[1]["step"] if where == "commit" else args[3]["steps_done"]) == at_step:
            raise Crash
        return real(*args)

    monkeypatch.setattr(module, name, die_at_step)
    with pytest.raises(Crash):
        train(config, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(module, name, real)
    marker = tmp_path / "resumed" / "train_state" / "state.json"
    committed = json.loads(marker.read_text())["step"] if marker.exists() else 0
    assert committed == (at_step if where == "export" else at_step - 4)
    with pytest.raises(FileExistsError):  # a killed run is still a run: a plain rerun does not clobber it
        train(config, tmp_path / "resumed", progress=False)
    train(config, tmp_path / "resumed", resume=True, progress=False)

    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [4, 8]
    assert sorted(p.name for p in (tmp_path / "resumed" / "train_state").iterdir()) == [
        "state.json", "step-00000008.model.safetensors", "step-00000008.optimizer.safetensors"]


def test_existing_output_needs_resume_or_overwrite(tiny_config, tmp_path):
    config = TrainConfig(tiny_config, steps=2, batch_size=4, warmup=1, eval_every=2, eval_n=2)
    train(config, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, tmp_path / "run", progress=False)
    other = TrainConfig(tiny_config, steps=3, batch_size=4, warmup=1, eval_every=2, eval_n=2)
    with pytest.raises(ValueError, match="different configuration"):
        train(other, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(config, tmp_path / "fresh", resume=True, progress=False)


def test_a_denoiser_can_start_from_its_autoregressive_twin(tiny_config, tmp_path):
    from dlmprobe.models import ModelConfig

    twin_model = ModelConfig.from_dict({**tiny_config.twin().to_dict(), "seed": 1})
    twin = TrainConfig(twin_model, steps=4, batch_size=8, warmup=1, eval_every=4, eval_n=4)
    train(twin, tmp_path / "twin", progress=False)
    config = TrainConfig(tiny_config, steps=4, batch_size=8, warmup=1, eval_every=2, eval_n=4,
                         init_from=str(tmp_path / "twin"))
    weights, provenance = config.initial_weights()
    saved = load_file(str(tmp_path / "twin" / "model.safetensors"))
    assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved)
    assert provenance["init_kind"] == "autoregressive" and len(provenance["init_weights_sha256"]) == 64

    out = train(config, tmp_path / "denoiser", progress=False)
    info = json.loads((out / "config.json").read_text())["info"]
    assert info["init_from"] == str(tmp_path / "twin") and info["init_weights_sha256"] == provenance["init_weights_sha256"]
    trained = load_file(str(out / "model.safetensors"))
    random_start = build_native(tiny_config).state_dict()  # what seed 0 would have drawn
    # Four small steps move the weights a little: they stay far nearer the twin's than the random draw.
    for key in saved:
        if saved[key].dim() == 2:
            assert (trained[key] - saved[key]).norm() < 0.5 * (random_start[key] - saved[key]).norm(), key


def test_starting_weights_must_match_the_architecture(tiny_config, tmp_path):
    from dlmprobe.models import ModelConfig

    wider = ModelConfig.from_dict({**tiny_config.twin().to_dict(), "d_model": 64})
    train(TrainConfig(wider, steps=1, batch_size=4, warmup=1, eval_every=1, eval_n=2), tmp_path / "wide", progress=False)
    config = TrainConfig(tiny_config, steps=2, batch_size=4, warmup=1, eval_every=2, eval_n=2,
                         init_from=str(tmp_path / "wide"))
    with pytest.raises(ValueError, match=r"differs in \['d_model'\]"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    missing = TrainConfig(tiny_config, steps=2, batch_size=4, warmup=1, eval_every=2, eval_n=2,
                          init_from=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(missing, tmp_path / "run", progress=False)



@pytest.mark.parametrize(("curve", "verdict"), [
    ([(500, 0.30), (1000, 0.50), (1500, 0.70)], "still rising"),  # +40 points over the last 1000 steps
    ([(1000, 0.80), (1500, 0.83), (2000, 0.822)], "still rising"),  # +2.2: just over the 2-point tolerance
    ([(1000, 0.80), (1500, 0.81), (2000, 0.82)], "level"),  # exactly the tolerance
    ([(1000, 0.90), (1500, 0.86), (2000, 0.85)], "level"),  # falling counts as level
    ([(2000, 0.85), (1000, 0.80), (1500, 0.86)], "still rising"),  # order of the records does not matter
    ([(500, 0.40), (1000, 0.99)], "at the ceiling"),
    ([(500, 0.40), (1000, 0.60)], "too short to tell"),  # nothing 1000 steps back
    ([], "too short to tell"),
])
def test_plateau_verdict_reads_the_last_1000_steps(curve, verdict):
    assert plateau_verdict(curve) == verdict


def test_the_curve_is_read_from_the_training_log(tiny_config, tmp_path):
    config = TrainConfig(tiny_config, steps=6, batch_size=4, lr=1e-3, warmup=1, eval_every=2, eval_n=4)
    train(config, tmp_path / "run", progress=False)
    curve = read_curve(tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert curve == [(r["step"], r["eval_accuracy"]) for r in log] and [step for step, _ in curve] == [2, 4, 6]
    assert recent_gain(curve, span=4) == pytest.approx(curve[-1][1] - curve[0][1])
    assert recent_gain(curve) is None  # a 6-step run has nothing 1000 steps back


def test_dlmprobe_train_says_whether_the_curve_levelled_off(tmp_path, capsys):
    args = ["train", "--task", "arith", "--task-param", "n_ops=3", "--kind", "diffusion", "--n-layers", "1",
            "--d-model", "16", "--n-heads", "2", "--d-mlp", "32", "--batch-size", "4", "--warmup", "1",
            "--eval-every", "2", "--eval-n", "4", "--train-steps", "4", "--out", str(tmp_path / "model")]
    assert main(args) == 0
    accuracy = read_curve(tmp_path / "model")[-1][1]
    assert f"held-out exact-solve {accuracy:.1%} at step 4: too short to tell" in capsys.readouterr().out
