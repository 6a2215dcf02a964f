"""A narrow wrapper around decord: open a video, report its frames' times, read frames at indices.

Frames come out as uint8 RGB arrays of shape (k, H, W, 3), already resized to the cache's input
size by the decoder itself (so a 1280x720 video never exists in memory at full size beyond one
frame inside FFmpeg) and centre-cropped when the resize policy asks for it.

decord's known traps (see DESIGN.md) and what this module does about them:
- torch must be imported before decord in a process that uses CUDA: this module is only imported
  by the decode worker process (featurize/worker.py), which never imports torch;
- ``get_batch`` on scattered indices has been nondeterministic and leaky: frames are read
  sequentially instead (an accurate seek to the first, then ``skip_frames`` between targets);
- ``len(vr)`` can exceed the decodable frames and decoding can hang or abort the process: callers
  run this inside a worker process that is timed out and replaced (featurize/worker.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .sampling import video_duration

RESIZE_POLICIES = ("squash", "crop")
# decord's scaler returns malformed arrays (wrong channel count) for some output widths, e.g. 16, 24
# and 48; multiples of 32 are safe. We ask decord for the next multiple of 32 and finish with PIL.
DECORD_ALIGN = 32
# Beyond this many frames between two targets, seek instead of decoding through the gap.
SEEK_GAP = 300


class DecodeError(RuntimeError):
    """A video could not be opened or decoded; the message starts with the video's path."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    n_frames: int
    fps: float
    duration: float
    width: int
    height: int
    size_bytes: int
    mtime: float


def decode_dims(width: int, height: int, size: int, policy: str) -> tuple[int, int]:
    """(width, height) the decoder should output before the final crop.

    squash: the whole frame resized to size x size (aspect ratio not kept, nothing cut off).
    crop:   shorter side resized to ``size`` keeping the aspect ratio, then centre-cropped to size x size.
    """
    if policy == "squash":
        return size, size
    if policy == "crop":
        if width <= height:
            return size, max(size, int(round(height * size / width)))
        return max(size, int(round(width * size / height))), size
    raise ValueError(f"unknown resize policy {policy!r}; choose one of {', '.join(RESIZE_POLICIES)}")


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """Centre crop (k, H, W, 3) frames to (k, size, size, 3); a no-op when already that size."""
    h, w = frames.shape[1:3]
    if h == size and w == size:
        return frames
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(frames[:, top:top + size, left:left + size])


def _native_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the container's stream header (PyAV, no decoding); None if it can't tell."""
    try:
        import av

        with av.open(path) as c:
            st = c.streams.video[0]
            if st.codec_context.width and st.codec_context.height:
                return int(st.codec_context.width), int(st.codec_context.height)
    except Exception:  # decord gets its own chance to open (and to report) the file
        return None
    return None


def _avi_fourcc(path: str) -> str:
    """The FourCC of an AVI file's first video stream (its strh chunk), '' when there is none to read."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return ""
    i = head.find(b"strh")
    while i >= 0:
        if head[i + 8:i + 12] == b"vids":
            return head[i + 12:i + 16].decode("latin-1").strip("\x00 ")
        i = head.find(b"strh", i + 4)
    return ""


def codec_problem(path: str) -> str:
    """Why a video's codec may be what stops the decoder, as a sentence ('' when PyAV can't tell or sees nothing
    wrong): the codec and container PyAV finds, or that FFmpeg knows no codec for the stream's FourCC."""
    try:
        import av

        with av.open(path) as c:
            if not c.streams.video:
                return "it has no video stream"
            cc = c.streams.video[0].codec_context
            if cc is None:
                tag = _avi_fourcc(path)
                return (f"its video codec{f' (FourCC {tag})' if tag else ''} is unknown to this FFmpeg build, so "
                        f"there is no decoder for it: transcode it, e.g. `ffmpeg -i {path} -c:v libx264 out.mp4`")
            tag = f", FourCC {cc.codec_tag}" if cc.codec_tag.strip("\x00 ") else ""
            return f"its video stream is {cc.name} ({cc.codec.long_name}{tag}) in {c.format.name}"
    except Exception:  # not a container PyAV can open either: decord's message says enough
        return ""


