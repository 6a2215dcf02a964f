"""decord 0.6 vs decord2: frames/s and the frames themselves, through featseq's decord backend.

Run it once under each (they both import as `decord`, so in two environments), then compare the two .npz files:

    .venv/bin/python bench/decord_compare.py /tmp/a.npz                 # whichever decord .venv has
    OTHER_ENV/bin/python bench/decord_compare.py /tmp/b.npz             # e.g. a venv with numpy, av, pillow, decord==0.6.0
    .venv/bin/python bench/decord_compare.py --same /tmp/a.npz /tmp/b.npz

Frames/s: the 16 Gingerbread clips of P01 and P02 decoded to 224 px at 1 and 6 fps, one thread (OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import glob
import importlib.metadata as md
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featseq.featurize.decoder import open_decoder  # noqa: E402
from featseq.featurize.sampling import plan_segment  # noqa: E402

CLIPS = str(Path(__file__).resolve().parents[2] / "shared/data/gingerbread/segments/P0[1-2]/music*.mp4")


def main(out: str) -> None:
    clips = sorted(glob.glob(CLIPS))[:24]
    dist = next((d for d in ("decord2", "decord") if _has(d)), "?")
    frames, rates = {}, {}
    for fps in (1.0, 6.0):
        n, t = 0, time.perf_counter()
        for i, p in enumerate(clips):
            d = open_decoder(p, size=224, backend="decord")
            fr = np.concatenate(list(d.read(plan_segment(d.frame_starts, d.info.duration, 0, None, fps).indices, 64)))
            n += len(fr)
            if fps == 6.0:
                frames[str(i)] = fr
        rates[fps] = n / (time.perf_counter() - t)
    np.savez(out, **frames)
    print(f"{dist} {md.version(dist)}: " + ", ".join(f"{r:.0f} frames/s at {f:g} fps" for f, r in rates.items()))


def _has(dist: str) -> bool:
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    if sys.argv[1] == "--same":
        a, b = np.load(sys.argv[2]), np.load(sys.argv[3])
        print(f"byte-identical clips: {sum(np.array_equal(a[k], b[k]) for k in a.files)} of {len(a.files)}")
    else:
        main(sys.argv[1])
