"""``cache``, ``merge`` and ``info``: the commands that write and describe activation stores."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from dlmprobe.choices import ACTIVATION_DTYPES, POSITION_RULES, SPLITS, TASK_NAMES
from dlmprobe.cli import common
from dlmprobe.errors import DlmprobeInputError

TEMPLATES = ("plain", "forced-answer")
MODEL_DTYPES = ("float32", "bfloat16", "float16")


def cmd_cache(args: argparse.Namespace) -> int:
    from dlmprobe.capture import CacheConfig, plan_cache, run_cache
    from dlmprobe.capture_text import is_builtin_model
    from dlmprobe.sampling.native import is_native_model

    out = Path(args.out)
    common.check_output(out, args)
    common.set_threads(args.threads)
    builtin = is_builtin_model(args.model)
    text_only = [flag for flag, value in (("--task-file", args.task_file), ("--template", args.template),
                                          ("--reasoning-length", args.reasoning_length),
                                          ("--answer-length", args.answer_length), ("--device-map", args.device_map),
                                          ("--model-dtype", args.model_dtype)) if value is not None]
    if builtin and text_only:
        raise DlmprobeInputError(f"{text_only[0]} is for Hugging Face models; {args.model!r} is a built-in checkpoint")
    if not builtin and is_native_model(args.model):
        _check_native_flags(args, text_only)
    if args.device_map is not None and args.device != "cpu":
        raise DlmprobeInputError(f"expected either --device or --device-map, got --device {args.device} and --device-map {args.device_map}")
    common.chosen_device(args)
    config = CacheConfig(
        model=args.model, n=args.n, split=args.split, seed=args.seed, sites=args.sites, steps=args.record_steps,
        positions=args.positions, sampler={**common.sampler_options(args), "seed": args.seed},
        task_params=dict(args.task_param), dtype=args.dtype, batch_size=args.batch_size, shard=args.shard,
        task=None if builtin else args.task, task_file=args.task_file, template=args.template or "plain",
        reasoning_length=args.reasoning_length, answer_length=args.answer_length,
        trust_remote_code=args.trust_remote_code, model_dtype=args.model_dtype or "float32", device=args.device,
        device_map=args.device_map,
    )
    plan = plan_cache(config, common.load_checkpoint(args.model, args) if builtin else None)
    if builtin and args.task and args.task != plan.task.name:
        raise DlmprobeInputError(f"--task {args.task} does not match the model, which was trained on {plan.task.name}")
    print(plan.describe())
    start = time.perf_counter()
    run_cache(config, out, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet, plan=plan)
    print(f"wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return 0


def _check_native_flags(args: argparse.Namespace, text_only: list[str]) -> None:
    """A DiffusionGemma folder (its own generate, no mask token): refuse the flags that do not apply to it."""
    from dlmprobe.capture_native import NATIVE_OPTIONS

    extra = (("--block-length", args.block_length), ("--temperature", args.temperature), ("--order", args.order),
             ("--trust-remote-code", args.trust_remote_code or None))
    refused = [flag for flag in text_only if flag == "--device-map"] + [flag for flag, value in extra if value is not None]
    if refused:
        raise DlmprobeInputError(f"{refused[0]} does not apply to a DiffusionGemma model ({args.model!r} samples with "
                                 f"its own generate); it takes {', '.join(NATIVE_OPTIONS)}")


def cmd_merge(args: argparse.Namespace) -> int:
    from dlmprobe.store import ActivationDataset, merge_shards

    shards = [common.input_file(path) for path in args.shards]
    common.check_output(Path(args.out), args)
    merge_shards(shards, args.out, overwrite=args.overwrite)
    with ActivationDataset(args.out) as data:
        print(f"merged {len(shards)} shards into {args.out}: {data.n_examples} examples")
    return 0


def _entry(config: dict[str, Any], *keys: str) -> Any:
    """``config[k1][k2]...``, or None where the run config lacks it (only the store's own fields are certain)."""
    for key in keys:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def cmd_info(args: argparse.Namespace) -> int:
    from dlmprobe.store import ActivationDataset

    with ActivationDataset(common.input_file(args.path)) as data:
        config = data.config
        solved = f", solved {data.solved.mean():.1%}" if data.n_examples else ""
        print(f"{args.path}: {data.n_examples} complete examples{solved}")
        described = [
            ("model", _entry(config, "model", "name"), _entry(config, "model", "kind")),
            ("task", _entry(config, "task", "name"), _entry(config, "task", "params")),
            ("text task", _entry(config, "task", "text_task"), _entry(config, "task", "template")),
            ("sampler", _entry(config, "sampler"), None),
            ("commit rule", _entry(config, "commit_rule"),
             "a position is committed from the step after which its canvas token stays final"
             if _entry(config, "commit_rule") == "settle" else None),
        ]
        print(", ".join(f"{what} {value}" + (f" ({detail})" if detail is not None else "")
                        for what, value, detail in described if value is not None) or "no run description")
        print(f"steps {data.steps.tolist()}")
        rule = _entry(config, "position_rule")
        print(f"positions{f' ({rule})' if rule else ''} {data.positions.tolist()}")
        print(f"labels {data.label_names}")
        dtype = _entry(config, "cache", "dtype")
        step, position = int(data.steps[0]), int(data.positions[0])
        for site in data.sites:
            width = data.get(site, step, position)[0].shape[1]  # reads one (examples, width) slice
            print(f"  {site}: {data.n_examples} examples x {len(data.steps)} steps x {len(data.positions)} positions "
                  f"x {width}{f' {dtype}' if dtype else ''}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("cache", help="sample with hooks attached and stream every step's activations to HDF5",
                            parents=[common.sampler(), common.seed(), common.threads(), common.device(),
                                     common.no_verify(), common.quiet(), common.resume_or_overwrite()])
    p.add_argument("--model", required=True, help="shipped model name, checkpoint folder, Hugging Face id or a folder "
                   "with a Hugging Face config.json (a DiffusionGemma folder runs its own generate on a text task: --steps "
                   "is its number of denoising steps, the sampler's other flags do not apply)")
    p.add_argument("--task", choices=TASK_NAMES, help="built-in model: check that it was trained on this task; "
                   "Hugging Face model: the task, rendered as text through its tokenizer")
    p.add_argument("--task-file", help="Hugging Face model: a JSONL file of {prompt, answer[, reasoning]} as the task")
    p.add_argument("--template", choices=TEMPLATES, help="Hugging Face model: canvas layout; forced-answer = prompt, "
                   "[MASK]*r, 'The answer is', [MASK]*a (default plain: prompt, [MASK]*a)")
    p.add_argument("--reasoning-length", type=common.positive_int, help="masked reasoning tokens before the answer slot")
    p.add_argument("--answer-length", type=common.positive_int, help="answer slot tokens (default: longest reference)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a Hugging Face model's own modeling code")
    p.add_argument("--model-dtype", choices=MODEL_DTYPES, help="Hugging Face model weights (default float32)")
    p.add_argument("--device-map", choices=("auto",), help="spread a Hugging Face model over the GPUs (accelerate)")
    p.add_argument("--n", type=common.positive_int, default=256, help="number of puzzles")
    p.add_argument("--split", choices=SPLITS, default="eval")
    p.add_argument("--sites", nargs="+", default=["blocks.*.hook_resid_post"],
                   help="TransformerLens hook names or globs (default: every layer's residual stream)")
    p.add_argument("--record-steps", type=common.steps_spec, default="all",
                   help="'all', 'every:K' or a list such as 0,4,8")
    p.add_argument("--positions", choices=(*POSITION_RULES, "answer-slot"), default="target",
                   help="answer-slot (text tasks): the forced answer slot and the column before it")
    p.add_argument("--dtype", choices=ACTIVATION_DTYPES, default="float16", help="stored activations")
    p.add_argument("--batch-size", type=common.positive_int, default=64)
    p.add_argument("--shard", type=common.shard,
                   help="i/n: write the i-th of n slices of the examples (merge them with dlmprobe merge)")
    p.add_argument("--out", required=True, help="the HDF5 file to write")
    p.set_defaults(func=cmd_cache)

    p = commands.add_parser("merge", help="join shard files into one HDF5 virtual dataset", parents=[common.overwrite()])
    p.add_argument("shards", nargs="+", help="the shard files written by dlmprobe cache --shard")
    p.add_argument("--out", required=True, help="the merged HDF5 file")
    p.set_defaults(func=cmd_merge)

    p = commands.add_parser("info", help="describe an activation dataset")
    p.add_argument("path", help="HDF5 file written by dlmprobe cache")
    p.set_defaults(func=cmd_info)
