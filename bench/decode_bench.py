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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import GINGERBREAD, median, save  # noqa: E402
from bench.featurize_bench import long_video  # noqa: E402
from featurize import backbones as bb  # noqa: E402
from featurize.decoder import BACKENDS, unavailable  # noqa: E402
from featurize.pipeline import FeaturizeConfig, featurize  # noqa: E402
from featurize.worker import DecodePool, decode_job  # noqa: E402


def sources(tmp: Path, quick: bool) -> dict[str, list[tuple]]:
    """name -> segments (path, start, end)."""
    if GINGERBREAD.is_dir():
        clips = [str(p) for p in sorted(GINGERBREAD.glob("P0[1-4]/music*.mp4"))][: 6 if quick else 32]
        small = "gingerbread 224px"
    else:
        from featurize.synth import render_dataset

        r = render_dataset(tmp / "synth", clips_per_class_per_group=3, groups=4, width=224, height=224,
                           duration=(28, 32), long_videos=0)
        clips, small = [c["path"] for c in r["clips"]][: 6 if quick else 32], "synthetic 224px"
    hd = tmp / "hd720.mp4"
    minutes = 0.25 if quick else 1.0
    long_video(hd, minutes, video_fps=30)
    cut = minutes * 60 / 4
    return {small: [(p, 0.0, None) for p in clips], "synthetic 1280x720": [(str(hd), k * cut, (k + 1) * cut) for k in range(4)]}


def decode_only(segments, fps: float, size: int, backend: str, workers: int, repeats: int,
                shared_memory: bool = True) -> float:
    """Frames/s delivered by the decode workers to this process (workers started and warmed up first)."""
    return decode_only_cpu(segments, fps, size, backend, workers, repeats, shared_memory)[0]


def decode_only_cpu(segments, fps: float, size: int, backend: str, workers: int, repeats: int,
                    shared_memory: bool = True) -> tuple[float, float]:
    """(frames/s delivered, this process's CPU seconds per 1000 frames received), medians over the repeats."""
    rates, cpu = [], []
    with DecodePool(workers=workers, decoder=backend, shared_memory=shared_memory) as pool:
        for r in range(repeats + 1):  # the first pass is the warm-up
            jobs = [decode_job(i, p, s, e, fps, size, "squash", 64) for i, (p, s, e) in enumerate(segments)]
            c, t = time.process_time(), time.perf_counter()
            n = sum(len(m[2]) for m in pool.run(jobs) if m[0] == "chunk")
            if r:
                rates.append(n / (time.perf_counter() - t))
                cpu.append((time.process_time() - c) / n * 1e6)  # ms per 1000 frames
    return median(rates), median(cpu)


def _plain(segments, fps: float, size: int) -> int:
    """Decode ``segments`` in this process with pyav, no worker pool: the frames delivered."""
    from featurize.decoder import open_decoder
    from featurize.sampling import plan_segment

    n = 0
    for p, s, e in segments:
        d = open_decoder(p, size=size, policy="squash", backend="pyav")
        for frames in d.read(plan_segment(d.frame_starts, d.info.duration, s, e, fps).indices, 64):
            n += len(frames)
        d.close()
    return n


def plain_processes(segments, fps: float, size: int, procs: int, repeats: int) -> float:
    """The machine's own scaling, without featseq's pool: frames/s of ``procs`` plain processes each decoding
    every procs-th segment in a loop (processes started and warmed up first)."""
    from concurrent.futures import ProcessPoolExecutor

    parts = [segments[k::procs] for k in range(procs)]
    rates = []
    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as ex:
        for r in range(repeats + 1):
            t = time.perf_counter()
            n = sum(ex.map(_plain, parts, [fps] * procs, [size] * procs))
            if r:
                rates.append(n / (time.perf_counter() - t))
    return median(rates)


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
        return self(frames)


