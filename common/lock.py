"""An inter-process lock on a path (a cache being written, a sweep's study): an flock, released by the OS when its
holder dies, so a killed process never leaves a lock behind."""
from __future__ import annotations

import fcntl
import os

from featseq.common.errors import UserError


class Locked(UserError):
    """Another live process holds the lock; the message names the path and the holder's pid."""


class FileLock:
    """An flock on ``<path>.lock``; released by the OS if the process dies.

    The lock file is removed on release, *while still locked*; so a process that opened the old file
    before it was unlinked can win the flock on an inode that no longer has a name. ``acquire``
    therefore checks after flock that the path still names the inode it locked, and starts over
    (opening the path again) when it does not; otherwise two writers could hold "the" lock at once.
    """

    def __init__(self, path: str, doing: str = "is writing it"):
        self.path = path + ".lock"
        self.doing = doing
        self._fh = None

    def acquire(self) -> "FileLock":
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                owner = fh.read().strip()
                fh.close()
                raise Locked(f"{self.path[:-5]}: another featseq process ({owner or 'unknown pid'}) {self.doing}; "
                             f"wait for it to finish or choose another --out") from None
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            mine = os.fstat(fh.fileno())
            if st is not None and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                break
            fh.close()  # locked a file a releasing holder had already unlinked: try the current one
        fh.truncate(0)
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh:
            try:
                os.remove(self.path)  # still locked here: see the class docstring
            except OSError:
                pass
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
