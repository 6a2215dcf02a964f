"""Deterministic, labelled synthetic video dataset rendered with PyAV.

This is the embedded dataset for the demo and the tests.  It is built so that
the three classes differ *only* in temporal order / rhythm:

* The global colour of the whole frame runs around a fixed colour wheel
  (hue ``h`` in cycles, ``[0, 1)`` is one full turn) at a constant speed of one
  turn per ``P`` seconds (``P`` drawn per clip from ``PERIOD_RANGE``, about
  3.5 s), starting at a random phase:

  - ``"ascending"``:  ``h(t) = phi + t / P``          (hue always increases)
  - ``"descending"``: ``h(t) = phi - t / P``          (hue always decreases)
  - ``"pingpong"``:   ``h(t) = phi + tri((t + tau) / P)`` where ``tri`` is the
    unit-slope triangle wave (0 -> 1 -> 0 with period 2): the hue sweeps a full
    turn up, then a full turn back down, and so on; ``tau`` is a random offset.

  Every class moves at the same speed through the same colours, so the
  distribution of single-frame appearances (and hence the mean of per-frame
  features) is the same for all classes; only the order of the frames differs.
  One turn per ~3.5 s means a sample rate of 1 frame/s still moves less than
  half a turn between samples, so direction stays resolvable.

* Nuisance that does not depend on the class: per group (``gNN``) a fixed
  saturation / brightness, a drifting sinusoidal grating, a spatial hue tilt
  and a soft grey disc moving on a Lissajous path; per clip a random phase,
  period, small smooth hue jitter, brightness flicker, a low-frequency
  brightness field and a little per-frame brightness noise.

* Everything is a function of continuous normalised coordinates ``x, y`` in
  ``[0, 1]`` (evaluated at pixel centres) and of time in seconds, so renders of
  the same clip at different resolutions show the same scene.

* ``burn_frame_numbers=True`` paints the 0-based frame index as 16 black/white
  vertical bands (most significant bit on the left) over the top sixth of the
  frame; :func:`read_frame_number` decodes it from a frame at any resolution.

Layout written by :func:`render_dataset`::

    OUT/clips/<label>/v_<label>_gNN_cMM.mp4  short clips, one folder per class (a folder source; .avi etc. too)
    OUT/long/long_NN.mp4                   long videos with several segments
    OUT/long_segments.csv                  path,label,start,end,group,id
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import math
import numbers
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

__all__ = [
    "CLASSES",
    "render_dataset",
    "render_clip",
    "render_long_video",
    "read_frame_number",
]

CLASSES = ("ascending", "descending", "pingpong")

#: Range (seconds) of the time for one full turn of the colour wheel.
PERIOD_RANGE = (3.2, 3.8)
#: Number of bits burned into a frame, and the relative height of the band area.
N_BITS = 16
BAND_HEIGHT = 1.0 / 6.0
#: Range (seconds) of the length of one segment of a long video.
LONG_SEGMENT_RANGE = (5.0, 15.0)

# Fixed integers that separate the random streams of the different parts.
_STREAM_GROUP = 1
_STREAM_CLIP = 2
_STREAM_LONG = 3
_STREAM_LONG_SEED = 4

_CODEC_CACHE: str | None = None
#: Bump when the rendering changes what a video of the same parameters looks like: synth then renders it again.
RENDER_VERSION = 1

#: What a file's suffix makes :func:`render_clip` write: (PyAV container format, video codec, FourCC or None).
#: UCF-101 and HMDB-51 ship as .avi with MPEG-4 Part 2 tagged Xvid; .webm holds VP9; the others H.264
#: (MPEG-4 Part 2 where this FFmpeg has no libx264).
CONTAINERS = {
    ".mp4": ("mp4", "libx264", None),
    ".mkv": ("matroska", "libx264", None),
    ".mov": ("mov", "libx264", None),
    ".avi": ("avi", "mpeg4", "XVID"),
    ".webm": ("webm", "libvpx-vp9", None),
}


# ----------------------------------------------------------------------------
# argument checking
# ----------------------------------------------------------------------------


def _even_size(value, name: str) -> int:
    """Return ``value`` as an even positive int (odd sizes are rounded up)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not math.isfinite(value) or value <= 0 or int(value) != value:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    value = int(value)
    return value + (value % 2)


