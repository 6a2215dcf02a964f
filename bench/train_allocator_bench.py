"""featseq train with glibc as it is against glibc tuned as featurize tunes it (featurize/allocator.py), one fresh
process each: timings from results.json, user and sys CPU seconds, peak RSS. The cache is a UCF-101-sized one
written by bench/scale_bench.write (13,320 segments x 35 frames x 2048, float16) when CACHE does not exist yet.

    .venv/bin/python bench/train_allocator_bench.py [CACHE] [--epochs 2]

Not part of `make bench`: a lead for issue 26's per-epoch ratio, measured twice so far (bench/NOTES.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = r"""
import json, resource, sys
if sys.argv[1] == "tuned":
    from featseq.featurize.allocator import tune_cpu_allocator
    tune_cpu_allocator()
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
    a = ap.parse_args()
    if not Path(a.cache).exists():
        from bench import scale_bench
        scale_bench.write(Path(a.cache), 13320, 35, scale_bench.GROUP_SECONDS)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("plain", "tuned"):
            r = subprocess.run([sys.executable, "-c", CHILD, kind, a.cache, f"{tmp}/{kind}", str(a.epochs)],
                               capture_output=True, text=True, check=True)
            print(r.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
