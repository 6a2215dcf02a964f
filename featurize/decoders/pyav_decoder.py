"""PyAV backend: FFmpeg through PyAV, one thread, frames found by their timestamps.

Frames are decoded in order from the keyframe at or before the first wanted frame; a frame's index is looked up
from its timestamp in the frame table (the same axis every backend uses). Frames that are not wanted are decoded
but never converted to RGB, which is most of the cost saved when sampling 1 fps out of 30. A gap of more than
SEEK_GAP frames seeks again. Scaling and RGB conversion happen in one swscale call, with swscale's bilinear, bicubic
or nearest-neighbour (point) filter as asked (on a grey frame its bicubic is within 1.5 levels on average of PIL's,
its bilinear 4 to 7 levels away: tests/test_interpolation.py).
"""
from __future__ import annotations

import threading
from typing import Iterator

import numpy as np
from av.video.reformatter import Interpolation

from ..decoder import SEEK_GAP, DecodeError, Decoder, chunked


FILTERS = {"bilinear": Interpolation.BILINEAR, "bicubic": Interpolation.BICUBIC, "nearest": Interpolation.POINT}


def to_rgb(reformatter, frame, width: int, height: int, interpolation: str = "bilinear") -> np.ndarray:
    """One decoded frame scaled to (height, width, 3) uint8 RGB: scaling and conversion in one swscale call, with
    ``interpolation``'s filter. The one place this backend (and the live-source backend, decoders/live.py) turns a
    frame into pixels."""
    return reformatter.reformat(frame, width=width, height=height, format="rgb24",
                                interpolation=FILTERS[interpolation]).to_ndarray()


_THREAD = threading.local()


def reformatter():
    """This thread's VideoReformatter, kept for every video it decodes: it holds its swscale context while the frames'
    size and format stay the same, and making a new one for each video cost about as much as decoding a tiny clip's
    frames (0.7-1.6 ms against 0.05-0.09 ms reused, 32 px frames; bench/clips_bench.py)."""
    if not hasattr(_THREAD, "reformatter"):
        from av.video.reformatter import VideoReformatter

        _THREAD.reformatter = VideoReformatter()
    return _THREAD.reformatter


class PyAVDecoder(Decoder):
    name = "pyav"

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        if device != "cpu":
            return "--decoder pyav decodes on the CPU only; use --decode-device cpu, or --decoder torchcodec for cuda"
        return None

    def _open(self) -> None:
        import av

        self._c = av.open(self.path)
        self._st = self._c.streams.video[0]
        self._st.thread_type = "NONE"  # one core per worker: parallelism comes from --decode-workers
        self._st.codec_context.thread_count = 1
        self._ref = reformatter()
        t = self.table
        self._index = None if t.pts is None else {int(p): i for i, p in enumerate(t.pts)}
        self._it = None  # the frame iterator
        self._pos = -1  # index of the last frame it yielded
        self._count = 0  # frames it yielded since the start (count mode)

    def _restart(self, i: int, from_start: bool = False) -> None:
        """Position the decoder to yield frames from the keyframe at or before frame ``i``, or from the first frame."""
        if from_start or self._index is None or i == 0:
            if self._it is not None:  # reopening is the one rewind that works without timestamps
                self._c.close()
                self._c = None
                self._open()
            self._count = 0
        else:
            self._c.seek(int(self.table.pts[i]), stream=self._st, backward=True, any_frame=False)
        self._it, self._pos = self._c.decode(self._st), -1

    def _frame_index(self, f) -> int:
        if self._index is None:
            self._count += 1
            return self._count - 1
        if f.pts is None or int(f.pts) not in self._index:
            raise DecodeError(f"{self.path}: PyAV decoded a frame with timestamp {f.pts} that the demuxer did not list")
        return self._index[int(f.pts)]

    def _decode_to(self, i: int, fresh: bool):
        """Decode forward to frame ``i``; a seek that overshot (a bad keyframe index) is retried from the first frame."""
        for attempt in (0, 1):
            for f in self._it:
                self._pos = pos = self._frame_index(f)
                if pos == i:
                    return f
                if pos > i:
                    break
            else:
                raise DecodeError(f"{self.path}: the video ended after frame {self._pos}, before frame {i} "
                                  f"(the container lists {len(self.frame_starts)} frames)")
            if attempt == 0 and fresh and self._index is not None:
                self._restart(i, from_start=True)
                continue
        raise DecodeError(f"{self.path}: frame {i} could not be decoded (the decoder went from a frame before it to frame {self._pos})")

    def _frames(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        w, h = self.out_dims
        last_i, last = -1, None  # the last frame converted, and its index
        for i in indices.tolist():
            if i != last_i:
                fresh = self._it is None or i <= self._pos or (self._index is not None and i - self._pos > SEEK_GAP)
                if fresh:
                    self._restart(i)
                f = self._decode_to(i, fresh)
                last_i = i
                last = to_rgb(self._ref, f, w, h, self.interpolation)
            yield last

    def _chunks(self, indices: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
        return chunked(self._frames(indices), chunk)

    def close(self) -> None:
        if getattr(self, "_c", None) is not None:
            self._c.close()
            self._c = None


DECODER = PyAVDecoder