def _rate(video_fps) -> Fraction:
    if isinstance(video_fps, bool) or not isinstance(video_fps, numbers.Real):
        raise ValueError(f"video_fps must be a positive number, got {video_fps!r}")
    if not math.isfinite(video_fps) or video_fps <= 0:
        raise ValueError(f"video_fps must be a positive number, got {video_fps!r}")
    if isinstance(video_fps, Fraction):
        return video_fps
    return Fraction(video_fps).limit_denominator(1001)


def _positive_seconds(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return value


def _duration_range(duration) -> tuple[float, float]:
    if isinstance(duration, numbers.Real):
        d = _positive_seconds(duration, "duration")
        return d, d
    try:
        lo, hi = duration
    except (TypeError, ValueError):
        raise ValueError(
            f"duration must be a number or a (min, max) pair of seconds, got {duration!r}"
        ) from None
    lo = _positive_seconds(lo, "duration")
    hi = _positive_seconds(hi, "duration")
    if hi < lo:
        raise ValueError(f"duration must be (min, max) with min <= max, got {duration!r}")
    return lo, hi


def _label_index(label) -> int:
    try:
        return CLASSES.index(label)
    except ValueError:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}") from None


def _n_frames(seconds: float, rate: Fraction) -> int:
    return max(1, int(round(seconds * rate)))


def _check_burn(width: int, height: int) -> None:
    if width < 2 * N_BITS or height < 12:
        raise ValueError(
            f"burn_frame_numbers needs width >= {2 * N_BITS} and height >= 12, "
            f"got width={width}, height={height}"
        )


# ----------------------------------------------------------------------------
# scene
# ----------------------------------------------------------------------------


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _group_look(rng: np.random.Generator) -> dict:
    """Class-independent appearance shared by all clips of one group."""
    return {
        "sat": rng.uniform(0.6, 0.85),
        "val": rng.uniform(0.6, 0.8),
        "tilt": rng.uniform(-0.08, 0.08),  # hue change across the frame (cycles)
        "tilt_angle": rng.uniform(0.0, 2 * np.pi),
        "grating_amp": rng.uniform(0.06, 0.12),
        "grating_freq": rng.uniform(1.5, 3.5),  # cycles per frame
        "grating_angle": rng.uniform(0.0, np.pi),
        "grating_speed": rng.uniform(-0.5, 0.5),  # cycles per second
        "grating_phase": rng.uniform(0.0, 1.0),
        "disc_radius": rng.uniform(0.10, 0.16),
        "disc_level": rng.choice([0.15, 0.9]),
        "disc_alpha": rng.uniform(0.5, 0.8),
        "disc_freq": rng.uniform(0.08, 0.3, size=2),  # cycles per second (x, y)
        "disc_phase": rng.uniform(0.0, 2 * np.pi, size=2),
    }


def _clip_noise(rng: np.random.Generator, n_frames: int) -> dict:
    """Per-clip nuisance: smooth hue jitter, flicker, a brightness field."""
    return {
        "jitter_amp": rng.uniform(0.0, 0.01, size=2),
        "jitter_period": rng.uniform(1.5, 4.0, size=2),
        "jitter_phase": rng.uniform(0.0, 2 * np.pi, size=2),
        "flicker_amp": rng.uniform(0.0, 0.03),
        "flicker_period": rng.uniform(1.0, 3.0),
        "flicker_phase": rng.uniform(0.0, 2 * np.pi),
        "field_amp": rng.uniform(0.02, 0.05),
        "field_k": rng.uniform(0.5, 1.5, size=2),  # cycles per frame (x, y)
        "field_phase": rng.uniform(0.0, 2 * np.pi, size=2),
        "frame_noise": rng.normal(0.0, 0.01, size=n_frames),
    }