@contextlib.contextmanager
def negligible_cnn():
    """featurize with :class:`NegligibleEmbedder` (the cache still records resnet18's spec: bench files only)."""
    real = bb.Embedder
    bb.Embedder = NegligibleEmbedder
    try:
        yield
    finally:
        bb.Embedder = real


def featurize_fps(source: str, tmp: Path, fps: float, size: int, workers: int, repeats: int, precision: str | None = None,
                  batch: int = 64) -> float:
    """Frames/s of the whole decode -> CNN -> HDF5 stream (validation and model building excluded)."""
    rates = []
    for r in range(repeats):
        out = tmp / f"f_{Path(source).stem}_{fps:g}_{size}_{workers}_{precision}_{r}.h5"
        res = featurize(FeaturizeConfig(source=source, backbone="resnet18", weights="none", size=size, fps=fps,
                                        device="cpu", precision=precision, decode_workers=workers, batch_size=batch,
                                        out=str(out), shard=None))
        rates.append(res.frames / res.stream_seconds)
    return median(rates)


def main(quick: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="featseq-decode-"))
    repeats = 1 if quick else 5
    srcs = sources(tmp, quick)
    installed = [b for b in BACKENDS if not unavailable(b)]
    rows = []
    for name, segs in srcs.items():
        for backend in installed:
            for fps in (1.0, 6.0):
                r = {"source": name, "backend": backend, "fps": fps, "size": 224}
                for w in (1, 2):
                    r[f"workers_{w}"] = round(decode_only(segs, fps, 224, backend, w, repeats), 1)
                r["speedup"] = round(r["workers_2"] / r["workers_1"], 2)
                rows.append(r)
                print(r, flush=True)
    name, segs = next(iter(srcs.items()))
    # how frames reach the parent, and what two processes gain on this machine without featseq in the way
    transport = []
    for fps in (1.0, 6.0):
        r = {"source": name, "fps": fps}
        for shared in (True, False):
            rate, cpu = decode_only_cpu(segs, fps, 224, "pyav", 2, repeats, shared_memory=shared)
            r["shm_fps" if shared else "pipe_fps"] = round(rate, 1)
            r["shm_parent_cpu_ms" if shared else "pipe_parent_cpu_ms"] = round(cpu, 1)
        r["plain_1"] = round(plain_processes(segs, fps, 224, 1, repeats), 1)
        r["plain_2"] = round(plain_processes(segs, fps, 224, 2, repeats), 1)
        r["plain_speedup"] = round(r["plain_2"] / r["plain_1"], 2)
        transport.append(r)
        print(r, flush=True)
    # the pipeline against its decode ceiling: a negligible CNN, the default decoder, the same workers, 224 px
    src = manifest(tmp, name, segs)
    pipe = []
    for fps in (1.0, 6.0):
        for w in (1, 2):
            ceiling = decode_only(segs, fps, 224, "pyav", w, repeats)
            with negligible_cnn():
                feat = featurize_fps(src, tmp, fps, 224, w, repeats)
            pipe.append({"source": name, "fps": fps, "workers": w, "decode_only_fps": round(ceiling, 1),
                         "featurize_fps": round(feat, 1), "ratio": round(feat / ceiling, 3)})
            print(pipe[-1], flush=True)
    # the CPU default: resnet18 at 224 px on the CPU (precision auto) with 1 and 2 decode workers
    shared = []
    for w in (1, 2):
        shared.append({"backbone": "resnet18", "size": 224, "precision": "auto", "fps": 1.0, "workers": w,
                       "featurize_fps": round(featurize_fps(src, tmp, 1.0, 224, w, repeats, precision="auto"), 1)})
        print(shared[-1], flush=True)
    data = {"decode": rows, "transport": transport, "pipeline": pipe, "cnn_shares_cpu": shared, "installed": installed,
            "sources": {k: len(v) for k, v in srcs.items()}}
    save("decode", data)
    return data


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
