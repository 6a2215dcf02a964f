"""finetune on several ranks: seconds per epoch in one process and with torchrun (DistributedDataParallel), and the
scaling efficiency (one process's seconds / (N x N ranks' seconds)).

    .venv/bin/python bench/finetune_ddp_bench.py [--quick] [--note TEXT]

On a machine with GPUs: the whole Gingerbread seed-compat split (124 train + 60 evaluated clips x 25 frames at 1 fps),
ResNet-18 at 224 px, --unfreeze 1, frames decoded from the videos: 1 GPU vs all of them. On a CPU: the same settings
on a small real subset of Gingerbread (its first clips by participant and piece, 10 frames each), 1 process vs
torchrun with 2 ranks (gloo), and one process on one thread (what torchrun gives each rank). Each configuration is the whole `featseq finetune` command; the figure is the median
of its epochs' seconds (training, then scoring validation and test) from history.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import GINGERBREAD, ROOT, free_port, save  # noqa: E402


def _epochs(run: Path) -> list[float]:
    return [float(r["seconds"]) for r in csv.DictReader(open(run / "history.csv"))]


def main(quick: bool = False, note: str | None = None) -> dict:
    import torch

    from featseq.sequence.results import Results

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    tmp = Path(tempfile.mkdtemp(prefix="featseq-ftddp-"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    cli = [sys.executable, "-c", "from featseq.cli import main; main()"]
    if GINGERBREAD.is_dir():
        from featseq.featurize.sources import read_source

        segs = sorted(read_source(GINGERBREAD)[1], key=lambda s: s.id)
        n_clips = len(segs) if gpus else (12 if quick else 36)
        with open(tmp / "subset.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "group", "id"])
            for s in segs[:n_clips]:
                w.writerow([s.path, s.label, s.group, s.id])
        src = str(tmp / "subset.csv")
        what = (f"the Gingerbread clips ({n_clips} of {len(segs)}" + (", all" if n_clips == len(segs) else
                                                                         ", the first by participant and piece") + ")")
    else:
        from featseq.featurize.synth import render_dataset

        src = render_dataset(tmp / "synth", clips_per_class_per_group=1 if quick else 3, groups=4, long_videos=0,
                             width=224, height=224)["clips_root"]
        what = "synthetic 224 px clips (Gingerbread not found)"
    seq_len = 25 if gpus else (5 if quick else 10)
    size = 224 if not quick else 112
    epochs = 2 if quick else 3
    device = ["--device", "cuda" if gpus else "cpu"]
    subprocess.run(cli + ["featurize", src, "--backbone", "resnet18", "--weights", "none", "--size", str(size),
                          "--fps", "1", "--out", str(tmp / "c.h5"), "-q"] + device, cwd=ROOT, env=env, check=True,
                   capture_output=True)
    subprocess.run(cli + ["train", str(tmp / "c.h5"), "--out", str(tmp / "run"), "--split", "seed-compat", "--fps", "1",
                          "--seq-len", str(seq_len), "--model", "lstm", "--epochs", "3", "--no-plots", "-q"] + device,
                   cwd=ROOT, env=env, check=True, capture_output=True)
    ft = ["finetune", str(tmp / "c.h5"), "--from", str(tmp / "run"), "--unfreeze", "1", "--epochs", str(epochs),
          "--patience", str(epochs + 1), "--no-plots", "-q"] + device
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    # (ranks, extra flags, label): on the CPU also one process on one thread, the share torchrun gives each rank
    if gpus:
        configs = [(1, [], "one process (1 GPU)")] + ([(gpus, [], f"torchrun --nproc-per-node {gpus} ({gpus} GPUs)")]
                                                      if gpus > 1 else [])
    else:
        configs = [(1, [], "one process (CPU, torch's default threads)"),
                   (1, ["--threads", "1"], "one process (CPU, 1 thread)"),
                   (2, [], "torchrun --nproc-per-node 2 (CPU, gloo, 1 thread per rank)")]
    rows = []
    for k, (n, extra, how) in enumerate(configs):
        out = tmp / f"ft{k}"
        launch = cli if n == 1 else [torchrun, "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
                                     "--master-port", str(free_port()), "-m", "featseq"]
        t = time.perf_counter()
        subprocess.run(launch + ft + extra + ["--out", str(out)], cwd=ROOT, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - t
        res = Results.read(out).content
        per = _epochs(out)
        rows.append({"ranks": n, "how": how,
                     "epoch_s": [round(x, 1) for x in per], "median_epoch_s": round(statistics.median(per), 1),
                     "wall_s": round(wall, 1), "n_train": res["n_train"], "n_val": res["n_val"], "n_test": res["n_test"],
                     "val_accuracy": res["val_accuracy"]})
    base = rows[0]["median_epoch_s"]
    for r in rows:
        r["speedup"] = round(base / r["median_epoch_s"], 2)
        r["efficiency"] = round(base / (r["ranks"] * r["median_epoch_s"]), 2)
    data = {"description": f"featseq finetune on {what}: ResNet-18 (--weights none) at {size} px, --unfreeze 1, frozen "
                           f"BatchNorm, {seq_len} frames per clip at 1 fps decoded from the videos, global batch 8, "
                           f"--split seed-compat, {epochs} epochs; seconds per epoch (training, then scoring the "
                           f"validation and test parts) from history.csv, median over the epochs.",
            "device": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": gpus, "rows": rows,
            "note": note}
    print(json.dumps(data, indent=1), flush=True)
    save("finetune_ddp", data)
    return data


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--note", default=None, help="a remark shown with the table (e.g. the machine was shared)")
    a = ap.parse_args()
    main(quick=a.quick, note=a.note)
