"""Real dataset layouts end to end through the CLI on real files: a UCF-like tree of .avi clips (MPEG-4 Part 2)
with official split lists, HMDB-style lists, a manifest's split column; the containers and codecs users have."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from featseq.cli import main
from helpers import ROOT, expected_indices
from featseq.featurize.cache import read_cache
from featseq.featurize.synth import read_frame_number
from featseq.sequence.dataset import CacheDataset


def synth(out, *args):
    """`featseq synth` in its own process (PyAV's VP9 encoder fails in a process that imported decord first)."""
    r = subprocess.run([sys.executable, "-c", "from featseq.cli import main; main()", "synth", str(out), "--long-videos", "0",
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip().splitlines()[-1])


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def predictions(run):
    with open(Path(run) / "predictions.csv") as fh:
        return {row["id"]: row["split"] for row in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    """3 classes x groups g01-g03, one .avi clip each (MPEG-4 Part 2, Xvid), featurized at 2 fps, 32 px."""
    d = tmp_path_factory.mktemp("ucf")
    clips = synth(d / "UCF", "--container", "avi", "--clips", "1", "--groups", "3", "--width", "32", "--height", "32",
                  "--min-duration", "2", "--max-duration", "3")
    cache = d / "ucf.h5"
    cli("featurize", clips, "--backbone", "resnet18", "--weights", "none", "--size", "32", "--fps", "2", "--out", cache,
        "-q")
    return clips, cache


CLASSES = ("ascending", "descending", "pingpong")


def clip(c, g):
    return f"{c}/v_{c}_g{g:02d}_c01"


def test_ucf101_split_puts_exactly_the_listed_clips_in_train_and_test(ucf, tmp_path):
    clips, cache = ucf
    assert sorted(p.suffix for p in clips.rglob("*.*")) == [".avi"] * 9
    lists = clips.parent / "ucfTrainTestlist"  # next to the source: found without --split-dir
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i} {c}\r\n" for i, c in enumerate(CLASSES, 1)))
    train = [clip(c, g) for c in CLASSES for g in (2, 3) if (c, g) != ("descending", 3)] + [clip("pingpong", 7)]
    test = [clip(c, 1) for c in CLASSES]
    (lists / "trainlist01.txt").write_text("".join(f"{v}.avi {CLASSES.index(v.split('/')[0]) + 1}\r\n" for v in train))
    (lists / "testlist01.txt").write_text("".join(f"{v}.avi\r\n" for v in test))
    r = cli("train", cache, "--out", tmp_path / "run", "--split", "ucf101:1", "--val-size", "0", "--epochs", "1",
            "--model", "gru", "--hidden", "8", "--no-plots")
    assert "1 listed video(s) are not in the cache, e.g. pingpong/v_pingpong_g07_c01" in r.output
    assert "1 cache segment(s) are in no part, e.g. descending/v_descending_g03_c01" in r.output
    split = predictions(tmp_path / "run")
    assert {i for i, s in split.items() if s == "train"} == set(train[:-1])
    assert {i for i, s in split.items() if s == "test"} == set(test)
    assert {i for i, s in split.items() if s == "unused"} == {clip("descending", 3)}
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["n_train"] == 5 and res["n_test"] == 3 and res["split_report"]["lists"] == str(lists)
    # the Dataset gives the same parts
    assert CacheDataset(cache, part="test", split="ucf101:1", val_size=0).ids == sorted(test)
    # a train list that names another class's index is refused with exit code 2, naming file and line
    (lists / "trainlist02.txt").write_text(f"{train[0]}.avi 3\n")
    (lists / "testlist02.txt").write_text(f"{test[0]}.avi\n")
    r = CliRunner().invoke(main, ["train", str(cache), "--out", str(tmp_path / "bad"), "--split", "ucf101:2"])
    assert r.exit_code == 2 and "trainlist02.txt line 1: class index 3 is pingpong" in r.output


def test_hmdb51_split_from_split_dir(ucf, tmp_path):
    clips, cache = ucf
    lists = tmp_path / "splits"
    lists.mkdir()
    for c in CLASSES:  # g01 test, g02 train, g03 unused
        (lists / f"{c}_test_split1.txt").write_text("".join(f"v_{c}_g{g:02d}_c01.avi {code} \n"
                                                            for g, code in ((1, 2), (2, 1), (3, 0))))
    cli("train", cache, "--out", tmp_path / "run", "--split", "hmdb51:1", "--split-dir", lists, "--val-size", "0",
        "--epochs", "1", "--model", "gru", "--hidden", "8", "--no-plots")
    split = predictions(tmp_path / "run")
    assert split == {clip(c, g): part for c in CLASSES for g, part in ((1, "test"), (2, "train"), (3, "unused"))}
    # sweep takes the same split options
    cli("sweep", cache, "--out", tmp_path / "sweep", "--split", "hmdb51:1", "--split-dir", lists, "--val-size", "0",
        "--epochs", "1", "--model", "gru,mlp", "--hidden", "8", "--plots", "false")
    with open(tmp_path / "sweep" / "leaderboard.csv") as fh:
        assert {row["status"] for row in csv.DictReader(fh)} == {"complete"}
    # and compare (here a cache with itself)
    cli("compare", cache, cache, "--out", tmp_path / "cmp", "--split", "hmdb51:1", "--split-dir", lists, "--seeds", "1",
        "--val-size", "0", "--epochs", "1", "--model", "gru", "--hidden", "8", "--plots", "false")
    assert predictions(tmp_path / "cmp" / "runs" / "A" / "gru" / "seed0") == split


def test_predefined_split_from_a_manifest_column(ucf, tmp_path):
    clips, _ = ucf
    manifest = tmp_path / "labels.csv"
    spelled = {1: "test", 2: "train", 3: "valid"}
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for c in CLASSES:
            for g in (1, 2, 3):
                w.writerow([clips / f"{clip(c, g)}.avi", c, spelled[g]])
    cache = tmp_path / "m.h5"
    cli("featurize", manifest, "--backbone", "resnet18", "--weights", "none", "--size", "32", "--fps", "2", "--out",
        cache, "-q")
    with h5py.File(cache, "r") as f:
        assert f.attrs["format_version"] == 2
        table = f["segments"][()]
        assert sorted(table["split"].tolist()) == sorted([b"test", b"train", b"val"] * 3)
    cli("train", cache, "--out", tmp_path / "run", "--split", "predefined", "--epochs", "1", "--model", "gru",
        "--hidden", "8", "--no-plots")
    split = predictions(tmp_path / "run")
    want = {"test": "test", "train": "train", "valid": "val"}
    assert split == {str(clips / f"{clip(c, g)}.avi"): want[spelled[g]] for c in CLASSES for g in (1, 2, 3)}


CONTAINERS = ("avi", "mkv", "webm", "mov")


def test_containers_and_codecs_featurize_exact_frames(tmp_path):
    """.avi (MPEG-4 Part 2, Xvid), .mkv (H.264), .webm (VP9), .mov (H.264): rendered with PyAV, decoded frames are
    exactly the expected ones (burned-in numbers); a codec FFmpeg lacks is named in the error."""
    rows = []
    for ext in CONTAINERS:
        clips = synth(tmp_path / ext, "--container", ext, "--burn-frame-numbers", "--clips", "1", "--groups", "1",
                      "--width", "64", "--height", "64", "--video-fps", "25", "--min-duration", "2", "--max-duration",
                      "2.6")
        rows += [(p, ext) for p in sorted(clips.rglob(f"*.{ext}"))]
    assert len(rows) == 3 * len(CONTAINERS)
    manifest = tmp_path / "all.csv"
    manifest.write_text("path,label,id\n" + "".join(f"{p},{p.parent.name},{ext}/{p.stem}\n" for p, ext in rows))
    cache = tmp_path / "all.h5"
    cli("featurize", manifest, "--size", "64", "--fps", "5", "--keep-frames", "--out", cache, "-q")
    c = read_cache(cache)
    with h5py.File(cache, "r") as f:
        frames = f["frames"][()]
    assert sorted(c.ids) == sorted(f"{ext}/{p.stem}" for p, ext in rows)
    for i, sid in enumerate(c.ids):
        o, n = c.segments["offset"][i], c.segments["length"][i]
        nf = int(c.segments["video_frames"][i])
        assert [read_frame_number(fr) for fr in frames[o:o + n]] == expected_indices(0.0, nf / 25, 5, 25, nf), sid
    # the same Xvid .avi with a FourCC no FFmpeg knows: refused before decoding, naming the codec
    avi = next(p for p, ext in rows if ext == "avi")
    data = avi.read_bytes()
    assert data.count(b"XVID")
    bad = tmp_path / "bad" / "x" / "v_x_g01_c01.avi"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(data.replace(b"XVID", b"ZZZZ"))
    r = CliRunner().invoke(main, ["featurize", str(tmp_path / "bad"), "--size", "32", "--out", str(tmp_path / "b.h5")])
    assert r.exit_code == 2, r.output
    assert "its video codec (FourCC ZZZZ) is unknown to this FFmpeg build" in r.output and "ffmpeg -i" in r.output
    assert np.all(np.isfinite(c.features.astype(np.float32)))
