"""decord backend: the original decoder, kept for caches made with it.

decord's known traps (README, "Decoders and decode workers") and what this module does about them:
- torch must be imported before decord in a process that uses CUDA: this module is only imported by the decode
  worker process (featurize/worker.py), which never imports torch for this backend;
- ``get_batch`` on scattered indices has been nondeterministic and leaky: frames are read sequentially instead
  (an accurate seek to the first, then ``skip_frames`` between targets);
- ``len(vr)`` can exceed the decodable frames and decoding can hang or abort the process: it runs inside a
  worker process that is timed out and replaced;
- its scaler returns malformed arrays (wrong channel count) for some output widths: 16, 24 and 48 with decord 0.6;
  16, 32, 48, 96 and 144 with decord2 3.4 (every multiple of 16 from 16 to 688 tried), and decord2 also fails on
  videos of those native widths. It is asked for a width that is a multiple of 32 and at least 160 (no failure
  seen there with either), also for narrower videos, and PIL finishes the resize;
- its scaler has one filter: with --interpolation bicubic or nearest it decodes at the native size and PIL resizes
  with that filter (the caches decord made before interpolation was recorded are bilinear ones);
- after ``next()`` it keeps decoding ahead in a background thread while nobody reads (see :meth:`release`).
Its own timestamps are float32 (off by up to 2e-6 s past 32 s of video); frame starts come from the shared table.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..decoder import SEEK_GAP, DecodeError, Decoder, chunked

ALIGN, MIN_WIDTH = 32, 160
PIL_FILTERS = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "NEAREST"}  # PIL.Image's names


class DecordDecoder(Decoder):
    name = "decord"

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        if device != "cpu":
            return "--decoder decord decodes on the CPU only here; use --decoder torchcodec for --decode-device cuda"
        try:
            import decord  # noqa: F401
        except ImportError:
            return "--decoder decord: decord is not installed (pip install decord2)"
        return None

    def _open(self) -> None:
        import decord

        w, h = self.out_dims
        kw: dict = {"num_threads": 1}
        self._fix = None  # final (w, h) when decord's output must be resized again
        if self.interpolation != "bilinear":  # native frames, resized by PIL with the filter asked for
            self._fix = (w, h) if (w, h) != (self.table.width, self.table.height) else None
        elif (w, h) != (self.table.width, self.table.height) or w < MIN_WIDTH:
            aw, ah = max(MIN_WIDTH, -(-w // ALIGN) * ALIGN), -(-h // ALIGN) * ALIGN
            kw.update(width=aw, height=ah)
            self._fix = (w, h) if (aw, ah) != (w, h) else None
        # one reader, opened at the output size: one at full resolution would decode ahead at full resolution
        self._vr = decord.VideoReader(self.path, **kw)
        if len(self._vr) < len(self.frame_starts):
            raise DecodeError(f"{self.path}: decord sees {len(self._vr)} frames, the container lists {len(self.frame_starts)}")
        self._parked = False  # release() seeked the reader away: the next read seeks accurately

    def _frames(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        from PIL import Image

        pos: int | None = None  # index of the frame vr.next() returns
        last_i, last = -1, None
        for i in indices.tolist():
            if i != last_i:
                if self._parked:  # released while the consumer was busy
                    self._parked, pos = False, None
                vr = self._vr
                if pos is None or i < pos or i - pos > SEEK_GAP:
                    vr.seek_accurate(i)
                elif i > pos:
                    vr.skip_frames(i - pos)
                last = vr.next().asnumpy()
                pos, last_i = i + 1, i
                if last.ndim != 3 or last.shape[2] != 3:
                    raise DecodeError(f"{self.path}: decord returned a malformed frame of shape {last.shape}")
                if self._fix is not None:
                    last = np.asarray(Image.fromarray(last).resize(self._fix, getattr(Image, PIL_FILTERS[self.interpolation])))
            yield last

    def _chunks(self, indices: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
        return chunked(self._frames(indices), chunk)

    def release(self) -> None:
        """Stop decord's read-ahead until the next frame is read (that read seeks accurately).

        After ``next()`` decord keeps decoding ahead in a background thread while nobody reads, buffering frames
        (about video length x frame size: 0.4 GB for 10 minutes at 10 fps, 224 px). A seek flushes that buffer and
        stops the thread (dmlc/decord#197, #208); the worker calls this before it would block.
        """
        if getattr(self, "_vr", None) is not None:
            self._vr.seek(0)
            self._parked = True

    def close(self) -> None:
        self._vr = None


DECODER = DecordDecoder
