"""Measure every shipped checkpoint and write MODELS.md and the machine-readable model_card.json.

    python scripts/model_card.py [--n 2000]

Accuracy is the exact-solve rate on held-out puzzles (the eval split) with each model's default
sampler: pure diffusion, one token per step, max-probability order (diffusion) or greedy decoding
(autoregressive). tests/test_shipped_models.py re-measures it on a fresh sample.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dlmprobe.models import CHECKPOINT_DIR, load_model, shipped_checkpoints
from dlmprobe.sampling import evaluate

ROOT = Path(__file__).resolve().parent.parent
CARD_SEED = 0


def measure(name: str, n: int) -> dict:
    ckpt = load_model(name)
    start = time.perf_counter()
    accuracy = evaluate(ckpt.model, ckpt.task, ckpt.kind, n=n, seed=CARD_SEED, progress=True)
    log = [json.loads(line) for line in (ckpt.path / "train_log.jsonl").read_text().splitlines()]
    info = ckpt.info
    return {
        "name": name,
        "task": ckpt.config.task,
        "task_params": ckpt.task.params(),
        "kind": ckpt.kind,
        "n_params": ckpt.n_params,
        "accuracy": accuracy,
        "n_eval": n,
        "eval_seed": CARD_SEED,
        "eval_seconds": round(time.perf_counter() - start, 1),
        "command": info.get("command", ""),
        "seed": info.get("train_config", {}).get("seed"),
        "train_steps": info.get("steps_done"),
        "wall_time_s": info.get("wall_time_s"),
        "threads": info.get("threads"),
        "weights_sha256": ckpt.weights_sha256,
        "size_bytes": (ckpt.path / "model.safetensors").stat().st_size,
        "curve": [(r["step"], r["eval_accuracy"]) for r in log],
    }


def render(cards: list[dict]) -> str:
    lines = [
        "# Model card: dlmprobe's shipped models",
        "",
        "Every task has a masked-diffusion denoiser (bidirectional attention) and an autoregressive twin",
        "(causal attention) with the same architecture and parameter count, trained on the same stream of",
        "puzzles for the same number of steps by `dlmprobe train` on a 2-core CPU (one thread per job).",
        "Accuracy: exact-solve rate on held-out puzzles (hash-based eval split) with the default sampler",
        "(diffusion: steps = target length, one block, max-probability commit order, temperature 0;",
        "autoregressive: greedy). Written by `python scripts/model_card.py`; do not edit by hand.",
        "",
        "| model | task | params | accuracy | n | train steps | wall time | seed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cards:
        params = ", ".join(f"{k}={v}" for k, v in c["task_params"].items())
        lines.append(
            f"| `{c['name']}` | {c['task']} ({params}) | {c['n_params']:,} | {c['accuracy']:.1%} | {c['n_eval']} "
            f"| {c['train_steps']} | {c['wall_time_s'] / 60:.1f} min | {c['seed']} |"
        )
    lines += ["", "## Diffusion vs its autoregressive twin", ""]
    by_task: dict[str, dict[str, dict]] = {}
    for c in cards:
        by_task.setdefault(c["task"], {})[c["kind"]] = c
    for task, kinds in by_task.items():
        if {"diffusion", "autoregressive"} <= set(kinds):
            d, a = kinds["diffusion"], kinds["autoregressive"]
            lines.append(f"- **{task}**: diffusion {d['accuracy']:.1%}, autoregressive twin {a['accuracy']:.1%}.")
    lines += ["", "## Commands (reproduce with exactly these)", ""]
    for c in cards:
        lines += [f"`{c['name']}` (sha256 of weights `{c['weights_sha256'][:16]}…`, {c['size_bytes'] / 1e6:.1f} MB):", "",
                  "```", c["command"], "```", ""]
    lines += ["## Training curves (held-out exact-solve during training, 200 puzzles each)", ""]
    for c in cards:
        curve = ", ".join(f"{step}: {acc:.0%}" for step, acc in c["curve"])
        lines.append(f"- `{c['name']}`: {curve}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="held-out puzzles per model")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cards = [measure(name, args.n) for name in shipped_checkpoints()]
    (CHECKPOINT_DIR / "model_card.json").write_text(json.dumps(cards, indent=2) + "\n")
    (ROOT / "MODELS.md").write_text(render(cards))
    for c in cards:
        print(f"{c['name']:<28} {c['accuracy']:.3f}")


if __name__ == "__main__":
    main()
