"""A paper model of featurize and a sweep on GPU machines, from this machine's measured per-core figures and a
published GPU figure (none was lent to measure). Rendered into BENCHMARKS.md by ``bench/run.py --render``.

Per stage, the rate a machine sustains (frames/s):

* decode: the measured one-worker PyAV rate of 224 px clips (bench/decode_bench.py; UCF-101's 320x240 and
  Kinetics' ~340x256 cost about the same per frame) times the decode workers (cores - 1 per GPU rank);
  at 5 fps the measured 6 fps rate x 5/6 (decoding is paid per source frame, so the output rate scales with fps);
* CNN: NVIDIA's published ResNet-50 mixed-precision inference throughput of one V100 (bench/shard_bench.py
  GPU_RESNET50_FPS) per GPU; newer GPUs are faster, which only moves the bound further towards decoding;
* writer: the measured grouped CacheWriter rate for 10- and 35-frame segments (bench/scale_bench.py), one writer
  per rank (each rank writes its own part; the disk's bandwidth is not modelled), plus the merge of the parts into one
  cache at the measured `featseq cache merge` rate (one process, after the ranks).

The sweep: 24 variants x 10 epochs at the measured seconds per epoch of one LSTM on the UCF-101-sized cache
(bench/scale_bench.py, 2 threads), scaled by the number of segments, with one worker per 2 cores; on a GPU the
sequence models train faster still (not estimated here: no measurement).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.shard_bench import GPU_RESNET50_FPS, UCF_CLIPS, UCF_SECONDS  # noqa: E402

KINETICS_CLIPS, KINETICS_SECONDS = 300_000, 300_000 * 10  # Kinetics-400: ~300k clips of ~10 s
MACHINES = [("8 cores + 1 GPU", 8, 1), ("64 cores + 8 GPUs", 64, 8)]
VARIANTS, EPOCHS = 24, 10


def _decode_rate(decode: dict, fps: float) -> float:
    rows = {r["fps"]: r["workers_1"] for r in decode["decode"]
            if r["backend"] == "pyav" and r["source"].startswith("gingerbread")}
    return rows[1.0] if fps <= 1 else rows[6.0] * fps / 6.0


def _writer_rate(scale: dict, frames: int) -> float:
    rows = {r["frames_per_segment"]: r["grouped_frames_per_s"] for r in scale["writer"]}
    return rows[min(rows, key=lambda k: abs(k - frames))]


def featurize_rows(decode: dict, scale: dict, merge_mb_per_s: float) -> list[dict]:
    out = []
    for name, clips, seconds in (("UCF-101", UCF_CLIPS, UCF_SECONDS), ("Kinetics-400", KINETICS_CLIPS, KINETICS_SECONDS)):
        for fps in (1.0, 5.0):
            frames = seconds * fps
            per_clip = frames / clips
            for machine, cores, gpus in MACHINES:
                workers = gpus * max(1, cores // gpus - 1)
                rates = {"decode": _decode_rate(decode, fps) * workers, "CNN": GPU_RESNET50_FPS * gpus,
                         "writer": _writer_rate(scale, round(per_clip)) * gpus}
                bound = min(rates, key=rates.get)
                mb = frames * 2048 * 2 / 1e6  # ResNet-50 features, float16
                merge_s = mb / merge_mb_per_s if gpus > 1 else 0.0
                run_s = frames / rates[bound]
                out.append({"dataset": name, "fps": fps, "frames": int(frames), "machine": machine,
                            "decode_workers": workers, **{f"{k}_fps": round(v) for k, v in rates.items()},
                            "bound": bound + (" (then the merge, longer)" if merge_s > run_s else ""),
                            "minutes": round((run_s + merge_s) / 60, 1), "merge_minutes": round(merge_s / 60, 1)})
    return out


def sweep_rows(scale: dict) -> list[dict]:
    tr = scale.get("train")
    if not tr:
        return []
    per_segment = tr["per_epoch_s"] / scale["train_segments"]
    out = []
    for name, clips in (("UCF-101", UCF_CLIPS), ("Kinetics-400", KINETICS_CLIPS)):
        for machine, cores, _ in MACHINES:
            jobs = max(1, cores // 2)
            hours = VARIANTS * EPOCHS * per_segment * clips / min(jobs, VARIANTS) / 3600
            out.append({"dataset": name, "machine": machine, "jobs": min(jobs, VARIANTS),
                        "epoch_s": round(per_segment * clips, 1), "hours": round(hours, 2)})
    return out
