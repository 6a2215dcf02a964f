"""Featurize speed: decode-only, backbone-only (ceiling) and end-to-end frames/s, and their ratio;
memory: peak RSS while featurizing a long 1280x720 video at two lengths.

    .venv/bin/python bench/featurize_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import GINGERBREAD, median, run_with_peak_rss, save  # noqa: E402
from featseq.featurize import backbones as bb  # noqa: E402
from featseq.featurize.allocator import tune_cpu_allocator  # noqa: E402
from featseq.featurize.pipeline import FeaturizeConfig, featurize  # noqa: E402
from featseq.featurize.precision import resolve_precision  # noqa: E402
from featseq.featurize.worker import DecodePool, decode_job  # noqa: E402


def clips(tmp: Path, n: int) -> list[str]:
    if GINGERBREAD.is_dir():
        return [str(p) for p in sorted(GINGERBREAD.glob("P0[1-4]/music*.mp4"))[:n]]
    from featseq.featurize.synth import render_dataset

    r = render_dataset(tmp / "synth", clips_per_class_per_group=2, groups=2, width=224, height=224, duration=(28, 32), long_videos=0)
    return [c["path"] for c in r["clips"]][:n]


def manifest(tmp: Path, paths: list[str]) -> str:
    m = tmp / "bench.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group"])
        for p in paths:
            w.writerow([p, "x", Path(p).parent.name])
    return str(m)


def decode_only(paths: list[str], fps: float, size: int, repeats: int) -> float:
    """Frames/s delivered by the decode worker to this process (the worker already started)."""
    rates = []
    with DecodePool() as pool:
        for _ in range(repeats + 1):  # the first run is the warm-up
            t = time.perf_counter()
            n = sum(len(m[2]) for m in pool.run([decode_job(i, p, 0.0, None, fps, size, "squash", 64) for i, p in enumerate(paths)])
                    if m[0] == "chunk")
            rates.append(n / (time.perf_counter() - t))
    return median(rates[1:])


def backbone_only(name: str, precision: str, frames: np.ndarray, batch: int, repeats: int) -> float:
    device = bb.resolve_device("auto")
    if device.type == "cpu":
        tune_cpu_allocator()  # as featurize does
    emb = bb.Embedder(bb.create_backbone(name, "none"), device, precision)
    emb(frames[:batch])  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(frames), batch):
            emb(frames[i:i + batch])
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(frames) / (time.perf_counter() - t))
    return median(rates)


def end_to_end(source: str, tmp: Path, name: str, precision: str, fps: float, batch: int, repeats: int) -> float:
    rates = []
    for r in range(repeats):
        out = tmp / f"e2e_{name}_{precision}_{r}.h5"
        res = featurize(FeaturizeConfig(source=source, backbone=name, weights="none", fps=fps, precision=precision,
                                        batch_size=batch, out=str(out)))
        rates.append(res.frames / res.stream_seconds)
    return median(rates)


def long_video(path: Path, minutes: float, width=1280, height=720, video_fps=10) -> None:
    """A cheap synthetic 720p video: a moving gradient and a bar (H.264)."""
    import av

    n = int(minutes * 60 * video_fps)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    base = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.full((height, width, 1), 128, np.float32)], axis=2).astype(np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=video_fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "28"}
        for i in range(n):
            img = np.roll(base, i * 7, axis=1)
            img[:, (i * 13) % width:(i * 13) % width + 40] = 255
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def memory(tmp: Path, minutes_list, backbone="resnet50", batch=64, fps=1.0) -> list[dict]:
    out = []
    for minutes in minutes_list:
        video = tmp / f"long_{minutes:g}min.mp4"
        long_video(video, minutes)
        m = tmp / f"long_{minutes:g}.csv"
        m.write_text(f"path,label\n{video},x\n")
        cmd = [sys.executable, "-c", "from featseq.cli import main; main()", "featurize", str(m), "--backbone", backbone,
               "--batch-size", str(batch), "--fps", f"{fps:g}", "--out", str(tmp / f"mem_{minutes:g}.h5"), "-q"]
        r = run_with_peak_rss(cmd)
        out.append({"minutes": minutes, "resolution": "1280x720", "backbone": backbone, "batch": batch, "fps": fps,
                    "frames": int(round(minutes * 60 * fps)), "seconds": round(r["seconds"], 1),
                    "peak_tree_mib": round(r["peak_tree_mib"]), "peak_main_mib": round(r["peak_main_mib"]),
                    "peak_worker_mib": round(r["peak_worker_mib"])})
        print(out[-1], flush=True)
    return out


def _decode(path: str, fps: float):
    from featseq.featurize.decoder import open_decoder
    from featseq.featurize.sampling import plan_segment

    d = open_decoder(path, size=224)
    return list(d.read(plan_segment(d.frame_starts, d.info.duration, 0, None, fps).indices, 64))


def main(quick: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="featseq-bench-"))
    device = bb.resolve_device("auto")
    # fp32 and what --precision auto picks here (bf16 only on a CPU that computes it natively)
    precisions = list(dict.fromkeys(["fp32", resolve_precision("auto", device)]))
    n_clips = 2 if quick else 12
    repeats = 1 if quick else 3
    paths = clips(tmp, n_clips)
    fps = 1.0
    dec = {f: round(decode_only(paths, f, 224, repeats), 1) for f in (1.0, 6.0)}
    print(f"decode-only (224 px): {dec} frames/s", flush=True)
    rows = []
    per_backbone = {"resnet18": 12, "resnet34": 8, "resnet50": 6}  # clips: ~8-20 s per measurement on 2 cores
    for name in (["resnet18"] if quick else list(per_backbone)):
        sub = paths[: per_backbone[name]]
        frames = np.concatenate([c for p in sub for c in _decode(p, fps)])
        source = manifest(tmp, sub)
        for prec in precisions:
            b = backbone_only(name, prec, frames, 64, repeats)
            e = end_to_end(source, tmp, name, prec, fps, 64, repeats)
            rows.append({"backbone": name, "precision": prec, "device": device.type, "frames": len(frames),
                         "backbone_fps": round(b, 1), "featurize_fps": round(e, 1), "ratio": round(e / b, 3)})
            print(rows[-1], flush=True)
    mem = memory(tmp, [0.5, 1.0] if quick else [5.0, 10.0])
    data = {"decode_only_fps": dec, "decode_clips": len(paths), "featurize": rows, "memory": mem,
            "data": "gingerbread" if GINGERBREAD.is_dir() else "synthetic 224x224"}
    save("featurize", data)
    return data


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
