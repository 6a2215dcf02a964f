"""Every decoder backend returns the same frame for the same timestamp.

Videos with burned-in frame numbers (H.264 with B-frames, so decode order differs from presentation order; one at
30 fps, one at NTSC 30000/1001 fps) are decoded through the decode worker (the real path) by every installed
backend, at several sampling rates and segment cuts starting and ending inside the video. The frame number read
off each frame must be the index the sampling plan asked for, and the recorded timestamps must agree exactly
between backends. A backend that is not installed is skipped with the reason.
"""
from fractions import Fraction

from pathlib import Path

import numpy as np
import pytest

from featseq.featurize.decoder import BACKENDS, frame_table, unavailable
from featseq.featurize.sampling import plan_segment
from featseq.featurize.synth import read_frame_number, render_clip
from featseq.featurize.worker import DecodePool, decode_job

CUTS = [(0.0, None), (1.37, 7.9), (10.0, 10.45), (20.3, None)]
RATES = [1.0, 2.5, 6.0, 30.0]


@pytest.fixture(scope="module")
def videos(synth_data, tmp_path_factory):
    ntsc = tmp_path_factory.mktemp("ntsc") / "ntsc.mp4"
    render_clip(ntsc, label="ascending", group_index=0, clip_index=0, width=64, height=48,
                video_fps=Fraction(30000, 1001), duration=12.0, seed=3, burn_frame_numbers=True)
    return [synth_data["long_csv"].replace("long_segments.csv", "long/long_01.mp4"), str(ntsc)]


def _decode(backend, videos):
    jobs, plans = [], {}
    for v in videos:
        t = frame_table(v)
        duration = float(t.ends[-1])
        for start, end in CUTS:
            if start >= duration:
                continue
            for fps in RATES:
                key = (v, start, end, fps)
                plans[key] = plan_segment(t.starts, duration, start, end, fps)
                jobs.append(decode_job(key, v, start, end, fps, 48, "squash", 16))
    frames, times = {}, {}
    with DecodePool(timeout=60, decoder=backend) as pool:
        for msg in pool.run(jobs):
            assert msg[0] != "error", msg
            if msg[0] == "chunk":
                frames.setdefault(msg[1], []).append(msg[2])
                times.setdefault(msg[1], []).append(msg[3])
    return plans, {k: np.concatenate(v) for k, v in frames.items()}, {k: np.concatenate(v) for k, v in times.items()}


@pytest.fixture(scope="module")
def reference(videos):
    return _decode("pyav", videos)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gives_the_planned_frames_at_the_same_times(backend, videos, reference):
    if why := unavailable(backend):
        pytest.skip(why)
    plans, frames, times = _decode(backend, videos) if backend != "pyav" else reference
    assert set(frames) == set(plans) and len(plans) > 20
    for key, plan in plans.items():
        got = [read_frame_number(f) for f in frames[key]]
        assert got == plan.indices.tolist(), (backend, key)
        assert np.array_equal(times[key], plan.times), (backend, key)
        assert np.array_equal(times[key], reference[2][key])  # the same clock as every other backend
        assert frames[key].shape[1:] == (48, 48, 3)


def test_frame_table_is_the_exact_timestamps(videos):
    """Frame starts are the packets' presentation times in float64 (decord's own are float32)."""
    t = frame_table(videos[1])
    assert t.fps == pytest.approx(30000 / 1001)
    assert np.allclose(t.starts, np.arange(len(t.starts)) * 1001 / 30000, atol=1e-9, rtol=0)
    assert (np.diff(t.starts) > 0).all() and np.allclose(t.ends - t.starts, 1001 / 30000)


