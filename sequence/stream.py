"""Classify a live stream in real time: ``featseq predict RUN --stream SOURCE``.

SOURCE is a V4L2 device (``/dev/video0``), an RTSP / HTTP / UDP / ... URL, ``-`` (a container on standard input,
e.g. MPEG-TS from ffmpeg) or a file (played as fast as it decodes, or at its own rate with ``--realtime``). It is
read with PyAV (decord opens neither devices nor network streams).

- **Frames** are taken at the run's fps by presentation time, on the stream's clock (seconds since its first
  frame): the frame on screen at each grid time k / fps, the rule of featurize's sampling plan
  (featurize.sampling.frame_at). They are scaled like featurize's (the run's size and resize policy, PyAV's
  scaler: featurize.decoders.pyav_decoder.to_rgb), embedded with the run's backbone, weights and precision through
  the same preprocessing (featurize.backbones.Embedder), and rounded to float16 as a feature cache stores them.
- **Windows**: the last ``seq_len`` grid frames (the run's window, seq_len / fps seconds) are classified every
  ``--stride`` seconds once that many have arrived, through the same softmax as ``predict FILE``
  (sequence.loop.probabilities): the windows of a file through ``--stream`` are those of
  ``predict FILE --window seq_len/fps --stride S``, with the same features and probabilities.
- **Real time**: a reader thread decodes and hands frames over through a bounded queue; when the CNN falls behind on
  a live source, the oldest waiting frames are dropped (counted; a window missing a frame repeats the frame before),
  never queued without bound. A file without ``--realtime`` is not live: the reader waits instead. The latency from a
  frame's arrival to the prediction of the first window that includes it is measured per window.
- **Stopping**: end of stream, Ctrl-C (exit 130), SIGTERM (exit 143) and a source that sends nothing for
  ``--stall-timeout`` seconds (exit 1) all end with every prediction so far in predictions.csv (written row by row)
  and predict.json. A device or URL that cannot be opened fails at once with its name and the fix.
"""
from __future__ import annotations

import csv
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from featseq.featurize import backbones as bb
from featseq.featurize.decoder import center_crop, decode_dims
from featseq.featurize.precision import resolve_precision
from featseq.common.errors import UserError
from featseq.featurize.sampling import EPS

from .config import StreamConfig
from .loop import FeatureInputs, probabilities
from .run import Run, resolve_run_folder, write_json

EXIT = {"end": 0, "stall": 1, "error": 1, "SIGINT": 130, "SIGTERM": 143}


class StreamError(UserError):
    """The stream cannot be opened or used; the message names it and the fix."""


def open_source(source: str, stall_timeout: float):
    """A PyAV input container for SOURCE; StreamError naming it and the fix when it can't be opened."""
    import av

    try:
        if source == "-":
            return av.open(sys.stdin.buffer, mode="r")
        if source.startswith("/dev/video"):
            return av.open(source, format="v4l2")
        if "://" in source:
            opts = {"rtsp_transport": "tcp"} if source.startswith("rtsp") else {}
            return av.open(source, options=opts, timeout=(min(10.0, stall_timeout), stall_timeout))
        if not os.path.isfile(source):
            raise StreamError(f"--stream {source}: no such file, device or URL (give /dev/videoN, rtsp://..., "
                              f"http://..., udp://..., - for standard input, or a video file)")
        return av.open(source)
    except StreamError:
        raise
    except Exception as e:  # av.error.* and OSError
        fix = ("check the device exists (ls /dev/video*) and that you may read it (the video group)"
               if source.startswith("/dev/") else "check the address, the port and that the server is up"
               if "://" in source else "pipe a container PyAV can probe (e.g. ffmpeg ... -f mpegts -)"
               if source == "-" else "check the file is a video")
        raise StreamError(f"--stream {source}: cannot open it ({type(e).__name__}: {str(e).strip()[:200]}); {fix}") from e


