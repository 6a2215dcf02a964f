"""Sequence selection math against an independent formula, and the reader on real caches."""
import numpy as np
import pytest
import torch

from helpers import featurize_cfg, write_fake_cache
from featseq.featurize.cache import read_cache
from featseq.sequence.loop import FeatureInputs
from featseq.sequence.reader import ReaderConfig, ReaderError, build
from featseq.sequence.windows import select, shifts

# the original study's sequence lengths: fps -> {percent: frames}
ORIGINAL = {1: {100: 25, 80: 20, 50: 12}, 2: {100: 51, 80: 41, 50: 25}, 3: {100: 77, 80: 62, 50: 38}}


@pytest.fixture(scope="module")
def long_fake(tmp_path_factory):
    """A 6 fps cache of three 30 s segments (timestamps exactly start + k/6): every study window fits."""
    return read_cache(write_fake_cache(tmp_path_factory.mktemp("reader") / "long.h5", ["a", "b", "a"],
                                       durations=[30.0, 30.0, 30.0], starts=[0.0, 5.0, 0.0]))


@pytest.mark.parametrize("fps,percent", [(f, p) for f in ORIGINAL for p in ORIGINAL[f]])
def test_original_study_counts(long_fake, fps, percent):
    """--seconds 25.9 --percent P at F fps reads the study's number of frames, every (6/F)th cached frame from the
    segment's start (the cache is 6 fps); any window in [25.834, 26) s gives the same count; --seq-len N reads N."""
    want = ORIGINAL[fps][percent]
    c, step = long_fake, 6 // fps
    for seconds in (25.9, 25.834, 25.95, 25.999):
        data = build(c, ReaderConfig(fps=fps, seconds=seconds, percent=percent))
        assert data.seq_len == want and data.rows.shape == (3, want), seconds
    assert data.mask.all()  # 30 s segments: no padding
    for i in range(3):
        o = int(c.segments["offset"][i])
        assert data.rows[i].tolist() == [o + step * k for k in range(want)]
        assert np.allclose(c.timestamps[data.rows[i].numpy()], c.segments["start"][i] + np.arange(want) / fps)
    direct = build(c, ReaderConfig(fps=fps, seq_len=want))
    assert torch.equal(direct.rows, data.rows) and torch.equal(direct.mask, data.mask)


def test_window_25_5_does_not_reproduce_the_counts(long_fake):
    """A 25.5 s window (the study's stated length) reads one frame fewer than the study at 2 fps/80 % and 3 fps/100 %."""
    assert build(long_fake, ReaderConfig(fps=2, seconds=25.5, percent=80)).seq_len == 40  # the study had 41
    assert build(long_fake, ReaderConfig(fps=3, seconds=25.5)).seq_len == 76  # and 77


def nearest_independent(ts, t):
    """argmin |ts - t|, ties to the earlier frame (pure Python)."""
    best = 0
    for j in range(len(ts)):
        if abs(ts[j] - t) < abs(ts[best] - t) - 1e-9:
            best = j
    return best


def expected_selection(timestamps, offsets, lengths, starts, ends, fps, seq_len, shift):
    rows, mask = [], []
    for i in range(len(offsets)):
        ts = timestamps[offsets[i]:offsets[i] + lengths[i]]
        r, m, alive = [], [], True
        for k in range(seq_len):
            t = starts[i] + shift[i] + k / fps
            j = nearest_independent(ts, t)
            ok = alive and t < ends[i] - 1e-6
            alive = ok
            r.append(offsets[i] + j if ok else 0)
            m.append(ok)
        rows.append(r)
        mask.append(m)
    return np.array(rows), np.array(mask)


CASES = [(fps, seq_len, offset, jitter) for fps in (1, 2, 3, 6, 4, 2.5) for seq_len in (3, 12, 40)
         for offset in ("start", "center", "random") for jitter in (0.0, 1.0)]


@pytest.mark.parametrize("fps,seq_len,offset,jitter", CASES)
def test_selection_matches_independent_formula(tmp_path, fps, seq_len, offset, jitter):
    durations = [9.0, 4.2, 1.0, 7.5]
    starts = [0.0, 12.5, 3.0, 100.0]
    path = write_fake_cache(tmp_path / "c.h5", ["a", "b", "a", "b"], durations=durations, starts=starts, jitter=jitter)
    c = read_cache(path)
    s = c.segments
    sh = shifts(np.array(durations), seq_len, fps, 6.0, offset, np.random.default_rng(1))
    assert (sh >= 0).all() and np.allclose(sh * 6, np.round(sh * 6))  # on the cache grid
    assert (sh <= np.maximum(0, np.array(durations) - seq_len / fps) + 1e-9).all()
    sel = select(c.timestamps, s["offset"], s["length"], s["start"], s["end"], fps, seq_len, 6.0, sh)
    rows, mask = expected_selection(c.timestamps, s["offset"], s["length"], s["start"], s["end"], fps, seq_len, sh)
    assert np.array_equal(sel.mask, mask)
    assert np.array_equal(sel.rows, rows)
    assert np.allclose(sel.coverage, mask.mean(1))
    if fps in (1, 2, 3, 6) and not jitter:  # divisors of the cache fps: the grid is read back exactly
        assert np.allclose(c.timestamps[sel.rows][sel.mask], sel.times[sel.mask])


