"""The window policy: which cached frames make up a sequence, for the trainer, CacheDataset, predict, stream and
compare alike. Pure index and time math over timestamps (no cache, no model), so every caller reads the same rows.

A request is (fps F, window length L frames, offset policy). For a segment with start s and end e (its bounds
in the cache, seconds on the video's clock) and a window shift o (seconds), the grid is

    t_k = s + o + k / F,   k = 0 .. L-1

and each grid time takes the cached frame whose *stored timestamp* is nearest to it (:func:`nearest`: ties go
to the earlier frame). A grid time at or past the segment's end (or with no cached frame within one cache
period) is padding: mask False, features zero. Padding therefore only ever sits at the end of a sequence (the
mask is a prefix of True values).

Window length, in frames (the first rule that applies, :func:`resolve_seq_len`):
  * ``--seq-len L``: exactly L;
  * ``--seconds S --percent P``: L = floor(S * P/100 * F) (+1e-6 against rounding), at least 1;
  * ``--percent P`` alone: S defaults to the 5th percentile of the segments' durations, so one very
    short clip does not shorten every sequence.

The original study's counts (1 fps: 25/20/12 frames for 100/80/50 %, 2 fps: 51/41/25,
3 fps: 77/62/38) are floor(W * F * P) for any window W in [25.834, 26) s, e.g. ``--seconds 25.9``;
floor(25.5 * F * P) does *not* reproduce them (it gives 40 at 2 fps/80 % and 76 at 3 fps/100 %).
``--seq-len`` reproduces any count directly.

Offsets (snapped to the cache's frame grid so they stay exact, :func:`shifts`):
  * ``start``: o = 0;
  * ``center``: o = (duration - L/F) / 2, or 0 when the clip is shorter than the window;
  * ``random``: o uniform over the cache frames in [0, duration - L/F] (temporal jitter; training sequences
    draw it anew every epoch, evaluation uses ``center``: :func:`eval_offset`).

Long videos are cut into sliding windows (:func:`sliding`, predict's ``--window/--stride``); a live stream's
windows are the last L grid frames every ``step`` frames (:func:`stride_frames`, :func:`stream_window`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import OFFSETS

EPS = 1e-6
TIE = 1e-9  # a right neighbour must be nearer by more than this to win: float noise ties to the earlier frame


def window_frames(seconds: float, fps: float, percent: float = 100.0) -> int:
    """Frames in P% of an S-second window at F fps: floor(S * P/100 * F), at least 1."""
    return max(1, int(math.floor(seconds * percent / 100.0 * fps + EPS)))


def default_seconds(durations: np.ndarray) -> float:
    """A window nearly all clips reach: the 5th percentile of the durations."""
    return float(np.percentile(np.asarray(durations, dtype=np.float64), 5)) if len(durations) else 0.0


def resolve_seq_len(cfg, fps: float, durations: np.ndarray) -> tuple[int, float | None]:
    """(L, the window's seconds or None) for a reader config (``seq_len``, ``seconds``, ``percent``)."""
    if cfg.seq_len is not None:
        return int(cfg.seq_len), None
    seconds = cfg.seconds if cfg.seconds is not None else default_seconds(durations)
    return window_frames(seconds, fps, cfg.percent), seconds


def eval_offset(offset: str) -> str:
    """The offset sequences are scored with: ``random`` jitter is for training only, evaluation is centred."""
    return "center" if offset == "random" else offset


def shift_steps(durations, seq_len: int, fps: float, cache_fps: float) -> np.ndarray:
    """How many cache frames a window of ``seq_len`` grid frames may move inside each segment (its slack)."""
    slack = np.maximum(0.0, np.asarray(durations, dtype=np.float64) - seq_len / fps)
    return np.floor(slack * cache_fps + EPS).astype(np.int64)


def shifts(durations: np.ndarray, seq_len: int, fps: float, cache_fps: float, offset: str,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Window shift (s) per segment, snapped to the cache's frame grid."""
    slack = np.maximum(0.0, np.asarray(durations, dtype=np.float64) - seq_len / fps)
    if offset == "start":
        return np.zeros_like(slack)
    if offset == "center":
        return np.round(slack / 2 * cache_fps) / cache_fps
    if offset == "random":
        rng = rng if rng is not None else np.random.default_rng(0)
        return rng.integers(0, shift_steps(durations, seq_len, fps, cache_fps) + 1) / cache_fps
    raise ValueError(f"--offset must be one of {', '.join(OFFSETS)}, got {offset!r}")


def nearest(ts: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Index into sorted, non-empty ``ts`` of the timestamp nearest to each time in ``t`` (ties to the earlier)."""
    m = len(ts)
    if m == 1:
        return np.zeros(len(t), np.int64)
    j = np.clip(np.searchsorted(ts, t, side="left"), 1, m - 1)
    left, right = ts[j - 1], ts[j]
    return np.where(right - t < t - left - TIE, j, j - 1)


def match_frames(ta: np.ndarray, tb: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i into ta, j into tb) of frames at the same time (nearest within tol), one per frame of the slower."""
    if len(ta) == 0 or len(tb) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    swap = len(ta) > len(tb)
    x, y = (tb, ta) if swap else (ta, tb)
    j = nearest(y, x)
    ok = np.abs(y[j] - x) <= tol
    i = np.nonzero(ok)[0]
    return (j[ok], i) if swap else (i, j[ok])


@dataclass
class Selection:
    """Which cache rows fill each sequence.

    rows:     (N, L) int64, row of the cache's features array (0 where padded)
    mask:     (N, L) bool, True for a real frame (a prefix of each row)
    times:    (N, L) float64, requested grid times
    coverage: (N,) float64, fraction of the window holding real frames
    """

    rows: np.ndarray
    mask: np.ndarray
    times: np.ndarray
    coverage: np.ndarray


def select(timestamps: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, starts: np.ndarray, ends: np.ndarray,
           fps: float, seq_len: int, cache_fps: float, shift: np.ndarray | None = None) -> Selection:
    """Nearest cached frame to each grid time ``start + shift + k / fps`` (see the module docstring)."""
    n = len(offsets)
    shift = np.zeros(n) if shift is None else np.asarray(shift, dtype=np.float64)
    k = np.arange(seq_len, dtype=np.float64)
    times = np.asarray(starts, np.float64)[:, None] + shift[:, None] + k[None, :] / fps
    rows = np.zeros((n, seq_len), dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=bool)
    tol = 1.0 / cache_fps + EPS
    for i in range(n):
        o, m = int(offsets[i]), int(lengths[i])
        if m == 0:
            continue
        ts = timestamps[o:o + m]
        t = times[i]
        j = nearest(ts, t)
        ok = (t < ends[i] - EPS) & (np.abs(ts[j] - t) <= tol)
        rows[i] = np.where(ok, o + j, 0)
        mask[i] = ok
    # keep padding at the end only: a grid time after a gap is dropped too
    mask = np.cumprod(mask, axis=1).astype(bool)
    rows = np.where(mask, rows, 0)
    return Selection(rows=rows, mask=mask, times=times, coverage=mask.mean(axis=1) if seq_len else np.zeros(n))


# ---------------------------------------------------------------- windows over long videos and streams

def sliding(duration: float, window: float | None, stride: float | None) -> list[tuple[float, float]]:
    """[start, end) of each window: the whole video, or every ``stride`` s a ``window``-s window that fits
    (one window [0, duration) when the video is shorter than the window)."""
    if window is None:
        return [(0.0, float(duration))]
    stride = stride or window
    out, t = [], 0.0
    while t + window <= duration + EPS:
        out.append((t, t + window))
        t = round(t + stride, 9)
    return out or [(0.0, float(duration))]


def sliding_selection(segments, keys: list, timestamps: np.ndarray, window: float | None, stride: float | None,
                      fps: float, seq_len: int, cache_fps: float, offset: str) -> tuple[list[tuple], Selection]:
    """The sliding windows of the cached videos ``keys`` (positions in the segment table ``segments``) read like
    clips: ([(n, window start, window end)]: n indexes ``keys``, the times are seconds from the video's start;
    their Selection). Inside a window the run's offset policy holds, scored as in evaluation (:func:`eval_offset`)."""
    recs, offs, lens, starts, ends = [], [], [], [], []
    for n, key in enumerate(keys):
        s0, e0 = float(segments["start"][key]), float(segments["end"][key])
        for a, b in sliding(e0 - s0, window, stride):
            recs.append((n, a, min(b, e0 - s0)))
            offs.append(segments["offset"][key])
            lens.append(segments["length"][key])
            starts.append(s0 + a)
            ends.append(s0 + min(b, e0 - s0))
    starts, ends = np.asarray(starts), np.asarray(ends)
    sh = shifts(ends - starts, seq_len, fps, cache_fps, eval_offset(offset))
    return recs, select(timestamps, np.asarray(offs), np.asarray(lens), starts, ends, fps, seq_len, cache_fps, sh)


def stride_frames(stride: float | None, fps: float) -> tuple[float, int]:
    """(stride in seconds, in grid frames) of a stream's windows: about 1 s by default, a whole number of frame
    periods; ValueError for a stride that is not one."""
    stride = stride if stride is not None else max(1, round(fps)) / fps
    step = int(round(stride * fps))
    if step < 1 or abs(step / fps - stride) > 1e-6:
        raise ValueError(f"--stride {stride:g}: give a multiple of the run's frame period 1/{fps:g} s")
    return stride, step


def stream_window(feats: dict, first: int, seq_len: int) -> tuple[np.ndarray | None, int]:
    """(seq_len, D) features of a stream's grid indices first.. (a dropped frame repeats the one before; the first
    missing ones repeat the first present), and how many were missing; None when none is present."""
    have = [i for i in range(first, first + seq_len) if i in feats]
    if not have:
        return None, seq_len
    rows, last = [], feats[have[0]]
    for i in range(first, first + seq_len):
        last = feats.get(i, last)
        rows.append(last)
    return np.stack(rows), seq_len - len(have)
