"""Predefined splits: the split column of a manifest and of the cache (format 2, format 1 still read), the official
UCF-101 / HMDB-51 lists mapped to segments, and --split predefined / ucf101:K / hmdb51:K as folds."""
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from featseq.featurize.cache import CacheError, read_cache, string_widths
from featseq.featurize.writer import CacheWriter
from featseq.featurize.sources import SourceError, load_segments
from helpers import write_fake_cache
from featseq.sequence.config import TrainConfig, parse_split
from featseq.sequence.reader import ReaderConfig, build
from featseq.sequence.split_lists import ListError, from_lists, read_hmdb51, read_ucf101, segment_parts
from featseq.sequence.splits import SplitError, folds_for, make_folds


def test_manifest_split_column_spellings_and_bad_values(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"")  # reading a manifest does not open videos
    values = ["train", "Valid", "TEST", "", "validation", "dev", "testing", "training"]
    m = tmp_path / "m.csv"
    m.write_text("path,label,split,id\n" + "".join(f"v.mp4,a,{v},s{i}\n" for i, v in enumerate(values)))
    _, segs = load_segments(m)
    assert [s.split for s in segs] == ["train", "val", "test", "", "val", "val", "test", "train"]
    m.write_text("path,label,split,id\nv.mp4,a,train,s0\nv.mp4,a,holdout,s1\n")
    with pytest.raises(SourceError, match=r"m.csv line 3: split 'holdout' is not one of train, val, test"):
        load_segments(m)


def _v1(path):
    """Rewrite a format-2 cache as format 1: the segment table without its split column."""
    with h5py.File(path, "a") as f:
        table = f["segments"][()]
        names = [n for n in table.dtype.names if n != "split"]
        old = np.zeros(len(table), dtype=[(n, table.dtype[n]) for n in names])
        for n in names:
            old[n] = table[n]
        del f["segments"]
        f.create_dataset("segments", data=old, maxshape=(None,), chunks=(256,))
        f.attrs["format_version"] = 1


def test_format_1_cache_reads_with_empty_splits_and_resumes_without_splits(tmp_path):
    path = write_fake_cache(tmp_path / "c.h5", ["a", "b", "a"], splits=["train", "test", "val"])
    c2 = read_cache(path)
    assert list(c2.segments["split"]) == ["train", "test", "val"] and c2.attrs["format_version"] == 2
    _v1(path)
    c1 = read_cache(path)
    assert c1.attrs["format_version"] == 1 and list(c1.segments["split"]) == ["", "", ""]
    assert np.array_equal(c1.features, c2.features) and c1.ids == c2.ids
    row = {"id": "s9", "label": "a", "group": "g", "path": "/v/9.mp4", "start": 0.0, "end": 1.0}
    with CacheWriter(path, {"fps": 6.0}, {}, 8, string_widths([row])) as w:
        assert not w.holds("split")
        w.append({**row, "split": ""}, np.zeros((6, 8), np.float16), np.arange(6) / 6)  # no split: fits format 1
        with pytest.raises(CacheError, match="version-1 cache has no split column"):
            w.append({**row, "id": "s10", "split": "train"}, np.zeros((6, 8), np.float16), np.arange(6) / 6)
    c = read_cache(path)
    assert c.attrs["format_version"] == 1 and c.ids[-1] == "s9" and len(c) == 4
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(CacheError, match="format version 3 is not supported.*reads versions 1, 2"):
        read_cache(path)


def test_parse_split():
    assert parse_split("ucf101:3") == ("ucf101", 3) and parse_split("predefined") == ("predefined", None)
    for bad, msg in (("ucf101", "give ucf101:K with K in 1..3"), ("hmdb51:4", "K in 1..3"), ("group:1", "takes no :K"),
                     ("ucf:1", "unknown --split")):
        with pytest.raises(ValueError, match=msg):
            parse_split(bad)
    with pytest.raises(ValueError, match="--split ucf101:0"):
        TrainConfig(cache="x", out="y", split="ucf101:0").validate()


LAB = np.array(["a", "b"] * 6)
GRP = np.array([f"g{i // 2}" for i in range(12)])


