"""--compile against eager for one backbone on the CPU: frames/s of featseq's Embedder (fp32, one batch shape), twice
each in turn, and the compilation's time (cold, then with inductor's cache warm).

    .venv/bin/python bench/compile_bench.py resnet18 224 16 6      # backbone, size, batch, batches timed
"""
import sys
import time

import numpy as np
import torch

from featseq.featurize.backbones import Embedder, create_backbone
from featseq.featurize.allocator import tune_cpu_allocator

tune_cpu_allocator()
name, size, batch, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
x = np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
res = {}
for comp in (False, True, False, True):
    e = Embedder(create_backbone(name, "none", 0), torch.device("cpu"), "fp32", compile=comp, batch_size=batch)
    t = time.perf_counter(); e(x); warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(reps): e(x)
    fps = reps * batch / (time.perf_counter() - t)
    res.setdefault(comp, []).append(fps)
    print({"compile": comp, "warmup_s": round(warm, 1), "frames_per_s": round(fps, 1)}, flush=True)
print("ratio compiled/eager (best of 2 each):", round(max(res[True]) / max(res[False]), 2))
