"""A decode worker keeps a video's decoder open across its jobs (featurize/keep_open.py); torchcodec opens without a
scan where approximate seeking finds the exact frames; a GPU decoder's CPU fallback reaches the parent (issue 31,
items 4 and 5). The torchcodec tests run where torchcodec loads (skipped with the reason elsewhere)."""
import os
import queue
import types

import av
import numpy as np
import pytest

from featseq.featurize.decoder import DecodeError, frame_table, open_decoder, unavailable
from featseq.featurize.decoders.torchcodec_decoder import approximate_is_exact
from featseq.featurize.keep_open import OpenDecoders
from featseq.featurize.messages import DONE, decode_job
from featseq.featurize.worker_process import WorkerProcess


def grey_clip(path, pts, size=32):
    """H.264 frames of grey level 8 * k (k = 0, 1, ...) at the given timestamps (time base 1/30); returns path."""
    from fractions import Fraction

    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=30)
        st.width, st.height, st.pix_fmt = size, size, "yuv420p"
        st.time_base = Fraction(1, 30)
        st.codec_context.time_base = Fraction(1, 30)
        for k, p in enumerate(pts):
            f = av.VideoFrame.from_ndarray(np.full((size, size, 3), 8 * k, np.uint8), format="rgb24")
            f.pts, f.time_base = p, Fraction(1, 30)
            out.mux(st.encode(f))
        out.mux(st.encode())
    return str(path)


def levels(frames) -> list[int]:
    return [int(round(float(f.mean()) / 8)) for f in frames]


@pytest.fixture
def clips(tmp_path):
    return {"cfr": grey_clip(tmp_path / "cfr.mp4", range(24)),
            "offset": grey_clip(tmp_path / "offset.mp4", range(5, 29)),  # starts at 5/30 s: frame i is not at i/30
            "vfr": grey_clip(tmp_path / "vfr.mp4", [0, 1, 2, 4, 5, 7, 8, 9, 12, 13, 14, 16, 17, 18, 20, 22])}


def test_approximate_seeking_is_taken_only_where_every_frame_is_at_i_over_fps(clips):
    """torchcodec's approximate mode seeks frame i at i / header fps: exact for a constant rate starting at 0, not
    for a video that starts later or varies its rate, nor when the header lists fewer frames than the table."""
    cfr, offset, vfr = (frame_table(clips[k]) for k in ("cfr", "offset", "vfr"))
    assert approximate_is_exact(cfr, 30.0, len(cfr.starts))
    assert not approximate_is_exact(cfr, 30.0, len(cfr.starts) - 1)
    assert not approximate_is_exact(cfr, 29.97, len(cfr.starts))
    assert not approximate_is_exact(offset, 30.0, len(offset.starts))
    assert not approximate_is_exact(vfr, vfr.fps, 100)


def _torchcodec():
    if why := unavailable("torchcodec"):
        pytest.skip(why)


def test_torchcodec_opens_without_a_scan_where_exact_enough_and_decodes_the_tables_frames(clips):
    _torchcodec()
    from torchcodec.decoders import VideoDecoder

    idx = np.array([0, 3, 7, 8, 15])
    for name, mode in (("cfr", "approximate"), ("offset", "exact"), ("vfr", "exact")):
        dec = open_decoder(clips[name], size=32, backend="torchcodec")
        assert dec.seek_mode == mode, name
        assert levels(np.concatenate(list(dec.read(idx)))) == idx.tolist(), name
        assert dec.fallback == ""  # on the CPU there is nothing to fall back from
    # the check is not idle: approximate seeking would have returned other frames of the variable-rate video
    wrong = VideoDecoder(clips["vfr"], seek_mode="approximate").get_frames_at(idx.tolist()).data
    assert levels(wrong.permute(0, 2, 3, 1).numpy()) != idx.tolist()


def test_a_worker_reuses_a_videos_decoder_across_its_jobs_and_closes_it_after_a_failure(clips):
    w = WorkerProcess(None, None, "pyav", "cpu", queue_chunks=64, shared=False)
    jobs = [decode_job(k, clips["cfr"], a, b, 10.0, 16, "squash", 4) for k, (a, b) in enumerate([(0, 0.4), (0.3, 0.8)])]
    jobs.append(decode_job(2, clips["vfr"], 0, None, 10.0, 16, "squash", 4))
    jobs.append(decode_job(3, clips["cfr"], 0, None, 10.0, 16, "squash", 4))
    for job in jobs:
        w._decode(job)
    assert w.decoders.opened == 2  # one per video, not one per job
    done = [m for m in _drain(w.out) if m.kind == DONE]
    assert [m.key for m in done] == [0, 1, 2, 3] and all(m.fallback == "" for m in done)
    kept = w.decoders.open(clips["cfr"], 16, "squash")
    kept._chunks = lambda idx, chunk: iter([np.zeros((1, 3, 3, 3), np.uint8)])  # a decoder that breaks mid-job
    w.decoders.keep(kept)
    with pytest.raises(DecodeError, match="malformed"):
        w._decode(jobs[0])
    assert kept._c is None  # closed: its state after a failure is unknown
    w._decode(jobs[0])
    assert w.decoders.opened == 3
    w.decoders.close()