def _triangle(u: np.ndarray) -> np.ndarray:
    """Unit-slope triangle wave: 0 at even u, 1 at odd u."""
    return 1.0 - np.abs(np.mod(u, 2.0) - 1.0)


def _hue_track(label_idx: int, t: np.ndarray, phase: float, period: float, tau: float) -> np.ndarray:
    """Hue (in turns, not wrapped) at times ``t`` for one class, 0 at t=0 plus phase."""
    u = t / period
    if label_idx == 0:
        return phase + u
    if label_idx == 1:
        return phase - u
    return phase + _triangle(u + tau / period) - _triangle(np.asarray(tau / period))


def _jitter(noise: dict, t: np.ndarray) -> np.ndarray:
    out = np.zeros_like(t)
    for a, p, ph in zip(noise["jitter_amp"], noise["jitter_period"], noise["jitter_phase"]):
        out += a * np.sin(2 * np.pi * t / p + ph)
    return out


class _Scene:
    """Renders frames of one video from a hue track and nuisance parameters."""

    _WHEEL = np.array([0.0, 1.0 / 3.0, 2.0 / 3.0])

    def __init__(self, width: int, height: int, look: dict, noise: dict, burn: bool):
        self.w, self.h = width, height
        self.look, self.noise, self.burn = look, noise, burn
        x = (np.arange(width) + 0.5) / width
        y = (np.arange(height) + 0.5) / height
        self.x, self.y = np.meshgrid(x, y)  # (H, W) each
        L = look
        ca, sa = math.cos(L["tilt_angle"]), math.sin(L["tilt_angle"])
        self.hue_offset = L["tilt"] * ((self.x - 0.5) * ca + (self.y - 0.5) * sa)
        cg, sg = math.cos(L["grating_angle"]), math.sin(L["grating_angle"])
        self.grating_coord = L["grating_freq"] * (self.x * cg + self.y * sg)
        kx, ky = noise["field_k"]
        px, py = noise["field_phase"]
        self.field = noise["field_amp"] * np.sin(2 * np.pi * kx * self.x + px) * np.sin(
            2 * np.pi * ky * self.y + py
        )
        self.n_band_rows = int(np.count_nonzero(y < BAND_HEIGHT))
        self.bit_of_col = np.minimum((x * N_BITS).astype(np.int64), N_BITS - 1)
        self.edge = 1.5 / min(width, height) + 0.01  # soft disc edge, relative units

    def frame(self, i: int, t: float, hue: float) -> np.ndarray:
        L, N = self.look, self.noise
        # brightness: group level * (grating + field + flicker + noise)
        grating = L["grating_amp"] * np.sin(
            2 * np.pi * (self.grating_coord - L["grating_speed"] * t + L["grating_phase"])
        )
        flicker = N["flicker_amp"] * math.sin(2 * np.pi * t / N["flicker_period"] + N["flicker_phase"])
        value = L["val"] * (1.0 + grating + self.field + flicker + N["frame_noise"][i])
        # colour wheel: zero-mean chroma vector rotating with hue
        h = (hue + self.hue_offset)[..., None]
        chroma = np.cos(2 * np.pi * (h - self._WHEEL))
        rgb = value[..., None] * (0.55 + 0.45 * L["sat"] * chroma)
        # soft grey disc on a Lissajous path (class independent)
        fx, fy = L["disc_freq"]
        px, py = L["disc_phase"]
        cx = 0.5 + 0.3 * math.sin(2 * np.pi * fx * t + px)
        cy = 0.55 + 0.25 * math.sin(2 * np.pi * fy * t + py)
        r = np.sqrt((self.x - cx) ** 2 + (self.y - cy) ** 2)
        alpha = L["disc_alpha"] * np.clip((L["disc_radius"] - r) / self.edge + 0.5, 0.0, 1.0)
        rgb = rgb * (1.0 - alpha[..., None]) + (L["disc_level"] * alpha)[..., None]
        out = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if self.burn:
            bits = (i >> (N_BITS - 1 - self.bit_of_col)) & 1  # (W,), MSB on the left
            band = np.repeat((bits * 255).astype(np.uint8)[:, None], 3, axis=1)  # (W, 3)
            out[: self.n_band_rows] = band[None]
        return out