def test_predefined_parts_are_exact_and_validation_comes_from_the_column_else_train():
    parts = np.array(["train"] * 6 + ["val"] * 2 + ["test"] * 3 + [""], dtype=object)
    (f,) = make_folds("predefined", LAB, GRP, parts=parts, val_size=0.3)
    assert list(f.train) == [0, 1, 2, 3, 4, 5] and list(f.val) == [6, 7] and list(f.test) == [8, 9, 10]
    parts[6:8] = "train"  # no val rows: carved out of train, by group
    (f,) = make_folds("predefined", LAB, GRP, parts=parts, val_size=0.3, seed=1)
    assert list(f.test) == [8, 9, 10] and set(f.train) | set(f.val) == set(range(8)) and len(f.val)
    assert not set(GRP[f.train]) & set(GRP[f.val])
    keep = np.ones(12, bool)
    keep[0] = False  # --min-coverage dropped it: in no part
    (f,) = make_folds("predefined", LAB, GRP, keep=keep, parts=parts, val_size=0)
    assert 0 not in f.train and list(f.test) == [8, 9, 10]
    for gone, word in (("test", "test part is empty"), ("train", "training part is empty")):
        p = np.where(parts == gone, "", parts)
        with pytest.raises(SplitError, match=rf"--split predefined: the {word} .*split column"):
            make_folds("predefined", LAB, GRP, parts=p)
    with pytest.raises(SplitError, match="ucf101:1: the test part is empty.*--split-dir"):
        make_folds("ucf101:1", LAB, GRP, parts=np.where(parts == "test", "", parts))


def write_ucf_lists(d, train, test, classes=("ApplyEyeMakeup", "Archery")):
    d.mkdir(parents=True, exist_ok=True)
    (d / "classInd.txt").write_text("".join(f"{i} {c}\r\n" for i, c in enumerate(classes, 1)))  # CRLF like the download
    (d / "trainlist01.txt").write_text("".join(f"{v} {classes.index(v.split('/')[0]) + 1}\r\n" for v in train))
    (d / "testlist01.txt").write_text("".join(f"{v}\r\n" for v in test))


def test_ucf101_lists_map_to_segments_and_report_what_is_missing(tmp_path):
    v = lambda c, g, k: f"{c}/v_{c}_g{g:02d}_c{k:02d}.avi"  # noqa: E731
    train = [v("ApplyEyeMakeup", 8, 1), v("Archery", 8, 1), v("ApplyEyeMakeup", 9, 1)]
    test = [v("ApplyEyeMakeup", 1, 1), v("Archery", 1, 1)]
    write_ucf_lists(tmp_path / "lists", train, test)
    listed = read_ucf101(tmp_path / "lists", 1)
    # the cache: folder-tree segments (one transcoded to .mp4, one cut in two by a manifest), one unlisted video
    paths = np.array([f"/data/UCF-101/{train[0]}", f"/data/UCF-101/{train[1][:-4]}.mp4", f"/data/UCF-101/{test[0]}",
                      f"/data/UCF-101/{test[1]}", f"/data/UCF-101/{test[1]}", "/data/UCF-101/Archery/v_Archery_g02_c03.avi",
                      "/elsewhere/flat/v_ApplyEyeMakeup_g09_c01.avi"], dtype=object)
    got = from_lists(listed, paths, "lists")
    assert list(got.parts) == ["train", "train", "test", "test", "test", "", "train"]
    r = got.report
    assert r["listed_not_in_cache"] == 0 and r["segments_not_listed"] == 1
    assert r["segments_not_listed_examples"] == ["/data/UCF-101/Archery/v_Archery_g02_c03.avi"]
    got = from_lists(listed, paths[2:4], "lists")
    assert got.report["listed_not_in_cache"] == 3 and "applyeyemakeup/v_applyeyemakeup_g08_c01" in got.report[
        "listed_not_in_cache_examples"]
    # a wrong class index and a video in both lists are refused, naming file and line
    write_ucf_lists(tmp_path / "bad", train, test + [train[0]])
    (tmp_path / "bad" / "trainlist01.txt").write_text(f"{train[0]} 2\n{train[1]} 2\n")
    with pytest.raises(ListError) as e:
        read_ucf101(tmp_path / "bad", 1)
    assert "trainlist01.txt line 1: class index 2 is archery" in str(e.value)
    assert "testlist01.txt line 3: applyeyemakeup/v_applyeyemakeup_g08_c01 is also listed as train" in str(e.value)


