"""The kit's own files, read and written safely: atomic writes and typed JSON loading.

Writes go to a temporary name beside the target, are flushed to disk and renamed into place, so a
killed process leaves the old file or the new one, never half of one; a write that fails removes its
temporary. Reads of JSON files the kit wrote (and a user may have edited) check every field's type
and turn any damage into one :class:`DlmprobeInputError` line naming the file, the field, what was
expected and what was found.

Example:
    >>> with atomic_file("out/table.csv") as tmp:
    ...     table.to_csv(tmp, index=False)        # out/table.csv appears whole or not at all
    >>> state = load_json_object("run/state.json", {"step": int, "elapsed_s": float})
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dlmprobe.errors import DlmprobeInputError

# The kit's JSON files are small; refusing bigger ones keeps a damaged file from filling memory.
MAX_JSON_BYTES = 64 * 2**20

Schema = Mapping[str, type | tuple[type, ...]]

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dict: "an object", list: "a list", type(None): "null"}


def one_line(text: str, limit: int = 300) -> str:
    """``text`` collapsed onto one line and cut at ``limit`` characters (for error messages)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def describe(value: Any) -> str:
    """What a JSON value is, for an error message: ``a string ('8')``."""
    kind = next((name for t, name in _TYPE_NAMES.items() if type(value) is t), type(value).__name__)
    return f"{kind} ({one_line(repr(value), 60)})"


def _is(value: Any, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):  # JSON true is not a number here
        return bool in types
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def _expected(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def check_object(value: Any, schema: Schema, where: str, optional: Schema | None = None) -> dict[str, Any]:
    """``value`` itself once it is a dict holding every ``schema`` field with its type.

    ``optional`` fields may be missing but, when present, must have their type. Other keys pass
    through. ``where`` starts the message (``"run/state.json"``, ``"run/config.json field 'model'"``).
    """
    if not isinstance(value, dict):
        raise DlmprobeInputError(f"{where}: expected a JSON object, found {describe(value)}")
    for key, types in schema.items():
        if key not in value:
            raise DlmprobeInputError(f"{where}: missing field {key!r} ({_expected(types)})")
    for key, types in {**(optional or {}), **schema}.items():
        if key in value and not _is(value[key], types):
            raise DlmprobeInputError(f"{where}: field {key!r} should be {_expected(types)}, found {describe(value[key])}")
    return value


def read_small_file(path: str | Path, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a small file the kit wrote; one DlmprobeInputError line if unreadable or too big."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise DlmprobeInputError(f"{path}: expected a file of at most {limit} bytes, found {size} bytes")
        return path.read_bytes()
    except OSError as err:
        raise DlmprobeInputError(f"{path}: cannot read it ({one_line(err.strerror or err)})") from None


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``; one DlmprobeInputError line if it cannot be read or parsed."""
    data = read_small_file(path)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise DlmprobeInputError(f"{path}: expected JSON, found invalid content ({one_line(err)})") from None


def load_json_object(path: str | Path, schema: Schema, optional: Schema | None = None) -> dict[str, Any]:
    """The JSON object in ``path``, checked against ``schema`` (see :func:`check_object`)."""
    return check_object(read_json(path), schema, str(path), optional)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some file systems cannot open a folder, which is fine.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def _made_parents(folder: Path) -> Iterator[None]:
    """Create ``folder`` (and parents) for a write; remove the ones created here if the write fails."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for p in missing:  # deepest first; only the still-empty folders this call made
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is synced and renamed onto ``path``."""
    path = Path(path)
    with _made_parents(path.parent):
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            tmp.chmod(0o666 & ~_umask())  # mkstemp makes it private; the result should look like any written file
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on success it replaces ``path`` whole.

    An existing ``path`` is swapped out in one step where the system allows it (else renamed aside
    first, for an instant) and then deleted. On failure the temporary folder is removed.
    """
    path = Path(path)
    with _made_parents(path.parent):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            tmp.chmod(0o777 & ~_umask())
            yield tmp
            _fsync_tree(tmp)
            if not path.exists():
                os.rename(tmp, path)
            elif _exchange(tmp, path):
                shutil.rmtree(tmp)  # now the old folder
            else:
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
                os.replace(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _fsync_dir(path.parent)


def peek_json_object(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or None where the file is missing, unreadable or not an object
    (for guessing what a folder holds, never for loading it)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None