# ----------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------


def _codec() -> str:
    global _CODEC_CACHE
    if _CODEC_CACHE is None:
        try:
            av.codec.Codec("libx264", "w")
            _CODEC_CACHE = "libx264"
        except Exception:  # pragma: no cover - depends on the FFmpeg build
            _CODEC_CACHE = "mpeg4"
    return _CODEC_CACHE


def _digest(*parts) -> str:
    """A sha256 over the values that determine a video's pixels (numbers, strings, arrays, dicts of them)."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, dict):
            for k in sorted(x):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, np.ndarray):
            h.update(f"{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        else:
            h.update(repr(x).encode())
        h.update(b"|")

    for p in parts:
        feed(p)
    return h.hexdigest()


def _rendered(path: Path, tag: str, n_frames: int) -> bool:
    """Does ``path`` hold the video ``tag`` describes, whole (written by :func:`_write_video` with that tag)?"""
    if not path.is_file():
        return False
    try:
        with av.open(str(path)) as c:
            said = {k.lower(): v for k, v in c.metadata.items()}.get("comment")
            frames = c.streams.video[0].frames if c.streams.video else -1
    except (av.error.FFmpegError, OSError, IndexError):
        return False
    return said == tag and frames in (0, n_frames)  # some containers (mkv, webm) record no frame count


def _write_video(path, frames_iter, width: int, height: int, rate: Fraction, tag: str = "") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower() or ".mp4"
    if suffix not in CONTAINERS:
        raise ValueError(f"{path}: synth writes {', '.join(CONTAINERS)} files, not {suffix}")
    fmt, codec, fourcc = CONTAINERS[suffix]
    if codec == "libx264":
        codec = _codec()
    tmp = path.with_name(path.name + ".part")
    container = av.open(str(tmp), mode="w", format=fmt)
    if tag:
        container.metadata["comment"] = tag
    try:
        if codec == "libx264":
            options = {"crf": "18", "preset": "superfast", "threads": "1"}
            stream = container.add_stream(codec, rate=rate, options=options)
        elif codec == "libvpx-vp9":
            options = {}
            stream = container.add_stream(codec, rate=rate, options=options)
        else:  # MPEG-4 Part 2
            stream = container.add_stream(codec, rate=rate)
            stream.bit_rate = max(4_000_000, int(width * height * float(rate) * 4))
            stream.codec_context.thread_count = 1
        if fourcc:
            stream.codec_context.codec_tag = fourcc
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        time_base = 1 / rate
        stream.codec_context.time_base = time_base
        for i, arr in enumerate(frames_iter):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = i
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    except BaseException:
        container.close()
        tmp.unlink(missing_ok=True)
        raise
    container.close()
    if _same_stream(path, tmp):  # e.g. a video of an older synth, which recorded no tag: keep it as it is
        tmp.unlink()
        return
    os.replace(tmp, path)


def _same_stream(a: Path, b: Path) -> bool:
    """Do two files hold the same encoded video (every packet's bytes and timestamps; container metadata aside)?"""
    if not a.is_file():
        return False
    try:
        with av.open(str(a)) as ca, av.open(str(b)) as cb:
            pa = ((bytes(p), p.pts, p.dts) for p in ca.demux(video=0) if p.size)
            pb = ((bytes(p), p.pts, p.dts) for p in cb.demux(video=0) if p.size)
            return all(x == y for x, y in itertools.zip_longest(pa, pb))
    except (av.error.FFmpegError, OSError, IndexError):
        return False


def _render(path, *, hues, n_frames, width, height, rate, look, noise, burn) -> None:
    """Render a video, unless ``path`` already holds this very one: each video records (in its container's comment)
    a digest of everything that makes its pixels (RENDER_VERSION, the scene, size, rate, frames, container, codec,
    PyAV's version), so rerunning synth keeps the files it already wrote, their mtimes included (a feature cache of
    them stays valid), and renders only what is missing, incomplete or different."""
    scene = _Scene(width, height, look, noise, burn)
    if burn and n_frames > 2**N_BITS:
        raise ValueError(f"burn_frame_numbers supports at most {2**N_BITS} frames, got {n_frames}")
    path = Path(path)
    suffix = path.suffix.lower() or ".mp4"
    codec = CONTAINERS.get(suffix, ("", "", None))[1]
    tag = "featseq synth " + _digest(RENDER_VERSION, np.asarray(hues, np.float64), n_frames, width, height, str(rate),
                                     look, noise, bool(burn), suffix, _codec() if codec == "libx264" else codec,
                                     av.__version__)
    if _rendered(path, tag, n_frames):
        return
    dt = 1.0 / float(rate)
    frames = (scene.frame(i, i * dt, float(hues[i])) for i in range(n_frames))
    _write_video(path, frames, width, height, rate, tag)


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------


def _clip_plan(*, label, group_index, clip_index, video_fps, duration, seed):
    """Frame count and random parameters of one short clip (no rendering)."""
    label_idx = _label_index(label)
    rate = _rate(video_fps)
    seed = _check_seed(seed)
    lo, hi = _duration_range(duration)
    rng = _rng(seed, _STREAM_CLIP, label_idx, int(group_index), int(clip_index))
    seconds = rng.uniform(lo, hi) if hi > lo else lo
    n = _n_frames(seconds, rate)
    phase = rng.uniform(0.0, 1.0)
    period = rng.uniform(*PERIOD_RANGE)
    tau = rng.uniform(0.0, 2.0 * period)
    noise = _clip_noise(rng, n)
    t = np.arange(n) / float(rate)
    hues = _hue_track(label_idx, t, phase, period, tau) + _jitter(noise, t)
    look = _group_look(_rng(seed, _STREAM_GROUP, int(group_index)))
    return rate, n, hues, look, noise


def render_clip(
    path,
    *,
    label,
    group_index,
    clip_index,
    width,
    height,
    video_fps,
    duration,
    seed,
    burn_frame_numbers=False,
) -> None:
    """Render one short clip of class ``label`` to ``path`` (its suffix picks the container and codec: CONTAINERS).

    ``duration`` is either seconds or a ``(min, max)`` range from which the
    length is drawn (seeded by ``seed, label, group_index, clip_index``).  The
    group look depends only on ``seed`` and ``group_index``.  Odd ``width`` /
    ``height`` are rounded up to even.
    """
    width = _even_size(width, "width")
    height = _even_size(height, "height")
    if burn_frame_numbers:
        _check_burn(width, height)
    rate, n, hues, look, noise = _clip_plan(
        label=label,
        group_index=group_index,
        clip_index=clip_index,
        video_fps=video_fps,
        duration=duration,
        seed=seed,
    )
    _render(
        path,
        hues=hues,
        n_frames=n,
        width=width,
        height=height,
        rate=rate,
        look=look,
        noise=noise,
        burn=bool(burn_frame_numbers),
    )


def render_long_video(
    path,
    *,
    parts,
    width,
    height,
    video_fps,
    seed,
    burn_frame_numbers=False,
) -> list[dict]:
    """Render a video made of consecutive class segments.

    ``parts`` is a list of ``(label, seconds)``.  Segment boundaries are rounded
    to whole frames; the hue is continuous across boundaries (only the way it
    moves changes).  Returns one dict per segment with ``label``, ``start`` and
    ``end`` (seconds, ``end`` exclusive: the frames ``start*fps .. end*fps-1``)
    plus ``start_frame`` / ``end_frame``.
    """
    width = _even_size(width, "width")
    height = _even_size(height, "height")
    if burn_frame_numbers:
        _check_burn(width, height)
    rate = _rate(video_fps)
    seed = _check_seed(seed)
    parts = list(parts)
    if not parts:
        raise ValueError("parts must hold at least one (label, seconds) pair")
    labels = []
    bounds = [0]
    total = 0.0
    for item in parts:
        try:
            label, seconds = item
        except (TypeError, ValueError):
            raise ValueError(f"parts must hold (label, seconds) pairs, got {item!r}") from None
        labels.append(_label_index(label))
        total += _positive_seconds(seconds, "parts seconds")
        end = int(round(total * rate))
        if end <= bounds[-1]:
            raise ValueError(f"part {item!r} is shorter than one frame")
        bounds.append(end)
    n = bounds[-1]
    rng = _rng(seed, _STREAM_LONG)
    look = _group_look(rng)
    noise = _clip_noise(rng, n)
    period = rng.uniform(*PERIOD_RANGE)
    hue = rng.uniform(0.0, 1.0)
    dt = 1.0 / float(rate)
    hues = np.empty(n)
    segments = []
    for k, label_idx in enumerate(labels):
        f0, f1 = bounds[k], bounds[k + 1]
        tau = rng.uniform(0.0, 2.0 * period)
        t = np.arange(f1 - f0 + 1) * dt  # one extra sample: start of next part
        track = _hue_track(label_idx, t, hue, period, tau)
        hues[f0:f1] = track[:-1]
        hue = float(track[-1])
        segments.append(
            {
                "label": CLASSES[label_idx],
                "start": float(Fraction(f0) / rate),
                "end": float(Fraction(f1) / rate),
                "start_frame": f0,
                "end_frame": f1,
            }
        )
    hues = hues + _jitter(noise, np.arange(n) * dt)
    _render(
        path,
        hues=hues,
        n_frames=n,
        width=width,
        height=height,
        rate=rate,
        look=look,
        noise=noise,
        burn=bool(burn_frame_numbers),
    )
    return segments


def _long_parts(rng: np.random.Generator, total: float) -> list[tuple[str, float]]:
    """Random consecutive segments (no label twice in a row) adding up to ``total``."""
    lo, hi = LONG_SEGMENT_RANGE
    parts: list[tuple[str, float]] = []
    left = total
    prev = None
    order = list(rng.permutation(len(CLASSES)))  # first labels: each class once
    while left > 1e-9:
        if order:
            idx = int(order.pop(0))
            if idx == prev:
                order.append(idx)
                idx = int(order.pop(0))
        else:
            idx = int(rng.choice([c for c in range(len(CLASSES)) if c != prev]))
        seconds = float(rng.uniform(lo, hi))
        if left - seconds < lo:  # the rest would be too short for a segment
            seconds = left if left <= hi or not parts else min(seconds, left - lo)
        seconds = min(seconds, left)
        parts.append((CLASSES[idx], seconds))
        left -= seconds
        prev = idx
    return parts


def render_dataset(
    out_dir,
    *,
    clips_per_class_per_group=2,
    groups=4,
    width=64,
    height=64,
    video_fps=30,
    duration=(6.0, 9.0),
    seed=0,
    burn_frame_numbers=False,
    long_videos=1,
    long_duration=40.0,
    container=".mp4",
) -> dict:
    """Render the whole synthetic dataset under ``out_dir``; the clips as ``container`` files (a key of
    :data:`CONTAINERS`, e.g. ``".avi"`` for MPEG-4 Part 2 like UCF-101), the long videos as .mp4.

    Returns ``{"root", "clips", "long_csv", "classes"}`` where ``clips`` is a
    list of ``{"path", "label", "group", "clip", "duration", "n_frames"}`` (path
    absolute, group like ``"g01"``, duration in seconds as encoded).
    """
    for value, name in ((clips_per_class_per_group, "clips_per_class_per_group"), (groups, "groups")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(long_videos, bool) or not isinstance(long_videos, numbers.Integral) or long_videos < 0:
        raise ValueError(f"long_videos must be a non-negative integer, got {long_videos!r}")
    if container not in CONTAINERS:
        raise ValueError(f"container must be one of {', '.join(CONTAINERS)}, got {container!r}")
    if groups > 99 or clips_per_class_per_group > 99 or long_videos > 99:
        raise ValueError("groups, clips_per_class_per_group and long_videos must be <= 99")
    width = _even_size(width, "width")
    height = _even_size(height, "height")
    rate = _rate(video_fps)
    seed = _check_seed(seed)
    _duration_range(duration)
    if long_videos:
        long_duration = _positive_seconds(long_duration, "long_duration")

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    clips = []
    for label in CLASSES:
        for g in range(1, groups + 1):
            for c in range(1, clips_per_class_per_group + 1):
                path = root / "clips" / label / f"v_{label}_g{g:02d}_c{c:02d}{container}"
                _, n, _, _, _ = _clip_plan(
                    label=label, group_index=g, clip_index=c,
                    video_fps=rate, duration=duration, seed=seed,
                )
                render_clip(
                    path, label=label, group_index=g, clip_index=c,
                    width=width, height=height, video_fps=rate,
                    duration=duration, seed=seed, burn_frame_numbers=burn_frame_numbers,
                )
                clips.append(
                    {
                        "path": str(path),
                        "label": label,
                        "group": f"g{g:02d}",
                        "clip": c,
                        "duration": float(Fraction(n) / rate),
                        "n_frames": n,
                    }
                )

    long_csv = None
    if long_videos:
        rows = []
        for k in range(1, long_videos + 1):
            name = f"long_{k:02d}"
            rel = f"long/{name}.mp4"
            long_seed = int(np.random.SeedSequence([seed, _STREAM_LONG_SEED, k]).generate_state(1)[0])
            parts = _long_parts(_rng(seed, _STREAM_LONG_SEED, k, 1), long_duration)
            segments = render_long_video(
                root / rel, parts=parts, width=width, height=height,
                video_fps=rate, seed=long_seed, burn_frame_numbers=burn_frame_numbers,
            )
            for s, seg in enumerate(segments):
                rows.append(
                    {
                        "path": rel,
                        "label": seg["label"],
                        "start": f"{seg['start']:.6f}",
                        "end": f"{seg['end']:.6f}",
                        "group": name,
                        "id": f"{name}_s{s:02d}",
                    }
                )
        long_csv = root / "long_segments.csv"
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=["path", "label", "start", "end", "group", "id"])
        writer.writeheader()
        writer.writerows(rows)
        if not long_csv.is_file() or long_csv.read_bytes() != text.getvalue().encode():  # a rerun keeps it as it was
            long_csv.write_bytes(text.getvalue().encode())
        long_csv = str(long_csv)

    return {"root": str(root), "clips_root": str(root / "clips"), "clips": clips, "long_csv": long_csv,
            "classes": list(CLASSES)}


def read_frame_number(frame) -> int:
    """Decode the frame index burned by ``burn_frame_numbers=True``.

    ``frame`` is an ``H x W x 3`` uint8 RGB image (or ``H x W`` grey) at any
    resolution; numpy arrays, decord NDArrays and torch tensors are accepted.
    Each bit is read as the mean brightness of the central part of its band.
    """
    if hasattr(frame, "asnumpy"):
        frame = frame.asnumpy()
    elif hasattr(frame, "detach"):
        frame = frame.detach().cpu().numpy()
    arr = np.asarray(frame)
    if arr.ndim == 3:
        arr = arr.astype(np.float64).mean(axis=2)
    elif arr.ndim != 2:
        raise ValueError(f"frame must be H x W x 3 or H x W, got shape {arr.shape}")
    else:
        arr = arr.astype(np.float64)
    h, w = arr.shape
    if w < N_BITS or h < 6:
        raise ValueError(f"frame of shape {arr.shape} is too small to hold {N_BITS} bits")
    band_h = h * BAND_HEIGHT
    r0 = int(math.floor(band_h * 0.25))
    r1 = max(r0 + 1, int(math.ceil(band_h * 0.75)))
    value = 0
    for k in range(N_BITS):
        c0 = int(math.floor((k + 0.25) * w / N_BITS))
        c1 = max(c0 + 1, int(math.ceil((k + 0.75) * w / N_BITS)))
        bit = arr[r0:r1, c0:c1].mean() > 127.5
        value = (value << 1) | int(bit)
    return value
