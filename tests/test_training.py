import json

import pytest
import torch
from safetensors.torch import load_file

from dlmprobe.models import build_native
from dlmprobe.training import TrainConfig, diffusion_loss, train


def test_diffusion_loss_only_counts_masked_target_positions(tiny_config):
    task = tiny_config.build_task()
    model = build_native(tiny_config)
    tokens = torch.tensor([ex.sequence(task.vocab) for ex in task.sample(8, "train")])
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen["input"] = x
            return model(x)

    diffusion_loss(Spy(), tokens, task.target_start, task.target_length, task.vocab.mask_id,
                   torch.Generator().manual_seed(0))
    masked = seen["input"] == task.vocab.mask_id
    assert not masked[:, : task.target_start].any() and not masked[:, task.target_start + task.target_length :].any()
    assert masked.any()


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


def test_resume_ends_where_an_uninterrupted_run_ends(tiny_config, tmp_path, monkeypatch):
    import dlmprobe.training.trainer as trainer

    config = TrainConfig(tiny_config, steps=8, batch_size=8, warmup=2, eval_every=4, eval_n=4)
    train(config, tmp_path / "straight", progress=False)

    class Crash(Exception):
        pass

    save_optimizer = trainer._save_optimizer

    def save_then_crash(optimizer, folder, meta):
        save_optimizer(optimizer, folder, meta)
        raise Crash  # the job dies right after its step-4 save

    monkeypatch.setattr(trainer, "_save_optimizer", save_then_crash)
    with pytest.raises(Crash):
        train(config, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(trainer, "_save_optimizer", save_optimizer)
    train(config, tmp_path / "resumed", resume=True, progress=False)

    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [4, 8]


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