@pytest.fixture(scope="module")
def real(synth_data, tmp_path_factory):
    """The synthetic clips (30 fps video, 3-5 s) featurized at 6 fps: cached frame j of a clip is video frame 5j,
    at time j/6 exactly."""
    from featseq.featurize.pipeline import featurize

    return read_cache(featurize(featurize_cfg(synth_data["clips_root"], tmp_path_factory.mktemp("real") / "c.h5")).path)


def _frames(c, i):
    """(first row, number of cached frames, start, end) of segment i."""
    s = c.segments
    return int(s["offset"][i]), int(s["length"][i]), float(s["start"][i]), float(s["end"][i])


@pytest.mark.parametrize("fps", [6, 3, 2, 1])
def test_sequences_read_every_nth_cached_frame_and_pad_at_the_end(real, fps):
    """At F fps a window of L frames reads cached frames 0, 6/F, 2*6/F, ... of its segment, while the grid time k/F
    is before the segment's end; the rest is padding: mask False, features zero."""
    c, step, L = real, 6 // fps, 6 * fps  # 6 s windows: the 3-5 s clips end in padding
    data = build(c, ReaderConfig(fps=fps, seq_len=L))
    ((_, x, m),) = FeatureInputs.of(data).batches([np.arange(len(c))])  # what the trainer feeds its model
    padded = 0
    for i in range(len(c)):
        o, n, start, end = _frames(c, i)
        real_k = [k for k in range(L) if k / fps < end - start - 1e-9]  # grid times inside the clip
        assert data.mask[i].tolist() == [k in real_k for k in range(L)], c.ids[i]
        assert data.rows[i, :len(real_k)].tolist() == [o + step * k for k in real_k]
        assert all(o + step * k < o + n for k in real_k)
        assert np.allclose(c.timestamps[[o + step * k for k in real_k]], start + np.array(real_k) / fps, atol=1e-6)
        for k in range(L):
            want = c.features[o + step * k].astype(np.float32) if k in real_k else np.zeros(c.features.shape[1])
            assert torch.equal(x[i, k], torch.from_numpy(np.asarray(want, np.float32))), (c.ids[i], k)
        assert data.coverage[i] == pytest.approx(len(real_k) / L)
        padded += len(real_k) < L
    assert m.dtype == torch.bool and torch.equal(m, data.mask) and x.dtype == torch.float32
    assert data.summary()["padded"] == padded == len(c) and data.summary()["dropped"] == 0