class _Reader(threading.Thread):
    """Decodes SOURCE, picks the frame shown at each grid time k / fps, scales it, hands (k, time, arrival, rgb) over."""

    def __init__(self, container, fps: float, size: int, policy: str, cfg: StreamConfig, q: queue.Queue):
        super().__init__(daemon=True, name="featseq-stream-reader")
        self.c, self.fps, self.size, self.policy, self.cfg, self.q = container, fps, size, policy, cfg, q
        self.live = cfg.live  # asked once: it stats the source
        self.stop = threading.Event()
        self.dropped = self.sampled = 0
        self.last_arrival = time.monotonic()

    def _hand_over(self, item) -> None:
        if self.live:
            while True:
                try:
                    return self.q.put_nowait(item)
                except queue.Full:
                    try:
                        self.q.get_nowait()  # the oldest waiting frame goes
                        self.dropped += 1
                    except queue.Empty:
                        pass
        while not self.stop.is_set():
            try:
                return self.q.put(item, timeout=0.2)
            except queue.Full:
                pass

    def run(self) -> None:
        from av.video.reformatter import VideoReformatter

        from featseq.featurize.decoders.pyav_decoder import to_rgb

        try:
            st = self.c.streams.video[0]
        except IndexError:
            self.q.put(("error", "the stream has no video"))
            return
        ref = VideoReformatter()
        dims = None
        t0 = wall0 = None
        k, prev = 0, None  # next grid index; the last frame seen (its time, the av frame, its arrival)
        rate = float(st.average_rate or st.guessed_rate or 0) or None

        def emit(upto: float) -> None:  # prev is the frame on screen at every grid time before ``upto``
            nonlocal k, dims
            while prev is not None and k / self.fps < upto - EPS and not self.stop.is_set():
                t, frame, arrival = prev
                if dims is None:
                    dims = decode_dims(frame.width, frame.height, self.size, self.policy)
                rgb = to_rgb(ref, frame, *dims)[None]
                rgb = center_crop(rgb, self.size)[0] if self.policy == "crop" else rgb[0]
                self.sampled += 1
                self._hand_over(("frame", k, k / self.fps, arrival, rgb))
                k += 1

        reason = "end"
        try:
            for frame in self.c.decode(st):
                arrival = self.last_arrival = time.monotonic()
                if frame.time is None:
                    continue
                if t0 is None:
                    t0, wall0 = float(frame.time), arrival
                t = float(frame.time) - t0
                if self.cfg.realtime:
                    time.sleep(max(0.0, wall0 + t - time.monotonic()))
                    arrival = self.last_arrival = time.monotonic()
                emit(t + EPS)  # grid times this frame (starting at t) takes over from prev
                prev = (t, frame, arrival)
                if self.stop.is_set():
                    reason = "stopped"
                    break
            else:
                if prev is not None:  # the last frame stays on screen for one frame period
                    dur = float(prev[1].duration * prev[1].time_base) if prev[1].duration else (1.0 / rate if rate else 0)
                    emit(prev[0] + dur)
        except Exception as e:  # a broken stream: what came before stands
            reason = f"error: {type(e).__name__}: {str(e).strip()[:200]}"
        self.q.put(("end", reason))


def _window_features(feats: dict, first: int, seq_len: int) -> tuple[np.ndarray | None, int]:
    """(seq_len, D) features of grid indices first.. (a dropped frame repeats the one before; the first missing
    ones repeat the first present), and how many were missing; None when none is present."""
    have = [i for i in range(first, first + seq_len) if i in feats]
    if not have:
        return None, seq_len
    rows, last = [], feats[have[0]]
    for i in range(first, first + seq_len):
        last = feats.get(i, last)
        rows.append(last)
    return np.stack(rows), seq_len - len(have)


