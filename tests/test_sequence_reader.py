"""Sequence selection math against an independent formula, and the reader on real caches."""
import math

import numpy as np
import pytest
import torch

from helpers import featurize_cfg, write_fake_cache
from featseq.featurize.cache import read_cache
from featseq.sequence.reader import (ReaderConfig, ReaderError, build, default_seconds, select, shifts, window_frames)

# the original study's sequence lengths: fps -> {percent: frames}
ORIGINAL = {1: {100: 25, 80: 20, 50: 12}, 2: {100: 51, 80: 41, 50: 25}, 3: {100: 77, 80: 62, 50: 38}}


@pytest.mark.parametrize("fps,percent", [(f, p) for f in ORIGINAL for p in ORIGINAL[f]])
def test_original_study_counts(fps, percent):
    """floor(W * fps * P) with W = 25.9 s reproduces every count; 25.5 s does not (documented in reader.py)."""
    want = ORIGINAL[fps][percent]
    assert window_frames(25.9, fps, percent) == want
    for w in (25.834, 25.95, 25.999):  # any window in [25.834, 26) s works
        assert window_frames(w, fps, percent) == want
    # and --seq-len reproduces them directly, whatever the window
    assert ReaderConfig(fps=fps, seq_len=want).seq_len == want


def test_window_25_5_does_not_reproduce_the_counts():
    got = {(f, p): math.floor(25.5 * f * p / 100) for f in ORIGINAL for p in ORIGINAL[f]}
    assert got[(2, 80)] == 40 and got[(3, 100)] == 76  # the study had 41 and 77


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


def test_build_on_featurized_cache(synth_data, tmp_path):
    """Real cache (6 fps): 2 fps sequences take the stored frames nearest to start + k/2; short clips are padded."""
    from featseq.featurize.pipeline import featurize

    res = featurize(featurize_cfg(synth_data["clips_root"], tmp_path / "c.h5"))
    c = read_cache(res.path)
    durs = c.segments["end"] - c.segments["start"]
    data = build(c, ReaderConfig(fps=2))
    assert data.seq_len == math.floor(default_seconds(durs) * 2 + 1e-6)
    assert data.seq_len == window_frames(np.percentile(durs, 5), 2)
    for i in range(len(c)):
        _, ts = c.segment(i)
        for k in range(data.seq_len):
            if data.mask[i, k]:
                t = c.segments["start"][i] + k / 2
                assert abs(c.timestamps[int(data.rows[i, k])] - t) < 1 / 30 + 1e-6
                assert int(data.rows[i, k]) - c.segments["offset"][i] == nearest_independent(ts, t)
    x, m = data.batch(torch.arange(len(c)))
    assert x.shape == (len(c), data.seq_len, 512) and x.dtype == torch.float32
    assert torch.equal(x[0, 0], torch.from_numpy(c.features[int(data.rows[0, 0])].astype(np.float32)))
    assert (x[~m] == 0).all()
    # a window longer than every clip: padded and masked, counted; --min-coverage drops
    long = build(c, ReaderConfig(fps=2, seconds=10))
    assert long.seq_len == 20 and long.summary()["padded"] == len(c) and long.summary()["dropped"] == 0
    assert not long.mask[:, -1].any() and long.mask[:, 0].all()
    cov = long.coverage
    dropped = build(c, ReaderConfig(fps=2, seconds=10, min_coverage=float(np.median(cov))))
    assert dropped.summary()["dropped"] == int((cov < np.median(cov) - 1e-6).sum()) > 0
    # --percent of the default window
    assert build(c, ReaderConfig(fps=3, percent=50)).seq_len == window_frames(default_seconds(durs), 3, 50)


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
    from featseq.featurize.cache import IDENTITY_KEYS, read_table
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
