"""Faults, with real processes, real signals and real files: a full disk (RLIMIT_FSIZE), SIGTERM / SIGINT, changed
sources, bits that rot in a cache, features beyond float16, readers beside a running writer."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featseq.cli import main
from helpers import (CHILD_ENV, ROOT, alive, children, clip_folder, featurize_cfg, gone, published_segments, wait_for,
                     write_fake_cache)
from featseq.featurize.cache import read_cache
from featseq.featurize.verify import verify
from featseq.featurize.pipeline import featurize

ENV = {**CHILD_ENV, "OMP_NUM_THREADS": "1"}


def _limit(nbytes):
    def pre():  # in the child: a write past nbytes fails with EFBIG instead of killing it (SIGXFSZ ignored)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return pre


def featseq(*args, limit=None, timeout=300):
    """Run the featseq CLI in a real process (under a file-size limit when given)."""
    return subprocess.run([sys.executable, "-c", "from featseq.cli import main; main()", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=_limit(limit) if limit else None)


def rerun(*args):
    """The featseq CLI in this process (click's CliRunner), as a CompletedProcess: for the reruns that finish what a
    fault stopped, where neither a signal nor a file-size limit is involved (it spares each a process start, the
    torch import). An exception that escapes the command is in stderr with its traceback."""
    import traceback

    r = CliRunner().invoke(main, [str(a) for a in args])
    escaped = r.exc_info and not isinstance(r.exception, SystemExit)
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout,
                                       r.stderr + ("".join(traceback.format_exception(*r.exc_info)) if escaped else ""))


def start(*args):
    return subprocess.Popen([sys.executable, "-c", "from featseq.cli import main; main()", *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def same_features(a, b):
    """Every segment of cache a is in cache b with the same features."""
    ca, cb = read_cache(a), read_cache(b)
    for i, sid in enumerate(ca.ids):
        assert np.array_equal(ca.segment(i)[0], cb.segment(cb.ids.index(sid))[0]), sid


@pytest.fixture(scope="module")
def ref(synth_data, tmp_path_factory):
    """The synthetic clips featurized whole at 96 px with frames kept (a few MB): what every faulty run must end as."""
    d = tmp_path_factory.mktemp("faults")
    res = featurize(featurize_cfg(synth_data["clips_root"], d / "ref.h5", size=96, keep_frames=True, batch_size=8))
    assert res.written == 6
    return {"cache": res.path, "dir": d, "src": synth_data["clips_root"]}


# ---------------------------------------------------------------- 1. a full disk

def test_featurize_on_a_full_disk_stops_clearly_keeps_segments_and_resumes(ref, tmp_path):
    out = tmp_path / "x.h5"
    args = ["featurize", ref["src"], "--size", 96, "--keep-frames", "--batch-size", 8, "--device", "cpu", "--out", out, "-q"]
    r = featseq(*args, limit=int(os.path.getsize(ref["cache"]) * 0.85))
    assert r.returncode == 2, r.stderr
    assert f"error: {out}:" in r.stderr and "ulimit -f" in r.stderr and "rerun the same command" in r.stderr
    assert "Traceback" not in r.stderr
    assert not Path(str(out) + ".lock").exists()
    kept = read_cache(out)
    assert 1 <= len(kept) < 6
    same_features(out, ref["cache"])  # every published segment intact
    assert verify(out).ok
    r = rerun(*args)  # space freed: the rerun completes
    assert r.returncode == 0, r.stderr
    assert f"{6 - len(kept)} segment(s) written, {len(kept)} already cached" in r.stderr
    assert len(read_cache(out)) == 6
    same_features(ref["cache"], out)


def test_train_and_sweep_on_a_full_disk_leave_no_complete_looking_run(tmp_path):
    cache = write_fake_cache(tmp_path / "c.h5", ["a", "b", "c"] * 8, groups=[f"g{i % 4}" for i in range(24)], dim=8)
    run = tmp_path / "run"
    args = ["train", cache, "--out", run, "--model", "gru", "--hidden", 16, "--epochs", 2, "--seq-len", 6, "--device", "cpu"]
    r = featseq(*args, limit=20_000)  # the plots and the checkpoint do not fit
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: {run}" in r.stderr and "writing failed: File too large" in r.stderr
    assert "not a complete run" in r.stderr and not (run / "results.json").exists()
    r = rerun(*args)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "results.json").read_text())["status"] == "complete"

    sweep = tmp_path / "sweep"
    args = ["sweep", cache, "--out", sweep, "--model", "gru,conv1d", "--hidden", 16, "--epochs", 2, "--seq-len", 6,
            "--device", "cpu", "-q"]
    r = featseq(*args, limit=20_000)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "writing failed: File too large" in r.stderr
    assert not list(sweep.glob("*/results.json"))
    r = rerun(*args)
    assert r.returncode == 0, r.stderr
    assert sorted(p.parent.name for p in sweep.glob("*/results.json")) == ["model=conv1d", "model=gru"]
    board = (sweep / "leaderboard.csv").read_text()
    assert board.count(",complete,") == 2 and ",error," not in board


@pytest.fixture(scope="module")
def small_ft(tmp_path_factory):
    """12 synthetic 32 px clips at 2 fps with frames kept, and a GRU run on them to fine-tune from."""
    from featseq.featurize.synth import render_dataset
    from featseq.sequence.train import TrainConfig, train

    d = tmp_path_factory.mktemp("ftfault")
    src = render_dataset(d / "v", clips_per_class_per_group=2, groups=2, width=32, height=32, duration=(5, 6),
                         long_videos=0, seed=5)["clips_root"]
    cache = featurize(featurize_cfg(src, d / "f.h5", fps=2.0, keep_frames=True)).path
    plain = featurize(featurize_cfg(src, d / "plain.h5", fps=2.0)).path
    train(TrainConfig(cache=cache, out=str(d / "run"), model="gru", hidden=16, split="random", epochs=2, seq_len=8,
                      plots=False, device="cpu"))
    return {"cache": cache, "plain": plain, "run": str(d / "run"), "src": src}


def test_finetune_on_a_full_disk_then_resumes(small_ft, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", small_ft["cache"], "--from", small_ft["run"], "--out", out, "--epochs", 2, "--batch-size", 4,
            "--device", "cpu", "--no-plots", "-q"]
    r = featseq(*args, limit=1_000_000)  # last.pt (the trunk and its optimizer) does not fit
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "last.pt: writing failed: File too large" in r.stderr and not (out / "results.json").exists()
    r = rerun(*args)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "results.json").read_text())["status"] == "complete"


# ---------------------------------------------------------------- 2. SIGTERM and SIGINT

def test_sigterm_stops_featurize_publishes_releases_and_resumes(ref, tmp_path):
    out = tmp_path / "t.h5"
    args = ["featurize", ref["src"], "--size", 96, "--keep-frames", "--batch-size", 4, "--decode-workers", 2,
            "--device", "cpu", "--out", out, "-q"]
    p = start(*args)
    assert wait_for(lambda: published_segments(out) >= 2, proc=p)
    workers = children(p.pid)
    assert len(workers) >= 2  # the decode workers
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)  # it stops: a hang fails here
    assert p.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert gone(workers), [Path(f'/proc/{w}/cmdline').read_text() for w in workers if alive(w)]
    assert not [b for w in workers for b in Path("/dev/shm").glob(f"featseq_{w}_*")]  # no shared frame block left
    assert not Path(str(out) + ".lock").exists()
    with h5py.File(out, "r") as f:  # closed cleanly: plain h5py opens it
        n = len(f["segments"])
    assert 2 <= n <= 6
    same_features(out, ref["cache"])
    r = rerun(*args)
    assert r.returncode == 0 and f"{6 - n} segment(s) written, {n} already cached" in r.stderr, r.stderr
    same_features(ref["cache"], out)


def test_sigint_stops_a_sweep_and_its_workers_and_the_rerun_finishes(tmp_path):
    cache = write_fake_cache(tmp_path / "c.h5", ["a", "b", "c"] * 40, groups=[f"g{i % 4}" for i in range(120)], dim=64)
    out = tmp_path / "s"
    args = ["sweep", cache, "--out", out, "--model", "gru,lstm,rnn,conv1d", "--hidden", 64, "--epochs", 400,
            "--patience", 400, "--seq-len", 30, "--jobs", 2, "--device", "cpu", "-q"]
    p = start(*args)
    assert wait_for(lambda: len(list(out.glob("*/config.json"))) >= 2, timeout=180, proc=p)
    workers = children(p.pid)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "stopped by SIGINT" in err
    assert workers and gone(workers)
    assert not list(out.glob("*/results.json"))  # nothing half-trained looks complete
    # other epochs: new variants; trained here (--jobs 1), as the two spawned workers of the stopped sweep were what
    # was under test, not the rerun's (this spares two torch imports)
    r = rerun("sweep", cache, "--out", out, "--model", "gru,lstm,rnn,conv1d", "--hidden", 64, "--epochs", 2,
              "--patience", 2, "--seq-len", 30, "--jobs", 1, "--device", "cpu", "--plots", "false", "-q")
    assert r.returncode == 0, r.stderr
    board = (out / "leaderboard.csv").read_text()
    assert board.count(",complete,") == 4, board
    assert not list(out.glob("study.lock"))


def test_sigterm_stops_finetune_and_resume_finishes(small_ft, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", small_ft["plain"], "--from", small_ft["run"], "--out", out, "--epochs", 200, "--batch-size", 2,
            "--device", "cpu", "--no-plots"]
    p = start(*args)  # a cache without frames: a decode worker decodes them while it trains
    assert wait_for(lambda: (out / "last.pt").exists(), timeout=240, proc=p)
    workers = children(p.pid)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)  # it stops: a hang fails here
    assert p.returncode == 143, err
    assert gone(workers), [Path(f'/proc/{w}/cmdline').read_text() for w in workers if alive(w)]
    assert not (out / "results.json").exists()
    r = rerun(*[a if a != 200 else 2 for a in args], "--resume")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "results.json").read_text())["status"] == "complete"


def test_sigterm_stops_predict_and_its_cache_resumes(small_ft, ref, tmp_path):
    videos = sorted(str(p) for p in Path(ref["src"]).glob("*/*.mp4"))
    long = shutil.copy(videos[0], tmp_path / "long.mp4")
    keep = tmp_path / "p.h5"
    args = ["predict", small_ft["run"], *videos, long, "--cache", keep, "--device", "cpu", "--batch-size", 2,
            "--out", tmp_path / "P", "--no-plots"]
    p = start(*args)
    assert wait_for(lambda: published_segments(keep) >= 1, proc=p, timeout=180)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143, err
    assert not Path(str(keep) + ".lock").exists()
    r = rerun(*args)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "P" / "predictions.csv").read_text().splitlines()) == len(videos) + 2


# ---------------------------------------------------------------- 3. changed sources

def test_a_changed_video_is_refused_then_refreshed(synth_data, tmp_path):
    clips = synth_data["clips"]
    src = clip_folder(clips[:3], tmp_path / "src")
    out = tmp_path / "x.h5"
    first = featurize(featurize_cfg(src, out))
    assert first.written == 3
    before = read_cache(out)
    victim = next(src.glob("*/*.mp4"))
    shutil.copy(clips[4]["path"], victim)  # another video under the same name
    r = CliRunner().invoke(main, ["featurize", str(src), "--size", "32", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 2, r.output
    sid = f"{victim.parent.name}/{victim.stem}"
    assert "1 cached segment(s) have videos that changed" in r.output and sid in r.output and "--refresh" in r.output
    assert np.array_equal(read_cache(out).features, before.features)  # refused: nothing changed
    v = verify(out, sources=True)
    assert not v.ok and any(sid in p and "changed" in p for p in v.problems)
    r = CliRunner().invoke(main, ["featurize", str(src), "--size", "32", "--device", "cpu", "--out", str(out), "--refresh"])
    assert r.exit_code == 0, r.output
    assert "1 segment(s) written, 2 already cached" in r.output
    after = read_cache(out)
    fresh = read_cache(featurize(featurize_cfg(clips[4]["path"].rsplit("/", 2)[0], tmp_path / "fresh.h5")).path)
    new = after.segment(after.ids.index(sid))[0]
    assert np.array_equal(new, fresh.segment(fresh.ids.index(f"{clips[4]['label']}/{Path(clips[4]['path']).stem}"))[0])
    for i, s in enumerate(before.ids):  # the others kept
        if s != sid:
            assert np.array_equal(before.segment(i)[0], after.segment(after.ids.index(s))[0])
    assert verify(out, sources=True).ok


# ---------------------------------------------------------------- 4. cache verify

def test_verify_names_flipped_bytes_nan_and_a_broken_table(ref, tmp_path):
    good = ref["cache"]
    r = CliRunner().invoke(main, ["cache", "verify", good, "--sources"])
    assert r.exit_code == 0 and "OK" in r.output and "with checksums" in r.output, r.output
    cache = read_cache(good)
    bad = tmp_path / "rot.h5"
    shutil.copy(good, bad)
    with h5py.File(bad, "r") as f:
        d = f["features"]
        assert d.fletcher32 and f["timestamps"].fletcher32 and f["segments"].fletcher32
        info = d.id.get_chunk_info(0)
        chunk_rows = min(d.chunks[0], d.shape[0])  # the rows chunk 0 holds (a small cache fits in one chunk)
    assert info.size > 1003  # the bytes below lie inside chunk 0
    with open(bad, "r+b") as fh:  # rot a few bits inside the first chunk of features
        fh.seek(info.byte_offset + 1000)
        b = bytearray(fh.read(3))
        fh.seek(info.byte_offset + 1000)
        fh.write(bytes(x ^ 0x5A for x in b))
    r = CliRunner().invoke(main, ["cache", "verify", str(bad)])
    assert r.exit_code == 1, r.output
    # exactly chunk 0's rows are named, with every segment that has a row in it (and no other)
    s = cache.segments
    hit = [cache.ids[i] for i in range(len(cache)) if s["offset"][i] < chunk_rows and s["length"][i] > 0]
    assert hit
    assert (f"/features rows 0-{chunk_rows - 1}: unreadable (checksum or read error), segment(s) "
            f"{', '.join(repr(x) for x in sorted(hit))};") in r.output, r.output
    assert r.output.count("/features rows") == 1 and "/timestamps rows" not in r.output

    nan = tmp_path / "nan.h5"
    shutil.copy(good, nan)
    o = int(cache.segments["offset"][2])
    with h5py.File(nan, "a") as f:
        f["features"][o + 1, 7] = np.nan
        f["features"][o + 2, 0] = np.inf
        seg = f["segments"][()]
        seg["id"][4] = seg["id"][3]  # a duplicate id
        seg["offset"][5] += 1       # a gap
        f["segments"][...] = seg
        f["timestamps"][o] = f["timestamps"][o + 3]  # time goes back
    v = verify(nan)
    text = "\n".join(v.problems)
    assert f"segment {cache.ids[2]!r}: 2 feature row(s) with NaN or Inf" in text
    assert f"segment {cache.ids[3]!r}: duplicate id" in text
    assert f"segment {cache.ids[5]!r}: offset" in text and "not contiguous" in text
    assert f"segment {cache.ids[2]!r}: timestamps decrease" in text


# ---------------------------------------------------------------- 5. float16 overflow

def test_features_beyond_float16_stop_the_run_with_the_fix(synth_data, tmp_path):
    import torchvision

    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd["layer4.1.bn2.weight"] = torch.full_like(sd["layer4.1.bn2.weight"], 1e6)  # activations far beyond 65504
    sd["layer4.1.bn2.bias"] = torch.full_like(sd["layer4.1.bn2.bias"], 1e5)

    weights = tmp_path / "loud.pth"
    torch.save(sd, weights)
    out = tmp_path / "x.h5"
    r = CliRunner().invoke(main, ["featurize", synth_data["clips_root"], "--size", "32", "--device", "cpu",
                                  "--weights", str(weights), "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert "beyond float16's range (+-65504)" in r.output and "--dtype float32" in r.output
    assert published_segments(out) == 0  # nothing inf written
    ok = featurize(featurize_cfg(synth_data["clips_root"], tmp_path / "f32.h5", weights=str(weights), dtype="float32"))
    feats = read_cache(ok.path).features
    assert np.isfinite(feats).all() and np.abs(feats).max() > 65504


# ---------------------------------------------------------------- 6. readers beside a writer

def test_train_info_and_compare_read_only_published_segments_while_featurize_appends(small_ft, synth_data, tmp_path):
    """While featurize appends to a cache, cache info, read_cache, train and compare read it: each sees segments
    featurize had published, in the order it published them, with exactly the features the finished cache holds."""
    import csv

    from featseq.sequence.compare import CompareConfig, compare
    from featseq.sequence.train import TrainConfig, train

    base = featurize(featurize_cfg(small_ft["src"], tmp_path / "base.h5", size=96, keep_frames=True, batch_size=8)).path
    out = tmp_path / "grow.h5"
    shutil.copy(base, out)  # 12 clips; the long video's segments are appended by a running featurize
    p = start("featurize", synth_data["long_csv"], "--size", 96, "--keep-frames", "--batch-size", 2, "--fps", 6,
              "--device", "cpu", "--out", out, "-q")
    seen, during = [], 0  # (segments cache info counted, the cache read, train's segment ids, compare's result)
    try:
        assert wait_for(lambda: published_segments(out) >= 12, proc=p, timeout=180)
        while p.poll() is None and during < 3:
            r = CliRunner().invoke(main, ["cache", "info", str(out), "--json"])
            assert r.exit_code == 0, r.output
            info = json.loads(r.output)
            c = read_cache(out)
            assert len(c) >= info["segments"] >= 12 and c.features.shape[0] == int(c.segments["length"].sum())
            assert np.isfinite(c.features.astype(np.float32)).all() and len(set(c.ids)) == len(c)
            res = train(TrainConfig(cache=str(out), out=str(tmp_path / f"run{during}"), model="mlp", epochs=1,
                                    seq_len=4, split="random", plots=False, device="cpu"))
            with open(tmp_path / f"run{during}" / "predictions.csv", newline="") as fh:
                trained = [row["id"] for row in csv.DictReader(fh)]
            assert res["n_train"] + res["n_val"] + res["n_test"] == len(trained) >= len(c)
            cmp = compare(CompareConfig(cache_a=str(out), cache_b=base, out=str(tmp_path / f"cmp{during}"),
                                        grid={"model": ["mlp"], "epochs": [1], "seq_len": [4]}, seeds=1, plots=False))
            seen.append((info["segments"], c, trained, cmp))
            during += p.poll() is None
    finally:
        _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert during >= 1, "featurize finished before a reader ran beside it; make it slower"
    long_rows = len(Path(synth_data["long_csv"]).read_text().strip().splitlines()) - 1
    final = read_cache(out)
    assert verify(out).ok and len(final) == 12 + long_rows
    for segments, c, trained, cmp in seen:
        assert c.ids == final.ids[:len(c)]  # what was published then, in the order it was published
        for i in range(len(c)):
            assert np.array_equal(c.segment(i)[0], final.segment(i)[0]), c.ids[i]
            assert np.array_equal(c.segment(i)[1], final.segment(i)[1]), c.ids[i]
        assert set(trained) == set(final.ids[:len(trained)])  # train read published segments only
        assert 12 <= segments <= cmp["cache_a"]["segments"] <= len(final)
        # compare matched the 12 base clips, whose features the growing cache holds unchanged
        assert cmp["common_segments"] == 12 and cmp["similarity"]["min_cosine"] == pytest.approx(1.0, abs=1e-6)