def stream(cfg: StreamConfig, log=lambda s: None, echo=print) -> dict:
    """Classify windows of ``cfg.source`` as it plays; returns predict.json's content (``exit_code`` included)."""
    from .predict import featurize_spec, spec_record

    cfg.validate()
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "predict_stream"
    run = Run(resolve_run_folder(cfg.run, "RUN", log))  # a cross-validation: its best fold
    with featurize_spec(run) as spec:  # a finetune run's trunk: a temporary weights file while the CNN is built
        backbone = bb.create_backbone(spec.backbone, spec.weights_arg(), spec.seed)
    classes, fps, seq_len = run.classes, float(run.reader.fps), int(run.reader.seq_len)
    stride = cfg.stride if cfg.stride is not None else max(1, round(fps)) / fps
    step = int(round(stride * fps))
    if step < 1 or abs(step / fps - stride) > 1e-6:
        raise StreamError(f"--stride {stride:g}: give a multiple of the run's frame period 1/{fps:g} s")
    if spec.decoder != "pyav":
        log(f"note: the run's features were decoded by {spec.decoder}, a stream is decoded by PyAV: frames are scaled "
            f"by another implementation, so features may differ slightly")
    out.mkdir(parents=True, exist_ok=True)
    container = open_source(cfg.source, cfg.stall_timeout)

    device = bb.resolve_device(cfg.device)
    if device.type == "cpu":
        from featseq.featurize.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    precision = resolve_precision(cfg.precision or spec.precision, device)
    embed = bb.Embedder(backbone, device, precision)
    run.model.to(device).eval()

    q: queue.Queue = queue.Queue(maxsize=cfg.max_queue)
    reader = _Reader(container, fps, spec.size, spec.resize, cfg, q)
    stop = {"why": None}

    def on_signal(signum, _frame):
        stop["why"] = signal.Signals(signum).name

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    feats: dict[int, np.ndarray] = {}
    arrivals: dict[int, float] = {}
    saved: list[tuple[float, np.ndarray]] = []
    latencies: list[float] = []
    window, embedded, repeated, streak, alerts = 0, 0, 0, (None, 0), []
    reason = None
    fh = open(out / "predictions.csv", "w", newline="")
    w = csv.writer(fh)
    w.writerow(["video", "window_start", "window_end"] + [f"p_{c}" for c in classes]
               + ["predicted", "above_threshold", "latency_s", "frames_repeated"])
    fh.flush()

    def classify_ready(upto: int) -> None:
        """Every window whose last grid index is <= ``upto``."""
        nonlocal window, repeated, streak
        while window * step + seq_len - 1 <= upto:
            first = window * step
            x, missing = _window_features(feats, first, seq_len)
            if x is not None:
                inputs = FeatureInputs(torch.from_numpy(x), torch.arange(seq_len)[None], torch.ones(1, seq_len, dtype=torch.bool))
                p = probabilities(run.model, inputs, np.ones((1, seq_len), bool), len(classes), device)[0]
                c = int(np.argmax(p))
                newest = max(i for i in range(first, first + seq_len) if i in arrivals)
                lat = time.monotonic() - arrivals[newest]
                latencies.append(lat)
                repeated += missing
                a, b = first / fps, (first + seq_len) / fps
                above = int(p[c] >= cfg.threshold)
                w.writerow([cfg.source, f"{a:.3f}", f"{b:.3f}"] + [f"{v:.6f}" for v in p]
                           + [classes[c], above, f"{lat:.4f}", missing])
                fh.flush()
                echo(f"{b:9.2f} s  {classes[c]:<16} {p[c]:.3f}{'' if above else ' (below threshold)'}  latency {lat * 1000:.0f} ms")
                if cfg.positive_windows:
                    streak = (c, streak[1] + 1) if above and streak[0] == c else ((c, 1) if above else (None, 0))
                    if streak[1] == cfg.positive_windows:
                        alerts.append({"class": classes[c], "at_s": round(b, 3), "windows": cfg.positive_windows})
                        echo(f"ALERT {classes[c]}: {cfg.positive_windows} windows in a row at p >= {cfg.threshold:g} "
                             f"(stream time {b:.2f} s)")
            for i in [i for i in feats if i < first + step]:
                feats.pop(i)
                arrivals.pop(i, None)
            window += 1

    t_start = time.monotonic()
    reader.start()
    try:
        while reason is None:
            if stop["why"]:
                reason = stop["why"]
                break
            try:
                items = [q.get(timeout=0.2)]
            except queue.Empty:
                if time.monotonic() - reader.last_arrival > cfg.stall_timeout:
                    reason = "stall"
                continue
            while len(items) < cfg.batch_size:
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            frames = [it for it in items if it[0] == "frame"]
            if frames:
                f = embed(np.stack([it[4] for it in frames])).astype(np.float16).astype(np.float32)
                for it, v in zip(frames, f):
                    feats[it[1]], arrivals[it[1]] = v, it[3]
                    if cfg.save_features:
                        saved.append((it[2], v))
                embedded += len(frames)
                classify_ready(frames[-1][1])
            end = [it for it in items if it[0] in ("end", "error")]
            if end:
                reason = "end" if end[0][1] in ("end", "stopped") else end[0][1]
    finally:
        reader.stop.set()
        for s, h in old.items():
            signal.signal(s, h)
        fh.close()
    if reason.startswith("error: "):
        log(f"the stream broke off ({reason[7:]}); predictions so far are kept")
    if reason == "stall":
        log(f"--stream {cfg.source}: no frame for {cfg.stall_timeout:g} s (stalled); stopped with the predictions so far")
    if cfg.save_features and saved:
        np.savez(cfg.save_features, times=np.array([s[0] for s in saved]), features=np.stack([s[1] for s in saved]))
    wall = time.monotonic() - t_start
    lat = np.asarray(latencies) if latencies else np.zeros(0)
    res = {
        "status": "complete" if reason == "end" else "stopped", "stop": "error" if reason.startswith("error") else reason,
        "stop_detail": reason, "exit_code": EXIT["error" if reason.startswith("error") else reason],
        "run": str(cfg.run), "source": cfg.source, "live": cfg.live, "realtime": cfg.realtime,
        "classes": classes, "fps": fps, "seq_len": seq_len, "window_s": seq_len / fps, "stride": stride,
        "threshold": cfg.threshold, "positive_windows": cfg.positive_windows, "alerts": alerts,
        "featurize": {**spec_record(run, spec), "precision": precision, "decoded_by": "pyav"},
        "windows": len(latencies), "frames_sampled": reader.sampled, "frames_embedded": embedded,
        "frames_dropped": reader.dropped, "frames_repeated_in_windows": repeated,
        "latency_s": {"p50": round(float(np.percentile(lat, 50)), 4), "p95": round(float(np.percentile(lat, 95)), 4),
                      "max": round(float(lat.max()), 4)} if len(lat) else None,
        "windows_per_s": round(len(latencies) / wall, 2) if wall > 0 else None,
        "frames_per_s": round(embedded / wall, 2) if wall > 0 else None,  # frames embedded per second of the stream
        "seconds": round(wall, 3), "out": str(out),
    }
    write_json(out / "predict.json", res)
    return res
