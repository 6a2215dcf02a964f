"""featurize end to end on real mp4 files and real HDF5 files."""
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from featseq.cli import main
from helpers import CHILD_ENV, ROOT, clip_folder, expected_indices, featurize_cfg, published_segments
from featseq.common.lock import FileLock, Locked
from featseq.featurize.cache import CacheError, read_cache, read_segment, summary
from featseq.featurize.pipeline import featurize
from featseq.featurize.sources import SourceError, load_segments
from featseq.featurize.synth import read_frame_number

VENV_PY = sys.executable


@pytest.fixture(scope="module")
def frames_cache(synth_data, tmp_path_factory):
    """Clips and long-video segments featurized at 6 fps with the frames kept (64 px, to read numbers)."""
    d = tmp_path_factory.mktemp("fc")
    clips = featurize(featurize_cfg(synth_data["clips_root"], d / "clips.h5", size=64, keep_frames=True))
    long = featurize(featurize_cfg(synth_data["long_csv"], d / "long.h5", size=64, keep_frames=True, fps=2))
    return clips, long


def test_decode_grid_is_exact(frames_cache, synth_data):
    """Frames decoded at 6 fps are exactly the frames at the expected times (burned-in numbers)."""
    res, _ = frames_cache
    assert res.written == 6 and not res.failures
    cache = read_cache(res.path)
    with h5py.File(res.path, "r") as f:
        frames = f["frames"][()]
    for i, sid in enumerate(cache.ids):
        o, n = cache.segments["offset"][i], cache.segments["length"][i]
        got = [read_frame_number(fr) for fr in frames[o:o + n]]
        nf = int(cache.segments["video_frames"][i])
        exp = expected_indices(0.0, nf / 30, 6, 30, nf)
        assert got == exp, sid
        assert np.allclose(cache.timestamps[o:o + n], np.array(exp) / 30, atol=1e-4)
        assert n == math.ceil(cache.segments["video_duration"][i] * 6 - 1e-6)


def test_segment_bounds_in_long_video(frames_cache, synth_data):
    _, res = frames_cache
    rows = list(csv.DictReader(open(synth_data["long_csv"])))
    cache = read_cache(res.path)
    assert sorted(cache.ids) == sorted(r["id"] for r in rows)
    with h5py.File(res.path, "r") as f:
        frames = f["frames"][()]
    for r in rows:
        i = cache.ids.index(r["id"])
        start, end = float(r["start"]), float(r["end"])
        o, n = cache.segments["offset"][i], cache.segments["length"][i]
        ts = cache.timestamps[o:o + n]
        assert (ts >= start - 1 / 30).all() and (ts < end).all()
        exp = expected_indices(start, end, 2, 30, int(cache.segments["video_frames"][i]))
        assert [read_frame_number(fr) for fr in frames[o:o + n]] == exp
        assert cache.segments["label"][i] == r["label"] and cache.segments["group"][i] == r["group"]
        assert math.isclose(cache.segments["start"][i], start) and math.isclose(cache.segments["end"][i], end)


