"""Live sources through PyAV: a V4L2 device, a network stream, standard input or a file played once, in order.

Opened and read inside a decode worker (featurize/worker.py, a StreamJob), so a source that hangs the decoder is
killed and reported like any video. Frames are taken at a run's fps by presentation time, on the stream's clock
(seconds since its first frame): the frame on screen at each grid time k / fps, the rule of featurize's sampling
plan (featurize.sampling.frame_at), scaled like featurize's PyAV frames (pyav_decoder.to_rgb) and centre-cropped
by the same policy.
"""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from ..decoder import DecodeError, LiveSource, center_crop
from ..geometry import resize_dims
from ..sampling import EPS

def _open(source: str, stall_timeout: float):
    import av

    try:
        if source == "-":  # the worker's standard input is its parent's (spawn keeps file descriptor 0)
            return av.open(open(0, "rb", closefd=False), mode="r")
        if source.startswith("/dev/video"):
            return av.open(source, format="v4l2")
        if "://" in source:
            opts = {"rtsp_transport": "tcp"} if source.startswith("rtsp") else {}
            return av.open(source, options=opts, timeout=(min(10.0, stall_timeout), stall_timeout))
        return av.open(source)
    except Exception as e:  # av.error.* and OSError
        fix = ("check the device exists (ls /dev/video*) and that you may read it (the video group)"
               if source.startswith("/dev/") else "check the address, the port and that the server is up"
               if "://" in source else "pipe a container PyAV can probe (e.g. ffmpeg ... -f mpegts -)"
               if source == "-" else "check the file is a video")
        raise DecodeError(f"{source}: cannot open it ({type(e).__name__}: {str(e).strip()[:200]}); {fix}") from e


class PyAVLive(LiveSource):
    def __init__(self, source: str, fps: float, size: int, policy: str, realtime: bool = False,
                 stall_timeout: float = 10.0, resize_size: str = "", interpolation: str = "bilinear"):
        self.source, self.fps, self.size, self.policy, self.realtime = source, fps, size, policy, realtime
        self.resize_size, self.interpolation = resize_size or str(size), interpolation
        self._c = _open(source, stall_timeout)
        if not self._c.streams.video:
            self._c.close()
            raise DecodeError(f"{source}: the stream has no video")
        self._st = self._c.streams.video[0]

    def describe(self) -> dict:
        st = self._st
        return {"source": self.source, "width": int(st.codec_context.width or 0),
                "height": int(st.codec_context.height or 0), "fps": float(st.average_rate or st.guessed_rate or 0),
                "format": self._c.format.name}

    def frames(self) -> Iterator[tuple[float, float, np.ndarray]]:
        try:
            yield from self._frames()
        except DecodeError:
            raise
        except Exception as e:  # a broken stream: what came before stands
            raise DecodeError(f"{self.source}: {type(e).__name__}: {str(e).strip()[:200]}") from e

    def _frames(self) -> Iterator[tuple[float, float, np.ndarray]]:
        from av.video.reformatter import VideoReformatter

        from .pyav_decoder import to_rgb

        ref, dims = VideoReformatter(), None
        t0 = wall0 = None
        k, prev = 0, None  # next grid index; the last frame seen (its time, the av frame, its arrival)
        rate = float(self._st.average_rate or self._st.guessed_rate or 0) or None

        def on_screen(upto: float):  # prev is the frame on screen at every grid time before ``upto``
            nonlocal k, dims
            while prev is not None and k / self.fps < upto - EPS:
                t, frame, arrival = prev
                if dims is None:
                    dims = resize_dims(frame.width, frame.height, self.resize_size, self.policy)
                rgb = to_rgb(ref, frame, *dims, self.interpolation)[None]
                yield k / self.fps, arrival, center_crop(rgb, self.size)[0]
                k += 1

        for frame in self._c.decode(self._st):
            arrival = time.monotonic()
            if frame.time is None:
                continue
            if t0 is None:
                t0, wall0 = float(frame.time), arrival
            t = float(frame.time) - t0
            if self.realtime:
                time.sleep(max(0.0, wall0 + t - time.monotonic()))
                arrival = time.monotonic()
            yield from on_screen(t + EPS)  # grid times this frame (starting at t) takes over from prev
            prev = (t, frame, arrival)
        if prev is not None:  # the last frame stays on screen for one frame period
            dur = float(prev[1].duration * prev[1].time_base) if prev[1].duration else (1.0 / rate if rate else 0)
            yield from on_screen(prev[0] + dur)

    def close(self) -> None:
        self._c.close()


DECODER = PyAVLive