def test_frame_tables_stay_demuxed_within_a_frame_budget_and_a_changed_file_is_demuxed_again(synth_data, tmp_path,
                                                                                              monkeypatch):
    """featurize.decoder.frame_table keeps every video it demuxed while the kept tables hold at most
    TABLE_CACHE_FRAMES frames (finetune and Grad-CAM come back to the same clips every epoch: one demux per clip and
    worker, not one per visit), drops the least recently used beyond, and demuxes a file again when it changed."""
    import shutil

    import featseq.featurize.decoder as D

    clips = sorted(str(p) for p in Path(synth_data["clips_root"]).rglob("*.mp4"))[:4]
    copies = []
    for i, c in enumerate(clips):
        copies.append(str(tmp_path / f"v{i}.mp4"))
        shutil.copy(c, copies[-1])
    demuxed = []
    real = D._frame_table
    monkeypatch.setattr(D, "_frame_table", lambda path: demuxed.append(path) or real(path))
    monkeypatch.setattr(D, "_TABLES", D._TableCache())
    for _ in range(3):  # three epochs over four clips
        for c in copies:
            D.frame_table(c)
    assert demuxed == copies  # once each
    frames = [len(D.frame_table(c).starts) for c in copies]
    monkeypatch.setattr(D, "TABLE_CACHE_FRAMES", frames[2] + frames[3])  # room for the last two
    monkeypatch.setattr(D, "_TABLES", D._TableCache())
    demuxed.clear()
    for c in copies + copies[2:]:
        D.frame_table(c)
    assert demuxed == copies  # the last two stayed; the first two were dropped
    assert D._TABLES.frames == frames[2] + frames[3] and len(D._TABLES.tables) == 2
    with open(copies[3], "ab") as fh:  # the file changed (size, mtime): its old table is not used
        fh.write(b"\0")
    D.frame_table(copies[3])
    assert demuxed[-1] == copies[3] and len(demuxed) == 5


def test_a_backend_that_cannot_run_is_refused_with_the_fix(monkeypatch, synth_data, tmp_path):
    """torchcodec installed without FFmpeg's libraries fails at import with a RuntimeError: featurize stops before any
    work, naming the fix; so does GPU decoding with a CPU-only backend or without a GPU."""
    import sys

    from click.testing import CliRunner

    from featseq.cli import main

    class NoFFmpeg:
        def find_spec(self, name, path=None, target=None):
            if name.startswith("torchcodec"):
                raise RuntimeError("Could not load libtorchcodec. Likely causes: FFmpeg is not properly installed")

    monkeypatch.setattr(sys, "meta_path", [NoFFmpeg()] + sys.meta_path)
    for m in [m for m in sys.modules if m.startswith("torchcodec")]:
        monkeypatch.delitem(sys.modules, m)
    why = unavailable("torchcodec")
    assert "cannot load FFmpeg" in why and "apt install ffmpeg" in why and "--decoder pyav" in why
    out = tmp_path / "x.h5"
    r = CliRunner().invoke(main, ["featurize", synth_data["clips_root"], "--size", "32", "--decoder", "torchcodec",
                                  "--out", str(out)])
    assert r.exit_code == 2 and "cannot load FFmpeg" in r.output and not out.exists()
    assert "decodes on the CPU only" in unavailable("pyav", "cuda")


def test_pyav_frames_through_the_kept_reformatter_equal_a_fresh_ones(synth_data, videos):
    """One VideoReformatter serves every video a thread decodes with pyav (featurize/decoders/pyav_decoder.py):
    videos of other sizes in turn, scaled to other sizes by either policy, come out as a fresh one scales them."""
    from av.video.reformatter import VideoReformatter

    from featseq.featurize.decoder import open_decoder

    clip = synth_data["clips"][0]["path"]  # 64x64; videos[1] is 64x48
    for path, size, policy in [(videos[1], 32, "squash"), (clip, 48, "crop"), (videos[1], 40, "crop"), (clip, 32, "squash")]:
        got = []
        for fresh in (False, True):
            dec = open_decoder(path, size=size, policy=policy, backend="pyav")
            if fresh:
                dec._ref = VideoReformatter()
            got.append(np.concatenate(list(dec.read(np.arange(0, 40, 7), 4))))
            dec.close()
        assert got[0].shape == (6, size, size, 3) and np.array_equal(got[0], got[1])
