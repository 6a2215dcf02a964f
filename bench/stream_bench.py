"""Live streams: windows/s, frames dropped and latency of `featseq predict RUN --stream FILE --realtime` fed at 30 fps.

    .venv/bin/python bench/stream_bench.py [--quick]

For each (input size, the run's fps): a ResNet-18 (untrained, --weights none) run is made on synthetic clips
(featurize, then a conv1d trained for a few epochs: its accuracy is not the point), then a 30 s, 30 fps, 320x240
H.264 video is played at its own rate (--realtime: a live source that drops frames when the CNN falls behind)
through `predict --stream` with 2 s windows every second, as a separate process. Latency: from a frame's arrival
to the prediction of the first window that includes it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, save  # noqa: E402
from bench.featurize_bench import long_video  # noqa: E402


def make_run(tmp: Path, src: str, size: int, fps: float) -> str:
    from featseq.featurize.pipeline import FeaturizeConfig, featurize
    from featseq.sequence.train import TrainConfig, train

    cache = featurize(FeaturizeConfig(source=src, backbone="resnet18", weights="none", size=size, fps=fps, device="cpu",
                                      out=str(tmp / f"c_{size}_{fps:g}.h5"), shard=None)).path
    run = tmp / f"run_{size}_{fps:g}"
    train(TrainConfig(cache=cache, out=str(run), model="conv1d", fps=fps, seq_len=int(2 * fps), split="group", epochs=3,
                      plots=False, device="cpu"))
    return str(run)


def main(quick: bool = False) -> dict:
    from featseq.featurize.synth import render_dataset

    tmp = Path(tempfile.mkdtemp(prefix="featseq-stream-"))
    src = render_dataset(tmp / "synth", clips_per_class_per_group=2, groups=2, width=64, height=64, duration=(4, 5),
                         long_videos=0)["clips_root"]
    video = tmp / "live.mp4"
    long_video(video, 0.25 if quick else 0.5, width=320, height=240, video_fps=30)
    rows = []
    for size in (112, 224):
        for fps in ((6.0,) if quick else (6.0, 15.0, 30.0)):
            run = make_run(tmp, src, size, fps)
            out = tmp / f"pred_{size}_{fps:g}"
            r = subprocess.run([sys.executable, "-c", "from featseq.cli import main; main()", "predict", run, "--stream", str(video),
                                "--realtime", "--stride", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(r.stderr)
            res = json.loads((out / "predict.json").read_text())
            lat = res["latency_s"]
            rows.append({"backbone": "resnet18", "size": size, "precision": res["featurize"]["precision"],
                         "input_fps": 30, "run_fps": fps, "seconds": res["seconds"], "windows": res["windows"],
                         "windows_per_s": res["windows_per_s"], "frames_sampled": res["frames_sampled"],
                         "frames_dropped": res["frames_dropped"], "latency_p50_ms": round(lat["p50"] * 1000),
                         "latency_p95_ms": round(lat["p95"] * 1000), "latency_max_ms": round(lat["max"] * 1000)})
            print(rows[-1], flush=True)
    data = {"rows": rows, "video": "synthetic 320x240 H.264, 30 fps, played at its rate (--realtime)",
            "windows": "2 s (2 x the run's fps frames) every 1 s"}
    save("stream", data)
    return data


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
