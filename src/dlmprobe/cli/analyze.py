"""``analyze ANALYSIS``: run one of the eight analyses and save its table, figure and summary."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from dlmprobe.choices import PROBE_TARGETS
from dlmprobe.cli import common
from dlmprobe.errors import DlmprobeInputError

OpenStore = Callable[[str], object]  # a path -> an open ActivationDataset, closed after the analysis


def _decodability(args: argparse.Namespace, store: OpenStore):
    from dlmprobe.analyses import decodability

    data = store(args.store)
    return decodability(data, label=args.label, target=args.target, sites=args.sites,
                        steps=common.select_steps(args.steps, data.steps), progress=not args.quiet)


def _lead(args: argparse.Namespace, store: OpenStore):
    from dlmprobe.analyses import planning_lead

    return planning_lead(store(args.store), label=args.label, site=args.site, progress=not args.quiet)


def _compare(args: argparse.Namespace, store: OpenStore):
    from dlmprobe.analyses import compare_runs

    names = [name for name, _ in args.runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DlmprobeInputError(f"compare expects one file per run name, got {repeated[0]!r} twice")
    runs = {name: store(path) for name, path in args.runs}
    return compare_runs(runs, label=args.label, sites=args.sites, progress=not args.quiet, shared_init=args.shared_init)


def _order(args: argparse.Namespace, store: OpenStore):
    from dlmprobe.analyses import commit_order

    return commit_order(store(args.store), answer=args.answer, reasoning=args.reasoning)


def _is_hf_model(args: argparse.Namespace) -> bool:
    """A Hugging Face model: a model folder that is no kit checkpoint, or a hub name given with a text flag."""
    from dlmprobe.capture_text import is_builtin_model

    if is_builtin_model(args.model):
        return False
    return Path(args.model).expanduser().is_dir() or bool(args.trust_remote_code or getattr(args, "task", None))


def _text_flags(args: argparse.Namespace) -> dict:
    """A Hugging Face model's text task and canvas layout from the flags; none for a built-in model."""
    from dlmprobe.tasks import get_task
    from dlmprobe.tasks.text import BuiltinTextTask, CanvasTemplate

    if not _is_hf_model(args):
        given = [flag for flag, value in (("--task", args.task), ("--task-param", args.task_param),
                                          ("--reasoning-length", args.reasoning_length),
                                          ("--answer-length", args.answer_length)) if value]
        if given:
            raise DlmprobeInputError(f"{given[0]} is for a Hugging Face model; built-in model {args.model!r} runs on its own task")
        return {}
    return {"task": BuiltinTextTask(get_task(args.task or "arith", **dict(args.task_param))),
            "template": CanvasTemplate.forced_answer(args.reasoning_length, args.answer_length)}


def _load_model(args: argparse.Namespace):
    """A built-in checkpoint, or a Hugging Face model's handle (a folder or hub name)."""
    from dlmprobe.models import load_hf_model

    if not _is_hf_model(args):
        return common.load_checkpoint(args.model, args)
    return load_hf_model(args.model, trust_remote_code=args.trust_remote_code, device=common.chosen_device(args))


def _native_faithfulness(args: argparse.Namespace):
    """DiffusionGemma (its own generate, no mask token) on a built-in task rendered as text through its tokenizer."""
    from dlmprobe.analyses import faithfulness
    from dlmprobe.capture_native import load_native_tokenizer
    from dlmprobe.sampling.native import load_native_model

    given = [flag for flag, value in (("--twin", args.twin), ("--trust-remote-code", args.trust_remote_code or None))
             if value is not None]
    if given:
        raise DlmprobeInputError(f"{given[0]} does not apply to a DiffusionGemma model ({args.model!r} runs a text task "
                                 "with its own generate)")
    text = _text_flags(args)
    tokenizer = load_native_tokenizer(args.model)
    model = load_native_model(args.model, common.chosen_device(args))
    return faithfulness(model, n=args.n, seed=args.seed, corrupt_label=args.corrupt_label, answer_label=args.answer_label,
                        progress=not args.quiet, denoising_steps=args.denoising_steps, tokenizer=tokenizer, **text)


