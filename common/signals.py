"""Graceful stops: SIGTERM (what SLURM sends at its time limit and on pre-emption, what `kill` sends) and SIGINT
(Ctrl-C) end a long command the way Ctrl-C always did, as an exception in the main thread, so every ``with`` and
``finally`` on the way out runs: a featurize run publishes the segments it finished and releases its lock, worker
processes are stopped, a training run leaves no results.json (a run folder is complete only with one). The CLI
then exits with 128 + the signal's number: 143 for SIGTERM, 130 for SIGINT.

:func:`on_signals` is installed once, at the entry point (cli.Main) and in worker processes that must stop
cleanly (a sweep's); library code only needs to be safe for KeyboardInterrupt, which :class:`Interrupted` is.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; ``exit_code`` is 128 + its number (143 SIGTERM, 130 SIGINT)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {self.name}")


_HOLD = {"depth": 0, "pending": None}  # see held()


def install() -> dict:
    """Make SIGTERM and SIGINT raise :class:`Interrupted` in this process's main thread (once: a second signal while
    the first is being handled is ignored, so the clean-up it started can finish; kill -9 still ends it at once).
    Returns the handlers it replaced."""
    fired = []

    def handler(signum, _frame):
        if fired:
            return
        fired.append(signum)
        if _HOLD["depth"]:
            _HOLD["pending"] = signum
            return
        raise Interrupted(signum)

    return {s: signal.signal(s, handler) for s in SIGNALS}


@contextmanager
def on_signals() -> Iterator[None]:
    """:func:`install` for the block (only in the main thread; elsewhere a no-op), the old handlers restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = install()
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def held() -> Iterator[None]:
    """A short step that must not be cut in the middle (a prediction row and the count beside it): a signal that
    arrives in the block (handled as :func:`install` set up) raises :class:`Interrupted` when the block ends. Main
    thread only, where the handler runs."""
    _HOLD["depth"] += 1
    try:
        yield
    finally:
        _HOLD["depth"] -= 1
        if not _HOLD["depth"] and _HOLD["pending"] is not None:
            signum, _HOLD["pending"] = _HOLD["pending"], None
            raise Interrupted(signum)


def ignore_interrupts() -> None:
    """For helper processes their parent stops (decode workers): Ctrl-C reaches the whole process group, and the
    parent, not each worker, decides what to do with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
