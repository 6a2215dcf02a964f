"""Feeding the CNN: decode-only frames/s per decoder backend x source x sampling fps x decode workers, the pipeline
against that ceiling (featurize with a negligible CNN, same workers), and how many workers are fastest when the CNN
shares the CPU (the CPU default of --decode-workers). The pipeline's own cost is measured with the CNN and its
preprocessing replaced by a stand-in that costs nothing (a proxy for a GPU that embeds faster than the CPU decodes).

    .venv/bin/python bench/decode_bench.py [--quick]

Sources: the Gingerbread clips of P01 to P04 (32; 224 px, 30 fps; synthetic 224 px clips without ../shared) and a synthetic 1280x720
30 fps H.264 video cut into 4 segments of 15 s (simple content: faster to decode than camera footage).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import GINGERBREAD, median, save  # noqa: E402
from bench.featurize_bench import long_video  # noqa: E402
from featseq.featurize import backbones as bb  # noqa: E402
from featseq.featurize.decoder import BACKENDS, unavailable  # noqa: E402
from featseq.featurize.pipeline import FeaturizeConfig, featurize  # noqa: E402
from featseq.featurize.worker import DecodePool, decode_job  # noqa: E402


def sources(tmp: Path, quick: bool) -> dict[str, list[tuple]]:
    """name -> segments (path, start, end)."""
    if GINGERBREAD.is_dir():
        clips = [str(p) for p in sorted(GINGERBREAD.glob("P0[1-4]/music*.mp4"))][: 6 if quick else 32]
        small = "gingerbread 224px"
    else:
        from featseq.featurize.synth import render_dataset

        r = render_dataset(tmp / "synth", clips_per_class_per_group=3, groups=4, width=224, height=224,
                           duration=(28, 32), long_videos=0)
        clips, small = [c["path"] for c in r["clips"]][: 6 if quick else 32], "synthetic 224px"
    hd = tmp / "hd720.mp4"
    minutes = 0.25 if quick else 1.0
    long_video(hd, minutes, video_fps=30)
    cut = minutes * 60 / 4
    return {small: [(p, 0.0, None) for p in clips], "synthetic 1280x720": [(str(hd), k * cut, (k + 1) * cut) for k in range(4)]}


def in_turn(measures: dict, repeats: int) -> dict:
    """The median of each measure (a callable returning a number or a tuple of numbers), the measures taken in turn,
    one pass each per round, after a warm-up round. Taken in turn rather than one after another, a slow spell of
    this shared machine hits them alike, so their ratios hold."""
    got: dict = {k: [] for k in measures}
    for r in range(repeats + 1):
        for k, m in measures.items():
            v = m()
            if r:
                got[k].append(v)
    return {k: tuple(median(c) for c in zip(*v)) if isinstance(v[0], tuple) else median(v) for k, v in got.items()}


def pool_pass(pool: DecodePool, segments, fps: float, size: int) -> tuple[float, float]:
    """One pass of ``segments`` through the pool's workers: (frames/s delivered to this process, this process's CPU
    milliseconds per 1000 frames received)."""
    jobs = [decode_job(i, p, s, e, fps, size, "squash", 64) for i, (p, s, e) in enumerate(segments)]
    c, t = time.process_time(), time.perf_counter()
    n = sum(len(m[2]) for m in pool.run(jobs) if m[0] == "chunk")
    return n / (time.perf_counter() - t), (time.process_time() - c) / n * 1e6


def _plain(segments, fps: float, size: int) -> int:
    """Decode ``segments`` in this process with pyav, no worker pool: the frames delivered."""
    from featseq.featurize.decoder import open_decoder
    from featseq.featurize.sampling import plan_segment

    n = 0
    for p, s, e in segments:
        d = open_decoder(p, size=size, policy="squash", backend="pyav")
        for frames in d.read(plan_segment(d.frame_starts, d.info.duration, s, e, fps).indices, 64):
            n += len(frames)
        d.close()
    return n


@contextlib.contextmanager
def plain_processes(procs: int):
    """The machine's own yardstick, without featseq's pool: a pass function decoding the segments in ``procs``
    plain processes, each taking every procs-th segment in a loop; it returns frames/s."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as ex:
        def one_pass(segments, fps: float, size: int) -> float:
            t = time.perf_counter()
            n = sum(ex.map(_plain, [segments[k::procs] for k in range(procs)], [fps] * procs, [size] * procs))
            return n / (time.perf_counter() - t)

        yield one_pass


def manifest(tmp: Path, name: str, segments) -> str:
    m = tmp / f"{name.replace(' ', '_')}.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "start", "end", "id"])
        for i, (p, s, e) in enumerate(segments):
            w.writerow([p, "x", s, "" if e is None else e, f"s{i:03d}"])
    return str(m)


