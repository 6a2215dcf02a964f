"""Classify a live stream in real time: ``featseq predict RUN --stream SOURCE``.

SOURCE is a V4L2 device (``/dev/video0``), an RTSP / HTTP / UDP / ... URL, ``-`` (a container on standard input,
e.g. MPEG-TS from ffmpeg) or a file (played as fast as it decodes, or at its own rate with ``--realtime``).

- **Frames** come from the live-source backend behind the decoder interface (featurize.decoder.open_live, PyAV),
  read in a decode worker process (featurize.worker, a StreamJob): a source that hangs the decoder is killed and
  reported like any video. They are taken at the run's fps by presentation time, on the stream's clock: the frame
  on screen at each grid time k / fps, the rule of featurize's sampling plan, scaled like featurize's, embedded
  with the run's backbone, weights and precision through the same preprocessing (featurize.backbones.Embedder),
  and rounded to float16 as a feature cache stores them.
- **Windows**: the last ``seq_len`` grid frames (the run's window, seq_len / fps seconds) are classified every
  ``--stride`` seconds once that many have arrived (sequence.windows.stream_window), through the same softmax as
  ``predict FILE`` (sequence.loop.probabilities): the windows of a file through ``--stream`` are those of
  ``predict FILE --window seq_len/fps --stride S``, with the same features and probabilities.
- **Real time**: a thread takes the worker's frames as they come and hands them over through a bounded queue; when
  the CNN falls behind on a live source, the oldest waiting frames are dropped (counted; a window missing a frame
  repeats the frame before), never queued without bound. A file without ``--realtime`` is not live: the thread
  waits instead. The latency from a frame's arrival to the prediction of the first window that includes it is
  measured per window.
- **Stopping**: end of stream, Ctrl-C (exit 130), SIGTERM (exit 143; featseq.common.signals, installed by the CLI)
  and a source that sends nothing for ``--stall-timeout`` seconds (exit 1) all end with every prediction so far in
  predictions.csv (written row by row) and predict.json. A device or URL that cannot be opened fails at once with
  its name and the fix.
"""
from __future__ import annotations

import csv
import queue
import threading
import time
from pathlib import Path

import numpy as np
import torch

from featseq.common import signals
from featseq.featurize.precision import resolve_precision
from featseq.common.errors import UserError
from featseq.featurize import backbones as bb
from featseq.featurize.decoder import live_source_problem
from featseq.featurize.messages import CHUNK, DONE, ERROR, START, stream_job

from .config import StreamConfig
from .loop import FeatureInputs, probabilities
from .run import Run, resolve_run_folder, write_json
from .windows import stream_window, stride_frames

EXIT = {"end": 0, "stall": 1, "error": 1, "SIGINT": 130, "SIGTERM": 143}
HANG_MARGIN = 5.0  # the worker is killed as hung this long after the stall timeout (which stops the stream first)


class StreamError(UserError):
    """The stream cannot be opened or used; the message names it and the fix."""


class _Stopped(Exception):
    """The stream stopped reading (raised inside DecodePool.run, which then kills its worker)."""


