"""Pure time-grid math against an independent formula over many rows."""
import math

import numpy as np
import pytest

from featseq.featurize.sampling import expected_frames, frame_at, plan_segment, time_grid


# (start, end, fps, n, last): how many grid times start + k/fps lie strictly before end, and the last one,
# worked out by hand (expected_frames is len(time_grid(...)), so it is checked against these rows too)
@pytest.mark.parametrize("start,end,fps,n,last", [
    (0, 10, 1, 10, 9.0),
    (0, 10, 6, 60, 59 / 6),
    (0, 9.99, 3, 30, 29 / 3),            # 10.0 is past 9.99
    (1.3, 5.9, 2, 10, 5.8),              # 1.3 + 9 * 0.5
    (0.5, 0.6, 1, 1, 0.5),
    (0, 32.0, 6, 192, 191 / 6),
    (2, 2.0001, 6, 1, 2.0),
    (0, 1 / 3, 3, 1, 0.0),               # 1/3 itself is the end: excluded
    (7.25, 19.75, 2.5, 32, 19.65),       # 7.25 + 31 * 0.4; 20.05 is past the end
    (0, 26.5, 1, 27, 26.0),
    (0, 0.7, 10, 7, 0.6),                # 0.7 == end (in floating point too): excluded
    (0.1, 0.7, 10, 6, 0.6),
    (0, 1.0, 30, 30, 29 / 30),
])
def test_time_grid_matches_hand_counts(start, end, fps, n, last):
    t = time_grid(start, end, fps)
    assert len(t) == n and expected_frames(start, end, fps) == n
    assert t[0] == pytest.approx(start) and t[-1] == pytest.approx(last)
    assert np.allclose(np.diff(t), 1 / fps)
    assert (t < end).all() and (t >= start).all()


def test_time_grid_empty_and_invalid():
    assert len(time_grid(5.0, 5.0, 6)) == 0 and len(time_grid(5.0, 4.0, 6)) == 0 and expected_frames(3, 3, 1) == 0
    with pytest.raises(ValueError, match="fps"):
        time_grid(0, 1, 0)


@pytest.mark.parametrize("video_fps", [24, 25, 29.97, 30, 60])
@pytest.mark.parametrize("fps", [1, 2, 3, 6, 7.5])
def test_frame_at_constant_rate(video_fps, fps):
    n_frames = int(20 * video_fps)
    starts = np.arange(n_frames) / video_fps
    plan = plan_segment(starts, n_frames / video_fps, 1.0, 15.0, fps)
    expect = [min(n_frames - 1, int(math.floor((1.0 + k / fps) * video_fps + 1e-4))) for k in range(len(plan))]
    assert plan.indices.tolist() == expect
    assert np.all(plan.times <= plan.grid + 1e-6) and np.all(plan.grid - plan.times < 1 / video_fps + 1e-6)


def test_grid_is_nested_for_divisors():
    """Frames sampled at 6 fps contain the 1, 2 and 3 fps grids exactly (the cache's default)."""
    starts = np.arange(900) / 30
    six = set(plan_segment(starts, 30.0, 0, None, 6).indices.tolist())
    for f in (1, 2, 3):
        assert set(plan_segment(starts, 30.0, 0, None, f).indices.tolist()) <= six


def test_end_clipped_to_video_and_before_first_frame():
    starts = np.array([0.1, 0.2, 0.3])
    assert frame_at(np.array([0.0, 0.15, 5.0]), starts).tolist() == [0, 0, 2]
    plan = plan_segment(starts, 0.4, 0.0, 99.0, 10)
    assert len(plan) == 4
