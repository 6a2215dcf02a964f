"""Which decode worker gets which job (featurize.worker.DecodePool deals them as workers free up).

A job goes to the worker that last had a job on the same video when that worker is still there: a decode worker
keeps the frame tables it demuxed (featurize.decoder.frame_table), so the table made while probing serves the decode
too, where another worker would open and demux the file again (with two workers, dealt as they freed up, 592 of
1,200 tiny clips were: cProfile of the workers on bench/clips_bench.py's clips). A worker with none of its own left
takes the next common job, then one from the worker with the most left (from the end of its list, so the owner keeps
the ones it reaches soonest).
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterable


class Dealer:
    """The jobs not yet dealt, by the worker slot that should have them (``owner(job)``: a slot, or None)."""

    def __init__(self, jobs: Iterable, owner: Callable[[object], int | None]):
        self.common: deque = deque()
        self.own: dict[int, deque] = {}
        for job in jobs:
            slot = owner(job)
            (self.common if slot is None else self.own.setdefault(slot, deque())).append(job)

    def __bool__(self) -> bool:
        return bool(self.common) or any(self.own.values())

    def take(self, slot: int):
        """The next job for the worker in ``slot`` (there must be one left: check ``bool(dealer)`` first)."""
        mine = self.own.get(slot)
        if mine:
            return mine.popleft()
        if self.common:
            return self.common.popleft()
        return max(self.own.values(), key=len).pop()

    def put_back(self, jobs: list) -> None:
        """Jobs a lost worker had queued: first in line for the others, in their order."""
        self.common.extendleft(reversed(jobs))