def test_the_kept_decoders_are_bounded_and_a_changed_file_gets_a_new_one(clips, tmp_path):
    kept = OpenDecoders("pyav", "cpu", capacity=2)
    decs = [kept.open(clips[k], 16, "squash") for k in ("cfr", "offset", "vfr")]
    for d in decs:
        kept.keep(d)
    assert decs[0]._c is None and decs[1]._c is not None  # the least recently used was closed
    assert kept.open(clips["vfr"], 16, "squash") is decs[2]
    assert kept.open(clips["vfr"], 32, "squash") is not decs[2]  # another size: another decoder
    kept.keep(decs[2])
    st = os.stat(clips["vfr"])
    os.utime(clips["vfr"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert kept.open(clips["vfr"], 16, "squash") is not decs[2]
    kept.close()
    assert decs[1]._c is None and decs[2]._c is None


def test_a_gpu_decoders_cpu_fallback_is_named_and_reaches_the_parent(clips, monkeypatch):
    """torchcodec's VideoDecoder.cpu_fallback (truthy once it fell back) becomes the decoder's ``fallback`` reason,
    and the worker's Done message carries it to the parent (whose warning and count are the next test)."""
    from featseq.featurize.decoders.torchcodec_decoder import TorchCodecDecoder

    class Status:  # torchcodec's CpuFallbackStatus, as 0.17 prints it
        def __init__(self, fell):
            self.fell = fell

        def __bool__(self):
            return self.fell

        def __str__(self):
            return ("[CUDA] Fallback status: Falling back due to: Video not supported" if self.fell
                    else "[CUDA] Fallback status: No fallback required")

    dec = TorchCodecDecoder.__new__(TorchCodecDecoder)
    dec._dev = types.SimpleNamespace(type="cuda")
    for status, why in ((Status(True), "Video not supported"), (Status(False), ""), (None, "")):
        dec._dec = types.SimpleNamespace(cpu_fallback=status) if status is not None else object()
        assert dec.fallback == why
    w = WorkerProcess(None, None, "pyav", "cpu", queue_chunks=64, shared=False)
    real = w.decoders.open

    def fell_back(*a):
        d = real(*a)
        d.fallback = "Video not supported"
        return d

    monkeypatch.setattr(w.decoders, "open", fell_back)
    w._decode(decode_job(0, clips["cfr"], 0, None, 10.0, 16, "squash", 4))
    assert [m.fallback for m in _drain(w.out) if m.kind == DONE] == ["Video not supported"]


def _drain(q: queue.Queue) -> list:
    out = []
    while not q.empty():
        out.append(q.get())
    return out


def test_featurize_warns_once_per_video_that_fell_back_and_counts_them(tmp_path):
    """The parent's side: a Done message with a fallback reason gives one warning per video, naming it and the
    reason, and FeaturizeResult.cpu_fallback (the summary line's count) holds each such video once."""
    import torch

    from featseq.featurize.config import FeaturizeConfig
    from featseq.featurize.messages import CHUNK, START, Chunk, Done, Start
    from featseq.featurize.pipeline import FeaturizeResult, _stream
    from featseq.featurize.sources import Segment

    segs = [Segment(f"s{k}", f"/v/{v}.mp4", "a", "g", float(k), k + 1.0) for k, v in enumerate("xxy")]
    info = {"duration": 10.0, "width": 8, "height": 8, "fps": 2.0, "n_frames": 20, "size_bytes": 1, "mtime": 0.0}
    why = {"x": "Video not supported", "y": ""}

    class Pool:
        def run(self, jobs, idle=None):
            for job in jobs:
                yield Start(START, job.key, info)
                yield Chunk(CHUNK, job.key, np.zeros((2, 4, 4, 3), np.uint8), np.array([0.0, 0.5]))
                yield Done(DONE, job.key, 2, why[job.path[3]])

    class Embed:
        device = torch.device("cpu")

        def submit(self, parts):
            return sum(len(p) for p in parts)

        def result(self, n):
            return np.zeros((n, 3), np.float32)

    class Writer:
        path, appended = str(tmp_path / "c.h5"), []

        def publish_due(self):
            pass

        def append(self, row, *a):
            self.appended.append(row["id"])

    logged: list[str] = []
    result = FeaturizeResult(path="c.h5", total=3, written=0, skipped_done=0)
    cfg = FeaturizeConfig(source="x", size=4, batch_size=2)
    _stream(cfg, Pool(), Writer(), Embed(), segs, result, None, logged.append, 0.0)
    assert Writer.appended == ["s0", "s1", "s2"]
    assert result.cpu_fallback == {"/v/x.mp4": "Video not supported"}
    warnings = [m for m in logged if m.startswith("warning:")]
    assert len(warnings) == 1 and "/v/x.mp4" in warnings[0] and "Video not supported" in warnings[0]