def _faithfulness(args: argparse.Namespace, store: OpenStore):
    from dlmprobe.analyses import faithfulness
    from dlmprobe.sampling.native import is_native_model

    if is_native_model(args.model):
        return _native_faithfulness(args)
    if args.denoising_steps is not None:
        raise DlmprobeInputError(f"--denoising-steps is for a DiffusionGemma model; {args.model!r} is not one")
    text = _text_flags(args)
    twin = common.load_checkpoint(args.twin, args) if args.twin else None
    return faithfulness(_load_model(args), n=args.n, seed=args.seed, corrupt_label=args.corrupt_label,
                        answer_label=args.answer_label, twin=twin, progress=not args.quiet, **text)


def _paraphrase(args: argparse.Namespace, store: OpenStore):
    from dlmprobe.analyses import paraphrase_run

    text = _text_flags(args)
    return paraphrase_run(_load_model(args), n=args.n, seed=args.seed, probe_site=args.probe_site, label=args.label,
                          progress=not args.quiet, **text)


def _causal(args: argparse.Namespace, store: OpenStore):
    from dlmprobe.analyses import causal_check
    from dlmprobe.sampling import DiffusionSamplerConfig

    data = store(args.store)
    sampler = DiffusionSamplerConfig(**{**data.config["sampler"], "temperature": 0.0}) if args.greedy else None
    return causal_check(_load_model(args), data, args.site, label=args.label, n=args.n, seed=args.seed,
                        progress=not args.quiet, sampler=sampler)


def _trajectory(args: argparse.Namespace, store: OpenStore):
    from dlmprobe.analyses import trajectory_view

    return trajectory_view(store(args.store), example=args.example)


def cmd_analyze(args: argparse.Namespace) -> int:
    from dlmprobe.store import ActivationDataset

    out = Path(args.out)
    common.check_output(out / args.analysis, args)  # each analysis saves into a sub-folder of its own name
    if "device" in args:  # the analyses that run a model
        common.chosen_device(args)
    common.set_threads(args.threads)
    with ExitStack() as stores:
        result = args.run(args, lambda path: stores.enter_context(ActivationDataset(common.input_file(path))))
        common.sweep_leftovers(out / result.name)
        folder = result.save(out)  # whole or not at all (built beside its place, renamed in)
    print(result.summary)
    print(f"\nwrote {folder} (table.csv, figure.png, result.json); dlmprobe report {out} builds the HTML page")
    return 0


def _model_flags() -> list[common.Parser]:
    """The flags of the analyses that load a model."""
    return [common.device(), common.no_verify()]


