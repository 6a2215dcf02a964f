"""What crosses the pipes between a :class:`featurize.worker.DecodePool` and its worker processes: one named record
per job and per message kind. Each is a NamedTuple whose first field is its ``kind``, so a record reads by name
(``msg.frames``) and still unpacks as the plain tuple it is (``kind, key, *payload = msg``).

Jobs (parent -> worker) and the messages each job produces (worker -> parent), in order:
  ProbeJob   -> Info
  DecodeJob  -> Start, Chunk..., Done          (a segment at an fps: featurize.sampling.plan_segment)
  TimesJob   -> Start, Chunk..., Done          (the frames shown at explicit times: finetune)
  StreamJob  -> Start, Chunk..., Done          (a live source, read once as it plays: sequence.stream)
  any job    -> Error                          instead of the rest, or after some chunks (message names the file)
Besides: Ready (a worker started), Note (something the user should know; logged once), Free (parent -> worker:
a shared block is copied out and may be written again).
"""
from __future__ import annotations

from typing import Any, NamedTuple

PROBE, DECODE, TIMES, STREAM = "probe", "decode", "times", "stream"
READY, INFO, START, CHUNK, DONE, ERROR, NOTE, FREE = "ready", "info", "start", "chunk", "done", "error", "note", "free"


class ProbeJob(NamedTuple):
    kind: str
    key: Any
    path: str


class DecodeJob(NamedTuple):
    kind: str
    key: Any
    path: str
    start: float
    end: float | None
    fps: float
    size: int
    policy: str
    chunk: int
    resize_size: str = ""  # what frames are resized to before the centre crop to size ('': size itself)
    interpolation: str = "bilinear"


class TimesJob(NamedTuple):
    kind: str
    key: Any
    path: str
    times: list
    size: int
    policy: str
    chunk: int
    resize_size: str = ""  # what frames are resized to before the centre crop to size ('': size itself)
    interpolation: str = "bilinear"


class StreamJob(NamedTuple):
    kind: str
    key: Any
    path: str            # the source: a device, a URL, "-" (standard input) or a file
    fps: float
    size: int
    policy: str
    realtime: bool       # a file is played at its own rate
    stall_timeout: float  # a network source that sends nothing this long ends with an error
    resize_size: str = ""  # what frames are resized to before the centre crop to size ('': size itself)
    interpolation: str = "bilinear"


def probe_job(key, path: str) -> ProbeJob:
    return ProbeJob(PROBE, key, path)


def decode_job(key, path: str, start: float, end: float | None, fps: float, size: int, policy: str,
               chunk: int, resize_size: str = "", interpolation: str = "bilinear") -> DecodeJob:
    """A segment's frames at ``fps``, resized to ``resize_size`` by ``policy`` with ``interpolation``, centre-cropped
    to ``size`` (featurize.decoder.Decoder)."""
    return DecodeJob(DECODE, key, path, start, end, fps, size, policy, chunk, resize_size, interpolation)


def times_job(key, path: str, times, size: int, policy: str, chunk: int, resize_size: str = "",
              interpolation: str = "bilinear") -> TimesJob:
    """Frames shown at explicit times (e.g. cached timestamps a sequence selected), for finetune/predict."""
    return TimesJob(TIMES, key, path, [float(t) for t in times], size, policy, chunk, resize_size, interpolation)


def stream_job(key, source: str, fps: float, size: int, policy: str, realtime: bool = False,
               stall_timeout: float = 10.0, resize_size: str = "", interpolation: str = "bilinear") -> StreamJob:
    """The frame on screen at each grid time k / fps of a live source, one chunk per grid frame, as it arrives."""
    return StreamJob(STREAM, key, source, float(fps), size, policy, bool(realtime), float(stall_timeout), resize_size,
                     interpolation)


class Ready(NamedTuple):
    kind: str
    key: None = None


class Info(NamedTuple):
    """Reply to a probe: the video's VideoInfo as a dict."""
    kind: str
    key: Any
    info: dict


class Start(NamedTuple):
    """A decode job opened its video (info: its VideoInfo as a dict; a live source: what is known of it)."""
    kind: str
    key: Any
    info: dict


class ShmRef(NamedTuple):
    """Where a chunk's frames wait: a worker's shared block (featurize.shm)."""
    kind: str
    slot: int
    name: str
    shape: tuple


class Chunk(NamedTuple):
    """Frames uint8 (k, S, S, 3) (from the worker: a ShmRef, or the frames themselves through the pipe), their
    times float64 (k,); a live source's chunk also carries each frame's arrival (time.monotonic(), seconds)."""
    kind: str
    key: Any
    frames: Any
    times: Any
    arrivals: Any = None


class Done(NamedTuple):
    """A job's frames are all sent; ``fallback``: why the GPU decoder decoded the video on the CPU ('' if it did not)."""
    kind: str
    key: Any
    n_frames: int
    fallback: str = ""


class Error(NamedTuple):
    kind: str
    key: Any
    message: str


class Note(NamedTuple):
    kind: str
    key: None
    message: str


class Free(NamedTuple):
    kind: str
    slot: int
