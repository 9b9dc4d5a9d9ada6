"""Training of the built-in models: the masked-diffusion objective and the next-token objective.

Diffusion (MDLM / LLaDA): draw ``t ~ U(0, 1]`` per sequence, mask each target token with probability
``t`` (the prompt is never masked), and minimise the cross-entropy on masked positions weighted by
``1/t``. Autoregressive twin: next-token cross-entropy on the target and ``<eos>``. Both see the same
stream of training puzzles. Training is seeded and resumable: the batch and the noise of step ``s``
depend only on ``(seed, s)``, and the optimiser state is saved beside the weights (safetensors +
JSON).

A model may start from another checkpoint's weights (``init_from``) instead of a random draw: a
denoiser initialised from its autoregressive twin, as Dream-7B is from Qwen2.5 and DiffuLLaMA from
LLaMA. The architecture must match in everything but the attention direction.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dlmprobe import __version__
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models import ModelConfig, build_native, load_native, save_checkpoint
from dlmprobe.models.checkpoint import WEIGHTS_FILE
from dlmprobe.sampling import evaluate

STATE_DIR = "train_state"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    """One training job. ``model`` holds the architecture and task; the rest is optimisation."""

    model: ModelConfig
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 200
    eval_every: int = 500
    eval_n: int = 200
    seed: int = 0
    init_from: str = ""
    command: str = field(default="")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_n"):
            if int(getattr(self, name)) < 1:
                raise DlmprobeInputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise DlmprobeInputError(f"lr must be positive, got {self.lr!r}")

    def initial_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The weights ``init_from`` names and their provenance; None for a random start.

        Raises ValueError when that checkpoint's architecture or task differs from ``model``'s
        (the attention direction may differ: that is the point of starting from a twin; so may the
        seed, which only draws random weights).
        """
        if not self.init_from:
            return None
        native, source, _, path = load_native(self.init_from)
        ignored = {"kind": "", "seed": 0}  # the attention direction, and the seed of a random draw not taken
        mine, theirs = self.model.to_dict() | ignored, source.to_dict() | ignored
        if mine != theirs:
            diff = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise DlmprobeInputError(f"cannot initialise from {self.init_from!r}: expected a checkpoint with this model's "
                                     f"architecture and task, but it differs in {diff} "
                                     f"({', '.join(f'{k}={theirs.get(k)!r}' for k in diff)})")
        digest = hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest()
        return native.state_dict(), {"init_from": self.init_from, "init_kind": source.kind, "init_weights_sha256": digest}

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of ``lr``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = self.model.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "model": ModelConfig.from_dict(data["model"])})


def diffusion_loss(model: torch.nn.Module, tokens: torch.Tensor, target_start: int, target_length: int,
                   mask_id: int, generator: torch.Generator) -> torch.Tensor:
    batch = tokens.shape[0]
    region = slice(target_start, target_start + target_length)
    t = 1e-3 + (1 - 1e-3) * torch.rand((batch, 1), generator=generator)
    masked = torch.rand((batch, target_length), generator=generator) < t
    noisy = tokens.clone()
    noisy[:, region] = torch.where(masked, torch.full_like(masked, mask_id, dtype=tokens.dtype), tokens[:, region])
    logits = model(noisy)[:, region]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, region].reshape(-1), reduction="none")
    return (ce.view(batch, target_length) * masked / t).sum() / (batch * target_length)


def autoregressive_loss(model: torch.nn.Module, tokens: torch.Tensor, target_start: int) -> torch.Tensor:
    # Positions target_start-1 ... L-2 predict the target and <eos>.
    logits = model(tokens[:, :-1])[:, target_start - 1 :]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, target_start:].reshape(-1))


def _init_info(out: Path) -> dict[str, Any]:
    """The provenance of a resumed run's initial weights, as its first save recorded it."""
    try:
        saved = json.loads((out / "config.json").read_text())["info"]
    except (OSError, ValueError, KeyError):
        return {}
    return {k: saved[k] for k in ("init_from", "init_kind", "init_weights_sha256") if k in saved}