class Decoder:
    """One open video. ``size=None`` decodes at native resolution.

    Use in the process that created it only (decord readers are not fork-safe).
    """

    def __init__(self, path: str, size: int | None = None, policy: str = "squash"):
        import decord  # imported here: the worker process owns decord

        self.path = path
        self.size = size
        self.policy = policy
        try:
            # one decord reader, opened at the output size: a reader at full resolution would start
            # decoding ahead at full resolution in its background thread (see release())
            self._native = _native_size(path)
            if self._native is None:  # PyAV could not tell: ask decord (decodes one frame)
                probe = decord.VideoReader(path, num_threads=1)
                if len(probe) == 0:
                    raise DecodeError(f"{path}: the video has no frames")
                self._native = (probe[0].shape[1], probe[0].shape[0])
                del probe
            self._dims = None  # final (w, h) before the crop, when it differs from what decord gives
            self._open_kw: dict = {"num_threads": 1}
            if size is not None and decode_dims(*self._native, size, policy) != self._native:
                w, h = decode_dims(self._native[0], self._native[1], size, policy)
                aw, ah = (-(-w // DECORD_ALIGN) * DECORD_ALIGN, -(-h // DECORD_ALIGN) * DECORD_ALIGN)
                self._open_kw.update(width=aw, height=ah)
                self._dims = (w, h) if (aw, ah) != (w, h) else None
            self._vr = decord.VideoReader(path, **self._open_kw)
            self._parked = False  # release() seeked the reader away: the next read seeks accurately
            if len(self._vr) == 0:
                raise DecodeError(f"{path}: the video has no frames")
            n = len(self._vr)
            ts = np.asarray(self._vr.get_frame_timestamp(list(range(n))), dtype=np.float64).reshape(n, 2)
            self._fps = float(self._vr.get_avg_fps())
        except DecodeError:
            raise
        except Exception as e:  # decord raises its own DECORDError and RuntimeError
            why = codec_problem(path)
            raise DecodeError(f"{path}: cannot open video ({type(e).__name__}: {str(e).strip()[:300]})"
                              + (f"; {why}" if why else "")) from e
        self.frame_starts = ts[:, 0]
        self._frame_ends = ts[:, 1]

    @property
    def info(self) -> VideoInfo:
        st = os.stat(self.path)
        return VideoInfo(
            path=self.path,
            n_frames=len(self.frame_starts),
            fps=self._fps,
            duration=video_duration(self.frame_starts, self._frame_ends, self._fps),
            width=int(self._native[0]),
            height=int(self._native[1]),
            size_bytes=int(st.st_size),
            mtime=float(st.st_mtime),
        )

    def read(self, indices: np.ndarray, chunk: int = 32) -> Iterator[np.ndarray]:
        """Frames at non-decreasing ``indices``, yielded in chunks of at most ``chunk`` frames.

        Each chunk is (k, S, S, 3) uint8 RGB with S = size (or native H, W when size is None).
        """
        pos: int | None = None  # index of the frame vr.next() returns
        last_i, last_frame = -1, None
        buf: list[np.ndarray] = []
        try:
            for i in np.asarray(indices, dtype=np.int64).tolist():
                if i == last_i:
                    frame = last_frame
                else:
                    if self._parked:  # released while the consumer was busy
                        self._parked, pos = False, None
                    vr = self._vr
                    if pos is None or i < pos or i - pos > SEEK_GAP:
                        vr.seek_accurate(i)
                    elif i > pos:
                        vr.skip_frames(i - pos)
                    frame = vr.next().asnumpy()
                    pos = i + 1
                    last_i, last_frame = i, frame
                buf.append(frame)
                if len(buf) == chunk:
                    yield self._finish(buf)
                    buf = []
            if buf:
                yield self._finish(buf)
        except DecodeError:
            raise
        except Exception as e:
            raise DecodeError(f"{self.path}: decoding failed near frame {pos} ({type(e).__name__}: {str(e).strip()[:300]})") from e

    def _finish(self, frames: list[np.ndarray]) -> np.ndarray:
        if frames[0].ndim != 3 or frames[0].shape[2] != 3:
            raise DecodeError(f"{self.path}: the decoder returned malformed frames of shape {frames[0].shape}")
        if self._dims is not None:
            from PIL import Image

            frames = [np.asarray(Image.fromarray(f).resize(self._dims, Image.BILINEAR)) for f in frames]
        arr = np.stack(frames)
        return center_crop(arr, self.size) if self.size is not None and self.policy == "crop" else arr

    def release(self) -> None:
        """Stop decord's read-ahead until the next frame is read (that read seeks accurately).

        After ``next()`` decord keeps decoding ahead in a background thread while nobody reads,
        buffering frames (about video length x frame size: 0.4 GB for 10 minutes at 10 fps, 224 px),
        so a reader must not sit idle while its consumer is busy. A seek flushes that buffer and stops
        the thread (dmlc/decord#197, #208); the worker calls this before it would block.
        """
        if self._vr is not None:
            self._vr.seek(0)
            self._parked = True

    def close(self) -> None:
        self._vr = None
