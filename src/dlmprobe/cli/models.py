"""``train``, ``eval``, ``sample`` and ``tasks``: the commands about models and their tasks."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dlmprobe.choices import KINDS, POSITIONS, TASK_NAMES
from dlmprobe.cli import common
from dlmprobe.errors import DlmprobeInputError


def cmd_train(args: argparse.Namespace) -> int:
    from dlmprobe.models import ModelConfig
    from dlmprobe.training import PLATEAU_SPAN, TrainConfig, plateau_verdict, read_curve, recent_gain, train
    from dlmprobe.training.trainer import command_line

    out = Path(args.out or f"runs/{args.task}-{args.kind}")
    common.check_output(out, args)
    if args.init_from:
        common.check_model(args.init_from)
    common.set_threads(args.threads)
    model = ModelConfig(task=args.task, kind=args.kind, task_params=dict(args.task_param), n_layers=args.n_layers,
                        d_model=args.d_model, n_heads=args.n_heads, d_mlp=args.d_mlp, seed=args.seed,
                        positions=args.positions)
    config = TrainConfig(model, steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
                         warmup=args.warmup, eval_every=args.eval_every, eval_n=args.eval_n,
                         seed=args.seed, init_from=args.init_from or "", command=command_line())
    train(config, out, resume=args.resume, overwrite=args.overwrite, verify=not args.no_verify)
    print(f"checkpoint written to {out}")
    curve = read_curve(out)
    gain, verdict = recent_gain(curve), plateau_verdict(curve)
    if curve:
        change = "" if gain is None else f", {gain * 100:+.1f} points over the last {PLATEAU_SPAN} steps"
        print(f"held-out exact-solve {curve[-1][1]:.1%} at step {curve[-1][0]}{change}: {verdict}"
              + (" (a longer --train-steps may still help)" if verdict == "still rising" else ""))
    return 0


def _load(args: argparse.Namespace):
    """The checkpoint named on the command line, with its task's options overridden by --task-param."""
    from dlmprobe.tasks import get_task

    ckpt = common.load_checkpoint(args.model, args)
    if args.task_param:
        ckpt.task = get_task(ckpt.config.task, **{**ckpt.task.params(), **dict(args.task_param)})
        if ckpt.task.sequence_length > ckpt.config.n_ctx:  # checked here, before any puzzle is drawn
            raise DlmprobeInputError(f"{ckpt.task!r} needs a context of {ckpt.task.sequence_length} tokens; "
                                     f"the model's context is {ckpt.config.n_ctx}")
    return ckpt


def _sampler(args: argparse.Namespace, kind: str):
    from dlmprobe.sampling import AutoregressiveSamplerConfig, DiffusionSamplerConfig

    options = {**common.sampler_options(args), "seed": args.seed}
    if kind == "diffusion":
        return DiffusionSamplerConfig(**options)
    diffusion_only = sorted(set(options) - {"temperature", "seed"})
    if diffusion_only:
        raise DlmprobeInputError(f"--{diffusion_only[0].replace('_', '-')} is for diffusion models; "
                                 "this model is autoregressive")
    return AutoregressiveSamplerConfig(**options)


def cmd_eval(args: argparse.Namespace) -> int:
    from dlmprobe.sampling import evaluate

    common.chosen_device(args)
    common.set_threads(args.threads)
    ckpt = _load(args)
    start = time.perf_counter()
    accuracy = evaluate(ckpt.model, ckpt.task, ckpt.kind, n=args.n, seed=args.seed,
                        sampler=_sampler(args, ckpt.kind), progress=not args.quiet)
    result = {"model": args.model, "task": repr(ckpt.task), "kind": ckpt.kind, "n": args.n,
              "seed": args.seed, "accuracy": accuracy, "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(result) if args.json else
          f"{args.model}: exact-solve {accuracy:.3f} on {args.n} held-out {ckpt.task.name} puzzles")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from dlmprobe.sampling import generate, solved

    common.chosen_device(args)
    common.set_threads(args.threads)
    ckpt = _load(args)
    examples = ckpt.task.sample(args.n, split="eval", seed=args.seed)
    trajectory = generate(ckpt.model, ckpt.task, examples, ckpt.kind, _sampler(args, ckpt.kind))
    for i, (ex, ok) in enumerate(zip(examples, solved(ckpt.task, examples, trajectory))):
        print(f"--- example {i} ({'solved' if ok else 'wrong'})")
        print(ckpt.task.render(ex.prompt, trajectory.output[i].tolist()))
        if args.trajectory:
            print("commit step of each target position:", trajectory.target_commit_step[i].tolist())
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from dlmprobe.tasks import get_task

    for name in TASK_NAMES:
        task = get_task(name)
        ex = task.sample(1, split="eval", seed=args.seed)[0]
        print(f"== {task!r}: prompt {task.prompt_length} tokens, target {task.target_length}, "
              f"labels {list(ex.labels)}")
        print(task.render(ex.prompt, ex.target))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="train a diffusion denoiser or its autoregressive twin on a task",
                            parents=[common.task_params("a task option, e.g. size=6 or blanks=16"), common.seed(),
                                     common.threads(), common.no_verify(), common.resume_or_overwrite()])
    p.add_argument("--task", choices=TASK_NAMES, required=True)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--out", help="checkpoint folder (default runs/<task>-<kind>)")
    p.add_argument("--train-steps", type=common.positive_int, default=4000)
    p.add_argument("--batch-size", type=common.positive_int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--eval-every", type=common.positive_int, default=500)
    p.add_argument("--eval-n", type=common.positive_int, default=200)
    p.add_argument("--n-layers", type=common.positive_int, default=4)
    p.add_argument("--d-model", type=common.positive_int, default=128)
    p.add_argument("--n-heads", type=common.positive_int, default=4)
    p.add_argument("--d-mlp", type=common.positive_int, default=512)
    p.add_argument("--positions", choices=POSITIONS, default="learned",
                   help="position encoding: learned absolute embeddings or rotary (relative)")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (same architecture and task; the kind may differ, "
                        "e.g. a denoiser from its autoregressive twin) instead of a random draw")
    p.set_defaults(func=cmd_train)

    model_help = "shipped model name (e.g. arith-diffusion) or checkpoint folder"
    p = commands.add_parser("eval", help="exact-solve rate of a model on held-out puzzles",
                            parents=[common.sampler(), common.seed(), common.threads(), common.device(),
                                     common.no_verify(), common.quiet()])
    p.add_argument("model", help=model_help)
    p.add_argument("--n", type=common.positive_int, default=500, help="held-out puzzles")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=cmd_eval)

    p = commands.add_parser("sample", help="sample and print a few held-out puzzles",
                            parents=[common.sampler(), common.seed(), common.threads(), common.device(),
                                     common.no_verify()])
    p.add_argument("model", help=model_help)
    p.add_argument("--n", type=common.positive_int, default=3, help="held-out puzzles")
    p.add_argument("--trajectory", action="store_true", help="also print the commit step of each position")
    p.set_defaults(func=cmd_sample)

    p = commands.add_parser("tasks", help="show one example of every task", parents=[common.seed()])
    p.set_defaults(func=cmd_tasks)
