"""The ``dlmprobe`` command line.

Bad input of any kind ends in a one-line ``dlmprobe <command>: error: …`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Bad input detected by dlmprobe itself."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), still exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _task_params(pairs: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--task-param expects KEY=VALUE, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _set_threads(threads: int | None) -> None:
    """One torch thread unless told otherwise: dlmprobe's models are small, and torch threads beyond
    the free cores (another job on the machine) slow small operations down by an order of magnitude."""
    import torch

    threads = 1 if threads is None else threads
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def _sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler flags given on the command line (unset ones keep the sampler's defaults)."""
    flags = ("steps", "block_length", "temperature", "order")
    return {flag: getattr(args, flag) for flag in flags if getattr(args, flag) is not None}


def _sampler(args: argparse.Namespace, kind: str):
    from dlmprobe.sampling import AutoregressiveSamplerConfig, DiffusionSamplerConfig

    options = {**_sampler_options(args), "seed": args.seed}
    if kind == "diffusion":
        return DiffusionSamplerConfig(**options)
    diffusion_only = sorted(set(options) - {"temperature", "seed"})
    if diffusion_only:
        raise UsageError(f"--{diffusion_only[0].replace('_', '-')} is for diffusion models; this model is autoregressive")
    return AutoregressiveSamplerConfig(**options)


def _load(args: argparse.Namespace):
    """The checkpoint named on the command line, with its task's options overridden by --task-param."""
    from dlmprobe.datasets import get_task
    from dlmprobe.models import load_model

    ckpt = load_model(args.model)
    if args.task_param:
        ckpt.task = get_task(ckpt.config.task, **{**ckpt.task.params(), **_task_params(args.task_param)})
    return ckpt


