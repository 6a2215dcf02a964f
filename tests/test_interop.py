"""featseq cache export / import (issue 29): every format round-trips a cache exactly (features in their dtype,
timestamps, ids, labels, groups, splits, bounds); a folder in video_features' layout becomes a cache that trains;
bad inputs are refused before anything is written, naming the file and the fix; an interrupted import resumes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import write_fake_cache

from featseq.cli import main
from featseq.featurize.cache import read_cache
from featseq.featurize.interop.config import FORMATS, INDEX_NAME


def _cli(*args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r


# ids that are not file names: a slash, spaces, case-only twins, a dot, the name of h5-per-video's timestamps group
IDS = ["walk/clip 1", "walk/Clip 1", "run.a", "timestamps", "jump_g02_c01"]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_then_import_gives_the_same_cache(tmp_path, fmt, dtype):
    src = write_fake_cache(tmp_path / "a.h5", ["walk", "walk", "run", "jump", "run"], ids=IDS, dtype=dtype,
                           groups=["p1", "p2", "p1", "p3", "p2"], splits=["train", "val", "test", "", "train"],
                           durations=[2.0, 3.0, 1.5, 2.5, 1.0], starts=[0.0, 0.0, 4.0, 0.0, 1.5], jitter=1.0)
    out = tmp_path / "exported"
    _cli("cache", "export", src, "--format", fmt, "--out", out, "--shard-samples", 2)
    assert (out / INDEX_NAME).is_file()
    where = out / "features.h5" if fmt == "h5-per-video" else out
    if fmt == "webdataset":
        assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    cache = tmp_path / "b.h5"
    r = _cli("cache", "import", where, "--format", fmt, "--out", cache)
    assert r.output.strip().splitlines()[-1] == str(cache)
    a, b = read_cache(src), read_cache(cache)
    for col in ("id", "label", "group", "split"):
        assert list(b.segments[col]) == list(a.segments[col]), col
    assert b.features.dtype == a.features.dtype == np.dtype(dtype)
    assert np.array_equal(b.features, a.features)
    if fmt == "video_features":  # milliseconds there and back: within rounding of a float64
        np.testing.assert_allclose(b.timestamps, a.timestamps, rtol=0, atol=1e-9)
    else:
        assert np.array_equal(b.timestamps, a.timestamps)
    for col in ("offset", "length", "start", "end"):
        assert np.array_equal(b.segments[col], a.segments[col]), col
    assert b.attrs["import_format"] == fmt and b.attrs["import_path"] == str(where.resolve())
    assert b.attrs["backbone"] == "unknown" and "backbone" in b.attrs["unknown"] and b.attrs["fps"] == 6.0
    _cli("cache", "verify", cache)


def _video_features_folder(root: Path, n_per_class=8, dim=16, fps=5.0, seed=0) -> tuple[Path, Path]:
    """OUTPUT/resnet/<stem>_resnet.npy (T x D float32), <stem>_timestamps_ms.npy, <stem>_fps.npy, as video_features'
    save_numpy writes them, for two classes that differ in the mean of their features, and a manifest of labels."""
    rng = np.random.default_rng(seed)
    d = root / "resnet"
    d.mkdir(parents=True)
    rows = ["file,label,group"]
    for k in range(2 * n_per_class):
        label = ("cartwheel", "dive")[k % 2]
        stem = f"v_{label}_g{k // 4:02d}_c{k:02d}"
        t = int(rng.integers(15, 25))
        np.save(d / f"{stem}_resnet.npy", (rng.standard_normal((t, dim)) + (2.0 if k % 2 else -2.0)).astype(np.float32))
        np.save(d / f"{stem}_timestamps_ms.npy", np.arange(t) * 1000.0 / fps)
        np.save(d / f"{stem}_fps.npy", np.array(fps))
        rows.append(f"{stem},{label},g{k // 4}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root, root / "labels.csv"


@pytest.mark.slow  # about 20 s here: a train, then predict, stream and finetune refused
def test_a_video_features_folder_becomes_a_cache_that_trains(tmp_path):
    src, manifest = _video_features_folder(tmp_path / "vf")
    cache = tmp_path / "imported.h5"
    _cli("cache", "import", src, "--format", "video_features", "--manifest", manifest, "--out", cache)
    c = read_cache(cache)
    assert len(c) == 16 and c.attrs["feature_dim"] == 16 and c.attrs["fps"] == 5.0 and c.attrs["dtype"] == "float32"
    assert set(c.segments["group"]) == {"g0", "g1", "g2", "g3"}
    np.testing.assert_allclose(c.timestamps[:3], [0.0, 0.2, 0.4])

    run = tmp_path / "run"
    _cli("train", cache, "--out", run, "--model", "mlp", "--epochs", 3, "--seq-len", 10, "--split", "group",
         "--no-plots", "--device", "cpu")
    res = json.loads((run / "results.json").read_text())
    assert res["n_test"] > 0 and res["test_accuracy"] > 0.9  # the classes' features differ by 4 standard deviations

    from featseq.sequence.dataset import CacheDataset

    ds = CacheDataset(cache, "train", split="group", seq_len=10)
    x, mask, y = ds[0]
    assert tuple(x.shape) == (10, 16) and bool(mask.all())

    # predict cannot make such features for new videos: refused, saying why, before any video is opened
    video = tmp_path / "new.mp4"
    video.write_bytes(b"not decoded")
    r = _cli("predict", run, video, "--out", tmp_path / "pr", code=2)
    assert "imported from video_features files" in r.output and "featseq evaluate" in r.output
    assert not (tmp_path / "pr").exists()
    r = _cli("predict", run, "--stream", video, "--out", tmp_path / "st", code=2)
    assert "imported from video_features files" in r.output and not (tmp_path / "st").exists()
    r = _cli("finetune", cache, "--out", tmp_path / "ft", "--epochs", 1, "--device", "cpu", code=2)
    assert "nor fine-tune that backbone" in " ".join(r.output.split()) and not (tmp_path / "ft").exists()


def test_bad_inputs_are_refused_naming_each_file_and_nothing_is_written(tmp_path):
    src, manifest = _video_features_folder(tmp_path / "vf", n_per_class=3)
    d = src / "resnet"
    t0 = np.load(d / "v_cartwheel_g00_c00_resnet.npy").shape[0]
    np.save(d / "v_cartwheel_g00_c00_resnet.npy", np.zeros((t0, 12), np.float32))      # another extractor's width
    np.save(d / "v_dive_g00_c01_timestamps_ms.npy", np.load(d / "v_dive_g00_c01_timestamps_ms.npy")[:-1])  # one short
    (d / "v_cartwheel_g00_c02_fps.npy").unlink()                                      # no rate
    np.save(d / "v_dive_g00_c03_flow.npy", np.zeros((3, 16), np.float32))             # a second feature key
    with manifest.open("a") as fh:
        fh.write("v_missing,dive,g9\n")                                               # a row without files
    cache = tmp_path / "c.h5"
    r = _cli("cache", "import", src, "--format", "video_features", "--manifest", manifest, "--out", cache, code=2)
    out = " ".join(r.output.split())
    assert "v_cartwheel_g00_c00_resnet.npy: 12 features per frame, but 4 other file(s) have 16" in out
    n = np.load(d / "v_dive_g00_c01_resnet.npy").shape[0]
    assert f"v_dive_g00_c01_resnet.npy: {n - 1} timestamps for {n} feature rows" in out
    assert "v_cartwheel_g00_c02_resnet.npy (labels.csv line 4): no fps" in out and "or pass --fps" in out
    assert "several features beside it (flow, resnet): pass --feature NAME" in out
    assert "labels.csv line 8: no features for file 'v_missing'" in out
    assert "6 problem(s), nothing was written" in out and not cache.exists()


def test_timestamps_must_increase(tmp_path):
    src, manifest = _video_features_folder(tmp_path / "vf", n_per_class=1)
    ts = src / "resnet" / "v_dive_g00_c01_timestamps_ms.npy"
    t = np.load(ts)
    t[3] = t[2]
    np.save(ts, t)
    r = _cli("cache", "import", src, "--format", "video_features", "--manifest", manifest, "--out", tmp_path / "c.h5",
             code=2)
    assert "v_dive_g00_c01_resnet.npy: timestamps not increasing at row 3 (0.400000 -> 0.400000 s)" in r.output


def test_labels_from_class_folders_and_fps_for_bare_npy(tmp_path):
    """npy files in SOURCE/<label>/ folders (as featurize reads video folders: id label/stem, UCF-101's group from
    the name) without timestamps: --fps gives the time grid; without it, refused naming the flag."""
    rng = np.random.default_rng(1)
    for label, stems in (("a", ["v_a_g01_c01", "v_a_g02_c01"]), ("b", ["v_b_g01_c01"])):
        (tmp_path / "src" / label).mkdir(parents=True)
        for s in stems:
            np.save(tmp_path / "src" / label / f"{s}.npy", rng.standard_normal((7, 4)).astype(np.float16))
    r = _cli("cache", "import", tmp_path / "src", "--format", "npy", "--out", tmp_path / "c.h5", code=2)
    assert "no fps" in r.output and "--fps" in r.output
    _cli("cache", "import", tmp_path / "src", "--format", "npy", "--out", tmp_path / "c.h5", "--fps", 2)
    c = read_cache(tmp_path / "c.h5")
    assert list(c.segments["id"]) == ["a/v_a_g01_c01", "a/v_a_g02_c01", "b/v_b_g01_c01"]
    assert list(c.segments["label"]) == ["a", "a", "b"] and list(c.segments["group"]) == ["g01", "g02", "g01"]
    assert c.features.dtype == np.float16
    np.testing.assert_array_equal(c.timestamps[:7], np.arange(7) / 2.0)
    assert c.segments["end"][0] == 3.5


def test_an_interrupted_import_resumes_and_another_source_is_refused(tmp_path):
    src, manifest = _video_features_folder(tmp_path / "vf", n_per_class=2)
    lines = manifest.read_text().splitlines()
    part = tmp_path / "part.csv"
    part.write_text("\n".join(lines[:3]) + "\n")  # what an import killed after two segments had published
    cache = tmp_path / "c.h5"
    _cli("cache", "import", src, "--format", "video_features", "--manifest", part, "--out", cache)
    assert len(read_cache(cache)) == 2
    r = _cli("cache", "import", src, "--format", "video_features", "--manifest", manifest, "--out", cache)
    assert "2 segment(s) imported, 2 already in the cache" in r.output
    assert len(read_cache(cache)) == 4
    # an edited manifest: the rerun relabels what is cached, as a featurize rerun does, features untouched
    before = read_cache(cache)
    manifest.write_text(manifest.read_text().replace("v_cartwheel_g00_c00,cartwheel,g0", "v_cartwheel_g00_c00,dive,g7"))
    r = _cli("cache", "import", src, "--format", "video_features", "--manifest", manifest, "--out", cache)
    assert "0 segment(s) imported, 4 already in the cache" in r.output and "another label, group or split" in r.output
    after = read_cache(cache)
    assert (after.segments["label"][0], after.segments["group"][0]) == ("dive", "g7")
    assert np.array_equal(after.features, before.features)

    other, _ = _video_features_folder(tmp_path / "other", n_per_class=1)
    r = _cli("cache", "import", other, "--format", "video_features", "--manifest", manifest, "--out", cache, code=2)
    assert "was imported from video_features files at" in r.output and "another --out" in r.output
    made = write_fake_cache(tmp_path / "featurized.h5", ["a"])
    r = _cli("cache", "import", src, "--format", "video_features", "--manifest", manifest, "--out", made, code=2)
    assert "made by featseq featurize" in r.output


def test_a_pickled_npy_is_refused_not_loaded(tmp_path):
    """Files to import are data: an object array (numpy pickles it) is refused by name, never unpickled."""
    (tmp_path / "src" / "a").mkdir(parents=True)
    np.save(tmp_path / "src" / "a" / "ok.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "src" / "a" / "evil.npy", np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    r = _cli("cache", "import", tmp_path / "src", "--format", "npy", "--fps", 1, "--out", tmp_path / "c.h5", code=2)
    assert "evil.npy: not a readable .npy array" in r.output and not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize("fmt", ["h5-per-video", "webdataset"])
def test_a_stopped_export_leaves_whole_files_and_no_index(tmp_path, monkeypatch, fmt):
    """Stopped mid-way (a signal ends as KeyboardInterrupt): the file being written is removed, files finished before
    stay whole, the index (written last) is absent; the same command then writes everything."""
    from featseq.featurize.interop import export as ex

    src = write_fake_cache(tmp_path / "a.h5", ["x", "y", "x", "y", "x"])
    cls = ex._H5 if fmt == "h5-per-video" else ex._WebDataset
    real, calls = cls.add, []

    def add(self, *a):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real(self, *a)

    monkeypatch.setattr(cls, "add", add)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ex.export(ex.ExportConfig(cache=src, format=fmt, out=str(out), shard_samples=2))
    left = sorted(p.name for p in out.iterdir())
    assert left == ([] if fmt == "h5-per-video" else ["shard-000000.tar"])  # no temporary file, no index
    monkeypatch.setattr(cls, "add", real)
    _cli("cache", "export", src, "--format", fmt, "--out", out, "--shard-samples", 2)
    _cli("cache", "import", out / "features.h5" if fmt == "h5-per-video" else out, "--format", fmt,
             "--out", tmp_path / "b.h5")
    assert np.array_equal(read_cache(tmp_path / "b.h5").features, read_cache(src).features)


def test_several_rates_need_fps_and_float16_overflow_is_refused(tmp_path):
    src, manifest = _video_features_folder(tmp_path / "vf", n_per_class=2)
    d = src / "resnet"
    np.save(d / "v_dive_g00_c03_fps.npy", np.array(25.0))  # one video at its native rate
    r = _cli("cache", "import", src, "--format", "video_features", "--manifest", manifest, "--out", tmp_path / "c.h5",
             code=2)
    out = " ".join(r.output.split())
    assert "the files give several rates (5 fps: 3 file(s)" in out and "25 fps: 1 file(s)" in out and "--fps F" in out
    _cli("cache", "import", src, "--format", "video_features", "--manifest", manifest, "--out", tmp_path / "c.h5",
         "--fps", 5)
    assert read_cache(tmp_path / "c.h5").attrs["fps"] == 5.0

    big = np.load(d / "v_dive_g00_c01_resnet.npy")
    big[0, 0] = 1e6
    np.save(d / "v_dive_g00_c01_resnet.npy", big)
    r = _cli("cache", "import", src, "--format", "video_features", "--manifest", manifest, "--fps", 5, "--dtype",
             "float16", "--out", tmp_path / "h.h5", code=2)
    assert "v_dive_g00_c01_resnet.npy: 1 feature value(s) beyond float16's range (+-65504): pass --dtype float32" \
        in " ".join(r.output.split())
    assert list(read_cache(tmp_path / "h.h5").segments["id"]) == ["v_cartwheel_g00_c00"]  # the one before it is kept
