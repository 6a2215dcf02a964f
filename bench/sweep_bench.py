"""Sweep speed: 24 variants x 25 epochs on the Gingerbread 1 fps cache, --jobs 1 and --jobs 2.

    .venv/bin/python bench/sweep_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import GINGERBREAD, ROOT, median, save  # noqa: E402
from featurize.pipeline import FeaturizeConfig, featurize  # noqa: E402

GRID = ["--model", "lstm,gru,rnn", "--hidden", "128,256", "--layers", "1,2", "--bidirectional", "false,true"]


def main(quick: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="featseq-sweep-"))
    if GINGERBREAD.is_dir():
        src, what = str(GINGERBREAD), "the Gingerbread 1 fps cache (184 clips, resnet18, D = 512)"
        seq = ["--split", "seed-compat", "--fps", "1", "--seq-len", "25"]
    else:
        from featurize.synth import render_dataset

        src = render_dataset(tmp / "synth", clips_per_class_per_group=8, groups=4, long_videos=0)["clips_root"]
        what, seq = "a synthetic 1 fps cache (96 clips, resnet18, D = 512)", ["--split", "random", "--fps", "1"]
    # the sweep only reads features: their dimension matters, not the input size, so featurize at 64 px
    cache = featurize(FeaturizeConfig(source=src, fps=1.0, size=64, out=str(tmp / "c.h5"))).path
    epochs = "3" if quick else "25"
    rows = []
    for jobs in (1, 2):
        walls = []
        for r in range(1):
            out = tmp / f"s{jobs}_{r}"
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "from cli import main; main()", "sweep", cache, "--out", str(out), *GRID,
                            "--epochs", epochs, "--patience", epochs, *seq, "--jobs", str(jobs), "-q"],
                           cwd=ROOT, check=True, capture_output=True)
            walls.append(time.perf_counter() - t)
            shutil.rmtree(out)
        w = median(walls)
        rows.append({"jobs": jobs, "variants": 24, "epochs": int(epochs), "wall_s": round(w, 1), "per_variant_s": round(w / 24, 2)})
        print(rows[-1], flush=True)
    data = {"description": f"`featseq sweep` over {what}: {' '.join(GRID)} (24 variants), every variant trained for all "
                           f"{epochs} epochs (`--patience {epochs}`), {' '.join(seq)}; wall time of the whole command "
                           f"(process start, cache load, training, outputs and plots of every run), one run each. With the default early stopping (patience 10) most variants stop "
                           "after 12-15 epochs and the sweep takes about two thirds of this.",
            "rows": rows}
    save("sweep", data)
    return data


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