def _save_optimizer(optimizer: torch.optim.Optimizer, folder: Path, meta: dict[str, Any]) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, param_state in state["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "optimizer.safetensors.tmp"))
    (folder / "state.json.tmp").write_text(json.dumps(
        {**meta, "param_groups": state["param_groups"], "scalars": scalars}, indent=2))
    (folder / "optimizer.safetensors.tmp").replace(folder / "optimizer.safetensors")
    (folder / "state.json.tmp").replace(folder / "state.json")


def _load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> dict[str, Any]:
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
    return meta


def train(config: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> Path:
    """Train ``config.model`` into the checkpoint folder ``out``; returns the folder.

    The folder holds the weights and config (a loadable checkpoint after every evaluation), the
    training log (``train_log.jsonl``, one line per evaluation) and ``train_state/`` for resuming.
    """
    out = Path(out)
    has_checkpoint = (out / "config.json").exists()
    if has_checkpoint and not (resume or overwrite):
        raise FileExistsError(f"{out} already holds a checkpoint; pass --resume to continue it or --overwrite to replace it")
    if resume and not (out / STATE_DIR / "state.json").exists():
        raise FileNotFoundError(f"cannot resume: {out / STATE_DIR / 'state.json'} does not exist")

    mc = config.model
    task = mc.build_task()
    model = build_native(mc)
    start = None if resume else config.initial_weights()
    if start is not None:
        model.load_state_dict(start[0])
    # Where the weights began: from the source now, or as a resumed run's first save recorded it.
    provenance = start[1] if start is not None else _init_info(out) if resume and config.init_from else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    start_step, elapsed_before = 0, 0.0
    if resume:
        saved = TrainConfig.from_dict(json.loads((out / STATE_DIR / "state.json").read_text())["train_config"])
        if saved.to_dict() | {"command": ""} != config.to_dict() | {"command": ""}:
            raise DlmprobeInputError(f"cannot resume {out}: it was trained with a different configuration {saved.to_dict()}")
        native, _, _, _ = load_native(out)
        model.load_state_dict(native.state_dict())
        meta = _load_optimizer(optimizer, out / STATE_DIR)
        start_step, elapsed_before = meta["step"], meta["elapsed_s"]
    elif overwrite:
        for name in ("config.json", "model.safetensors", LOG_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    vocab = task.vocab
    n_params = sum(p.numel() for p in model.parameters())
    began = time.perf_counter()
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, disable=not progress,
               desc=f"train {mc.task}-{mc.kind}", unit="step")
    loss_sum, loss_n = 0.0, 0
    model.train()
    for step in bar:
        examples = task.sample(config.batch_size, "train", seed=config.seed * 1_000_003 + step)
        tokens = torch.tensor([ex.sequence(vocab) for ex in examples], dtype=torch.long)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        if mc.kind == "diffusion":
            loss = diffusion_loss(model, tokens, task.target_start, task.target_length, vocab.mask_id, generator)
        else:
            loss = autoregressive_loss(model, tokens, task.target_start)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        bar.set_postfix(loss=f"{loss.item():.4f}")

        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            accuracy = evaluate(model, task, mc.kind, n=config.eval_n, seed=1)
            model.train()
            elapsed = elapsed_before + time.perf_counter() - began
            record = {"step": done, "loss": loss_sum / loss_n, "lr": config.lr_at(step),
                      "eval_accuracy": accuracy, "eval_n": config.eval_n, "elapsed_s": round(elapsed, 1)}
            loss_sum, loss_n = 0.0, 0
            with open(out / LOG_FILE, "a") as log:
                log.write(json.dumps(record) + "\n")
            bar.write(f"step {done}: loss {record['loss']:.4f}  eval exact-solve {accuracy:.3f}")
            info = {
                "dlmprobe_version": __version__,
                "command": config.command,
                "train_config": config.to_dict(),
                "steps_done": done,
                "wall_time_s": round(elapsed, 1),
                "n_params": n_params,
                "threads": torch.get_num_threads(),
                "last_eval": record,
            }
            info.update(provenance)
            save_checkpoint(model, mc, out, info)
            _save_optimizer(optimizer, out / STATE_DIR,
                            {"step": done, "elapsed_s": elapsed, "train_config": config.to_dict()})
    return out


def command_line() -> str:
    """The command that started this process, for the model card."""
    return " ".join(["dlmprobe"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith("dlmprobe") else " ".join(sys.argv)
