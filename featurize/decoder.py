"""The decoder interface: open a video at an output size and resize policy, tell every frame's start time,
read frames by index in bounded chunks, release, close. One module per backend in featurize/decoders/.

Frames come out as uint8 RGB arrays of shape (k, S, S, 3) (native (k, H, W, 3) when ``size`` is None): resized by
the backend itself to ``resize_size`` by the resize policy (featurize/geometry.py), with the
``interpolation`` asked for (bilinear, bicubic or nearest: the backend's own implementation of that filter), so a
1280x720 frame never exists in memory beyond the one inside the decoder; then centre-cropped to S x S.

**One time axis for every backend.** A video's frame start times come from one place, :func:`frame_table`: the
presentation timestamps of its packets, read by PyAV's demuxer (no decoding) and kept in float64. Frame ``i`` is
the ``i``-th frame in presentation order for every backend, so the same timestamp selects the same frame whatever
decodes it (tests/test_decoders.py checks it with burned-in frame numbers). Backends differ only in how they scale
pixels, which is why the backend is part of a cache's identity.

Backends (``BACKENDS``) and what ``auto`` picks (:func:`resolve_decoder`):
- ``pyav``: PyAV (a dependency; FFmpeg in its wheel). ``auto`` on the CPU: at least as fast as decord on this
  project's measurements (bench/decode_bench.py, BENCHMARKS.md), and no decode-ahead thread to tame;
- ``decord``: the original decoder, kept for caches made with it (a cache without a ``decoder`` attribute was);
- ``torchcodec``: optional (`pip install 'featseq[torchcodec]'` plus FFmpeg 4 to 8 from the system); on the CPU or
  on CUDA (NVDEC) with ``--decode-device cuda``, which is what ``auto`` picks then.

Live sources (a device, a network stream, standard input, a file played once) have no frame table: they are read
once, in order, as they play (:class:`LiveSource`, :func:`open_live`; PyAV in featurize/decoders/live.py).

Every backend, live sources included, runs inside a decode worker process (featurize/worker.py) that is timed out
and replaced: hangs and aborts are not only decord's.
"""
from __future__ import annotations

import collections
import importlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from featseq.common.errors import UserError
from .decoders import BACKENDS, DECODE_DEVICES, DECODERS
from .geometry import default_resize_size, resize_dims
from .sampling import video_duration

# Beyond this many frames between two wanted frames, seek instead of decoding through the gap.
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
    rotation: int = 0  # degrees of the display matrix (a phone's portrait video); frames are decoded as stored


@dataclass(frozen=True)
class FrameTable:
    """Every frame's presentation time (seconds, float64, presentation order) and the stream's header facts.

    ``pts``: the frames' timestamps in the stream's time base, or None when the container has none (some AVI
    files): then backends count frames from the start instead of seeking.
    """
    starts: np.ndarray
    ends: np.ndarray
    fps: float
    width: int
    height: int
    pts: np.ndarray | None
    time_base: float
    rotation: int = 0


# Frame tables kept per process, up to this many frames in all (24 bytes a frame: about 50 MB). Every video a decode
# worker has seen stays demuxed while they fit: the segments of one long video, and the clips finetune and Grad-CAM
# come back to every epoch (UCF-101's 13,320 clips hold about 2.4 million frames).
TABLE_CACHE_FRAMES = 2_000_000


class _TableCache:
    """Least recently used frame tables, bounded by the frames they hold (not their number: one hour-long video's
    table weighs as much as 600 ten-second clips')."""

    def __init__(self):
        self.tables: collections.OrderedDict[tuple, FrameTable] = collections.OrderedDict()
        self.frames = 0

    def get(self, key: tuple) -> FrameTable | None:
        table = self.tables.get(key)
        if table is not None:
            self.tables.move_to_end(key)
        return table

    def put(self, key: tuple, table: FrameTable) -> None:
        self.tables[key] = table
        self.frames += len(table.starts)
        while self.frames > TABLE_CACHE_FRAMES and len(self.tables) > 1:
            self.frames -= len(self.tables.popitem(last=False)[1].starts)


_TABLES = _TableCache()