def cmd_train(args: argparse.Namespace) -> int:
    from dlmprobe.models import ModelConfig
    from dlmprobe.training import TrainConfig, train
    from dlmprobe.training.trainer import command_line

    _set_threads(args.threads)
    model = ModelConfig(task=args.task, kind=args.kind, task_params=_task_params(args.task_param),
                        n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
                        d_mlp=args.d_mlp, seed=args.seed, positions=args.positions)
    config = TrainConfig(model, steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
                         warmup=args.warmup, eval_every=args.eval_every, eval_n=args.eval_n,
                         seed=args.seed, init_from=args.init_from or "", command=command_line())
    out = args.out or f"runs/{args.task}-{args.kind}"
    train(config, out, resume=args.resume, overwrite=args.overwrite)
    print(f"checkpoint written to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dlmprobe.sampling import evaluate

    _set_threads(args.threads)
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    ckpt = _load(args)
    start = time.perf_counter()
    accuracy = evaluate(ckpt.model, ckpt.task, ckpt.kind, n=args.n, seed=args.seed,
                        sampler=_sampler(args, ckpt.kind), progress=True)
    result = {"model": args.model, "task": repr(ckpt.task), "kind": ckpt.kind, "n": args.n,
              "seed": args.seed, "accuracy": accuracy, "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(result) if args.json else
          f"{args.model}: exact-solve {accuracy:.3f} on {args.n} held-out {ckpt.task.name} puzzles")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from dlmprobe.sampling import generate, solved

    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    ckpt = _load(args)
    examples = ckpt.task.sample(args.n, split="eval", seed=args.seed)
    trajectory = generate(ckpt.model, ckpt.task, examples, ckpt.kind, _sampler(args, ckpt.kind))
    for i, (ex, ok) in enumerate(zip(examples, solved(ckpt.task, examples, trajectory))):
        print(f"--- example {i} ({'solved' if ok else 'wrong'})")
        print(ckpt.task.render(ex.prompt, trajectory.output[i].tolist()))
        if args.trajectory:
            order = trajectory.target_commit_step[i].tolist()
            print("commit step of each target position:", order)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dlmprobe.pipeline import DemoConfig, run_demo

    _set_threads(args.threads)
    config = DemoConfig(n=args.n, n_model=args.n_model, record_every=args.record_every, seed=args.seed)
    report = run_demo(args.out, config)
    print(f"\nreport: {report.resolve()}\n(open it in a browser; the tables behind it are in {report.parent / 'results'})")
    return 0


def _open_store(path: str):
    from dlmprobe.datasets.store import ActivationDataset

    if not Path(path).is_file():
        raise UsageError(f"expected an HDF5 activation dataset written by dlmprobe cache, got {path!r} (no such file)")
    return ActivationDataset(path)


def cmd_analyze(args: argparse.Namespace) -> int:
    from dlmprobe import analyses
    from dlmprobe.models import load_model

    _set_threads(args.threads)
    out = Path(args.out)
    name = args.analysis  # each analysis saves into a sub-folder of its own name
    if (out / name).exists() and not args.overwrite:
        raise UsageError(f"{out / name} already exists; pass --overwrite to replace it")
    progress = not args.quiet
    if args.analysis == "decodability":
        steps = None if args.steps == "all" else _parse_steps(args.steps)
        result = analyses.decodability(_open_store(args.store), label=args.label, target=args.target, sites=args.sites,
                                       steps=steps if isinstance(steps, list) else None, progress=progress)
    elif args.analysis == "lead":
        result = analyses.planning_lead(_open_store(args.store), label=args.label, site=args.site, progress=progress)
    elif args.analysis == "compare":
        runs = {}
        for spec in args.runs:
            run, sep, path = spec.partition("=")
            if not sep or not run or not path:
                raise UsageError(f"compare expects runs as NAME=FILE.h5, got {spec!r}")
            runs[run] = _open_store(path)
        result = analyses.compare_runs(runs, label=args.label, sites=args.sites, progress=progress)
    elif args.analysis == "order":
        result = analyses.commit_order(_open_store(args.store), answer=args.answer, reasoning=args.reasoning)
    elif args.analysis == "faithfulness":
        twin = load_model(args.twin) if args.twin else None
        result = analyses.faithfulness(load_model(args.model), n=args.n, seed=args.seed, corrupt_label=args.corrupt_label,
                                       answer_label=args.answer_label, twin=twin, progress=progress)
    elif args.analysis == "paraphrase":
        result = analyses.paraphrase_run(load_model(args.model), n=args.n, seed=args.seed, probe_site=args.probe_site,
                                         label=args.label, progress=progress)
    elif args.analysis == "causal":
        result = analyses.causal_check(load_model(args.model), _open_store(args.store), args.site, label=args.label,
                                       n=args.n, seed=args.seed, progress=progress)
    else:  # trajectory
        result = analyses.trajectory_view(_open_store(args.store), example=args.example)
    folder = result.save(out)
    print(result.summary)
    print(f"\nwrote {folder} (table.csv, figure.png, result.json); dlmprobe report {out} builds the HTML page")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dlmprobe.report import write_report

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UsageError(f"expected a folder of saved analyses (from dlmprobe analyze or demo), got {args.folder!r}")
    out = Path(args.out) if args.out else folder / "report.html"
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")
    print(f"wrote {write_report(folder, out, title=args.title)}")
    return 0


def _parse_steps(text: str):
    if text == "all":
        return "all"
    if text.startswith("every:"):
        return int(text.split(":", 1)[1])
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--record-steps expects 'all', 'every:K' or a comma-separated list of steps, got {text!r}") from None


def _parse_shard(text: str | None):
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not sep or not i.isdigit() or not n.isdigit():
        raise UsageError(f"--shard expects i/n (e.g. 0/4), got {text!r}")
    return int(i), int(n)


def cmd_cache(args: argparse.Namespace) -> int:
    from dlmprobe.capture import CacheConfig, plan_cache, run_cache

    _set_threads(args.threads)
    sampler = {**_sampler_options(args), "seed": args.seed}
    config = CacheConfig(
        model=args.model, n=args.n, split=args.split, seed=args.seed, sites=args.sites,
        steps=_parse_steps(args.record_steps), positions=args.positions, sampler=sampler,
        task_params=_task_params(args.task_param), dtype=args.dtype, batch_size=args.batch_size,
        shard=_parse_shard(args.shard),
    )
    out = Path(args.out)
    if out.exists() and not (args.resume or args.overwrite):
        raise UsageError(f"{out} already exists; pass --resume to continue it or --overwrite to replace it")
    plan = plan_cache(config)
    if args.task and args.task != plan.task.name:
        raise UsageError(f"--task {args.task} does not match the model, which was trained on {plan.task.name}")
    print(plan.describe())
    start = time.perf_counter()
    run_cache(config, out, overwrite=args.overwrite, resume=args.resume, plan=plan)
    print(f"wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from dlmprobe.datasets.store import ActivationDataset, merge_shards

    merge_shards(args.shards, args.out, overwrite=args.overwrite)
    with ActivationDataset(args.out) as data:
        print(f"merged {len(args.shards)} shards into {args.out}: {data.n_examples} examples")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from dlmprobe.datasets.store import ActivationDataset

    with ActivationDataset(args.path) as data:
        config = data.config
        complete = data.n_examples
        planned = data._file.attrs["n_examples"]
        print(f"{args.path}: {complete}/{planned} examples complete, solved {data.solved.mean():.1%}")
        print(f"model {config['model']['name']} ({config['model']['kind']}), task {config['task']['name']} "
              f"{config['task']['params']}, sampler {config['sampler']}")
        print(f"steps {data.steps.tolist()}")
        print(f"positions ({config['position_rule']}) {data.positions.tolist()}")
        print(f"labels {data.label_names}")
        for site in data.sites:
            print(f"  {site}: {data._file['activations'][site].shape} {data._file['activations'][site].dtype}")
    return 0


def _read_rule(text: str):
    if text in ("own", "pooled", "frontier"):
        return text
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--read expects 'own', 'pooled', 'frontier' or a canvas position, got {text!r}") from None


def cmd_probe(args: argparse.Namespace) -> int:
    from dlmprobe.datasets.store import ActivationDataset
    from dlmprobe.probes import ProbeGrid, clock_table

    _set_threads(args.threads)
    out = Path(args.out)
    steps = None if args.steps == "all" else _parse_steps(args.steps)
    with ActivationDataset(args.dataset) as data:
        label = args.label or data.config["task"]["answer_label"]
        stem = f"{label}-{args.target}-{args.phase}"
        table_path = out / f"grid-{stem}.{args.format}"
        if table_path.exists() and not args.overwrite:
            raise UsageError(f"{table_path} already exists; pass --overwrite to replace it")
        if isinstance(steps, int):
            steps = data.steps[::steps].tolist()
        grid = ProbeGrid(label=label, target=args.target, read=_read_rule(args.read), phase=args.phase,
                         per_slot=args.per_slot, sites=args.sites, steps=steps, folds=args.folds, C=args.C,
                         control=not args.no_control, random_baseline=not args.no_random_baseline,
                         mdl=args.mdl, seed=args.seed, device=args.device)
        table = grid.run(data)
        clock = clock_table(data, grid.label, sites=args.sites, folds=args.folds, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    if args.format == "parquet":
        table.to_parquet(table_path, index=False)
    else:
        table.to_csv(table_path, index=False)
    clock.to_csv(out / f"clock-{grid.label}.csv", index=False)
    (out / f"grid-{stem}.json").write_text(
        json.dumps({"dataset": str(args.dataset), "settings": grid.settings(), "skipped": grid.skipped_}, indent=2) + "\n")
    print(_summary(table, clock))
    if grid.skipped_:
        print(f"skipped {len(grid.skipped_)} cells with too few rows (e.g. {grid.skipped_[0]})")
    print(f"wrote {table_path} ({len(table)} cells)")
    return 0


def _summary(table, clock) -> str:
    """Best step per site, and the clock confound, as a terminal table."""
    lines = [f"{'site':<28} {'best step':>9} {'acc':>6} {'95% CI':>13} {'majority':>8} {'control':>8} "
             f"{'random-w':>8} {'clock acc':>9}"]
    for site, rows in table.groupby("site", sort=False):
        best = rows.loc[rows["accuracy"].idxmax()]
        clock_acc = clock.loc[clock["site"] == site, "step_accuracy"]
        lines.append(
            f"{site:<28} {int(best['step']):>9} {best['accuracy']:>6.3f} "
            f"{f'[{best.ci_low:.3f}, {best.ci_high:.3f}]':>13} {best['majority']:>8.3f} "
            f"{best.get('control_accuracy', float('nan')):>8.3f} {best.get('random_weights_accuracy', float('nan')):>8.3f} "
            f"{(clock_acc.iloc[0] if len(clock_acc) else float('nan')):>9.3f}"
        )
    return "\n".join(lines)


def cmd_tasks(args: argparse.Namespace) -> int:
    from dlmprobe.datasets import TASKS, get_task

    for name in sorted(TASKS):
        task = get_task(name)
        ex = task.sample(1, split="eval", seed=args.seed)[0]
        print(f"== {task!r}: prompt {task.prompt_length} tokens, target {task.target_length}, "
              f"labels {list(ex.labels)}")
        print(task.render(ex.prompt, ex.target))
    return 0


def _add_output_mode(p: argparse.ArgumentParser, what: str) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help=f"continue the {what} in --out")
    mode.add_argument("--overwrite", action="store_true", help=f"replace the {what} in --out")


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    from dlmprobe.sampling import ORDERS

    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: one token per step)")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block length (default: whole target)")
    p.add_argument("--temperature", type=float, default=None, help="0 = argmax (default), else Gumbel noise")
    p.add_argument("--order", choices=ORDERS, default=None, help="which masked tokens to commit first (default: confidence)")
    p.add_argument("--task-param", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluate on a variant of the model's task, e.g. blanks=24 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from dlmprobe import __version__
    from dlmprobe.datasets import TASKS
    from dlmprobe.models import KINDS

    parser = _Parser(prog="dlmprobe", description="Probe kit for diffusion language models.")
    parser.add_argument("--version", action="version", version=f"dlmprobe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job: sample, capture, probe, analyse and report on the shipped models")
    p.add_argument("--out", default="runs/demo", help="folder for the datasets, results and report.html (replaced)")
    p.add_argument("--n", type=int, default=192, help="held-out puzzles per activation dataset")
    p.add_argument("--n-model", type=int, default=160, help="puzzles per model-based analysis")
    p.add_argument("--record-every", type=int, default=3, help="record every k-th denoising step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("analyze", help="run one analysis and save its table, figure and summary")
    p.add_argument("--out", default="runs/analyses", help="folder of saved analyses (one sub-folder each)")
    p.add_argument("--overwrite", action="store_true", help="replace a saved analysis of the same name")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    kinds = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    q = kinds.add_parser("decodability", help="1: probe accuracy per layer and step before commit")
    q.add_argument("store")
    q.add_argument("--label")
    q.add_argument("--target", choices=("output", "truth"), default="output")
    q.add_argument("--sites", nargs="+")
    q.add_argument("--steps", default="all", help="'all' or a list such as 0,4,8 (stored steps)")
    q = kinds.add_parser("lead", help="2: how many steps before its commit a token is known")
    q.add_argument("store")
    q.add_argument("--label")
    q.add_argument("--site")
    q = kinds.add_parser("compare", help="3: diffusion vs autoregressive (vs left-to-right diffusion)")
    q.add_argument("runs", nargs="+", help="NAME=FILE.h5, e.g. diffusion=d.h5 autoregressive=ar.h5")
    q.add_argument("--label")
    q.add_argument("--sites", nargs="+")
    q = kinds.add_parser("order", help="4: when answer tokens are committed vs reasoning tokens")
    q.add_argument("store")
    q.add_argument("--answer")
    q.add_argument("--reasoning")
    q = kinds.add_parser("faithfulness", help="5: corrupt committed reasoning at step t; does the answer follow?")
    q.add_argument("--model", required=True)
    q.add_argument("--twin", help="the autoregressive twin to run the same corruption on")
    q.add_argument("--n", type=int, default=200)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--corrupt-label")
    q.add_argument("--answer-label")
    q = kinds.add_parser("paraphrase", help="6: rewrite the canvas after every step, meaning preserved")
    q.add_argument("--model", required=True)
    q.add_argument("--n", type=int, default=200)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--probe-site")
    q.add_argument("--label")
    q = kinds.add_parser("causal", help="7: ablate or steer the probe subspace while sampling")
    q.add_argument("store")
    q.add_argument("--model", required=True)
    q.add_argument("--site", required=True)
    q.add_argument("--label")
    q.add_argument("--n", type=int, default=200)
    q.add_argument("--seed", type=int, default=1)
    q = kinds.add_parser("trajectory", help="8: one example's canvas, token x step")
    q.add_argument("store")
    q.add_argument("--example", type=int, default=0)
    for q in kinds.choices.values():
        q.error = p.error  # one-line errors here too
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("report", help="a self-contained HTML page from a folder of saved analyses")
    p.add_argument("folder")
    p.add_argument("--out", help="the HTML file (default FOLDER/report.html)")
    p.add_argument("--title", default="dlmprobe report")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("train", help="train a diffusion denoiser or its autoregressive twin on a task")
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--task-param", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, e.g. size=6 or blanks=16 (repeatable)")
    p.add_argument("--out", help="checkpoint folder (default runs/<task>-<kind>)")
    p.add_argument("--train-steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-mlp", type=int, default=512)
    p.add_argument("--positions", choices=("learned", "rotary"), default="learned",
                   help="position encoding: learned absolute embeddings or rotary (relative)")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (same architecture and task; the kind may differ, "
                        "e.g. a denoiser from its autoregressive twin) instead of a random draw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    _add_output_mode(p, "checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="exact-solve rate of a model on held-out puzzles")
    p.add_argument("model", help="shipped model name (e.g. arith-diffusion) or checkpoint folder")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    _add_sampler_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="sample and print a few held-out puzzles")
    p.add_argument("model")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trajectory", action="store_true", help="also print the commit step of each position")
    _add_sampler_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("cache", help="sample with hooks attached and stream every step's activations to HDF5")
    p.add_argument("--model", required=True, help="shipped model name or checkpoint folder")
    p.add_argument("--task", choices=sorted(TASKS), help="check that the model was trained on this task")
    p.add_argument("--n", type=int, default=256, help="number of puzzles")
    p.add_argument("--split", choices=("train", "eval"), default="eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sites", nargs="+", default=["blocks.*.hook_resid_post"],
                   help="TransformerLens hook names or globs (default: every layer's residual stream)")
    p.add_argument("--record-steps", default="all", help="'all', 'every:K' or a list such as 0,4,8")
    p.add_argument("--positions", choices=("all", "target", "masked", "answer", "last_prompt", "sep+target"), default="target")
    _add_sampler_args(p)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard", help="i/n: write the i-th of n slices of the examples (merge them with dlmprobe merge)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--out", required=True, help="the HDF5 file to write")
    _add_output_mode(p, "interrupted run")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("merge", help="join shard files into one HDF5 virtual dataset")
    p.add_argument("shards", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("info", help="describe an activation dataset")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("probe", help="train a grid of linear probes (site x step) with controls on an activation dataset")
    p.add_argument("dataset", help="HDF5 file written by dlmprobe cache")
    p.add_argument("--label", help="task label to decode (default: the task's answer label)")
    p.add_argument("--target", choices=("output", "truth"), default="output",
                   help="the token the model finally commits, or the correct answer")
    p.add_argument("--read", default="own",
                   help="'own' (the label position), 'pooled', 'frontier' (last written token; autoregressive read-ahead) or a canvas position")
    p.add_argument("--phase", choices=("before_commit", "after_commit"), default="before_commit")
    p.add_argument("--per-slot", action="store_true", help="one probe per label slot")
    p.add_argument("--sites", nargs="+", help="subset of the stored sites")
    p.add_argument("--steps", default="all", help="'all', 'every:K' or a list such as 0,4,8")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength (scikit-learn's C)")
    p.add_argument("--no-control", action="store_true", help="skip the control task")
    p.add_argument("--no-random-baseline", action="store_true", help="skip the random-weights baseline")
    p.add_argument("--mdl", action="store_true", help="also compute online-code description length")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv")
    p.add_argument("--device", default="cpu", help="where the probes are fitted (e.g. cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--out", required=True, help="folder for the tables")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("tasks", help="show one example of every task")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tasks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (UsageError, ValueError, OSError, NotImplementedError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"dlmprobe {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"dlmprobe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
