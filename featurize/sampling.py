"""Pure time and index math: which frames of a video a segment samples at a given fps.

No decoding here. Times are seconds on the video's own clock (the frame presentation times the
decoder reports), so a segment [start, end) of a long video samples the grid
``start, start + 1/fps, start + 2/fps, ...`` strictly below ``end``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EPS = 1e-6


@dataclass(frozen=True)
class SamplePlan:
    """The frames one segment samples.

    grid:    (n,) float64, requested times  start + k / fps
    indices: (n,) int64, index of the frame shown at each grid time (non-decreasing)
    times:   (n,) float64, presentation time of each sampled frame (what the cache records)
    """

    grid: np.ndarray
    indices: np.ndarray
    times: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


def time_grid(start: float, end: float, fps: float) -> np.ndarray:
    """Times ``start + k / fps`` for k = 0, 1, ... that lie strictly before ``end``."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if end <= start:
        return np.zeros(0, dtype=np.float64)
    n = int(math.ceil((end - start) * fps - EPS))
    k = np.arange(max(n, 0), dtype=np.float64)
    t = start + k / fps
    return t[t < end - EPS]


def frame_at(times: np.ndarray, frame_starts: np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each time: the last frame whose start is <= t.

    A time before the first frame maps to frame 0. ``frame_starts`` must be non-decreasing.
    """
    idx = np.searchsorted(frame_starts, np.asarray(times, dtype=np.float64) + EPS, side="right") - 1
    return np.clip(idx, 0, len(frame_starts) - 1).astype(np.int64)


def video_duration(frame_starts: np.ndarray, frame_ends: np.ndarray | None = None, fps: float | None = None) -> float:
    """End of the last frame: its end time if known, else its start plus one frame period."""
    if len(frame_starts) == 0:
        return 0.0
    if frame_ends is not None and len(frame_ends):
        return float(frame_ends[-1])
    return float(frame_starts[-1] + (1.0 / fps if fps else 0.0))


def plan_segment(frame_starts: np.ndarray, duration: float, start: float, end: float | None, fps: float) -> SamplePlan:
    """The sampling plan of segment [start, end) (end None or past the video: up to the video's end)."""
    stop = duration if end is None else min(end, duration)
    grid = time_grid(start, stop, fps)
    idx = frame_at(grid, frame_starts) if len(frame_starts) else np.zeros(0, dtype=np.int64)
    times = np.asarray(frame_starts, dtype=np.float64)[idx] if len(idx) else np.zeros(0, dtype=np.float64)
    return SamplePlan(grid=grid, indices=idx, times=times)


def expected_frames(start: float, end: float, fps: float) -> int:
    """How many grid points [start, end) holds at fps (the independent closed form used by tests)."""
    return len(time_grid(start, end, fps))
