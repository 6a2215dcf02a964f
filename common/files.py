"""Writing files so that a crash never leaves a half-written one (write a temporary file beside, then rename), and
so that a full disk ends in one clear error naming the file instead of a traceback from deep inside a library."""
from __future__ import annotations

import errno
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError

# the errors a write fails with when the space runs out: the disk (ENOSPC), a quota (EDQUOT), a file-size limit
# (EFBIG: ulimit -f, RLIMIT_FSIZE, a file system's largest file)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(UserError):
    """A write failed for want of space; the message names the file, what is kept and how to go on."""


def disk_full(e: BaseException) -> str | None:
    """The reason (``strerror``) when ``e`` is a write that failed for want of space, else None. HDF5 reports the
    C errno inside a RuntimeError's or OSError's text (``errno = 28, error message = ...``); Python in ``errno``."""
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
        return os.strerror(e.errno)
    m = re.search(r"errno = (\d+)", str(e))
    if m and int(m.group(1)) in DISK_FULL_ERRNOS:
        return os.strerror(int(m.group(1)))
    return None


@contextmanager
def writing(path: str | os.PathLike, kept: str = "what was finished before is kept") -> Iterator[None]:
    """Turn a write that fails for want of space inside the block into a :class:`DiskFullError` naming ``path``."""
    try:
        yield
        return
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as e:
        why = disk_full(e)
        if why is None:
            raise
        err = DiskFullError(f"{path}: writing failed: {why} ({errno.errorcode.get(_errno(e), 'write error')}); "
                            f"{kept}. Free space (or raise the file-size limit, ulimit -f) and rerun the same "
                            f"command")
        # release the frames the library's traceback holds now: HDF5 datasets in them must go before their file is
        # closed (h5py crashes at exit otherwise), and they complain while they go, which says nothing new
        with quiet_unraisable():
            e.with_traceback(None)
            del e
    raise err from None


@contextmanager
def quiet_unraisable() -> Iterator[None]:
    """Drop the "Exception ignored in ..." reports (sys.unraisablehook) of objects released in the block, e.g. h5py's
    ObjectID.__dealloc__ on a file whose last write failed."""
    old = sys.unraisablehook
    sys.unraisablehook = lambda _unraisable: None
    try:
        yield
    finally:
        sys.unraisablehook = old


def _errno(e: BaseException) -> int:
    if isinstance(e, OSError) and e.errno:
        return e.errno
    m = re.search(r"errno = (\d+)", str(e))
    return int(m.group(1)) if m else 0


@contextmanager
def replaced(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it is renamed over ``path`` (readers
    see the old file or the whole new one), otherwise removed. A full disk raises :class:`DiskFullError` naming
    ``path`` (which then still holds its old content, or does not exist)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # same suffix: writers that go by it work
    try:
        with writing(path, kept=f"{path.name} was not replaced"):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def unique_stem(name: str, used: set) -> str:
    """A file-name-safe stem of ``name`` (a path or an id) not yet in ``used`` (``_2``, ``_3`` appended), added to it."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem) or "item"
    base, k = s, 2
    while s in used:
        s, k = f"{base}_{k}", k + 1
    used.add(s)
    return s
