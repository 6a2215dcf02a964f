"""Seconds and PNG size of one confusion plot at N classes (a run writes one per scored part).

    .venv/bin/python bench/confusion_plot_bench.py 101 [OUT.png]

Standalone (not part of `make bench`): it times sequence.plots.confusion on a synthetic N x N matrix of
UCF-101-like class names, the part of a run's tail that grows with the square of the class count.
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from featseq.sequence import plots


def main(n: int, out: Path) -> None:
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 3, (n, n)) + np.diag(rng.integers(20, 40, n))
    classes = [f"ApplyEyeMakeup_{i}" for i in range(n)]
    t = time.perf_counter()
    plots.confusion(out, cm, classes, "test")
    print(f"{n} classes: {time.perf_counter() - t:.2f} s, {out.stat().st_size // 1024} KiB ({out})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 101,
         Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp()) / "confusion.png")