def frame_table(path: str) -> FrameTable:
    """Demux ``path`` (no decoding) into its :class:`FrameTable`; DecodeError naming the file when it can't.

    Kept (keyed by path, size and mtime: a changed file is demuxed again) while the kept tables hold at most
    :data:`TABLE_CACHE_FRAMES` frames, the least recently used dropped first."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DecodeError(f"{path}: cannot open video ({type(e).__name__}: {e.strerror})") from e
    key = (path, st.st_size, st.st_mtime_ns)
    table = _TABLES.get(key)
    if table is None:
        table = _frame_table(path)
        _TABLES.put(key, table)
    return table


def _frame_table(path: str) -> FrameTable:
    import av

    try:
        with av.open(path) as c:
            if not c.streams.video:
                raise DecodeError(f"{path}: the file has no video stream")
            st = c.streams.video[0]
            cc = st.codec_context
            width, height = int(cc.width or 0), int(cc.height or 0)
            rate = st.average_rate or st.guessed_rate or st.base_rate
            tb = float(st.time_base) if st.time_base else 0.0
            pts, dts, dur = [], [], []
            rotation = None
            for pk in c.demux(st):
                if pk.size == 0 and pk.pts is None and pk.dts is None:  # the flushing packet
                    continue
                pts.append(pk.pts)
                dts.append(pk.dts)
                dur.append(pk.duration or 0)
                if rotation is None:
                    rotation = _first_rotation(st, pk)
            if rotation is None:
                rotation = _first_rotation(st, None) if pts else 0
    except DecodeError:
        raise
    except Exception as e:  # av.error.* (InvalidDataError, FileNotFoundError, ...)
        why = codec_problem(path)
        raise DecodeError(f"{path}: cannot open video ({type(e).__name__}: {str(e).strip()[:300]})"
                          + (f"; {why}" if why else "")) from e
    n = len(pts)
    if n == 0 or not width or not height:
        raise DecodeError(f"{path}: the video has no frames")
    fps = float(rate) if rate else 0.0
    if tb and all(p is not None for p in pts):
        order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
        p = np.asarray(pts, dtype=np.int64)[order]
        d = np.asarray(dur, dtype=np.int64)[order]
        starts = p * tb
        period = (1.0 / fps) if fps else (float(np.median(np.diff(starts))) if n > 1 else 0.0)
        ends = np.where(d > 0, (p + d) * tb, starts + period)
        if fps == 0.0 and period:
            fps = 1.0 / period
        return FrameTable(starts, ends, fps, width, height, p, tb, rotation)
    if not fps:
        raise DecodeError(f"{path}: the video has neither timestamps nor a frame rate")
    starts = np.arange(n, dtype=np.float64) / fps  # no pts (e.g. some AVI): frames are evenly spaced by definition
    return FrameTable(starts, starts + 1.0 / fps, fps, width, height, None, tb, rotation)


def _first_rotation(stream, packet) -> int | None:
    """The rotation (degrees) of the display matrix on the first frame, decoded from the packets as they are demuxed
    (no seek and second read of the file: a quarter less CPU per probe of bench/clips_bench.py's 32 px clips); ``packet`` None flushes the
    decoder. None while the decoder holds its first frame back, 0 when there is no matrix or the stream can't be
    decoded (the decoder reports that, not the probe)."""
    try:
        for frame in stream.codec_context.decode(packet):
            return int(round(getattr(frame, "rotation", 0) or 0)) % 360
    except Exception:
        return 0
    return None if packet is not None else 0


def video_info(path: str, table: FrameTable | None = None) -> VideoInfo:
    t = table or frame_table(path)
    st = os.stat(path)
    return VideoInfo(path=path, n_frames=len(t.starts), fps=t.fps, duration=video_duration(t.starts, t.ends, t.fps),
                     width=t.width, height=t.height, size_bytes=int(st.st_size), mtime=float(st.st_mtime),
                     rotation=t.rotation)


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """Centre crop (k, H, W, 3) frames to (k, size, size, 3); a no-op when already that size."""
    h, w = frames.shape[1:3]
    if h == size and w == size:
        return frames
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(frames[:, top:top + size, left:left + size])


def chunked(frames: Iterable[np.ndarray], chunk: int) -> Iterator[np.ndarray]:
    """Stack single (H, W, 3) frames into arrays of at most ``chunk`` frames."""
    buf: list[np.ndarray] = []
    for f in frames:
        buf.append(f)
        if len(buf) == chunk:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


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
    """One open video; a backend implements :meth:`_chunks` (and :meth:`_open`, :meth:`release`, :meth:`close`).

    Use in the process that created it only (decoders are not fork-safe).
    """

    name = ""
    fallback = ""  # why a GPU decoder decoded this video on the CPU after all ('' when it did not: every CPU backend)

    def __init__(self, path: str, size: int | None = None, policy: str = "squash", device: str = "cpu",
                 resize_size: str = "", interpolation: str = "bilinear"):
        """``size``: the side of the square frames returned (None: native frames); ``resize_size`` ('N' or 'HxW',
        default ``size``): what the frame is resized to by ``policy`` before the centre crop to ``size``."""
        self.path, self.size, self.policy, self.device = path, size, policy, device
        self.interpolation = interpolation
        self.table = frame_table(path)
        self.frame_starts = self.table.starts
        native = (self.table.width, self.table.height)
        self.out_dims = native if size is None else \
            resize_dims(*native, resize_size or default_resize_size(size, policy), policy)  # (w, h) before the crop
        if size is not None and min(self.out_dims) < size:
            raise ValueError(f"{path}: frames resized to {self.out_dims[0]}x{self.out_dims[1]} are smaller than "
                             f"their {size} px centre crop")
        try:
            self._open()
        except DecodeError:
            raise
        except Exception as e:
            why = codec_problem(path)
            raise DecodeError(f"{path}: cannot open video with {self.name} ({type(e).__name__}: {str(e).strip()[:300]})"
                              + (f"; {why}" if why else "")) from e

    @property
    def info(self) -> VideoInfo:
        return video_info(self.path, self.table)

    def read(self, indices: np.ndarray, chunk: int = 32) -> Iterator[np.ndarray]:
        """Frames at non-decreasing ``indices`` in chunks of at most ``chunk``: (k, S, S, 3) uint8 RGB."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self.frame_starts) or (np.diff(idx) < 0).any()):
            raise ValueError(f"{self.path}: frame indices must be non-decreasing within [0, {len(self.frame_starts)})")
        w, h = self.out_dims
        try:
            for arr in self._chunks(idx, chunk):
                if arr.ndim != 4 or arr.shape[1:] != (h, w, 3) or arr.dtype != np.uint8:
                    raise DecodeError(f"{self.path}: {self.name} returned malformed frames of shape {arr.shape} "
                                      f"({arr.dtype}), expected (k, {h}, {w}, 3) uint8")
                yield center_crop(arr, self.size) if self.size is not None else arr
        except DecodeError:
            raise
        except Exception as e:
            why = codec_problem(self.path)
            raise DecodeError(f"{self.path}: decoding failed with {self.name} ({type(e).__name__}: {str(e).strip()[:300]})"
                              + (f"; {why}" if why else "")) from e

    def _open(self) -> None:
        raise NotImplementedError

    def _chunks(self, indices: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def release(self) -> None:
        """Called by the worker before it would block on a busy consumer; backends that decode ahead stop here."""

    def close(self) -> None:
        """Free the backend's resources."""


_MODULES = {"pyav": "pyav_decoder", "decord": "decord_decoder", "torchcodec": "torchcodec_decoder"}


def backend_class(name: str) -> type[Decoder]:
    return importlib.import_module(f"featseq.featurize.decoders.{_MODULES[name]}").DECODER


def unavailable(name: str, device: str = "cpu") -> str | None:
    """Why backend ``name`` can't decode on ``device`` here (with the fix), or None when it can."""
    if name not in BACKENDS:
        return f"--decoder must be one of {', '.join(DECODERS)}, got {name!r}"
    if device not in DECODE_DEVICES:
        return f"--decode-device must be cpu or cuda, got {device!r}"
    try:
        cls = backend_class(name)
    except ImportError as e:
        return f"--decoder {name}: {e}"
    return cls.unavailable(device)


def resolve_decoder(name: str, device: str = "cpu") -> str:
    """The backend ``--decoder NAME --decode-device DEVICE`` means here; UserError with the fix when it can't run."""
    if name == "auto":
        name = "torchcodec" if device == "cuda" else "pyav"
    why = unavailable(name, device)
    if why:
        raise UserError(why)
    return name


def open_decoder(path: str, size: int | None = None, policy: str = "squash", backend: str = "pyav",
                 device: str = "cpu", resize_size: str = "", interpolation: str = "bilinear") -> Decoder:
    """Open ``path`` with ``backend`` (a name from BACKENDS) on ``device`` (the other arguments: :class:`Decoder`)."""
    return backend_class(backend)(path, size=size, policy=policy, device=device, resize_size=resize_size,
                                  interpolation=interpolation)


class LiveSource:
    """A source read once, in order, as it plays (a device, a network stream, standard input, a file played once):
    no frame table, no seeking. :meth:`frames` yields (grid time k / fps in seconds on the stream's clock, the
    frame's arrival as time.monotonic(), (S, S, 3) uint8 RGB) for the frame on screen at each grid time, as it
    arrives; DecodeError naming the source when it cannot be opened or breaks off. Used inside a decode worker only
    (a StreamJob), so the worker's timeout covers it like any video."""

    def describe(self) -> dict:
        raise NotImplementedError

    def frames(self) -> Iterator[tuple[float, float, np.ndarray]]:
        raise NotImplementedError

    def release(self) -> None:
        """Nothing to stop: a live source is read as it comes."""

    def close(self) -> None:
        """Free the source."""


def open_live(source: str, fps: float, size: int, policy: str = "squash", realtime: bool = False,
              stall_timeout: float = 10.0, resize_size: str = "", interpolation: str = "bilinear") -> LiveSource:
    """Open a live ``source`` (PyAV: decord and torchcodec open neither devices nor network streams), sampled at
    ``fps``, resized to ``resize_size`` by ``policy`` with ``interpolation`` and centre-cropped to ``size`` (as
    :class:`Decoder`); ``realtime`` plays a file at its own rate."""
    return importlib.import_module("featseq.featurize.decoders.live").DECODER(
        source, fps, size, policy, realtime, stall_timeout, resize_size or default_resize_size(size, policy),
        interpolation)


def live_source_problem(source: str) -> str | None:
    """Why ``source`` names nothing a live source can open (a cheap check before a worker starts), or None."""
    if source == "-" or source.startswith("/dev/video") or "://" in source or os.path.isfile(source):
        return None
    return (f"{source}: no such file, device or URL (give /dev/videoN, rtsp://..., http://..., udp://..., - for "
            f"standard input, or a video file)")