class _Frames(threading.Thread):
    """Runs SOURCE as a StreamJob in a decode worker and hands ("frame", k, time, arrival, rgb) over through a bounded
    queue as they come; first ("open", info), last ("end", None), ("stall", None), ("error", message) or ("failed",
    exception)."""

    def __init__(self, cfg: StreamConfig):
        from featseq.featurize.worker import DecodePool

        super().__init__(daemon=True, name="featseq-stream-reader")
        self.cfg, self.job = cfg, None
        # the worker starts now, while the run and its CNN load
        self.pool = DecodePool(timeout=cfg.stall_timeout + HANG_MARGIN, decoder="pyav").start()
        self.q: queue.Queue = queue.Queue(maxsize=cfg.max_queue)
        self.live = cfg.live  # asked once: it stats the source
        self.stop = threading.Event()
        self.dropped = self.sampled = 0
        self.opened, self.last_arrival = False, time.monotonic()

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

    def _idle(self) -> None:
        if self.stop.is_set():
            raise _Stopped

    def run(self) -> None:
        try:
            for msg in self.pool.run([self.job], idle=self._idle):
                self._idle()
                if msg.kind == START:
                    self.opened, self.last_arrival = True, time.monotonic()
                    self._hand_over(("open", msg.info))
                elif msg.kind == CHUNK:
                    self.last_arrival = time.monotonic()
                    self._hand_over(("frame", self.sampled, float(msg.times[0]), float(msg.arrivals[0]), msg.frames[0]))
                    self.sampled += 1
                elif msg.kind == DONE:
                    self._hand_over(("end", None))
                elif msg.kind == ERROR:  # after the stall timeout without a frame, a stall (killed as hung, or
                    # the network's own timeout), whatever the worker says of it
                    stalled = self.opened and time.monotonic() - self.last_arrival >= self.cfg.stall_timeout
                    self._hand_over(("stall", None) if stalled else ("error", msg.message))
        except _Stopped:
            pass
        except Exception as e:  # e.g. a worker that cannot start: the main thread raises it
            self._hand_over(("failed", e))
        finally:
            self.pool.close(kill=True)

    def open(self, fps: float, size: int, policy: str, resize_size: str = "", interpolation: str = "bilinear") -> dict:
        """Start reading at ``fps``, made as a decoder makes them (featurize.decoder.Decoder: ``size``, ``policy``,
        ``resize_size``, ``interpolation``); returns what the worker knows of the opened source, StreamError with the
        fix when it cannot be opened."""
        cfg = self.cfg
        self.job = stream_job("stream", cfg.source, fps, size, policy, cfg.realtime, cfg.stall_timeout, resize_size,
                              interpolation)
        self.start()
        while True:
            try:
                kind, payload = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "open":
                self.last_arrival = time.monotonic()
                return payload
            if kind == "failed":
                raise payload
            raise StreamError(f"--stream {payload}")

    def halt(self) -> None:
        self.stop.set()
        if self.is_alive():
            self.join(timeout=5)
        else:  # never started reading
            self.pool.close(kill=True)


class _Windows:
    """A stream's state: embedded frames waiting for their windows, and what was predicted so far; every window is
    written to predictions.csv (and echoed) as it is classified."""

    def __init__(self, cfg: StreamConfig, run: Run, fps: float, seq_len: int, step: int, device, out: Path, echo):
        self.cfg, self.run, self.fps, self.seq_len, self.step, self.device, self.echo = cfg, run, fps, seq_len, step, device, echo
        self.classes = run.classes
        self.feats: dict[int, np.ndarray] = {}
        self.arrivals: dict[int, float] = {}
        self.saved: list[tuple[float, np.ndarray]] = []
        self.latencies: list[float] = []
        self.alerts: list[dict] = []
        self.next = self.embedded = self.repeated = 0  # the next window's index
        self.streak = (None, 0)  # (class, consecutive windows of it at p >= threshold)
        self.fh = open(out / "predictions.csv", "w", newline="")
        self.csv = csv.writer(self.fh)
        self.csv.writerow(["video", "window_start", "window_end"] + [f"p_{c}" for c in self.classes]
                          + ["predicted", "above_threshold", "latency_s", "frames_repeated"])
        self.fh.flush()

    def add(self, frames: list, features: np.ndarray) -> None:
        """Embedded ("frame", k, time, arrival, rgb) items; classifies every window they complete."""
        for it, v in zip(frames, features):
            self.feats[it[1]], self.arrivals[it[1]] = v, it[3]
            if self.cfg.save_features:
                self.saved.append((it[2], v))
        self.embedded += len(frames)
        while self.next * self.step + self.seq_len - 1 <= frames[-1][1]:
            first = self.next * self.step
            x, missing = stream_window(self.feats, first, self.seq_len)
            if x is not None:
                self._predict(first, x, missing)
            for i in [i for i in self.feats if i < first + self.step]:
                self.feats.pop(i)
                self.arrivals.pop(i, None)
            self.next += 1

    def _predict(self, first: int, x: np.ndarray, missing: int) -> None:
        L, cfg = self.seq_len, self.cfg
        inputs = FeatureInputs(torch.from_numpy(x), torch.arange(L)[None], torch.ones(1, L, dtype=torch.bool))
        p = probabilities(self.run.model, inputs, np.ones((1, L), bool), len(self.classes), self.device)[0]
        c = int(np.argmax(p))
        lat = time.monotonic() - self.arrivals[max(i for i in range(first, first + L) if i in self.arrivals)]
        self.latencies.append(lat)
        self.repeated += missing
        a, b = first / self.fps, (first + L) / self.fps
        above = int(p[c] >= cfg.threshold)
        self.csv.writerow([cfg.source, f"{a:.3f}", f"{b:.3f}"] + [f"{v:.6f}" for v in p]
                          + [self.classes[c], above, f"{lat:.4f}", missing])
        self.fh.flush()
        self.echo(f"{b:9.2f} s  {self.classes[c]:<16} {p[c]:.3f}{'' if above else ' (below threshold)'}  "
                  f"latency {lat * 1000:.0f} ms")
        if cfg.positive_windows:
            self._alert(c, above, b)

    def _alert(self, c: int, above: int, at: float) -> None:
        n = self.cfg.positive_windows
        self.streak = (c, self.streak[1] + 1) if above and self.streak[0] == c else ((c, 1) if above else (None, 0))
        if self.streak[1] == n:
            self.alerts.append({"class": self.classes[c], "at_s": round(at, 3), "windows": n})
            self.echo(f"ALERT {self.classes[c]}: {n} windows in a row at p >= {self.cfg.threshold:g} "
                      f"(stream time {at:.2f} s)")

    def close(self) -> None:
        self.fh.close()


