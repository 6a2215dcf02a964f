"""Tests of the synthetic video dataset (featurize.synth)."""

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import av
import torch

from featseq.featurize import synth

FPS = 30


def _frames(path, width=None, height=None, start=0, stop=None, step=1):
    """Decoded frames of ``path`` as a uint8 array (T, H, W, 3), read with PyAV directly (FFmpeg's scaler when
    ``width`` is given), independently of featseq's decoders."""
    out = []
    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if stop is not None and i >= stop:
                break
            if i >= start and (i - start) % step == 0:
                out.append(f.to_ndarray(format="rgb24", width=width, height=height) if width else f.to_ndarray(format="rgb24"))
    return np.stack(out)


def _video(path):
    """(frame count, average frame rate, every frame's start time) with PyAV."""
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        times = [f.time for f in c.decode(st)]
        return len(times), float(st.average_rate), times


# chroma plane orthogonal to grey (1, 1, 1)
_CHROMA = np.array([[1.0, -0.5, -0.5], [0.0, np.sqrt(3) / 2, -np.sqrt(3) / 2]])


def _mean_colour_and_hue(frames):
    """Per-frame mean RGB below the band area and its hue angle in turns."""
    h = frames.shape[1]
    mean = frames[:, h // 6 + 2 :].reshape(len(frames), -1, 3).astype(np.float64).mean(axis=1)
    z = mean @ _CHROMA.T
    return mean, np.arctan2(z[:, 1], z[:, 0]) / (2 * np.pi)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = synth.render_dataset(out, burn_frame_numbers=True)
    return out, summary


def test_classes(tmp_path):
    """The documented class names (README, module docstring), in this order, and each name says what its
    clips do, measured on decoded frames: the hue of an 'ascending' clip rises, a 'descending' one falls,
    a 'pingpong' one goes both ways. Same group, clip index and seed for all three: only the label differs."""
    assert synth.CLASSES == ("ascending", "descending", "pingpong")
    up = {}
    for label in synth.CLASSES:
        path = tmp_path / f"{label}.mp4"
        synth.render_clip(path, label=label, group_index=1, clip_index=1, width=32, height=32, video_fps=10,
                          duration=8.0, seed=0)
        _, hue = _mean_colour_and_hue(_frames(path))
        up[label] = (np.diff(np.unwrap(hue * 2 * np.pi)) > 0).mean()
    assert up["ascending"] > 0.9 and up["descending"] < 0.1 and 0.2 < up["pingpong"] < 0.8, up


def test_tree_layout_and_summary(dataset):
    out, summary = dataset
    assert summary["root"] == str(out)
    assert summary["clips_root"] == str(out / "clips")
    assert summary["classes"] == list(synth.CLASSES)
    clips = summary["clips"]
    assert len(clips) == 3 * 4 * 2
    # clips/ is a folder source (one folder per class, short clips only); long/ is beside it
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["clips", "long"]
    assert sorted(p.name for p in (out / "clips").iterdir()) == sorted(synth.CLASSES)
    for label in synth.CLASSES:
        names = sorted(p.name for p in (out / "clips" / label).iterdir())
        expected = sorted(
            f"v_{label}_g{g:02d}_c{c:02d}.mp4" for g in range(1, 5) for c in range(1, 3)
        )
        assert names == expected
    assert sorted(p.name for p in (out / "long").iterdir()) == ["long_01.mp4"]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["long_segments.csv"]
    for clip in clips:
        path = Path(clip["path"])
        assert path.is_file()
        assert path.parent.name == clip["label"]
        m = re.fullmatch(r"v_(\w+)_g(\d\d)_c(\d\d)\.mp4", path.name)
        assert m and m.group(1) == clip["label"]
        assert clip["group"] == f"g{m.group(2)}"


def test_long_segments_csv(dataset):
    out, summary = dataset
    assert summary["long_csv"] == str(out / "long_segments.csv")
    with open(summary["long_csv"], newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["path", "label", "start", "end", "group", "id"]
        rows = list(reader)
    assert len(rows) >= 3
    assert {r["label"] for r in rows} <= set(synth.CLASSES)
    assert {r["path"] for r in rows} == {"long/long_01.mp4"}
    assert {r["group"] for r in rows} == {"long_01"}
    assert [r["id"] for r in rows] == [f"long_01_s{i:02d}" for i in range(len(rows))]
    starts = [float(r["start"]) for r in rows]
    ends = [float(r["end"]) for r in rows]
    assert starts[0] == 0.0
    assert ends[-1] == pytest.approx(40.0, abs=1e-6)
    for i in range(len(rows)):
        assert 3.0 <= ends[i] - starts[i] <= 15.0 + 1e-6
        if i:
            assert starts[i] == ends[i - 1]
            assert rows[i]["label"] != rows[i - 1]["label"]
    n, rate, _ = _video(out / "long" / "long_01.mp4")
    assert n == 40 * FPS
    assert rate == pytest.approx(FPS)


def test_durations_frame_counts_fps_timestamps(dataset):
    _, summary = dataset
    durations = []
    for clip in summary["clips"]:
        assert 6.0 - 0.5 / FPS <= clip["duration"] <= 9.0 + 0.5 / FPS
        n, rate, times = _video(clip["path"])
        assert n == clip["n_frames"] == round(clip["duration"] * FPS)
        assert rate == pytest.approx(FPS)
        for i in (0, 1, n // 2, n - 1):
            assert times[i] == pytest.approx(i / FPS, abs=1e-3)
        assert _frames(clip["path"], stop=1).shape == (1, 64, 64, 3)
        durations.append(clip["duration"])
    assert len(set(durations)) > len(durations) // 2  # lengths differ between clips


@pytest.mark.parametrize("size", [None, 224, 32])
def test_burned_frame_numbers(dataset, size):
    out, summary = dataset
    paths = [summary["clips"][0]["path"], summary["clips"][-1]["path"], out / "long" / "long_01.mp4"]
    for path in paths:
        n = _video(path)[0]
        for start in range(0, n, 300):
            frames = _frames(path, size, size, start=start, stop=min(n, start + 300))
            if size is not None:
                assert frames.shape[1:] == (size, size, 3)
            got = [synth.read_frame_number(f) for f in frames]
            assert got == list(range(start, start + len(frames))), path


def test_read_frame_number_accepts_tensors_and_grey():
    frame = np.zeros((48, 64, 3), np.uint8)
    bits = [(1234 >> (15 - k)) & 1 for k in range(16)]
    for k, b in enumerate(bits):
        frame[:8, 4 * k : 4 * k + 4] = 255 * b
    assert synth.read_frame_number(frame) == 1234
    assert synth.read_frame_number(torch.from_numpy(frame)) == 1234
    assert synth.read_frame_number(frame[..., 0]) == 1234


def test_determinism(tmp_path):
    kw = dict(groups=1, clips_per_class_per_group=1, long_videos=1, long_duration=10.0, duration=(2.0, 3.0))
    a = synth.render_dataset(tmp_path / "a", seed=3, **kw)
    b = synth.render_dataset(tmp_path / "b", seed=3, **kw)
    synth.render_dataset(tmp_path / "c", seed=4, **kw)
    assert [x["duration"] for x in a["clips"]] == [x["duration"] for x in b["clips"]]
    assert Path(a["long_csv"]).read_text() == Path(b["long_csv"]).read_text()
    rel = [Path(x["path"]).relative_to(tmp_path / "a") for x in a["clips"]] + [Path("long/long_01.mp4")]
    differs = False
    for r in rel:
        fa = _frames(tmp_path / "a" / r)
        fb = _frames(tmp_path / "b" / r)
        np.testing.assert_array_equal(fa, fb)
        fc = _frames(tmp_path / "c" / r)
        differs |= fa.shape != fc.shape or not np.array_equal(fa, fc)
    assert differs  # another seed gives other content


def test_resolution_invariance(tmp_path):
    kw = dict(label="pingpong", group_index=2, clip_index=1, video_fps=FPS, duration=2.0, seed=5)
    synth.render_clip(tmp_path / "lo.mp4", width=64, height=64, **kw)
    synth.render_clip(tmp_path / "hi.mp4", width=256, height=256, **kw)
    lo = _frames(tmp_path / "lo.mp4").astype(np.float64)
    hi = _frames(tmp_path / "hi.mp4").astype(np.float64)
    assert lo.shape == (2 * FPS, 64, 64, 3) and hi.shape == (2 * FPS, 256, 256, 3)
    hi_down = hi.reshape(len(hi), 64, 4, 64, 4, 3).mean(axis=(2, 4))
    diff = np.abs(lo - hi_down).mean(axis=(1, 2, 3))
    assert diff.max() < 4.0
    # much smaller than the difference between frames half a clip apart
    assert np.abs(lo[FPS:] - lo[:FPS]).mean() > 10 * diff.mean()


def test_odd_and_invalid_sizes(tmp_path):
    kw = dict(label="ascending", group_index=1, clip_index=1, video_fps=FPS, duration=0.5, seed=0)
    synth.render_clip(tmp_path / "odd.mp4", width=63, height=47, **kw)
    assert _frames(tmp_path / "odd.mp4").shape == (FPS // 2, 48, 64, 3)
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="width"):
            synth.render_clip(tmp_path / "x.mp4", width=bad, height=64, **kw)
        with pytest.raises(ValueError, match="height"):
            synth.render_clip(tmp_path / "x.mp4", width=64, height=bad, **kw)
    with pytest.raises(ValueError, match="width"):
        synth.render_dataset(tmp_path / "d", width=0)
    with pytest.raises(ValueError, match="label"):
        synth.render_clip(tmp_path / "x.mp4", width=64, height=64, **{**kw, "label": "nope"})


def test_render_long_video_segments(tmp_path):
    parts = [("descending", 1.5), ("pingpong", 1.0), ("ascending", 0.5)]
    segs = synth.render_long_video(
        tmp_path / "l.mp4", parts=parts, width=64, height=64, video_fps=FPS, seed=1, burn_frame_numbers=True
    )
    assert [s["label"] for s in segs] == ["descending", "pingpong", "ascending"]
    assert [(s["start"], s["end"]) for s in segs] == [
        pytest.approx((0.0, 1.5)), pytest.approx((1.5, 2.5)), pytest.approx((2.5, 3.0))
    ]
    frames = _frames(tmp_path / "l.mp4")
    assert len(frames) == 3 * FPS
    assert [synth.read_frame_number(f) for f in frames] == list(range(3 * FPS))
    _, hue = _mean_colour_and_hue(frames)
    step = np.diff(np.unwrap(hue * 2 * np.pi))
    assert (step[: int(1.5 * FPS) - 1] < 0).mean() > 0.9  # descending part
    assert (step[int(2.5 * FPS) :] > 0).mean() > 0.9  # ascending part


def test_order_blind_but_order_aware(dataset):
    """Clip-mean colour does not tell the classes apart; the order of hues does."""
    _, summary = dataset
    clip_means = {c: [] for c in synth.CLASSES}
    within_std = []
    up_fraction = {c: [] for c in synth.CLASSES}
    hue_hist = {c: np.zeros(6) for c in synth.CLASSES}
    for clip in summary["clips"]:
        # 2 frames per second, as a featurizer might sample them
        frames = _frames(clip["path"], step=FPS // 2)
        mean, hue = _mean_colour_and_hue(frames)
        clip_means[clip["label"]].append(mean.mean(axis=0))
        within_std.append(mean.std(axis=0).mean())
        step = np.diff(np.unwrap(hue * 2 * np.pi))
        up_fraction[clip["label"]].append((step > 0).mean())
        hue_hist[clip["label"]] += np.histogram(np.mod(hue, 1.0), bins=6, range=(0.0, 1.0))[0]
    within = float(np.mean(within_std))
    assert within > 20.0  # the global colour changes a lot within a clip
    class_means = np.array([np.mean(clip_means[c], axis=0) for c in synth.CLASSES])
    spread = np.abs(class_means[:, None] - class_means[None]).max()
    assert spread < 0.25 * within
    # every class visits all hues about equally often
    hists = np.array([hue_hist[c] / hue_hist[c].sum() for c in synth.CLASSES])
    assert np.abs(hists - 1.0 / 6).max() < 0.07
    # ... but the direction of the hue change tells ascending from descending
    asc, desc, ping = (np.array(up_fraction[c]) for c in synth.CLASSES)
    assert asc.min() > 0.9
    assert desc.max() < 0.1
    assert np.all((ping > 0.2) & (ping < 0.8))


def test_a_rerun_keeps_the_videos_it_already_rendered(tmp_path):
    """issue 24 item 10 (`make demo` twice): rendering the same dataset again leaves every file as it was (mtimes
    included), so a cache of it resumes instead of refusing 'sources changed'; a missing, truncated or differently
    asked-for video is rendered again."""
    from click.testing import CliRunner

    from featseq.cli import main

    kw = dict(groups=1, clips_per_class_per_group=1, long_videos=1, long_duration=10.0, duration=(2.0, 3.0), width=32,
              height=32)
    first = synth.render_dataset(tmp_path / "d", seed=3, **kw)
    files = sorted(p for p in (tmp_path / "d").rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    out = tmp_path / "c.h5"
    r = CliRunner().invoke(main, ["featurize", first["clips_root"], "--size", "32", "--device", "cpu", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    again = synth.render_dataset(tmp_path / "d", seed=3, **kw)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    r = CliRunner().invoke(main, ["featurize", first["clips_root"], "--size", "32", "--device", "cpu", "--out", str(out), "-q"])
    assert r.exit_code == 0 and "all 3 segments already cached" in r.output, r.output
    # what is gone, cut short or asked for otherwise is rendered again
    gone, cut = Path(first["clips"][0]["path"]), Path(first["clips"][1]["path"])
    gone.unlink()
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    synth.render_dataset(tmp_path / "d", seed=3, **kw)
    assert gone.is_file() and _frames(gone).shape[0] == first["clips"][0]["n_frames"]
    assert _frames(cut).shape[0] == first["clips"][1]["n_frames"]
    kept = [p for p in files if p not in (gone, cut)]
    assert {p: p.stat().st_mtime_ns for p in kept} == {p: mtimes[p] for p in kept}
    synth.render_dataset(tmp_path / "d", seed=4, **kw)
    assert all(Path(c["path"]).stat().st_mtime_ns != mtimes[Path(c["path"])] for c in first["clips"][2:])
