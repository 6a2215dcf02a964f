"""featseq train with glibc as it is (FEATSEQ_MALLOC=default) against glibc tuned as train and featurize tune it
(featurize/allocator.py), and other settings; one fresh process each: timings from results.json, user and sys CPU
seconds, peak RSS. The cache is a UCF-101-sized one written by bench/scale_bench.write (13,320 segments x 35
frames x 2048, float16) when CACHE does not exist yet.

    .venv/bin/python bench/train_allocator_bench.py [CACHE] [--epochs 2] [--variants plain+eval64,tuned+eval16,trim64/128]

A variant: plain (glibc's default), tuned, or trimMB[/mmapMB] (glibc's trim and mmap thresholds), with +evalN for
evaluation batches of N MiB of float32 (train's own: 16). Not part of `make bench`: the measurements behind
train's allocator setting and evaluation batch size (bench/NOTES.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = r"""
import json, resource, sys
kind, _, eval_mib = sys.argv[1].partition("+eval")  # +evalN: evaluation batches of N MiB of float32
if eval_mib:
    from featseq.sequence.loop import FeatureInputs
    FeatureInputs.eval_bytes = int(eval_mib) << 20
if kind == "tuned":
    from featseq.featurize.allocator import tune_cpu_allocator
    tune_cpu_allocator()
elif kind.startswith("trim"):  # trimMB[/mmapMB]: glibc keeps this much freed memory at the heap's top
    import ctypes
    trim, _, mm = kind[4:].partition("/")
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-1, int(trim) << 20)  # M_TRIM_THRESHOLD
    assert libc.mallopt(-3, int(mm or 32) << 20)  # M_MMAP_THRESHOLD (fixed: no dynamic adjustment)
from featseq.sequence.train import TrainConfig, train
train(TrainConfig(cache=sys.argv[2], out=sys.argv[3], model="lstm", hidden=128, fps=5, split="random",
                  epochs=int(sys.argv[4]), device="cpu", plots=False))
t = json.load(open(sys.argv[3] + "/results.json"))["timings"]
ru = resource.getrusage(resource.RUSAGE_SELF)
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) // 1024
print(json.dumps({"malloc": sys.argv[1], **{k: round(v, 1) for k, v in t.items() if isinstance(v, float)},
                  "user_s": round(ru.ru_utime, 1), "sys_s": round(ru.ru_stime, 1), "peak_rss_mib": hwm}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache", nargs="?", default=str(Path(tempfile.gettempdir()) / "featseq-ucf-sized.h5"))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--variants", default="plain,tuned", help="plain, tuned (featurize's setting), trimMB[/mmapMB]; +evalN: N MiB evaluation batches")
    a = ap.parse_args()
    if not Path(a.cache).exists():
        from bench import scale_bench
        scale_bench.write(Path(a.cache), 13320, 35, scale_bench.GROUP_SECONDS)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.variants.split(","):
            env = {**os.environ, "FEATSEQ_MALLOC": "tuned" if kind.startswith("tuned") else "default"}  # train tunes
            r = subprocess.run([sys.executable, "-c", CHILD, kind, a.cache, f"{tmp}/{kind.replace('/', '_')}",
                                str(a.epochs)], capture_output=True, text=True, check=True, env=env)
            print(r.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
