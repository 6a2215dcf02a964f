"""Sweep speed: 24 variants x 25 epochs on the Gingerbread 1 fps cache, --jobs 1 and --jobs 2 on one study; the full
grid against a TPE search of half as many trials with median pruning, over 3 seeds (wall time, best validation).

    .venv/bin/python bench/sweep_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import GINGERBREAD, ROOT, save  # noqa: E402
from featseq.featurize.pipeline import FeaturizeConfig, featurize  # noqa: E402

GRID = ["--model", "lstm,gru,rnn", "--hidden", "128,256", "--layers", "1,2", "--bidirectional", "false,true"]


def main(quick: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="featseq-sweep-"))
    if GINGERBREAD.is_dir():
        src, what = str(GINGERBREAD), "the Gingerbread 1 fps cache (184 clips, resnet18, D = 512)"
        seq = ["--split", "seed-compat", "--fps", "1", "--seq-len", "25"]
    else:
        from featseq.featurize.synth import render_dataset

        src = render_dataset(tmp / "synth", clips_per_class_per_group=8, groups=4, long_videos=0)["clips_root"]
        what, seq = "a synthetic 1 fps cache (96 clips, resnet18, D = 512)", ["--split", "random", "--fps", "1"]
    # the sweep only reads features: their dimension matters, not the input size, so featurize at 64 px
    cache = featurize(FeaturizeConfig(source=src, fps=1.0, size=64, out=str(tmp / "c.h5"))).path
    epochs = "3" if quick else "25"

    def run(name, *extra):
        out = tmp / name
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from featseq.cli import main; main()", "sweep", cache, "--out", str(out), *GRID,
                        "--epochs", epochs, "--patience", epochs, *seq, "--plots", "false", "-q", *extra],
                       cwd=ROOT, check=True, capture_output=True)
        wall = time.perf_counter() - t
        with open(out / "leaderboard.csv", newline="") as fh:
            lb = list(csv.DictReader(fh))
        shutil.rmtree(out)
        done = [r for r in lb if r["status"] == "complete"]
        return wall, max(float(r["val_accuracy"]) for r in done), len(lb), sum(r["status"] == "pruned" for r in lb)

    rows = []
    grid_j2 = {}
    for jobs in (1, 2):
        w, best, _, _ = run(f"grid_j{jobs}", "--jobs", str(jobs))
        if jobs == 2:
            grid_j2[0] = (w, best)
        rows.append({"jobs": jobs, "variants": 24, "epochs": int(epochs), "wall_s": round(w, 1), "per_variant_s": round(w / 24, 2)})
        print(rows[-1], flush=True)
    search = []
    for seed in (0, 1, 2):
        if seed not in grid_j2:
            w, best, _, _ = run(f"grid_s{seed}", "--jobs", "2", "--seed", str(seed))
            grid_j2[seed] = (w, best)
        tw, tbest, n, pruned = run(f"tpe_s{seed}", "--jobs", "2", "--seed", str(seed), "--search", "tpe", "--trials", "12",
                                   "--prune", "median", "--search-seed", str(seed))
        search.append({"seed": seed, "grid_wall_s": round(grid_j2[seed][0], 1), "grid_best_val": round(grid_j2[seed][1], 3),
                       "tpe_wall_s": round(tw, 1), "tpe_best_val": round(tbest, 3), "tpe_trials": n, "tpe_pruned": pruned,
                       "wall_ratio": round(tw / grid_j2[seed][0], 2)})
        print(search[-1], flush=True)
    data = {"description": f"`featseq sweep` over {what}: {' '.join(GRID)} (24 variants), every variant trained for all "
                           f"{epochs} epochs (`--patience {epochs}`), {' '.join(seq)}; wall time of the whole command "
                           f"(process start, cache load, training and the outputs of every run, without plots: --plots false), one run each. With the default early stopping (patience 10) most variants stop "
                           "after 12-15 epochs and the sweep takes about two thirds of this.",
            "rows": rows, "search": search,
            "search_description": f"The full grid (24 variants, every one trained {epochs} epochs) against `--search tpe "
                                  f"--trials 12 --prune median` over the same lists (Optuna's TPE, median pruner after 3 "
                                  f"epochs once 4 trials finished), both with --jobs 2 and the training --seed and the "
                                  f"sampler seed set to the row's seed; wall time of the command and the best validation "
                                  f"accuracy on its leaderboard."}
    save("sweep", data)
    return data


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