def test_schema_round_trip_and_cli_equals_api(synth_data, tmp_path):
    api = featurize(featurize_cfg(synth_data["clips_root"], tmp_path / "api.h5"))
    r = CliRunner().invoke(main, ["featurize", synth_data["clips_root"], "--size", "32", "--device", "cpu",
                                  "--out", str(tmp_path / "cli.h5"), "-q"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == str(tmp_path / "cli.h5")  # the cache path is printed last
    a, b = read_cache(api.path), read_cache(tmp_path / "cli.h5")
    assert sorted(a.ids) == sorted(b.ids)
    for i, sid in enumerate(a.ids):  # rows follow completion (two decode workers): compared segment by segment
        (fa, ta), (fb, tb) = a.segment(i), b.segment(b.ids.index(sid))
        assert np.array_equal(fa, fb) and np.array_equal(ta, tb)
    with h5py.File(api.path, "r") as f:  # plain h5py opens a cleanly closed cache
        for k in ("format_version", "backbone", "weights", "weights_sha256", "size", "resize", "fps", "precision",
                  "feature_dim", "versions", "created", "dtype", "source", "resize_policy"):
            assert k in f.attrs, k
        assert f["features"].dtype == np.float16 and f["features"].shape == (f["timestamps"].shape[0], 512)
        seg = f["segments"][()]
        assert (seg["offset"][1:] == (seg["offset"] + seg["length"])[:-1]).all()  # contiguous, ragged layout
    assert a.attrs["backbone"] == "resnet18" and a.attrs["feature_dim"] == 512 and a.attrs["fps"] == 6.0
    assert set(a.segments["label"]) == {"ascending", "descending", "pingpong"}
    assert set(a.segments["group"]) == {"g01", "g02"}
    one = read_segment(api.path, a.ids[3])
    assert np.array_equal(one["features"], a.segment(3)[0]) and one["label"] == a.segments["label"][3]
    # features equal a fresh embedding of freshly decoded frames (same decoder + preprocessing path)
    from featseq.featurize.backbones import Embedder, create_backbone
    from featseq.featurize.decoder import open_decoder
    from featseq.featurize.sampling import plan_segment
    import torch

    dec = open_decoder(a.segments["path"][0], size=32, backend=a.attrs["decoder"])
    plan = plan_segment(dec.frame_starts, dec.info.duration, 0.0, None, 6)
    emb = Embedder(create_backbone("resnet18", "none", 0), torch.device("cpu"), "fp32")
    fresh = np.concatenate([emb(c) for c in dec.read(plan.indices, 64)]).astype(np.float16)
    assert np.allclose(fresh.astype(np.float32), a.segment(0)[0].astype(np.float32), atol=2e-2)
    # float32 storage option
    f32 = featurize(featurize_cfg(synth_data["clips_root"], tmp_path / "f32.h5", dtype="float32"))
    assert read_cache(f32.path).features.dtype == np.float32


def test_cache_info_json_and_list(synth_data, tmp_path):
    featurize(featurize_cfg(synth_data["clips_root"], tmp_path / "c" / "x.h5"))
    r = CliRunner().invoke(main, ["cache", "info", str(tmp_path / "c" / "x.h5"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["segments"] == 6 and info["feature_dim"] == 512 and info["fps"] == 6.0
    assert info["backbone"] == "resnet18" and info["classes"] == {"ascending": 2, "descending": 2, "pingpong": 2}
    assert info["groups"] == 2 and info["frames"] > 6 * 3 * 6 - 6
    r = CliRunner().invoke(main, ["cache", "list", "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0 and "x.h5" in r.output and "resnet18" in r.output and " 6 " in r.output


def test_noop_rerun_and_refusal_of_mismatched_request(synth_data, tmp_path):
    out = tmp_path / "x.h5"
    first = featurize(featurize_cfg(synth_data["clips_root"], out))
    before = (os.path.getmtime(out), read_cache(out).features.copy())
    t = time.monotonic()
    again = featurize(featurize_cfg(synth_data["clips_root"], out))
    assert again.written == 0 and again.skipped_done == first.written == 6
    assert os.path.getmtime(out) == before[0]
    for change in ({"fps": 3.0}, {"size": 64}, {"backbone": "resnet34"}, {"seed": 1}, {"dtype": "float32"},
                   {"decoder": "decord"}):
        with pytest.raises(CacheError, match="different request"):
            featurize(featurize_cfg(synth_data["clips_root"], out, **change))
    r = CliRunner().invoke(main, ["featurize", synth_data["clips_root"], "--size", "32", "--fps", "3", "--out", str(out)])
    assert r.exit_code == 2 and "fps: cache has 6.0, request has 3.0" in r.output
    assert np.array_equal(read_cache(out).features, before[1])
    assert time.monotonic() - t < 60  # generous; the real figure is in BENCHMARKS.md


def test_second_writer_refused(synth_data, tmp_path):
    out = tmp_path / "x.h5"
    lock = FileLock(str(out)).acquire()
    try:
        with pytest.raises(Locked, match="another featseq process"):
            featurize(featurize_cfg(synth_data["clips_root"], out))
    finally:
        lock.release()
    assert featurize(featurize_cfg(synth_data["clips_root"], out)).written == 6


def test_lock_release_race_gives_no_second_holder(tmp_path, monkeypatch):
    """C opens the lock file while A holds it; A releases (unlinks the file, unlocks); only then does C
    flock. C must not end up holding the old, nameless inode while B creates and locks a new file: two
    writers at once. Real file descriptors: flocks of separate open() calls conflict, even in one process."""
    import fcntl
    from types import SimpleNamespace

    import featseq.common.lock as lock_mod

    out = str(tmp_path / "x.h5")
    a = FileLock(out).acquire()
    real_flock, armed = fcntl.flock, [True]

    def flock(fh, op):
        if armed[0] and op & fcntl.LOCK_EX:  # C's first flock, after its open(): A releases right now
            armed[0] = False
            a.release()
            assert not os.path.exists(out + ".lock")
        return real_flock(fh, op)

    monkeypatch.setattr(lock_mod, "fcntl", SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX,
                                                            LOCK_NB=fcntl.LOCK_NB, LOCK_UN=fcntl.LOCK_UN))
    c = FileLock(out).acquire()
    assert not armed[0]
    try:
        with pytest.raises(Locked, match=rf"another featseq process \(pid {os.getpid()}\) is writing it"):
            FileLock(out).acquire()  # B
        # C's lock is on the file that the path names (with C's pid in it), not on an unlinked inode
        assert os.fstat(c._fh.fileno()).st_ino == os.stat(out + ".lock").st_ino
    finally:
        c.release()
    FileLock(out).acquire().release()  # free again


_LOCK_HAMMER = r"""
import os, sys, time
from featseq.common.lock import FileLock, Locked
out, marker, stop = sys.argv[1], sys.argv[1] + ".holder", time.monotonic() + float(sys.argv[2])
held = clash = 0
while time.monotonic() < stop:
    try:
        lock = FileLock(out).acquire()
    except Locked:
        continue
    held += 1
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # exists: someone else holds it too
        os.remove(marker)
    except FileExistsError:
        clash += 1
    lock.release()
print(held, clash)
"""


def test_lock_holders_never_overlap_across_processes(tmp_path):
    """Three processes take and release the lock as fast as they can for a second; none ever finds the
    holder marker of another (a smoke test with real processes; the test above pins the interleaving)."""
    out = str(tmp_path / "x.h5")
    procs = [subprocess.Popen([VENV_PY, "-c", _LOCK_HAMMER, out, "1.0"], env=CHILD_ENV, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [tuple(map(int, p.communicate(timeout=60)[0].split())) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(held > 0 for held, _ in results), results
    assert sum(clash for _, clash in results) == 0, results


def _write_manifest(path, rows, header=("path", "label", "start", "end", "group", "id")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def test_manifest_errors_list_every_row(synth_data, tmp_path):
    clip = Path(synth_data["clips"][0]["path"])
    shutil.copy(clip, tmp_path / "a.mp4")
    (tmp_path / "garbage.mp4").write_bytes(b"this is not a video" * 100)
    m = tmp_path / "m.csv"
    _write_manifest(m, [
        ("a.mp4", "x", "0", "2", "g", "ok1"),
        ("missing.mp4", "x", "", "", "g", "m1"),
        ("a.mp4", "x", "3", "1", "g", "bad-bounds"),
        ("a.mp4", "y", "", "", "g", "ok1"),
        ("a.mp4", "x", "500", "", "g", "late"),
        ("garbage.mp4", "x", "", "", "g", "junk"),
        ("a.mp4", "x", "abc", "", "g", "nan"),
    ])
    out = tmp_path / "out.h5"
    r = CliRunner().invoke(main, ["featurize", str(m), "--size", "32", "--out", str(out)])
    assert r.exit_code == 2, r.output
    for needle in ("line 3: video not found", "line 4: end 1 <= start 3", "line 5: duplicate id 'ok1'",
                   "line 6: start 500 s is beyond the video's end", "line 7: unreadable video", "garbage.mp4",
                   "line 8: start 'abc' is not a number"):
        assert needle in r.output, needle
    assert not out.exists()
    _write_manifest(tmp_path / "cols.csv", [("a.mp4",)], header=("video",))
    r = CliRunner().invoke(main, ["featurize", str(tmp_path / "cols.csv"), "--out", str(out)])
    assert r.exit_code == 2 and "missing column(s) path, label" in r.output and not out.exists()


def test_corrupt_and_truncated_videos_are_reported_and_others_cached(synth_data, tmp_path):
    root = tmp_path / "src"
    for c in synth_data["clips"][:3]:
        dst = root / c["label"] / Path(c["path"]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(c["path"], dst)
    (root / "ascending" / "garbage.mp4").write_bytes(os.urandom(5000))
    data = Path(synth_data["clips"][3]["path"]).read_bytes()
    (root / "ascending" / "truncated.mp4").write_bytes(data[: len(data) // 2])
    out = tmp_path / "x.h5"
    r = CliRunner().invoke(main, ["featurize", str(root), "--size", "32", "--out", str(out)])
    assert r.exit_code == 2 and "garbage.mp4" in r.output and "truncated.mp4" in r.output and not out.exists()
    r = CliRunner().invoke(main, ["featurize", str(root), "--size", "32", "--out", str(out), "--skip-errors"])
    assert r.exit_code == 0, r.output
    s = summary(out)
    assert s["segments"] == 3
    report = json.loads(Path(str(out) + ".errors.json").read_text())
    assert set(report["failed"]) == {"ascending/garbage", "ascending/truncated"}


def test_sources(tmp_path, synth_data):
    kind, segs = load_segments(synth_data["clips_root"])
    assert kind == "folder" and len(segs) == 6
    assert {s.group for s in segs} == {"g01", "g02"} and segs[0].id == "ascending/v_ascending_g01_c01"
    gb = tmp_path / "gb"
    for p, piece in (("P01", 1), ("P01", 6), ("P02", 12)):
        (gb / p).mkdir(parents=True, exist_ok=True)
        shutil.copy(synth_data["clips"][0]["path"], gb / p / f"music{piece:02d}.mp4")
    kind, segs = load_segments(gb)
    assert kind == "gingerbread"
    assert [(s.id, s.label, s.group) for s in segs] == [
        ("P01_music01", "Classicalmusic", "P01"), ("P01_music06", "Instrumentalmusic", "P01"), ("P02_music12", "Popmusic", "P02")]
    shutil.copy(synth_data["clips"][0]["path"], gb / "P02" / "music13.mp4")
    with pytest.raises(SourceError, match="piece number 13"):
        load_segments(gb)
    kind, segs = load_segments(synth_data["long_csv"])
    assert kind == "csv" and all(s.end is not None and Path(s.path).is_file() for s in segs)


def test_resume_after_kill_9(synth_data, tmp_path):
    """A real featurize process with two decode workers is SIGKILLed mid-run; the file opens, the rerun completes
    with no duplicates, and the features equal a one-worker run's."""
    out = tmp_path / "k.h5"
    cmd = [VENV_PY, "-c", "from featseq.cli import main; main()", "featurize", synth_data["clips_root"], "--size", "160",
           "--fps", "6", "--batch-size", "4", "--decode-workers", "2", "--out", str(out), "-q"]
    # every segment published as soon as it is written (FEATSEQ_PUBLISH_SECONDS=0, not the default one-second groups of
    # featurize.writer), and the kill sent as soon as the first is: a group could otherwise hold all six segments
    p = subprocess.Popen(cmd, cwd=ROOT, env={**CHILD_ENV, "FEATSEQ_PUBLISH_SECONDS": "0"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None and published_segments(out) < 1:
        time.sleep(0.02)
    assert p.poll() is None, "featurize finished before it could be killed; make the job longer"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed = read_cache(out)  # opens (SWMR read), only published segments visible
    assert 1 <= len(killed) < 6
    assert len(set(killed.ids)) == len(killed.ids)
    r = CliRunner().invoke(main, cmd[3:])  # the rerun in this process (the kill is what needs a real one)
    assert r.exit_code == 0, r.output
    assert f"{6 - len(killed)} segment(s) written, {len(killed)} already cached" in r.output
    final = read_cache(out)
    assert sorted(final.ids) == sorted(set(final.ids)) and len(final) == 6
    assert final.features.shape[0] == int(final.segments["length"].sum())
    with h5py.File(out, "r") as f:  # cleanly closed again: plain h5py opens it
        assert len(f["segments"]) == 6
    for i, sid in enumerate(killed.ids):  # finished work intact
        j = final.ids.index(sid)
        assert np.array_equal(killed.segment(i)[0], final.segment(j)[0])
    fresh = featurize(featurize_cfg(synth_data["clips_root"], tmp_path / "fresh.h5", size=160, batch_size=4))
    ref = read_cache(fresh.path)
    for i, sid in enumerate(ref.ids):
        j = final.ids.index(sid)
        assert np.allclose(ref.segment(i)[0].astype(np.float32), final.segment(j)[0].astype(np.float32), atol=1e-2)


def test_a_cache_without_a_decoder_attribute_resumes_with_decord(synth_data, tmp_path):
    """Caches written before decoders were selectable record none: decord made them. --decoder auto resumes them
    with decord (backends scale pixels differently); asking for another decoder is refused."""
    out = tmp_path / "old.h5"
    featurize(featurize_cfg(synth_data["clips_root"], out, decoder="decord"))
    full = read_cache(out)
    with h5py.File(out, "a") as f:  # make it look like a cache from before: no decoder, fewer segments
        del f.attrs["decoder"]
        seg = f["segments"][()]
        n = int(seg["offset"][2])
        f["segments"].resize((2,))
        for name in ("features", "timestamps"):
            f[name].resize((n,) + f[name].shape[1:])
    res = featurize(featurize_cfg(synth_data["clips_root"], out))  # auto
    assert res.written == len(full) - 2
    resumed = read_cache(out)
    assert "decoder" not in resumed.attrs or resumed.attrs["decoder"] == "decord"
    for i, sid in enumerate(full.ids):
        assert np.array_equal(full.segment(i)[0], resumed.segment(resumed.ids.index(sid))[0])  # decord's features
    with pytest.raises(CacheError, match="decoder: cache has 'decord', request has 'pyav'"):
        featurize(featurize_cfg(synth_data["clips_root"], out, decoder="pyav"))


def test_cpu_micro_batches_equal_one_call_and_allocator_switch():
    """On the CPU the Embedder slices a batch into CPU_SLICE_PIXELS; the features are those of one call."""
    import torch

    from featseq.featurize.backbones import CPU_SLICE_PIXELS, Embedder, create_backbone

    emb = Embedder(create_backbone("resnet18", "none", 0), torch.device("cpu"), "fp32")
    per_slice = CPU_SLICE_PIXELS // (32 * 32)
    frames = np.random.default_rng(0).integers(0, 256, (2 * per_slice + 3, 32, 32, 3), dtype=np.uint8)  # 3 slices
    sliced = emb(frames)
    emb.slice_pixels = None
    whole = emb(frames)
    assert sliced.shape == (len(frames), 512) and np.allclose(sliced, whole, atol=1e-4)
    code = "from featurize.allocator import tune_cpu_allocator as t; print(t(), t())"
    for env, want in (({}, "True True"), ({"FEATSEQ_MALLOC": "default"}, "False False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}, cwd=str(ROOT))
        assert out.stdout.strip() == (want if sys.platform.startswith("linux") else "False False")


def test_bf16_on_a_cpu_without_it_warns(synth_data, tmp_path, monkeypatch):
    import featseq.featurize.precision as pm

    monkeypatch.setattr(pm, "cpu_bf16_native", lambda cpuinfo=None: False)
    notes = []
    res = featurize(featurize_cfg(synth_data["clips_root"], tmp_path / "b.h5", size=16, precision="bf16"),
                    log=notes.append)
    assert res.written == 6
    assert any("bf16 is emulated on this CPU" in n and "--precision auto picks fp32" in n for n in notes), notes
    assert read_cache(res.path, features=False).attrs["precision"] == "bf16"


def test_the_default_precision_resumes_the_cache_it_finds(synth_data, tmp_path, monkeypatch):
    """Without --precision, a new cache is made in auto's choice, bf16 on a CPU that computes it natively, and a
    rerun on a machine whose choice differs resumes the cache it finds (default path or --out) in that cache's own
    precision: here an fp32 cache begun on an AVX2 CPU is finished on a bf16-native one, not begun again."""
    from featseq.featurize.config import FeaturizeConfig

    segments = load_segments(synth_data["clips_root"])[1]
    cfg = dict(source=str(synth_data["clips_root"]), size=16, fps=6.0, device="cpu", cache_dir=str(tmp_path / "cache"))
    monkeypatch.setenv("FEATSEQ_CPU_BF16", "0")  # an AVX2 CPU: auto is fp32
    first = featurize(FeaturizeConfig(**cfg), segments=segments[:3])
    assert first.path.endswith("__fp32.h5") and first.written == 3
    monkeypatch.setenv("FEATSEQ_CPU_BF16", "1")  # a bf16-native CPU: auto is bf16
    notes = []
    again = featurize(FeaturizeConfig(**cfg), segments=segments, log=notes.append)
    assert again.path == first.path and (again.written, again.skipped_done) == (len(segments) - 3, 3)
    assert read_cache(again.path, features=False).attrs["precision"] == "fp32"
    assert any(f"resuming {first.path}, made in fp32" in n and "auto's choice here is bf16" in n for n in notes), notes
    assert os.listdir(tmp_path / "cache") == [Path(first.path).name]  # no bf16 cache beside it
    # the same through --out; a new file there (or a new default path) is bf16
    out = tmp_path / "mine.h5"
    monkeypatch.setenv("FEATSEQ_CPU_BF16", "0")
    featurize(featurize_cfg(synth_data["clips_root"], out, size=16), segments=segments[:2])
    monkeypatch.setenv("FEATSEQ_CPU_BF16", "1")
    assert featurize(featurize_cfg(synth_data["clips_root"], out, size=16), segments=segments).written == len(segments) - 2
    assert read_cache(out, features=False).attrs["precision"] == "fp32"
    fresh = featurize(featurize_cfg(synth_data["clips_root"], tmp_path / "new.h5", size=16), segments=segments[:1])
    assert read_cache(fresh.path, features=False).attrs["precision"] == "bf16"
    # that bf16 cache resumed on an AVX2 CPU stays bf16 (emulated there, with a warning saying how to get speed)
    monkeypatch.setenv("FEATSEQ_CPU_BF16", "0")
    notes.clear()
    featurize(featurize_cfg(synth_data["clips_root"], fresh.path, size=16), segments=segments[:2], log=notes.append)
    assert read_cache(fresh.path, features=False).attrs["precision"] == "bf16"
    assert any("bf16 is slow on this CPU" in n and "--precision fp32 and another --out" in n for n in notes), notes
    # an explicit --precision is what was asked for: one that differs from the cache's is refused, as before
    with pytest.raises(CacheError, match="precision: cache has 'fp32', request has 'bf16'"):
        featurize(featurize_cfg(synth_data["clips_root"], out, size=16, precision="bf16"), segments=segments)


def _clip_manifest(path, clips, label=lambda c: c["label"], split=lambda c: "", group=lambda c: c["group"]):
    """A manifest path,label,group,split of the synthetic clips (no id column: ids are the paths as written)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "split"])
        for c in clips:
            w.writerow([c["path"], label(c), group(c), split(c)])
    return str(path)


def test_a_rerun_with_a_changed_manifest_updates_labels_groups_and_splits(synth_data, tmp_path):
    """issue 24 item 1: relabelled rows, new groups and splits of cached segments follow the manifest on a rerun (the
    table is rewritten, the features stay), with a note listing each change; `cache check` reports the differences
    before and agrees after."""
    clips = synth_data["clips"]
    m = _clip_manifest(tmp_path / "m.csv", clips)
    out = tmp_path / "c.h5"
    r = CliRunner().invoke(main, ["featurize", m, "--size", "32", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    before = read_cache(out)
    long_label = "ascending, written out at a length the first table's label column cannot hold" * 2
    new = {clips[0]["path"]: dict(label="ÄSC"), clips[1]["path"]: dict(label=long_label, split="test"),
           clips[2]["path"]: dict(group="P23", split="val")}
    m2 = _clip_manifest(tmp_path / "m2.csv", clips, label=lambda c: new.get(c["path"], {}).get("label", c["label"]),
                        split=lambda c: new.get(c["path"], {}).get("split", ""),
                        group=lambda c: new.get(c["path"], {}).get("group", c["group"]))
    r = CliRunner().invoke(main, ["cache", "check", str(out), m2])
    assert r.exit_code == 1, r.output
    assert f"{clips[0]['path']}: label 'ascending' in the cache, 'ÄSC' in the source" in r.output
    assert "3 difference(s)" in r.output and f"--out {out}" in r.output
    r = CliRunner().invoke(main, ["featurize", m2, "--size", "32", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert "the source gives 3 cached segment(s) another label, group or split" in r.output
    assert f"{clips[2]['path']}: group 'g01' -> 'P23', split '' -> 'val'" in r.output
    after = read_cache(out)
    col = {k: dict(zip(after.ids, after.segments[k])) for k in ("label", "group", "split")}
    assert col["label"][clips[0]["path"]] == "ÄSC" and col["label"][clips[1]["path"]] == long_label
    assert col["split"][clips[1]["path"]] == "test" and col["group"][clips[2]["path"]] == "P23"
    assert col["label"][clips[3]["path"]] == clips[3]["label"] and col["split"][clips[3]["path"]] == ""
    assert summary(out)["classes"]["ÄSC"] == 1
    for i, sid in enumerate(before.ids):  # features and timestamps untouched
        j = after.ids.index(sid)
        assert np.array_equal(before.segment(i)[0], after.segment(j)[0])
        assert np.array_equal(before.segment(i)[1], after.segment(j)[1])
    r = CliRunner().invoke(main, ["cache", "check", str(out), m2, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["ok"], r.output
    r = CliRunner().invoke(main, ["featurize", m2, "--size", "32", "--out", str(out), "-q"])
    assert r.exit_code == 0 and "another label" not in r.output and "already cached" in r.output, r.output
    r = CliRunner().invoke(main, ["cache", "verify", str(out)])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("where", ["copying", "renaming"])
def test_a_relabel_killed_midway_leaves_the_old_table(synth_data, tmp_path, where):
    """kill -9 while the segment table is rewritten (while the new file is written, or just before it replaces the old
    one) leaves the old cache whole; the rerun writes the new table."""
    clips = synth_data["clips"]
    m = _clip_manifest(tmp_path / "m.csv", clips)
    out = tmp_path / "c.h5"
    featurize(featurize_cfg(m, out, size=32))
    before = read_cache(out)
    m2 = _clip_manifest(tmp_path / "m2.csv", clips, label=lambda c: c["label"].upper())
    hook = ("featseq.featurize.writer._relabelled" if where == "copying" else "os.replace")
    script = f"""
import os, sys, time
import featseq.featurize.writer, featseq.featurize.pipeline
from featseq.featurize.pipeline import featurize as run
from helpers import featurize_cfg
real = {hook}
def stall(*a, **k):
    if "{where}" == "copying" or a[0].endswith(".recover.tmp"):
        print("stalled", flush=True)
        time.sleep(120)
    return real(*a, **k)
{'featseq.featurize.writer._relabelled' if where == 'copying' else 'os.replace'} = stall
run(featurize_cfg({m2!r}, {str(out)!r}, size=32))
"""
    p = subprocess.Popen([VENV_PY, "-c", script], cwd=ROOT / "tests", env=CHILD_ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "stalled", (line, p.stderr.read() if p.poll() is not None else "")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed = read_cache(out)
    assert killed.ids == before.ids and list(killed.segments["label"]) == list(before.segments["label"])
    assert np.array_equal(killed.features, before.features)
    r = CliRunner().invoke(main, ["featurize", m2, "--size", "32", "--device", "cpu", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert sorted(read_cache(out).segments["label"]) == sorted(c["label"].upper() for c in clips)
    assert not Path(str(out) + ".recover.tmp").exists()


def test_skip_errors_skips_missing_videos_and_lists_them(synth_data, tmp_path):
    """issue 24 item 6: --skip-errors skips a row whose video is missing, as it skips a zero-byte one, and the error
    report lists both by id and manifest line; without it the run is refused naming the row and the flag."""
    clip = Path(synth_data["clips"][0]["path"])
    shutil.copy(clip, tmp_path / "a.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    m = tmp_path / "m.csv"
    _write_manifest(m, [("a.mp4", "x", "", "", "g", "ok"), ("gone.mp4", "x", "", "", "g", "gone"),
                        ("empty.mp4", "x", "", "", "g", "empty")])
    out = tmp_path / "out.h5"
    r = CliRunner().invoke(main, ["featurize", str(m), "--size", "32", "--out", str(out)])
    assert r.exit_code == 2 and "line 3: video not found" in r.output and "--skip-errors" in r.output, r.output
    assert not out.exists()
    r = CliRunner().invoke(main, ["featurize", str(m), "--size", "32", "--out", str(out), "--skip-errors"])
    assert r.exit_code == 0, r.output
    assert "1 segment(s) written, 0 already cached, 2 failed" in r.output
    assert f"gone: video not found: {tmp_path / 'gone.mp4'} (m.csv line 3)" in r.output
    assert read_cache(out).ids == ["ok"]
    report = json.loads(Path(str(out) + ".errors.json").read_text())["failed"]
    assert set(report) == {"gone", "empty"} and "video not found" in report["gone"]


def test_cache_info_shows_split_counts(synth_data, tmp_path):
    """issue 24 item 11: `cache info` and `cache info --json` count the segments of each split (and of none)."""
    clips = synth_data["clips"]
    parts = {clips[0]["path"]: "test", clips[1]["path"]: "val", clips[2]["path"]: "train", clips[3]["path"]: "train"}
    m = _clip_manifest(tmp_path / "m.csv", clips, split=lambda c: parts.get(c["path"], ""))
    out = featurize(featurize_cfg(m, tmp_path / "s.h5", size=32)).path
    r = CliRunner().invoke(main, ["cache", "info", out, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["splits"] == {"train": 2, "val": 1, "test": 1, "none": 2}, r.output
    r = CliRunner().invoke(main, ["cache", "info", out])
    assert r.exit_code == 0 and "splits: train 2, val 1, test 1, none 2" in r.output, r.output


def test_a_shard_on_a_changed_merged_cache_proposes_the_cache_s_own_command(synth_data, tmp_path):
    """issue 24 item 4: the refresh a shard proposes for a merged cache whose videos changed is the command that made
    it (size, resize, weights ...), not a bare `featurize --shard none --refresh`."""
    clips = synth_data["clips"]
    src = clip_folder(clips[:2], tmp_path / "src")
    out = tmp_path / "x.h5"
    featurize(featurize_cfg(src, out, size=32, resize="crop", fps=2.0))
    shutil.copy(clips[4]["path"], next(src.glob("*/*.mp4")))  # another video under the same name
    r = CliRunner().invoke(main, ["featurize", str(src), "--size", "32", "--resize", "crop", "--fps", "2", "--device",
                                  "cpu", "--out", str(out), "--shard", "0/2"])
    assert r.exit_code == 2, r.output
    hint = r.output[r.output.index("refresh the merged cache in one process: "):]
    assert f"featseq featurize {src} --backbone resnet18 --weights none --seed 0 --size 32 --resize crop --fps 2" in hint
    assert f"--out {out} --shard none --refresh" in hint, hint