def test_hmdb51_lists(tmp_path):
    d = tmp_path / "testTrainMulti_7030_splits"
    d.mkdir()
    (d / "brush_hair_test_split1.txt").write_text("April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \nA_brush_2.avi 2 \n"
                                                  "B_brush_3.avi 0 \n")
    (d / "brush_hair_test_split2.txt").write_text("April_09_brush_hair_u_nm_np1_ba_goo_0.avi 2 \n")
    (d / "cartwheel_test_split1.txt").write_text("C_wheel_(1)#x.avi 2\n")
    listed = read_hmdb51(d, 1)
    paths = np.array(["/h/brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "/h/brush_hair/A_brush_2.avi",
                      "/h/brush_hair/B_brush_3.avi", "/h/cartwheel/C_wheel_(1)#x.avi", "/h/cartwheel/other.avi"])
    got = from_lists(listed, paths, str(d))
    assert list(got.parts) == ["train", "test", "", "test", ""]
    assert got.report["segments_listed_unused"] == 1 and got.report["segments_not_listed"] == 1
    assert list(from_lists(read_hmdb51(d, 2), paths[:1], str(d)).parts) == ["test"]
    (d / "cartwheel_test_split1.txt").write_text("C_wheel.avi 3\n")
    with pytest.raises(ListError, match=r"cartwheel_test_split1.txt line 1: expected '<video>.avi 1\|2\|0'"):
        read_hmdb51(d, 1)


def test_folds_for_finds_lists_next_to_the_source_or_in_split_dir(tmp_path):
    root = tmp_path / "UCF-101"
    labels = ["ApplyEyeMakeup", "Archery"] * 4
    paths = [str(root / c / f"v_{c}_g{g:02d}_c01.avi") for c, g in zip(labels, [1, 1, 2, 2, 8, 8, 9, 9])]
    path = write_fake_cache(tmp_path / "c.h5", labels, groups=[p.split("_")[-2] for p in paths], paths=paths)
    with h5py.File(path, "a") as f:
        f.attrs["source"] = str(root)
    cache = read_cache(path, features=False)
    data = build(cache, ReaderConfig())
    cfg = TrainConfig(cache=path, out="", split="ucf101:1", val_size=0)
    with pytest.raises(SplitError, match=r"--split ucf101:1: no trainlist01.txt and testlist01.txt found next to the "
                                         r"source .*ucfTrainTestlist.*pass --split-dir"):
        folds_for(cfg, data, cache)
    rel = [p[len(str(root)) + 1:] for p in paths]
    write_ucf_lists(tmp_path / "ucfTrainTestlist", rel[4:] + ["Archery/v_Archery_g10_c01.avi"], rel[:4])
    logged = []
    (f,) = folds_for(cfg, data, cache, logged.append)
    assert list(f.train) == [4, 5, 6, 7] and list(f.test) == [0, 1, 2, 3] and not len(f.val)
    assert f.report["listed_not_in_cache"] == 1 and "1 listed video(s) are not in the cache" in logged[0]
    other = tmp_path / "mine"
    write_ucf_lists(other, rel[:4], rel[4:])
    (f,) = folds_for(TrainConfig(cache=path, out="", split="ucf101:1", split_dir=str(other), val_size=0), data, cache)
    assert list(f.train) == [0, 1, 2, 3] and f.report["lists"] == str(other)
    with pytest.raises(SplitError, match="--split-dir .*: no trainlist02.txt"):
        folds_for(TrainConfig(cache=path, out="", split="ucf101:2", split_dir=str(other)), data, cache)
    # predefined reads the cache's column; this cache has none
    with pytest.raises(SplitError, match="training part is empty"):
        folds_for(TrainConfig(cache=path, out="", split="predefined"), data, cache)
    assert segment_parts("group", None, SimpleNamespace()) is None
