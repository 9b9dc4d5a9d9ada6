"""What the commands share: the one-line-error parser, flag groups, argument types and checks.

Nothing here imports torch or another heavy library at module level: ``dlmprobe --help`` and every
argument error answer before those load (benchmarks/cli_latency.py). Handlers import them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from dlmprobe.choices import ORDERS, READ_RULES
from dlmprobe.errors import DlmprobeInputError

EXIT_BAD_INPUT = 2
STORE = "an HDF5 activation dataset written by dlmprobe cache"
# --steps / --record-steps: "all", every K-th step ("every:K" -> K) or the steps themselves.
StepsSpec = str | int | list[int]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), still exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Argument types: argparse turns an ArgumentTypeError into "argument --x: <message>", one line.


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def task_param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``, the value read as JSON when it parses (``size=6`` is an int), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def steps_spec(text: str) -> StepsSpec:
    """``all``, ``every:K`` (returned as the int K) or a comma-separated list of steps."""
    try:
        if text == "all":
            return "all"
        if text.startswith("every:"):
            every = int(text.removeprefix("every:"))
            if every >= 1:
                return every
        else:
            steps = [int(v) for v in text.split(",")]
            if min(steps) >= 0:
                return steps
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected 'all', 'every:K' (K >= 1) or steps such as 0,4,8, got {text!r}")


def shard(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise argparse.ArgumentTypeError(f"shard must be i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return int(i), int(n)


def read_rule(text: str) -> str | int:
    if text in READ_RULES:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(READ_RULES)} or a canvas position, got {text!r}") from None


def named_run(text: str) -> tuple[str, str]:
    """``NAME=FILE.h5``: one run of ``analyze compare``."""
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.h5, got {text!r}")
    return name, path


# Flag groups, each declared once and given to the commands that take it (argparse parents). Each
# call builds a new group: argparse shares a parent's actions, so one command's set_defaults would
# otherwise change the others'.


def _group(*flags: tuple[tuple[str, ...], dict[str, Any]]) -> Parser:
    parent = Parser(add_help=False)
    for names, options in flags:
        parent.add_argument(*names, **options)
    return parent


def threads() -> Parser:
    return _group((("--threads",), {"type": positive_int, "default": 1, "help": "torch CPU threads (default 1)"}))


def seed(default: int = 0) -> Parser:
    return _group((("--seed",), {"type": int, "default": default, "help": f"random seed (default {default})"}))


def quiet() -> Parser:
    return _group((("--quiet",), {"action": "store_true", "help": "no progress bars"}))


def overwrite() -> Parser:
    return _group((("--overwrite",), {"action": "store_true", "help": "replace an existing output"}))


def resume_or_overwrite() -> Parser:
    parent = Parser(add_help=False)
    mode = parent.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the unfinished output in --out")
    mode.add_argument("--overwrite", action="store_true", help="replace the output in --out")
    return parent


def device(what: str = "the model runs") -> Parser:
    return _group((("--device",), {"default": "cpu", "help": f"where {what}: cpu, cuda, cuda:N or mps (default cpu)"}))


def no_verify() -> Parser:
    return _group((("--no-verify",), {"action": "store_true", "help": "load weights even where they differ from "
                                      "the sha256 recorded with them (weights edited on purpose)"}))


def task_params(what: str = "a variant of the model's task, e.g. blanks=24") -> Parser:
    return _group((("--task-param",), {"type": task_param, "action": "append", "default": [], "metavar": "KEY=VALUE",
                                       "help": f"{what} (repeatable)"}))


def sampler() -> Parser:
    """The sampler's flags (unset ones keep the sampler's defaults) and --task-param."""
    parent = Parser(add_help=False, parents=[task_params()])
    parent.add_argument("--steps", type=positive_int, help="denoising steps (default: one token per step)")
    parent.add_argument("--block-length", type=positive_int, help="semi-autoregressive block length (default: whole target)")
    parent.add_argument("--temperature", type=float, help="0 = argmax (default), else Gumbel noise")
    parent.add_argument("--order", choices=ORDERS, help="which masked tokens to commit first (default: confidence)")
    return parent


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler flags given on the command line (unset ones keep the sampler's defaults)."""
    flags = ("steps", "block_length", "temperature", "order")
    return {flag: getattr(args, flag) for flag in flags if getattr(args, flag) is not None}


# Checks at the boundary, before any work: each raises a one-line DlmprobeInputError.


def check_output(path: Path, args: argparse.Namespace) -> None:
    """The one "output already exists" check: refuse unless --overwrite (or --resume) says so.

    An empty folder is not an output (``mkdir`` before a run is fine); an output inside a file is bad input.
    """
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise DlmprobeInputError(f"cannot write {path}: {folder} is a file, not a folder")
    if getattr(args, "overwrite", False) or getattr(args, "resume", False):
        return
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        how = "--resume to continue it or --overwrite to replace it" if "resume" in args else "--overwrite to replace it"
        raise DlmprobeInputError(f"{path} already exists; pass {how}")


def input_file(path: str, what: str = STORE) -> Path:
    file = Path(path)
    if not file.is_file():
        raise DlmprobeInputError(f"expected {what}, got {path!r} ({'a folder' if file.is_dir() else 'no such file'})")
    return file


def check_model(name: str) -> None:
    """A shipped model's name or a checkpoint folder; the library's FileNotFoundError becomes input."""
    from dlmprobe.models import resolve_checkpoint

    try:
        resolve_checkpoint(name)
    except FileNotFoundError as err:
        raise DlmprobeInputError(str(err)) from None


def chosen_device(args: argparse.Namespace):
    """The torch device ``--device`` names, checked to exist here: call it before any work or output."""
    from dlmprobe.models.device import resolve_device

    return resolve_device(args.device)


def load_checkpoint(name: str, args: argparse.Namespace):
    """The checkpoint ``name`` on ``--device``, its weights checked unless ``--no-verify``."""
    from dlmprobe.models import load_model

    check_model(name)
    return load_model(name, device=chosen_device(args), verify=not args.no_verify)


def sweep_leftovers(path: Path) -> None:
    """Remove what a killed write of ``path`` left beside it: the hidden temporaries of dlmprobe.files
    (``.NAME.*.tmp`` files or folders, ``.NAME.*.old`` folders), which no reader looks at."""
    folder, prefix = path.parent, f".{path.name}."
    if not folder.is_dir():
        return
    for item in folder.iterdir():
        if item.name.startswith(prefix) and item.name.endswith((".tmp", ".old")):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)


def set_threads(count: int) -> None:
    """One torch thread unless told otherwise: dlmprobe's models are small, and torch threads beyond
    the free cores (another job on the machine) slow small operations down by an order of magnitude."""
    import torch

    torch.set_num_threads(count)


def select_steps(spec: StepsSpec, stored: Sequence[int]) -> list[int] | None:
    """The stored steps a ``--steps`` spec names (None: all of them); a step not stored is bad input."""
    if spec == "all":
        return None
    stored = [int(s) for s in stored]
    if isinstance(spec, int):
        return stored[::spec]
    missing = [s for s in spec if s not in stored]
    if missing:
        raise DlmprobeInputError(f"--steps expects stored steps {stored}, got {missing[0]}")
    return list(spec)
