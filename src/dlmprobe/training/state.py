"""A training run's resumable state, saved as one unit: weights, optimiser, then the commit marker.

In the run folder::

    train_state/step-00000008.model.safetensors      the weights after step 8
    train_state/step-00000008.optimizer.safetensors  AdamW's moments after step 8
    train_state/state.json                           the commit: names both files with their sha256,
                                                     the step, and the length of train_log.jsonl

A save writes the step's two files, then replaces ``state.json`` (each write atomic), then deletes
every other step's files. A run killed at any moment leaves ``state.json`` naming a complete unit,
the old one or the new one; resuming truncates the log to the length that unit recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.files import (
    atomic_write_bytes,
    atomic_write_text,
    check_object,
    load_json_object,
    one_line,
    read_small_file,
)
from dlmprobe.models.checkpoint import read_weights

STATE_DIR = "train_state"
STATE_FILE = "state.json"
LOG_FILE = "train_log.jsonl"

STATE_SCHEMA = {"step": int, "elapsed_s": float, "train_config": dict, "param_groups": list, "scalars": dict,
                "weights": str, "weights_sha256": str, "optimizer": str, "optimizer_sha256": str,
                "log_bytes": int, "info": dict}
LOG_SCHEMA = {"step": int, "loss": float, "lr": float, "eval_accuracy": float, "eval_n": int, "elapsed_s": float}
_UNIT_FILE = re.compile(r"step-\d{8}\.(model|optimizer)\.safetensors")


def commit(folder: Path, record: dict[str, Any]) -> None:
    """Replace ``state.json``: from this instant the unit ``record`` names is the run's state."""
    atomic_write_text(folder / STATE_FILE, json.dumps(record, indent=2) + "\n")


def save_state(folder: Path, step: int, weights: bytes, optimizer: torch.optim.Optimizer, log_bytes: int,
               meta: dict[str, Any]) -> dict[str, Any]:
    """Save one unit (``weights`` are a safetensors file's bytes) and commit it; returns the record."""
    tensors, scalars = {}, {}
    for idx, param_state in optimizer.state_dict()["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    moments = save(tensors)
    stem = f"step-{step:08d}"
    atomic_write_bytes(folder / f"{stem}.model.safetensors", weights)
    atomic_write_bytes(folder / f"{stem}.optimizer.safetensors", moments)
    record = {**meta, "step": step, "param_groups": optimizer.state_dict()["param_groups"], "scalars": scalars,
              "weights": f"{stem}.model.safetensors", "weights_sha256": hashlib.sha256(weights).hexdigest(),
              "optimizer": f"{stem}.optimizer.safetensors", "optimizer_sha256": hashlib.sha256(moments).hexdigest(),
              "log_bytes": log_bytes}
    commit(folder, record)
    remove_uncommitted(folder, record)
    return record


def remove_uncommitted(folder: Path, record: dict[str, Any] | None) -> None:
    """Delete every file of ``folder`` that the committed ``record`` does not name (older units, temporaries)."""
    keep = {STATE_FILE} | ({record["weights"], record["optimizer"]} if record else set())
    for path in folder.iterdir():
        if path.name not in keep and path.is_file():
            path.unlink()


def read_state(folder: Path, verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """The committed record, its weights and its optimiser state dict; damage is one DlmprobeInputError line."""
    file = folder / STATE_FILE
    record = load_json_object(file, STATE_SCHEMA)
    for key in ("weights", "optimizer"):
        if not _UNIT_FILE.fullmatch(record[key]):
            raise DlmprobeInputError(f"{file}: field {key!r} should name a file like step-00000008.{key}.safetensors "
                                     f"in {folder}, found {record[key]!r}")
    if record["step"] < 0 or record["log_bytes"] < 0:
        raise DlmprobeInputError(f"{file}: fields 'step' and 'log_bytes' should be >= 0, found "
                                 f"{record['step']} and {record['log_bytes']}")
    weights = read_weights(folder / record["weights"], record["weights_sha256"], verify)
    moments = read_weights(folder / record["optimizer"], record["optimizer_sha256"], verify)
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in list(moments.items()) + list(record["scalars"].items()):
        idx, _, name = key.partition(".")
        if not idx.isdigit() or not name:
            raise DlmprobeInputError(f"{file}: optimiser entries should be named '<parameter index>.<name>', found {key!r}")
        per_param.setdefault(int(idx), {})[name] = value
    return record, weights, {"state": per_param, "param_groups": record["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any], file: Path) -> None:
    """Load a state dict from :func:`read_state`, once it fits ``optimizer``'s parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for idx, entries in state["state"].items():
        if idx >= len(params):
            raise DlmprobeInputError(f"{file}: optimiser state for parameter {idx}, but the model has {len(params)}")
        for name, value in entries.items():
            if torch.is_tensor(value) and value.dim() and value.shape != params[idx].shape:
                raise DlmprobeInputError(f"{file}: optimiser tensor {idx}.{name} should have shape "
                                         f"{tuple(params[idx].shape)}, found {tuple(value.shape)}")
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise DlmprobeInputError(f"{file}: expected AdamW state for this model, found {type(err).__name__} "
                                 f"({one_line(err, 200)})") from None


def append_log(out: Path, record: dict[str, Any]) -> int:
    """Append one line to the training log, synced to disk; returns the log's length in bytes."""
    with open(out / LOG_FILE, "ab") as log:
        log.write((json.dumps(record) + "\n").encode())
        log.flush()
        os.fsync(log.fileno())
        return log.tell()


def restore_log(out: Path, log_bytes: int) -> None:
    """Cut the log back to the length the committed unit recorded (lines of an uncommitted save go)."""
    path = out / LOG_FILE
    size = path.stat().st_size if path.exists() else 0
    if size < log_bytes:
        raise DlmprobeInputError(f"{path}: expected at least {log_bytes} bytes (as {out / STATE_DIR / STATE_FILE} "
                                 f"records), found {size}")
    with open(path, "ab") as log:
        log.truncate(log_bytes)
    read_train_log(path)


def read_train_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl``, each checked; damage is one DlmprobeInputError line."""
    path = Path(path)
    records = []
    for number, line in enumerate(read_small_file(path).split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, absurd nesting
            raise DlmprobeInputError(f"{path}: line {number} should be a JSON object, found invalid JSON "
                                     f"({one_line(err)})") from None
        records.append(check_object(value, LOG_SCHEMA, f"{path} line {number}"))
    return records