class NegligibleEmbedder(bb.Embedder):
    """A stand-in for a GPU that embeds faster than the CPU decodes: no preprocessing, no CNN; each frame's first
    pixel repeated to the backbone's feature width (a narrower array would make h5py broadcast row by row, a cost
    the real pipeline does not have), so what featurize measures with it is the pipeline's own cost on the host."""

    def __call__(self, frames):
        import numpy as np

        first = frames.reshape(len(frames), -1)[:, :1].astype("float32")
        return np.repeat(first, self.backbone.entry.feature_dim, axis=1)

    def submit(self, frames):
        import numpy as np

        return self(np.concatenate(frames) if isinstance(frames, list) else frames)  # the pipeline hands its chunks


@contextlib.contextmanager
def negligible_cnn():
    """featurize with :class:`NegligibleEmbedder` (the cache still records resnet18's spec: bench files only)."""
    real = bb.Embedder
    bb.Embedder = NegligibleEmbedder
    try:
        yield
    finally:
        bb.Embedder = real


def featurize_once(source: str, tmp: Path, fps: float, size: int, workers: int, precision: str | None = None,
                   batch: int = 64) -> float:
    """Frames/s of one whole decode -> CNN -> HDF5 stream into a new cache (validation and model building excluded)."""
    out = tempfile.mktemp(suffix=".h5", dir=tmp)
    res = featurize(FeaturizeConfig(source=source, backbone="resnet18", weights="none", size=size, fps=fps,
                                    device="cpu", precision=precision, decode_workers=workers, batch_size=batch,
                                    out=out, shard=None))
    os.unlink(out)
    return res.frames / res.stream_seconds


def main(quick: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="featseq-decode-"))
    repeats = 1 if quick else 5
    srcs = sources(tmp, quick)
    installed = [b for b in BACKENDS if not unavailable(b)]
    rows = []
    for name, segs in srcs.items():
        for backend in installed:
            for fps in (1.0, 6.0):
                with DecodePool(workers=1, decoder=backend) as one, DecodePool(workers=2, decoder=backend) as two:
                    got = in_turn({w: (lambda p=p: pool_pass(p, segs, fps, 224)[0]) for w, p in ((1, one), (2, two))},
                                  repeats)
                r = {"source": name, "backend": backend, "fps": fps, "size": 224,
                     "workers_1": round(got[1], 1), "workers_2": round(got[2], 1), "speedup": round(got[2] / got[1], 2)}
                rows.append(r)
                print(r, flush=True)
    name, segs = next(iter(srcs.items()))
    # how frames reach the parent, and what two processes gain on this machine without featseq in the way
    transport = []
    for fps in (1.0, 6.0):
        with DecodePool(workers=2) as shm, DecodePool(workers=2, shared_memory=False) as pipe, \
                plain_processes(1) as plain1, plain_processes(2) as plain2:
            got = in_turn({"shm": lambda: pool_pass(shm, segs, fps, 224), "pipe": lambda: pool_pass(pipe, segs, fps, 224),
                           "plain_1": lambda: plain1(segs, fps, 224), "plain_2": lambda: plain2(segs, fps, 224)}, repeats)
        r = {"source": name, "fps": fps, "shm_fps": round(got["shm"][0], 1), "shm_parent_cpu_ms": round(got["shm"][1], 1),
             "pipe_fps": round(got["pipe"][0], 1), "pipe_parent_cpu_ms": round(got["pipe"][1], 1),
             "plain_1": round(got["plain_1"], 1), "plain_2": round(got["plain_2"], 1),
             "plain_speedup": round(got["plain_2"] / got["plain_1"], 2)}
        transport.append(r)
        print(r, flush=True)
    # the pipeline against its decode ceiling: a negligible CNN, the default decoder, the same workers, 224 px;
    # featurize starts its own workers each run (and probes with them first), the ceiling's pool stays up
    src = manifest(tmp, name, segs)
    pipe = []
    for fps in (1.0, 6.0):
        for w in (1, 2):
            with DecodePool(workers=w) as pool, negligible_cnn():
                got = in_turn({"ceiling": lambda: pool_pass(pool, segs, fps, 224)[0],
                               "featurize": lambda: featurize_once(src, tmp, fps, 224, w)}, repeats)
            pipe.append({"source": name, "fps": fps, "workers": w, "decode_only_fps": round(got["ceiling"], 1),
                         "featurize_fps": round(got["featurize"], 1), "ratio": round(got["featurize"] / got["ceiling"], 3)})
            print(pipe[-1], flush=True)
    # the CPU default: resnet18 at 224 px on the CPU (precision auto) with 1 and 2 decode workers
    got = in_turn({w: (lambda w=w: featurize_once(src, tmp, 1.0, 224, w, precision="auto")) for w in (1, 2)}, repeats)
    shared = [{"backbone": "resnet18", "size": 224, "precision": "auto", "fps": 1.0, "workers": w,
               "featurize_fps": round(got[w], 1)} for w in (1, 2)]
    print(shared, flush=True)
    data = {"decode": rows, "transport": transport, "pipeline": pipe, "cnn_shares_cpu": shared, "installed": installed,
            "sources": {k: len(v) for k, v in srcs.items()}}
    save("decode", data)
    return data


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
