"""Measure every shipped checkpoint and write MODELS.md and the machine-readable model_card.json.

    python scripts/model_card.py [--n 2000]

Accuracy is the exact-solve rate on held-out puzzles (the eval split) with each model's default
sampler: pure diffusion, one token per step, max-probability order (diffusion) or greedy decoding
(autoregressive). tests/test_shipped_models.py re-measures it on a fresh sample.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from dlmprobe.models import CHECKPOINT_DIR, load_model, shipped_checkpoints
from dlmprobe.sampling import evaluate
from dlmprobe.training import PLATEAU_SPAN, PLATEAU_TOLERANCE, plateau_verdict, recent_gain

ROOT = Path(__file__).resolve().parent.parent
CARD_SEED = 0
TARGETS = {"sudoku": 0.90, "pathstar": 0.95, "arith": 0.95}  # diffusion exact-solve targets
# What was tried where a target is missed (a person's account, printed only while it is missed).
SHORTFALL_NOTES: dict[str, str] = {}
# How a model came to be trained the way it was (a person's account, printed while the model is shipped).
TRAINING_NOTES = {
    "pathstar-diffusion": (
        "Initialised from its autoregressive twin's weights (`--init-from pathstar-autoregressive`), as "
        "Dream-7B starts from Qwen2.5 and DiffuLLaMA from LLaMA, then trained with the masked-diffusion "
        "objective only (a trial with warm-up 100 on a 3000-step schedule was at 98% held-out exact-solve "
        "after 1000 steps). From a random "
        "start the denoiser never learned the edge look-up (find the edge whose child is a known node, read "
        "its parent) on this CPU: the shipped configuration for 5000 steps (3.5%) and for 7000 of a planned "
        "16000 (the one-hop look-up still at chance, 21-25%); arms=3, arm_length=4, n_nodes=20 for 6000 "
        "steps (0%); lr 3e-3; 3 layers/8 heads/batch 256/lr 2e-3; 2 layers/d 64; 16 heads/warmup 500; "
        "rotary positions for 5000 steps: all 0-7%. The twin's first layer has a head sending each child "
        "to its parent (attention 0.98), the base of its look-up; no randomly started denoiser grew one "
        "(best partner attention 0.04-0.11, uniform 0.036): under bidirectional attention an untrained "
        "head averages all tokens alike and gives that head no signal, while causal attention puts half "
        "of position 1's attention on position 0. Starting from the twin supplies that head. Read this "
        "model's circuits as possibly inherited from the twin's: the look-up the denoiser runs (parent of "
        "a known child) is the reverse of the twin's (child of a known parent), so training did more than "
        "switch the attention mask, but a comparison with the twin is not one of two independent starts."
    ),
}


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
        "init_from": info.get("init_from", ""),
        "init_weights_sha256": info.get("init_weights_sha256", ""),
        "seed": info.get("train_config", {}).get("seed"),
        "train_steps": info.get("steps_done"),
        "wall_time_s": info.get("wall_time_s"),
        "threads": info.get("threads"),
        "weights_sha256": ckpt.weights_sha256,
        "stored_dtype": info.get("stored_dtype", "float32"),
        "trained_weights_sha256": info.get("trained_weights_sha256", ""),
        "size_bytes": (ckpt.path / "model.safetensors").stat().st_size,
        "curve": [(r["step"], r["eval_accuracy"]) for r in log],
        "curve_n": log[-1].get("eval_n") if log else None,
    }


def seed_groups(cards: list[dict]) -> dict[str, list[dict]]:
    """Models trained with several seeds: base name (``sudoku-diffusion``) -> its cards, seed 0 first."""
    groups: dict[str, list[dict]] = {}
    for c in cards:
        groups.setdefault(re.sub(r"-seed\d+$", "", c["name"]), []).append(c)
    return {k: sorted(v, key=lambda c: c["seed"]) for k, v in groups.items() if len(v) > 1}


def float16_effect(name: str, n: int) -> dict:
    """What storing ``name``'s float32 weights as float16 changes: logits on random canvases, the
    argmax there, and the exact-solve rate on ``n`` held-out puzzles (both roundings measured)."""
    exact, rounded = load_model(name), load_model(name)
    with torch.no_grad():
        for p in rounded.model.parameters():
            p.copy_(p.half().float())
    canvases = torch.randint(0, len(exact.task.vocab), (64, exact.config.n_ctx), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = exact.model(canvases), rounded.model(canvases)
    return {"name": name, "n_canvases": 64, "max_abs_logit_diff": round((a - b).abs().max().item(), 4),
            "argmax_agreement": round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 5), "n_eval": n,
            "accuracy_float32": evaluate(exact.model, exact.task, exact.kind, n=n, seed=CARD_SEED),
            "accuracy_float16": evaluate(rounded.model, rounded.task, rounded.kind, n=n, seed=CARD_SEED)}


def _seeds_section(cards: list[dict]) -> list[str]:
    groups = seed_groups(cards)
    if not groups:
        return []
    lines = ["", "## Training seeds", "",
             "The same command with `--seed 1`, `--seed 2`: a different initial draw and a different stream of",
             "training puzzles; nothing else changes. Exact-solve rate per seed, and its mean ± sd (ddof 1) over seeds:", ""]
    for base, group in groups.items():
        acc = np.array([c["accuracy"] for c in group])
        lines.append(f"- `{base}`: " + ", ".join(f"seed {c['seed']} {c['accuracy']:.1%} (n={c['n_eval']})" for c in group)
                     + f"; mean {acc.mean():.1%} ± {acc.std(ddof=1):.1%}.")
    effects = [c["float16_effect"] for c in cards if c.get("float16_effect")]
    if effects:
        lines += ["", "Seeds stored as float16 (to fit the 30 MB budget) load into float32 models. What the rounding changes, "
                  "measured on the float32 seed-0 model (`scripts/model_card.py`, 64 random canvases, held-out puzzles):", ""]
        for e in effects:
            lines.append(f"- `{e['name']}` rounded to float16: largest logit change {e['max_abs_logit_diff']}, argmax agrees at "
                         f"{e['argmax_agreement']:.2%} of positions, exact-solve {e['accuracy_float32']:.1%} -> "
                         f"{e['accuracy_float16']:.1%} on {e['n_eval']} puzzles.")
    return lines


def render(cards: list[dict]) -> str:
    twins = sorted((c for c in cards if c["task"] == "sudoku" and c["kind"] == "autoregressive"), key=lambda c: c["seed"])
    twin_steps = ", ".join(f"seed {c['seed']} on {c['train_steps']} steps" for c in twins)
    lines = [
        "# Model card: dlmprobe's shipped models",
        "",
        "Every task has a masked-diffusion denoiser (bidirectional attention) and an autoregressive twin",
        "(causal attention) with the same architecture and parameter count, trained on the same stream of",
        "puzzles by `dlmprobe train` on a 2-core CPU (the threads each command names; wall times include",
        "sharing the machine with other jobs). Training steps are per model in the table: the arith twin got",
        "fewer steps than its denoiser (next-token training converged early), the sudoku twins more: on 3500",
        "steps their held-out curves were still rising, so each twin was trained until its curve levelled off",
        f"by the rule given under the curves ({twin_steps}; a longer schedule stretches the learning-rate",
        "decay, it does not append steps). `start` says where training began:",
        "a random draw from the seed, or another checkpoint's weights (see the notes below the table).",
        "Accuracy: exact-solve rate on held-out puzzles (hash-based eval split) with the default sampler",
        "(diffusion: steps = target length, one block, max-probability commit order, temperature 0;",
        "autoregressive: greedy). Written by `python scripts/model_card.py`; do not edit by hand.",
        "",
        "| model | task | params | accuracy | n | train steps | wall time | seed | start | stored as |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for c in cards:
        params = ", ".join(f"{k}={v}" for k, v in c["task_params"].items())
        lines.append(
            f"| `{c['name']}` | {c['task']} ({params}) | {c['n_params']:,} | {c['accuracy']:.1%} | {c['n_eval']} "
            f"| {c['train_steps']} | {c['wall_time_s'] / 60:.1f} min | {c['seed']} "
            f"| {'`' + c['init_from'] + '`' if c.get('init_from') else 'random'} | {c.get('stored_dtype', 'float32')} |"
        )
    lines += ["", "## Diffusion vs its autoregressive twin", ""]
    by_task: dict[str, dict[str, dict]] = {}
    for c in cards:
        if not c.get("seed"):  # seed 0: the models the README's findings use
            by_task.setdefault(c["task"], {})[c["kind"]] = c
    for task, kinds in by_task.items():
        if {"diffusion", "autoregressive"} <= set(kinds):
            d, a = kinds["diffusion"], kinds["autoregressive"]
            lines.append(f"- **{task}**: diffusion {d['accuracy']:.1%}, autoregressive twin {a['accuracy']:.1%}.")
    lines += _seeds_section(cards)
    missed = [c for c in cards if c["kind"] == "diffusion" and c["accuracy"] < TARGETS.get(c["task"], 0)]
    if missed:
        lines += ["", "## Targets not met", ""]
        for c in missed:
            lines.append(f"- `{c['name']}`: {c['accuracy']:.1%}, target {TARGETS[c['task']]:.0%}. "
                         + SHORTFALL_NOTES.get(c["task"], ""))
    notes = [c for c in cards if c["name"] in TRAINING_NOTES]
    if notes:
        lines += ["", "## How some models were trained", ""]
        lines += [f"- `{c['name']}`: {TRAINING_NOTES[c['name']]}" for c in notes]
    lines += ["", "## Commands (reproduce with exactly these)", ""]
    for c in cards:
        start = (f"; starts from `{c['init_from']}`, weights sha256 `{c['init_weights_sha256'][:16]}…`"
                 if c.get("init_from") else "")
        halved = c.get("stored_dtype") == "float16"
        stored = (f"; stored as float16, trained float32 weights sha256 `{c['trained_weights_sha256'][:16]}…`"
                  if halved else "")
        command = c["command"] + (f"\npython scripts/store_float16.py {c['command'].split('--out ')[1].split()[0]}" if halved else "")
        lines += [f"`{c['name']}` (sha256 of weights `{c['weights_sha256'][:16]}…`, {c['size_bytes'] / 1e6:.1f} MB{start}{stored}):",
                  "", "```", command, "```", ""]
    lines += ["## Training curves (held-out exact-solve during training; puzzles per evaluation in brackets)", "",
              f"Each curve ends with its gain over the last {PLATEAU_SPAN} steps (last evaluation minus the one "
              f"{PLATEAU_SPAN} steps before, on the same puzzles). A model counts as trained to its plateau when that",
              f"gain is at most {PLATEAU_TOLERANCE * 100:.0f} points (10 of the sudoku twins' 500 puzzles) or its last "
              "evaluation is within that of 100% (`dlmprobe.training.plateau_verdict`; `dlmprobe train` prints it).", ""]
    for c in cards:
        curve = ", ".join(f"{step}: {acc:.0%}" for step, acc in c["curve"])
        gain = recent_gain(c["curve"])
        tail = "" if gain is None else f"; last {PLATEAU_SPAN} steps {gain * 100:+.1f} points ({plateau_verdict(c['curve'])})"
        lines.append(f"- `{c['name']}` ({c.get('curve_n') or 200}): {curve}{tail}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="held-out puzzles per model")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--float16-n", type=int, default=500,
                        help="held-out puzzles for the float16-rounding check of a seed-0 model whose other seeds are halved")
    parser.add_argument("--render-only", action="store_true", help="rewrite MODELS.md from model_card.json")
    parser.add_argument("--only", nargs="+", metavar="MODEL",
                        help="re-measure only these models; the others keep their entries in model_card.json")
    args = parser.parse_args()
    if args.render_only:
        (ROOT / "MODELS.md").write_text(render(json.loads((CHECKPOINT_DIR / "model_card.json").read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        unknown = sorted(set(args.only) - set(shipped_checkpoints()))
        if unknown:
            parser.error(f"--only expects shipped model names {shipped_checkpoints()}, got {unknown}")
        kept = {c["name"]: c for c in json.loads((CHECKPOINT_DIR / "model_card.json").read_text())}
        cards = [measure(name, args.n) if name in args.only else kept[name] for name in shipped_checkpoints()]
    else:
        cards = [measure(name, args.n) for name in shipped_checkpoints()]
    for group in seed_groups(cards).values():
        if any(c.get("stored_dtype") == "float16" for c in group) and group[0].get("stored_dtype") != "float16" \
                and (not group[0].get("float16_effect") or group[0]["name"] in (args.only or [group[0]["name"]])):
            group[0]["float16_effect"] = float16_effect(group[0]["name"], args.float16_n)
    (CHECKPOINT_DIR / "model_card.json").write_text(json.dumps(cards, indent=2) + "\n")
    (ROOT / "MODELS.md").write_text(render(cards))
    for c in cards:
        print(f"{c['name']:<28} {c['accuracy']:.3f}")


if __name__ == "__main__":
    main()
