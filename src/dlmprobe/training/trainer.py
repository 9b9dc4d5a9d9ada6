"""Training of the built-in models: the masked-diffusion objective and the next-token objective.

Diffusion (MDLM / LLaDA): draw ``t ~ U(0, 1]`` per sequence, mask each target token with probability
``t`` (the prompt is never masked), and minimise the cross-entropy on masked positions weighted by
``1/t``. Autoregressive twin: next-token cross-entropy on the target and ``<eos>``. Both see the same
stream of training puzzles. Training is seeded and resumable: the batch and the noise of step ``s``
depend only on ``(seed, s)``, and the optimiser state is saved beside the weights (safetensors +
JSON), as one unit per save (see :mod:`dlmprobe.training.state`).

A model may start from another checkpoint's weights (``init_from``) instead of a random draw: a
denoiser initialised from its autoregressive twin, as Dream-7B is from Qwen2.5 and DiffuLLaMA from
LLaMA. The architecture must match in everything but the attention direction.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dlmprobe import __version__
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.files import check_object
from dlmprobe.models import ModelConfig, build_native, load_native
from dlmprobe.models.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    weights_bytes,
    write_checkpoint,
)
from dlmprobe.sampling import evaluate
from dlmprobe.training.state import (
    LOG_FILE,
    STATE_DIR,
    STATE_FILE,
    append_log,
    load_optimizer,
    read_state,
    remove_uncommitted,
    restore_log,
    save_state,
)

# The JSON type of every field but ``model``, checked when a saved config is read back.
FIELD_TYPES: dict[str, type] = {"steps": int, "batch_size": int, "lr": float, "weight_decay": float, "warmup": int,
                                "eval_every": int, "eval_n": int, "seed": int, "init_from": str, "command": str}


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

    def initial_weights(self, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The weights ``init_from`` names and their provenance; None for a random start.

        Raises DlmprobeInputError when that checkpoint's architecture or task differs from
        ``model``'s (the attention direction may differ: that is the point of starting from a twin;
        so may the seed, which only draws random weights). ``verify``: check its weights' sha256.
        """
        if not self.init_from:
            return None
        native, source, _, path = load_native(self.init_from, verify=verify)
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
    def from_dict(cls, data: dict[str, Any], where: str = "training config") -> TrainConfig:
        """The config ``data`` describes; ``where`` (e.g. a file name) starts any error line."""
        check_object(data, {"model": dict}, where, optional=FIELD_TYPES)
        model = ModelConfig.from_dict(data["model"], where=f"{where} field 'model'")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{**{k: v for k, v in data.items() if k in known}, "model": model})
        except ValueError as err:
            raise DlmprobeInputError(f"{where}: {err}") from None


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


def _clear_run(out: Path) -> None:
    """Remove a run's files from ``out`` (what ``--overwrite`` replaces; nothing else in the folder)."""
    for name in (CONFIG_FILE, WEIGHTS_FILE, LOG_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def train(config: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, verify: bool = True) -> Path:
    """Train ``config.model`` into the checkpoint folder ``out``; returns the folder.

    The folder holds the weights and config (a loadable checkpoint after every evaluation), the
    training log (``train_log.jsonl``, one line per evaluation) and ``train_state/``, the last
    committed unit to resume from. ``resume`` continues from that unit, or starts again when the
    run was killed before its first save. ``verify``: check saved and starting weights' sha256.
    """
    out = Path(out)
    state_dir = out / STATE_DIR
    if any((out / name).exists() for name in (CONFIG_FILE, STATE_DIR, LOG_FILE)) and not (resume or overwrite):
        raise FileExistsError(f"{out} already holds a checkpoint; pass --resume to continue it or --overwrite to replace it")
    if resume and not state_dir.is_dir():
        raise FileNotFoundError(f"cannot resume: {out} holds no training run ({state_dir} does not exist)")

    mc = config.model
    task = mc.build_task()
    model = build_native(mc)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    committed = None
    if resume and (state_dir / STATE_FILE).exists():
        committed, weights, moments = read_state(state_dir, verify)
        saved = TrainConfig.from_dict(committed["train_config"], where=f"{state_dir / STATE_FILE} field 'train_config'")
        if saved.to_dict() | {"command": ""} != config.to_dict() | {"command": ""}:
            raise DlmprobeInputError(f"cannot resume {out}: it was trained with a different configuration {saved.to_dict()}")
        model.load_state_dict(weights)
        load_optimizer(optimizer, moments, state_dir / STATE_FILE)
    start = None if committed else config.initial_weights(verify)
    if start is not None:
        model.load_state_dict(start[0])
    # Where the weights began: from the source now, or as the committed unit recorded it.
    provenance = start[1] if start is not None else {
        k: v for k, v in (committed or {}).get("info", {}).items() if k in ("init_from", "init_kind", "init_weights_sha256")}

    start_step, elapsed_before = 0, 0.0
    if committed:
        start_step, elapsed_before = committed["step"], committed["elapsed_s"]
        restore_log(out, committed["log_bytes"])
        remove_uncommitted(state_dir, committed)
        if start_step:  # a kill between the two files of the last export: write it again
            write_checkpoint(out, (state_dir / committed["weights"]).read_bytes(), mc, committed["info"])
    else:
        _clear_run(out)
    state_dir.mkdir(parents=True, exist_ok=True)

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
            log_bytes = append_log(out, record)
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
            weights = weights_bytes(model)
            save_state(state_dir, done, weights, optimizer, log_bytes,
                       {"elapsed_s": elapsed, "train_config": config.to_dict(), "info": info})
            write_checkpoint(out, weights, mc, info)
    return out


def command_line() -> str:
    """The command that started this process, for the model card."""
    return " ".join(["dlmprobe"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith("dlmprobe") else " ".join(sys.argv)
