"""The ``dlmprobe`` command line.

Bad input of any kind (a :class:`~dlmprobe.errors.DlmprobeInputError`, a path the user named
that cannot be read or written, or a write the machine refused: disk full, quota, read-only file
system) ends in one ``dlmprobe <command>: error: …`` line and exit code 2;
``--debug`` shows its traceback instead. Any other exception is a bug and keeps its traceback.
Each command's parser sits beside its handler, which alone imports torch and the other heavy
libraries, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Sequence

from dlmprobe import __version__
from dlmprobe.cli import analyze, common, demo, models, probe, store
from dlmprobe.errors import DlmprobeInputError

# OSErrors that mean "this path cannot be used", not "dlmprobe is broken".
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# OSErrors that mean the machine refused a write (disk full, quota, read-only file system), wherever it was.
RESOURCE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def build_parser() -> argparse.ArgumentParser:
    parser = common.Parser(prog="dlmprobe", description="Probe kit for diffusion language models.")
    parser.add_argument("--version", action="version", version=f"dlmprobe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a bad-input error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, analyze, models, store, probe):
        module.register(commands)
    return parser


def _named_paths(args: argparse.Namespace) -> list[str]:
    """Every path the command line may name: each string argument, and the FILE of NAME=FILE."""
    values: list[str] = []
    for value in vars(args).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str):
                values.append(item)
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str):
                values.append(item[1])
    return [os.path.abspath(v) for v in values if v]


def input_error(err: Exception, args: argparse.Namespace) -> str | None:
    """The one line to print for an error the user caused; None for a bug."""
    if isinstance(err, DlmprobeInputError):
        return _first_line(err)
    if isinstance(err, OSError) and err.errno in RESOURCE_ERRNOS:
        return f"{err.strerror}: {err.filename}" if err.filename else _first_line(err)
    if not isinstance(err, PATH_ERRORS):
        return None
    if err.filename is None:  # raised with a message, by dlmprobe about a path the user named
        return _first_line(err)
    named = _named_paths(args)
    for filename in (err.filename, err.filename2):  # a rename fails on either path
        path = os.path.abspath(filename) if filename is not None else None
        if path is not None and any(path == p or path.startswith(p.rstrip(os.sep) + os.sep) for p in named):
            return f"{err.strerror}: {filename}"
    return None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code: 0 done, 2 bad input, 130 interrupted (a bug raises)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version and argument errors, already printed
        return exit_.code if isinstance(exit_.code, int) else 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"dlmprobe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = input_error(err, args)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        else:
            print(f"dlmprobe {args.command}: error: {message}", file=sys.stderr)
        return common.EXIT_BAD_INPUT
