"""The decoders a decode worker keeps open between jobs, so a video's segments reuse one decoder.

A featurize run deals a long video's segments out one after another, and finetune comes back to the same clips
every epoch. Opening a decoder per job repeats what opening costs: for torchcodec in exact seek mode a scan of every
packet of the file, plus a CUDA decoder on NVDEC; for PyAV and decord a container and a codec. A worker keeps the
last :data:`KEEP_OPEN` decoders it used (least recently used closed first), keyed by the file (path, size and
mtime: a changed file gets a new decoder), size and resize policy. A job that finishes hands its decoder back
after ``release()`` (decord stops decoding ahead); a job that fails closes it (its state is unknown); the worker
closes them all when it ends. Decoders are used by the worker's one decoding thread only.
"""
from __future__ import annotations

import collections
import os

from .decoder import Decoder, open_decoder

# Two jobs are dealt to a worker at a time (featurize/worker.py), so two videos alternate at most while a run moves
# through its videos; four leave room for finetune's clips without holding more than a few decoders' buffers.
KEEP_OPEN = 4


class OpenDecoders:
    def __init__(self, backend: str, device: str, capacity: int = KEEP_OPEN):
        self.backend, self.device, self.capacity = backend, device, capacity
        self._kept: collections.OrderedDict[tuple, Decoder] = collections.OrderedDict()
        self._taken: dict[int, tuple] = {}  # id of a decoder a job holds -> its key
        self.opened = 0  # decoders opened (tests count them)

    def _key(self, path: str, *geometry) -> tuple:
        try:
            st = os.stat(path)
            return path, *geometry, st.st_size, st.st_mtime_ns
        except OSError:  # opening reports it, naming the file
            return path, *geometry, None, None

    def open(self, path: str, size: int | None, policy: str, resize_size: str = "",
             interpolation: str = "bilinear") -> Decoder:
        """The decoder kept for this file and geometry (size, policy, resize size, interpolation), taken out until
        :meth:`keep` or :meth:`discard`, or a new one."""
        key = self._key(path, size, policy, resize_size, interpolation)
        dec = self._kept.pop(key, None)
        if dec is None:
            dec = open_decoder(path, size=size, policy=policy, backend=self.backend, device=self.device,
                               resize_size=resize_size, interpolation=interpolation)
            self.opened += 1
        self._taken[id(dec)] = key
        return dec

    def keep(self, dec: Decoder) -> None:
        """A job finished with ``dec``: release it and keep it for the next job on its video."""
        dec.release()
        self._kept[self._taken.pop(id(dec))] = dec
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)[1].close()

    def discard(self, dec: Decoder) -> None:
        """A job failed with ``dec``: close it."""
        self._taken.pop(id(dec), None)
        dec.close()

    def close(self) -> None:
        while self._kept:
            self._kept.popitem()[1].close()