def _play(cfg: StreamConfig, frames: _Frames, windows: _Windows, embed) -> str:
    """Embed frames as they come and classify the windows they complete, until the stream stops; returns why."""
    try:
        while True:
            try:
                items = [frames.q.get(timeout=0.2)]
            except queue.Empty:
                if time.monotonic() - frames.last_arrival > cfg.stall_timeout:
                    return "stall"
                continue
            while len(items) < cfg.batch_size:
                try:
                    items.append(frames.q.get_nowait())
                except queue.Empty:
                    break
            with signals.held():  # a stop waits for this batch's rows: predictions.csv and the counts agree
                got = [it for it in items if it[0] == "frame"]
                if got:
                    windows.add(got, embed(np.stack([it[4] for it in got])).astype(np.float16).astype(np.float32))
            for kind, payload in (it[:2] for it in items if it[0] != "frame"):
                if kind == "failed":
                    raise payload
                if kind in ("end", "stall"):
                    return kind
                prefix = f"{cfg.source}: "  # a broken stream's message names the source first
                return "error: " + (payload[len(prefix):] if payload.startswith(prefix) else payload)
    except KeyboardInterrupt as e:  # signals.Interrupted (SIGTERM, SIGINT), or Ctrl-C without the CLI's handler
        return getattr(e, "name", "SIGINT")


def _embedder(cfg: StreamConfig, backbone, precision: str, log=lambda s: None):
    device = bb.resolve_device(cfg.device)
    if device.type == "cpu":
        from featseq.featurize.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    precision = resolve_precision(precision, device)
    return device, precision, bb.Embedder(backbone, device, precision, compile=cfg.compile, batch_size=cfg.batch_size,
                                          log=log)


