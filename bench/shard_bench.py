"""Scaling featurize out: one process vs two --shard processes vs torchrun with 2 ranks on this machine, merge MB/s,
and a paper estimate of the workers and GPUs that featurize UCF-101 in an hour.

    .venv/bin/python bench/shard_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import GINGERBREAD, RESULTS, ROOT, free_port, save  # noqa: E402

# UCF-101 (Soomro et al. 2012): 13,320 clips, 27 hours of 320x240 video at 25 fps -> 7.3 s per clip on average
UCF_CLIPS, UCF_SECONDS = 13320, 27 * 3600
# NVIDIA's published PyTorch ResNet-50 mixed-precision inference throughput on one V100 at batch 256 (images/s)
GPU_RESNET50_FPS = 3382


def main(quick: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="featseq-shard-"))
    if GINGERBREAD.is_dir() and not quick:
        src, what = str(GINGERBREAD), "the 184 Gingerbread clips (224 px, 30 fps, ~30 s each)"
    else:
        from featseq.featurize.synth import render_dataset

        src = render_dataset(tmp / "synth", clips_per_class_per_group=2 if quick else 8, groups=4, long_videos=0,
                             width=224, height=224)["clips_root"]
        what = "synthetic 224 px clips"
    args = ["--backbone", "resnet18", "--weights", "none", "--size", "112", "--fps", "1", "--device", "cpu", "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID")}
    env["PYTHONPATH"] = str(ROOT)
    cli = [sys.executable, "-c", "from featseq.cli import main; main()", "featurize", src]

    t = time.perf_counter()
    subprocess.run(cli + ["--out", str(tmp / "one.h5"), "--shard", "none"] + args, cwd=ROOT, env=env, check=True,
                   capture_output=True)
    one_s = time.perf_counter() - t

    t = time.perf_counter()
    procs = [subprocess.Popen(cli + ["--out", str(tmp / "two.h5"), "--shard", f"{k}/2"] + args, cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for k in range(2)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    two_s = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from featseq.cli import main; main()", "cache", "merge", str(tmp / "two.h5")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    merge_cli_s = time.perf_counter() - t
    from featseq.featurize.shard import merge

    (tmp / "two.h5").unlink()
    m = merge(str(tmp / "two.h5"))  # in-process: the copy and verification alone

    torchrun = Path(sys.executable).with_name("torchrun")
    t = time.perf_counter()
    subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                    str(free_port()), "-m", "featseq", "featurize", src, "--out", str(tmp / "tr.h5")] + args,
                   cwd=ROOT, env=env, check=True, capture_output=True)
    torchrun_s = time.perf_counter() - t

    from featseq.featurize.cache import read_cache

    frames = int(read_cache(tmp / "one.h5", features=False).segments["length"].sum())
    rows = [{"how": "one process (--shard none)", "wall_s": round(one_s, 1), "frames_per_s": round(frames / one_s, 1)},
            {"how": "two processes (--shard 0/2, 1/2) + cache merge", "wall_s": round(two_s + merge_cli_s, 1),
             "frames_per_s": round(frames / (two_s + merge_cli_s), 1)},
            {"how": "torchrun --nproc-per-node 2 (rank 0 merges)", "wall_s": round(torchrun_s, 1),
             "frames_per_s": round(frames / torchrun_s, 1)}]
    for r in rows:
        r["speedup"] = round(one_s / r["wall_s"], 2)
    # paper estimate for UCF-101, from this machine's decode-only rate per worker (bench/featurize_bench.py)
    est = []
    fb = RESULTS / "featurize.json"
    decode = json.loads(fb.read_text())["decode_only_fps"] if fb.exists() else None
    if decode:
        for fps in ("1.0", "6.0"):
            need = UCF_SECONDS * float(fps)  # frames delivered
            per_worker = decode[fps]
            est.append({"fps": float(fps), "frames": int(need), "decode_frames_per_s_per_worker": per_worker,
                        "decode_workers_for_1h": round(need / (per_worker * 3600), 2),
                        "gpus_for_1h_resnet50": round(need / (GPU_RESNET50_FPS * 3600), 3)})
    data = {"description": f"featurize of {what} with {' '.join(args[:-1])}; wall time of the whole commands "
                           f"(process start, probing, model building, decoding, CNN, writing; merge included).",
            "frames": frames, "rows": rows,
            "merge": {"segments": m.segments, "mb": round(m.mb, 1), "seconds": round(m.seconds, 2),
                      "mb_per_s": round(m.mb / m.seconds, 1) if m.seconds else None, "cli_seconds": round(merge_cli_s, 1)},
            "ucf101_estimate": est}
    print(json.dumps(data, indent=1), flush=True)
    save("shard", data)
    return data


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(quick=ap.parse_args().quick)
