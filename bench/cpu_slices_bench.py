"""The CNN on the CPU: one call of 64 frames vs slices, with glibc's default allocator vs large blocks kept.

Backbone-only frames/s (median of 3 calls after a warm-up) and the process's peak RSS, through the
real ``Embedder`` on 64 random 224 px frames. Each configuration runs in a fresh process, because
the allocator setting holds for a whole process (``FEATSEQ_MALLOC=default`` turns it off).

    .venv/bin/python bench/cpu_slices_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, save  # noqa: E402

FRAMES, SIZE = 64, 224
CONFIGS = [("default", 64), ("kept", 64), ("kept", 16)]  # (allocator, frames per CNN call)


def child(name: str, precision: str, frames_per_call: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from bench.common import median_time
    from featseq.featurize import backbones as bb
    from featseq.featurize.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # as featurize does (FEATSEQ_MALLOC=default leaves glibc alone)
    emb = bb.Embedder(bb.create_backbone(name, "none"), torch.device("cpu"), precision)
    emb.slice_pixels = frames_per_call * SIZE * SIZE
    x = np.random.default_rng(0).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    t, _ = median_time(lambda: emb(x), repeats=repeats)
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) // 1024
    return {"frames_per_s": round(FRAMES / t, 1), "peak_mib": peak}


def main(quick: bool = False) -> dict:
    models = ["resnet50"] if quick else ["resnet50", "timm:efficientnet_lite0"]
    rows = []
    for name in models:
        for precision in ("fp32", "bf16"):
            for alloc, per_call in CONFIGS:
                env = {**os.environ, "FEATSEQ_MALLOC": "default" if alloc == "default" else "kept"}
                out = subprocess.run([sys.executable, __file__, "--child", name, precision, str(per_call),
                                      str(1 if quick else 3)], cwd=ROOT, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"{name} {precision} {alloc} {per_call}: {out.stderr[-1500:]}")
                r = {"backbone": name, "precision": precision, "allocator": alloc, "frames_per_call": per_call,
                     **json.loads(out.stdout.strip().splitlines()[-1])}
                rows.append(r)
                print(r, flush=True)
    data = {"description": f"{FRAMES} random {SIZE} px frames through featurize's Embedder on the CPU; allocator "
                           "'default' = glibc as is (FEATSEQ_MALLOC=default), 'kept' = large freed blocks kept for "
                           "reuse (featseq's setting); frames per call 64 = one call, 16 = featseq's slices.",
            "rows": rows}
    save("cpu_slices", data)
    return data


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
    else:
        ap = argparse.ArgumentParser()
        ap.add_argument("--quick", action="store_true")
        main(ap.parse_args().quick)