def stream(cfg: StreamConfig, log=lambda s: None, echo=print) -> dict:
    """Classify windows of ``cfg.source`` as it plays; returns predict.json's content (``exit_code`` included)."""
    from .predict import featurize_spec

    cfg.validate()
    if why := live_source_problem(cfg.source):
        raise StreamError(f"--stream {why}")
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "predict_stream"
    frames, windows = _Frames(cfg), None
    try:
        run = Run(resolve_run_folder(cfg.run, "RUN", log))  # a cross-validation: its best fold
        run.spec.check_featurizable(str(cfg.run))
        fps, seq_len = float(run.reader.fps), int(run.reader.seq_len)
        try:
            stride, step = stride_frames(cfg.stride, fps)
        except ValueError as e:
            raise StreamError(str(e)) from None
        if run.spec.clip_stride:
            raise StreamError(f"{cfg.run}: its features are clips of {run.spec.clip_frames} frames "
                              f"({run.spec.backbone}); stream embeds frame by frame and cannot cut a live source into "
                              f"clips yet: predict on recorded videos (featseq predict) instead")
        if run.spec.decoder != "pyav":
            log(f"note: the run's features were decoded by {run.spec.decoder}, a stream is decoded by PyAV: frames are "
                f"scaled by another implementation, so features may differ slightly")
        out.mkdir(parents=True, exist_ok=True)
        frames.open(fps, **run.spec.decode_args())  # a source that cannot be opened fails before the CNN loads
        with featurize_spec(run) as spec:  # a finetune run's trunk: a temporary weights file while the CNN is built
            opts = spec.featurize_options(precision=cfg.precision, device=cfg.device)
            backbone = bb.create_backbone(opts["backbone"], opts["weights"], opts["seed"], opts["pool"], opts["crops"],
                                          opts["size"])
        device, precision, embed = _embedder(cfg, backbone, opts["precision"], log)
        if cfg.compile:  # compiled before the first window, not while the source's frames queue up
            side = run.spec.decode_args()["size"]
            embed(np.zeros((cfg.batch_size, side, side, 3), np.uint8))
            log(f"--compile: compiled the CNN in {embed.warmup_s:.1f} s, before reading the stream")
        run.model.to(device).eval()
        windows = _Windows(cfg, run, fps, seq_len, step, device, out, echo)
        t_start = time.monotonic()
        reason = _play(cfg, frames, windows, embed)
        wall = time.monotonic() - t_start
    finally:
        frames.halt()
        if windows is not None:
            windows.close()
    if reason.startswith("error: "):
        log(f"the stream broke off ({reason[7:]}); predictions so far are kept")
    if reason == "stall":
        log(f"--stream {cfg.source}: no frame for {cfg.stall_timeout:g} s (stalled); stopped with the predictions so far")
    if cfg.save_features and windows.saved:
        np.savez(cfg.save_features, times=np.array([s[0] for s in windows.saved]),
                 features=np.stack([s[1] for s in windows.saved]))
    res = _result(cfg, run, spec, precision, reason, frames, windows, stride, wall, out)
    write_json(out / "predict.json", res)
    return res


def _result(cfg: StreamConfig, run: Run, spec, precision: str, reason: str, frames: _Frames, windows: _Windows,
            stride: float, wall: float, out: Path) -> dict:
    """predict.json's content for a stream."""
    from .predict import spec_record

    stop = "error" if reason.startswith("error") else reason
    lat = np.asarray(windows.latencies) if windows.latencies else np.zeros(0)
    return {
        "status": "complete" if reason == "end" else "stopped", "stop": stop, "stop_detail": reason,
        "exit_code": EXIT[stop], "run": str(cfg.run), "source": cfg.source, "live": cfg.live, "realtime": cfg.realtime,
        "classes": run.classes, "fps": windows.fps, "seq_len": windows.seq_len, "window_s": windows.seq_len / windows.fps,
        "stride": stride, "threshold": cfg.threshold, "positive_windows": cfg.positive_windows, "alerts": windows.alerts,
        "featurize": {**spec_record(run, spec), "precision": precision, "decoded_by": "pyav"},
        "windows": len(windows.latencies), "frames_sampled": frames.sampled, "frames_embedded": windows.embedded,
        "frames_dropped": frames.dropped, "frames_repeated_in_windows": windows.repeated,
        "latency_s": {"p50": round(float(np.percentile(lat, 50)), 4), "p95": round(float(np.percentile(lat, 95)), 4),
                      "max": round(float(lat.max()), 4)} if len(lat) else None,
        "windows_per_s": round(len(windows.latencies) / wall, 2) if wall > 0 else None,
        "frames_per_s": round(windows.embedded / wall, 2) if wall > 0 else None,  # frames embedded per second of the stream
        "seconds": round(wall, 3), "out": str(out),
    }