def test_center_offset_and_percent_of_the_default_window(real):
    """--percent P alone: a window of P % of the 5th-percentile duration; --offset center: it sits in the middle of
    each longer clip (shifted by whole cached frames), at the start of a shorter one."""
    c = real
    durs = [float(e - s) for s, e in zip(c.segments["start"], c.segments["end"])]
    p5 = sorted(durs)[0] + 0.05 * (len(durs) - 1) * (sorted(durs)[1] - sorted(durs)[0])  # numpy's linear percentile
    assert p5 == pytest.approx(np.percentile(durs, 5))
    checked = 0
    for fps, percent in ((2, 100), (3, 50), (1, 80)):
        L = int(p5 * percent / 100 * fps + 1e-6)  # whole frames of the window
        data = build(c, ReaderConfig(fps=fps, percent=percent, offset="center"))
        assert data.seq_len == L >= 1
        for i in range(len(c)):
            o, n, start, end = _frames(c, i)
            slack = max(0.0, (end - start) - L / fps)
            shift = min(range(n), key=lambda j: abs(j / 6 - slack / 2))  # cached frames to skip: nearest the middle
            if abs(abs(shift / 6 - slack / 2) - 1 / 12) < 1e-9:
                continue  # a tie between two frames: either is the middle
            real_k = [k for k in range(L) if shift / 6 + k / fps < end - start - 1e-9]
            assert data.rows[i, :len(real_k)].tolist() == [o + shift + (6 // fps) * k for k in real_k], (c.ids[i], fps)
            assert data.mask[i].sum() == len(real_k)
            checked += shift > 0
    assert checked >= len(c)  # windows really moved off the start


def test_a_window_longer_than_every_clip_is_padded_and_min_coverage_drops(real):
    c = real
    long = build(c, ReaderConfig(fps=2, seconds=10))
    assert long.seq_len == 20
    want_cov = np.array([sum(k / 2 < e - s - 1e-9 for k in range(20)) / 20
                         for s, e in zip(c.segments["start"], c.segments["end"])])
    assert np.allclose(long.coverage, want_cov) and want_cov.max() < 1
    assert long.summary()["padded"] == len(c) and long.summary()["dropped"] == 0
    threshold = float(np.median(want_cov))
    dropped = build(c, ReaderConfig(fps=2, seconds=10, min_coverage=threshold))
    assert dropped.keep.tolist() == (want_cov >= threshold - 1e-9).tolist() and not dropped.keep.all()
    assert dropped.summary()["dropped"] == int((want_cov < threshold - 1e-9).sum())


def test_fps_above_cache_is_refused(tmp_path):
    path = write_fake_cache(tmp_path / "c.h5", ["a", "b"], fps=1.0)
    with pytest.raises(ReaderError) as e:
        build(read_cache(path), ReaderConfig(fps=2))
    msg = str(e.value)
    assert "1 fps" in msg and "featseq featurize" in msg and "--fps" in msg


def test_empty_cache_is_refused(tmp_path):
    path = write_fake_cache(tmp_path / "e.h5", [])
    with pytest.raises(ReaderError, match="no segments"):
        build(read_cache(path), ReaderConfig())


@pytest.mark.parametrize("kw,flag", [({"fps": 0}, "--fps"), ({"percent": 0}, "--percent"), ({"seq_len": 0}, "--seq-len"),
                                     ({"offset": "middle"}, "--offset"), ({"min_coverage": 2}, "--min-coverage"),
                                     ({"seconds": -1}, "--seconds")])
def test_reader_options_validated(kw, flag):
    with pytest.raises(ValueError, match=flag):
        ReaderConfig(**kw).validate()


def test_fps_hint_reproduces_the_cache(synth_data, tmp_path):
    """issue 24 item 4: `train CACHE --fps 3` on a 1 fps cache proposes the featurize command that made the cache (its
    weights file, seed, size, resize, precision, dtype, decoder) at a rate holding both, and that command, run as
    written, makes that cache; --fps 1.5 on a 2 fps cache is refused, not read from unevenly spaced nearest frames."""
    import shlex

    from click.testing import CliRunner

    import torchvision

    from featseq.cli import main
    from featseq.featurize.cache import read_table
    from featseq.featurize.spec import IDENTITY_KEYS
    from featseq.featurize.pipeline import featurize

    weights = tmp_path / "my_resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    cache = featurize(featurize_cfg(synth_data["clips_root"], tmp_path / "one.h5", fps=1.0, weights=str(weights),
                                    size=32, resize="crop", precision="fp32", dtype="float32", decoder="pyav")).path
    r = CliRunner().invoke(main, ["train", cache, "--out", str(tmp_path / "R"), "--fps", "3", "--epochs", "1"])
    assert r.exit_code == 2, r.output
    assert "above the cache's 1 fps" in r.output
    cmd = r.output.split("`")[1]
    assert cmd.startswith("featseq featurize ") and "--fps 6" in cmd, cmd
    for flag in (f"--weights {weights}", "--size 32", "--resize crop", "--precision fp32", "--dtype float32",
                 "--decoder pyav"):
        assert flag in cmd, (flag, cmd)
    args = shlex.split(cmd)[1:] + ["--device", "cpu", "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    (old, _), (new, _) = read_table(cache), read_table(args[args.index("--out") + 1])
    assert {k: new[k] for k in IDENTITY_KEYS if k != "fps"} == {k: old[k] for k in IDENTITY_KEYS if k != "fps"}
    assert new["fps"] == 6.0 and new["source"] == old["source"]
    from featseq.featurize.cache import CacheError, read_frames  # the hint of a cache without frames (finetune) likewise

    with pytest.raises(CacheError) as e:
        read_frames(cache, np.array([0]))
    assert "--keep-frames" in str(e.value) and f"--weights {weights}" in str(e.value) and "--fps 1 " in str(e.value)

    two = featurize(featurize_cfg(synth_data["clips_root"], tmp_path / "two.h5", fps=2.0)).path
    with pytest.raises(ReaderError) as e:
        build(read_cache(two), ReaderConfig(fps=1.5))
    msg = str(e.value)
    assert "--fps 1.5 is not a rate the cache holds" in msg and "2, 1, 0.667" in msg and "--fps 6" in msg, msg
    assert build(read_cache(two), ReaderConfig(fps=1)).fps == 1.0  # its rate divided by a whole number reads back