def _text_model_flags() -> common.Parser:
    """A Hugging Face model's flags: remote code, its text task and the forced-answer canvas."""
    p = common.Parser(add_help=False, parents=[common.task_params("Hugging Face model: an option of --task, e.g. n_ops=2")])
    p.add_argument("--trust-remote-code", action="store_true", help="allow a Hugging Face model's own modeling code")
    p.add_argument("--task", help="Hugging Face model: the built-in task rendered as text (default arith)")
    p.add_argument("--reasoning-length", type=common.positive_int,
                   help="Hugging Face model: masked reasoning tokens before the forced answer slot (default 0)")
    p.add_argument("--answer-length", type=common.positive_int,
                   help="Hugging Face model: answer slot tokens (default: longest reference)")
    return p


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("analyze", help="run one analysis and save its table, figure and summary",
                            parents=[common.threads(), common.quiet(), common.overwrite()])
    p.add_argument("--out", default="runs/analyses", help="folder of saved analyses (one sub-folder each)")
    p.set_defaults(func=cmd_analyze)
    kinds = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    store_help = "HDF5 file written by dlmprobe cache"

    q = kinds.add_parser("decodability", help="1: probe accuracy per layer and step before commit")
    q.add_argument("store", help=store_help)
    q.add_argument("--label", help="task label to decode (default: the task's answer label)")
    q.add_argument("--target", choices=PROBE_TARGETS, default="output")
    q.add_argument("--sites", nargs="+", help="subset of the stored sites")
    q.add_argument("--steps", type=common.steps_spec, default="all",
                   help="stored steps: 'all', every K-th ('every:K') or a list such as 0,4,8")
    q.set_defaults(run=_decodability)

    q = kinds.add_parser("lead", help="2: how many steps before its commit a token is known")
    q.add_argument("store", help=store_help)
    q.add_argument("--label")
    q.add_argument("--site", help="the probed site (default: the deepest stored)")
    q.set_defaults(run=_lead)

    q = kinds.add_parser("compare", help="3: diffusion vs autoregressive (vs left-to-right diffusion)")
    q.add_argument("runs", nargs="+", type=common.named_run,
                   help="NAME=FILE.h5, e.g. diffusion=d.h5 autoregressive=ar.h5")
    q.add_argument("--label")
    q.add_argument("--shared-init", action=argparse.BooleanOptionalAction, default=None,
                   help="the models share an initialisation (a matched pair, e.g. Dream-7B from Qwen2.5-7B); "
                        "recorded in the result (default: not stated)")
    q.add_argument("--sites", nargs="+", help="subset of the stored sites")
    q.set_defaults(run=_compare)

    q = kinds.add_parser("order", help="4: when answer tokens are committed vs reasoning tokens")
    q.add_argument("store", help=store_help)
    q.add_argument("--answer", help="the answer label (default: the task's)")
    q.add_argument("--reasoning", help="the reasoning label (default: the task's)")
    q.set_defaults(run=_order)

    q = kinds.add_parser("faithfulness", help="5: corrupt committed reasoning at step t; does the answer follow?",
                         parents=[common.seed(), *_model_flags(), _text_model_flags()])
    q.add_argument("--model", required=True, help="a built-in checkpoint, or a Hugging Face diffusion model (a folder, or "
                   "a hub name with --task); a DiffusionGemma folder runs --task (default arith) with its own generate")
    q.add_argument("--denoising-steps", type=common.positive_int,
                   help="DiffusionGemma: its number of denoising steps (default: the model's own)")
    q.add_argument("--twin", help="the autoregressive twin to run the same corruption on")
    q.add_argument("--n", type=common.positive_int, default=200)
    q.add_argument("--corrupt-label")
    q.add_argument("--answer-label")
    q.set_defaults(run=_faithfulness)

    q = kinds.add_parser("paraphrase", help="6: rewrite the canvas after every step, meaning preserved",
                         parents=[common.seed(), *_model_flags(), _text_model_flags()])
    q.add_argument("--model", required=True, help="a built-in checkpoint, or a Hugging Face diffusion model (a folder, or a hub name with --task)")
    q.add_argument("--n", type=common.positive_int, default=200)
    q.add_argument("--probe-site")
    q.add_argument("--label")
    q.set_defaults(run=_paraphrase)

    q = kinds.add_parser("causal", help="7: ablate or steer the probe subspace while sampling",
                         parents=[common.seed(default=1), *_model_flags()])
    q.add_argument("store", help=store_help)
    q.add_argument("--model", required=True,
                   help="the model that recorded the store: a built-in checkpoint, or a Hugging Face model (folder or hub name)")
    q.add_argument("--trust-remote-code", action="store_true", help="allow a Hugging Face model's own modeling code")
    q.add_argument("--site", required=True)
    q.add_argument("--label")
    q.add_argument("--n", type=common.positive_int, default=200)
    q.add_argument("--greedy", action="store_true",
                   help="sample the fresh runs at temperature 0 with the store's other sampler settings "
                        "(for a store sampled at a higher temperature)")
    q.set_defaults(run=_causal)

    q = kinds.add_parser("trajectory", help="8: one example's canvas, token x step")
    q.add_argument("store", help=store_help)
    q.add_argument("--example", type=int, default=0)
    q.set_defaults(run=_trajectory)
