"""What a store writer needs from the file system: one writer per file, space reserved, errors named.

:class:`WriteLock` lets one process at a time write a store; :func:`reserve_space` allocates a
store's disk blocks before the first example is sampled; :func:`write_error` turns an OS error
from a write into a one-line :class:`StoreError` that says what to do.

Example:
    >>> with WriteLock(Path("run.h5")):
    ...     reserve_space(Path("run.h5"), resume=True)
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from pathlib import Path
from typing import Self

from dlmprobe.store.layout import StoreError

# h5py reports the errno of a failed system call in its message text, not always in err.errno.
_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")


class WriteLock:
    """An exclusive lock on ``<store>.lock``, held while one process writes the store.

    ``flock`` locks belong to the open file, so the kernel releases them when the process dies,
    kill -9 included. The lock file is removed on release; a process that opened it just before
    would then lock a removed file, so :meth:`acquire` checks that the file it locked is still
    the one at the path.
    """

    def __init__(self, store: Path):
        self.store = store
        self.path = store.with_name(store.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> WriteLock:
        """Take the lock, or raise a StoreError naming the process that holds it."""
        self.store.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise StoreError(
                    f"{self.store} is being written by another process (pid {holder}); "
                    "wait for it to finish or stop it, then rerun"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode("ascii"))
                self._fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (in that order, see the class docstring)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()


def reserve_space(path: Path, *, resume: bool) -> None:
    """Allocate every disk block of the preallocated (sparse) file ``path`` now.

    The writer preallocates a store's whole address space without writing it, so the file is
    sparse and the disk could fill up halfway through a run. This checks the bytes not yet
    backed by disk blocks (the real remaining need: less than the file's size when a run is
    resumed) against the free space, then allocates them with ``posix_fallocate``, which makes
    later writes into the file unable to fail for lack of space. Where the file system cannot
    allocate ahead (``EOPNOTSUPP``), the free-space check is all that is done.
    """
    stat = os.stat(path)
    missing = stat.st_size - 512 * stat.st_blocks  # st_blocks counts 512-byte units
    if missing <= 0:
        return
    free = shutil.disk_usage(path.parent).free
    if missing > free:
        raise StoreError(
            f"not enough disk space for {_name(path)}: it needs {_mib(missing)} more, "
            f"{path.parent} has {_mib(free)} free; free space and rerun{' with --resume' if resume else ''}"
        )
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, stat.st_size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise write_error(err, path, resume=resume) from None
    finally:
        os.close(fd)


def write_error(err: BaseException, path: Path, *, resume: bool = True, stored: int | None = None) -> BaseException:
    """A one-line StoreError for an OS error met writing ``path``, or ``err`` itself if it is none.

    ``stored``: examples safely in the file, said in the message when given.
    """
    code = _errno_of(err)
    if code is None:
        return err
    rerun = "rerun with --resume" if resume else "rerun"
    if code in (errno.ENOSPC, errno.EDQUOT):
        what, advice = "disk full", f"free space and {rerun}"
    elif code == errno.EFBIG:
        what, advice = "file size limit reached", f"raise the limit (ulimit -f) and {rerun}"
    elif code == errno.EIO:
        what, advice = "I/O error", f"check the disk and {rerun}"
    else:
        what, advice = "write failed", f"fix the cause and {rerun}"
    kept = f" ({stored} examples are safely stored)" if stored is not None else ""
    error = StoreError(f"{what} while writing {_name(path)}: {os.strerror(code)}{kept}; {advice}")
    error.__cause__ = err
    return error


def _errno_of(err: BaseException) -> int | None:
    if isinstance(err, OSError) and isinstance(err.errno, int) and err.errno > 0:
        return err.errno
    if isinstance(err, (OSError, RuntimeError)):
        found = _ERRNO_IN_MESSAGE.search(str(err))
        if found and int(found.group(1)) > 0:
            return int(found.group(1))
    return None


def _name(path: Path) -> str:
    """The store a message names: a file being built is named by the path it will take."""
    return str(path.with_name(path.name.removesuffix(".partial")))


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"
