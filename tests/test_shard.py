"""Featurize in shards (processes, torchrun ranks), merge the parts, resume a moved source."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featseq.cli import main
from helpers import CHILD_ENV, ROOT, featurize_cfg, published_segments, torchrun_cmd
from featseq.featurize import shard
from featseq.featurize.cache import read_cache
from featseq.featurize.pipeline import featurize

ENV = CHILD_ENV


def _cli(*args) -> list[str]:
    return [sys.executable, "-c", "from featseq.cli import main; main()", *args]


def _featurize_cmd(src, out, *extra) -> list[str]:
    return _cli("featurize", src, "--size", "32", "--fps", "6", "--device", "cpu", "--out", str(out), "-q", *extra)


def _same(a, b, exact=True):
    """Two caches hold the same segments: ids, labels, timestamps, features (exactly or within float16 noise)."""
    assert sorted(a.ids) == sorted(b.ids) and len(set(b.ids)) == len(b.ids)
    for i, sid in enumerate(a.ids):
        j = b.ids.index(sid)
        assert a.segments["label"][i] == b.segments["label"][j]
        fa, ta = a.segment(i)
        fb, tb = b.segment(j)
        assert np.array_equal(ta, tb), sid
        if exact:
            assert np.array_equal(fa, fb), sid
        else:
            assert np.allclose(fa.astype(np.float32), fb.astype(np.float32), atol=1e-2), sid


@pytest.fixture(scope="module")
def reference(synth_data, tmp_path_factory):
    """The source featurized by one process, the way every shard test featurizes it."""
    return read_cache(featurize(featurize_cfg(synth_data["clips_root"], tmp_path_factory.mktemp("ref") / "one.h5",
                                              shard=None)).path)


def test_assignment_is_a_balanced_partition_independent_of_row_order():
    rng = np.random.default_rng(0)
    frames = {f"seg{i:03d}": int(rng.integers(1, 400)) for i in range(60)}
    for n in range(1, 9):
        plan = shard.assign(frames, n)
        assert set(plan) == set(frames) and set(plan.values()) <= set(range(n))  # every segment in exactly one shard
        items = list(frames.items())
        rng.shuffle(items)
        assert shard.assign(dict(items), n) == plan  # the same plan whatever the row order
        load = [sum(f for s, f in frames.items() if plan[s] == k) for k in range(n)]
        assert max(load) - min(load) <= max(frames.values())  # greedy longest-first: within one segment


def test_shard_spec_from_the_flag_and_the_environment():
    assert shard.parse("1/4") == (1, 4) and shard.parse("none") is None and shard.parse(None) is None
    assert shard.parse("auto", {}) is None
    assert shard.parse("auto", {"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert shard.parse("auto", {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_COUNT": "4",
                                "SLURM_ARRAY_TASK_MIN": "10"}) == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            shard.parse(bad)
    assert shard.part_path("c/X.h5", 2, 5) == "c/X.part-2-of-5.h5"


def test_two_shards_one_killed_and_rerun_then_merged_equal_one_process(synth_data, reference, tmp_path):
    src, out = synth_data["clips_root"], tmp_path / "X.h5"
    p0 = subprocess.Popen(_featurize_cmd(src, out, "--shard", "0/2"), cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    slow = _featurize_cmd(src, out, "--shard", "1/2", "--batch-size", "4")  # one small batch at a time: killable
    # every segment published as it completes, so the kill lands between two of them
    p1 = subprocess.Popen(slow, cwd=ROOT, env={**ENV, "FEATSEQ_PUBLISH_SECONDS": "0"}, stderr=subprocess.PIPE, text=True)
    part1 = shard.part_path(str(out), 1, 2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p1.poll() is None and published_segments(part1) < 1:
        time.sleep(0.02)
    assert p1.poll() is None, "shard 1 finished before it could be killed"
    os.kill(p1.pid, signal.SIGKILL)
    p1.wait()
    assert p0.wait(timeout=120) == 0, p0.stderr.read()
    killed = len(read_cache(part1).ids)
    # merging now refuses: shard 1's segments are not all there, and the message names them
    r = CliRunner().invoke(main, ["cache", "merge", str(out)])
    assert r.exit_code == 2 and "segment(s) of the source are in no part" in r.output, r.output
    r1 = CliRunner().invoke(main, slow[3:])  # the rerun in this process: the kill is what needs a real one
    assert r1.exit_code == 0, r1.output
    assert f"{killed} already cached" in r1.output
    r = CliRunner().invoke(main, ["cache", "merge", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == str(out)
    merged = read_cache(out)
    assert len(merged) == len(reference) == len(read_cache(shard.part_path(str(out), 0, 2))) + len(read_cache(part1))
    _same(reference, merged, exact=False)
    for sid in read_cache(shard.part_path(str(out), 0, 2)).ids:  # the shard that ran through: bit for bit
        i, j = reference.ids.index(sid), merged.ids.index(sid)
        assert np.array_equal(reference.segment(i)[0], merged.segment(j)[0])
    # merging again is safe and changes nothing; a later featurize finds nothing to do
    r = CliRunner().invoke(main, ["cache", "merge", str(out)])
    assert r.exit_code == 0 and f"{len(merged)} already in" in r.output, r.output
    _same(merged, read_cache(out))
    again = featurize(featurize_cfg(src, out, shard=None))
    assert again.written == 0 and again.skipped_done == len(merged)


def test_merge_refuses_mixed_duplicated_and_missing_parts(synth_data, tmp_path):
    src = synth_data["clips_root"]
    a, b = str(tmp_path / "A.h5"), str(tmp_path / "B.h5")
    featurize(featurize_cfg(src, a, shard="0/2"))
    featurize(featurize_cfg(src, b, shard="0/2"))
    featurize(featurize_cfg(src, b, shard="1/2", size=48))
    a0, b0, b1 = shard.part_path(a, 0, 2), shard.part_path(b, 0, 2), shard.part_path(b, 1, 2)

    def refused(args, *needles):
        r = CliRunner().invoke(main, ["cache", "merge", *args])
        assert r.exit_code == 2, r.output
        for n in needles:
            assert n in r.output, r.output

    refused([str(tmp_path / "M.h5"), b0, b1], "size: 32 vs 48", b0, b1)
    refused([str(tmp_path / "M.h5"), a0, b0], "in two parts", a0, b0)
    refused([a], "shard(s) 1 of 2 have no part file", "in no part")
    r = CliRunner().invoke(main, ["cache", "merge", a, "--allow-missing"])
    assert r.exit_code == 0, r.output
    assert sorted(read_cache(a).ids) == sorted(read_cache(a0).ids)
    refused([str(tmp_path / "none.h5")], "no parts to merge")


def test_merge_of_parts_from_two_kinds_of_machine_names_the_precision(synth_data, tmp_path, monkeypatch):
    """Without --precision each shard takes auto's choice on its own machine: a part made on a bf16-native CPU and one
    made on an AVX2 CPU differ in precision, and merge refuses them, saying to pass --precision to every shard."""
    src, out = synth_data["clips_root"], str(tmp_path / "X.h5")
    for k, native in ((0, "0"), (1, "1")):
        monkeypatch.setenv("FEATSEQ_CPU_BF16", native)
        featurize(featurize_cfg(src, out, shard=f"{k}/2", size=16))
    r = CliRunner().invoke(main, ["cache", "merge", out])
    assert r.exit_code == 2, r.output
    assert "precision: 'fp32' vs 'bf16'" in r.output and "pass --precision to every shard" in r.output, r.output


def test_a_moved_source_folder_resumes(synth_data, tmp_path):
    src = tmp_path / "videos"
    shutil.copytree(synth_data["clips_root"], src)
    out = tmp_path / "c.h5"
    first = featurize(featurize_cfg(src, out, shard=None))
    before = read_cache(out)
    moved = tmp_path / "mounted" / "elsewhere"
    moved.parent.mkdir()
    shutil.move(str(src), moved)
    notes = []
    again = featurize(featurize_cfg(moved, out, shard=None), log=notes.append)
    assert again.written == 0 and again.skipped_done == first.written
    assert any("resuming it from" in n and str(moved.resolve()) in n for n in notes), notes
    _same(before, read_cache(out))


def test_torchrun_two_ranks_give_the_single_process_cache(synth_data, reference, tmp_path):
    out = tmp_path / "T.h5"
    cmd = torchrun_cmd(2, *_featurize_cmd(synth_data["clips_root"], out)[3:])
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "merged 2 parts" in r.stderr
    assert str(out) in r.stdout.splitlines()  # rank 0 prints the merged cache
    _same(reference, read_cache(out))  # same backbone, weights and precision on the CPU: bit for bit


def test_slurm_launcher_through_submitit_local_executor(synth_data, reference, tmp_path):
    """--slurm N submits an array of N shard jobs with submitit; without SLURM its local executor runs them as
    processes here, then the parts are merged."""
    pytest.importorskip("submitit", reason="the slurm extra (submitit) is not installed")
    out = tmp_path / "S.h5"
    r = CliRunner().invoke(main, ["featurize", synth_data["clips_root"], "--size", "32", "--fps", "6", "--device", "cpu",
                                  "--out", str(out), "--slurm", "2", "--slurm-logs", str(tmp_path / "logs"), "-q"])
    assert r.exit_code == 0, r.output
    assert "2 shard job(s) submitted (local)" in r.output and r.output.strip().splitlines()[-1] == str(out)
    assert sorted(Path(p).name for p in shard.find_parts(str(out))) == ["S.part-0-of-2.h5", "S.part-1-of-2.h5"]
    _same(reference, read_cache(out))


def test_shard_numbers_from_a_slurm_array_are_checked():
    with pytest.raises(ValueError, match="--array=0-2"):
        shard.from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"})
    assert shard.from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: the cache itself, no part


def test_merge_refuses_a_copy_that_does_not_read_back(synth_data, tmp_path, monkeypatch):
    """The verification compares every merged segment with its part; a damaged copy is never renamed into place."""
    out = str(tmp_path / "V.h5")
    for k in (0, 1):
        featurize(featurize_cfg(synth_data["clips_root"], out, shard=f"{k}/2"))
    real = shard._digest
    calls = []

    def flaky(x):  # the read-back of the third segment differs from what was written
        calls.append(1)
        return real(x) if len(calls) != 6 + 3 else "damaged"

    monkeypatch.setattr(shard, "_digest", flaky)
    with pytest.raises(ValueError, match="verification failed for 1 segment"):
        shard.merge(out)
    assert not os.path.exists(out) and len(shard.find_parts(out)) == 2
    monkeypatch.setattr(shard, "_digest", real)
    assert shard.merge(out).segments == 6


def test_iter_segments_reads_blocks_yet_gives_each_segment_its_own_rows(tmp_path):
    """featurize.cache.iter_segments (merge's reader): with blocks far smaller than the cache, every segment of a table
    in any row order comes back with exactly its features, timestamps and kept frames, in offset order; a segment
    longer than a block is read whole."""
    import h5py
    from featseq.featurize.cache import iter_segments, string_widths
    from featseq.featurize.writer import CacheWriter

    rng = np.random.default_rng(1)
    lengths = [3, 1, 40, 5, 2, 7]
    rows = [{"id": f"s{i}", "label": "a", "group": "g", "path": f"/v/{i}.mp4"} for i in range(len(lengths))]
    segs = {}
    with CacheWriter(str(tmp_path / "c.h5"), {"fps": 2.0}, {}, 4, string_widths(rows), frame_size=8) as w:
        for r, n in zip(rows, lengths):
            segs[r["id"]] = (rng.standard_normal((n, 4)).astype(np.float16), np.arange(n) / 2.0,
                             rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8))
            w.append({**r, "start": 0.0, "end": n / 2.0}, segs[r["id"]][0], segs[r["id"]][1], segs[r["id"]][2])
    with h5py.File(tmp_path / "c.h5", "r") as f:
        table = f["segments"][()][::-1]  # rows in reverse: the reader goes by offset
        row_bytes = 4 * 2 + 8 * 8 * 3
        got = list(iter_segments(f, table, frames=True, block_bytes=10 * row_bytes))
    assert [r["id"].decode() for r, *_ in got] == [r["id"] for r in rows]
    for r, feats, ts, frames in got:
        want = segs[r["id"].decode()]
        assert np.array_equal(feats, want[0]) and np.array_equal(ts, want[1]) and np.array_equal(frames, want[2])
