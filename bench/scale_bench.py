"""Scale: the cache writer and cache commands at the sizes users have (UCF-101: 13,320 clips; Kinetics-400: ~300k).

Synthetic caches written by featseq's own CacheWriter (random float16 features, 101 classes, 25 groups):

* writer: segments/s and frames/s for 10-frame x 2048-dim segments (1 fps, 10 s clips: the case where a fixed
  cost per segment shows most) and 35-frame x 2048 (UCF-101 at 5 fps), publishing every segment on its own
  (group_seconds=0, the writer before group commits) against groups (the default), taken in turn per round;
* cache info / verify / merge of two halves on the UCF-101-sized cache;
* train on it (LSTM, hidden 128, 5 fps, 3 epochs, --split random): load, seconds per epoch against a plain PyTorch
  loop with the same model, batch and data (float32 tensors in memory, timed in the same run), the tail after
  training (predictions, per-class files, plots, checkpoint) and the peak RSS against the cache file's size;
* sweep --jobs 2 (lstm, gru; 2 epochs): the peak of all its processes, RSS and PSS (PSS counts the pages that
  the workers share, one memory-mapped copy of the features, once);
* CacheDataset items/s through a DataLoader with 0 and 2 workers;
* the table-sized costs at Kinetics scale: 100,000 segments x 10 frames x 256 dims (the rows, not the features,
  are what grows there): writer, cache info, verify, train's load.

    .venv/bin/python bench/scale_bench.py [--quick]
    .venv/bin/python bench/scale_bench.py --train-only   # those after the cache commands again, into the saved results
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, ROOT, median, run_with_peak_rss, save  # noqa: E402
from featseq.featurize.cache import string_widths  # noqa: E402
from featseq.featurize.writer import GROUP_SECONDS, CacheWriter  # noqa: E402

DIM = 2048
FEATSEQ = [sys.executable, "-m", "featseq"]


def rows_for(n: int) -> list[dict]:
    return [{"id": f"v_{i % 101:03d}_g{i % 25:02d}_c{i:06d}", "label": f"class{i % 101:03d}", "group": f"g{i % 25:02d}",
             "path": f"/data/ucf/{i}.avi"} for i in range(n)]


def write(path: Path, n: int, frames: int, group_seconds: float, shard: tuple[int, int] | None = None,
          dim: int = DIM) -> float:
    """Write n segments of ``frames`` x ``dim``; seconds spent in the writer (features made beforehand). Features are
    class centres plus noise, so a model can learn them (a run at chance would stop early and time nothing)."""
    rows = rows_for(n)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((101, 1, dim)).astype("float16")
    noise = (2.0 * rng.standard_normal((64, frames, dim))).astype("float16")  # 64 distinct draws, reused
    ts = np.arange(frames) / 5.0
    attrs = {"backbone": "resnet50", "weights": "none-seed0", "size": 224, "resize": "squash", "fps": 5.0,
             "precision": "fp32", "dtype": "float16"}
    if shard:
        attrs.update(shard_index=shard[0], shard_count=shard[1],
                     shard_plan={r["id"]: i % shard[1] for i, r in enumerate(rows)})
        rows = [r for i, r in enumerate(rows) if i % shard[1] == shard[0]]
    t = time.perf_counter()
    with CacheWriter(str(path), attrs, {"source": "scale_bench"}, dim, string_widths(rows),
                     group_seconds=group_seconds) as w:
        for r in rows:
            i = int(r["id"][-6:])
            w.append({**r, "start": 0.0, "end": frames / 5.0}, centres[i % 101] + noise[i % 64], ts)
    return time.perf_counter() - t


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t


TRAIN = ["--model", "lstm", "--hidden", "128", "--fps", "5", "--split", "random"]


def plain_epoch_s(path: Path, n_train: int, n_eval: int, seq_len: int, batch: int, epochs: int = 3) -> float:
    """Seconds per epoch of a plain PyTorch loop: every segment's first ``seq_len`` frames as one float32 tensor in
    memory, nn.LSTM(hidden 128) + a linear head, AdamW, a shuffled pass over ``n_train`` segments with backward and
    a forward pass over ``n_eval`` (featseq's epoch scores the validation and test parts: the same work); median of
    the epochs after the first."""
    import torch
    from torch import nn
    from featseq.featurize.cache import read_cache

    c = read_cache(path)
    idx = c.segments["offset"][:, None] + np.arange(seq_len)[None]
    x = torch.from_numpy(c.features[idx].astype(np.float32))
    y = torch.tensor([int(s[5:]) for s in c.segments["label"]])
    del c
    torch.manual_seed(0)
    lstm, head = nn.LSTM(x.shape[2], 128, batch_first=True), nn.Linear(128, 101)
    opt = torch.optim.AdamW(list(lstm.parameters()) + list(head.parameters()), lr=1e-3)
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        for b in torch.randperm(n_train).split(batch):
            opt.zero_grad()
            out, _ = lstm(x[b])
            nn.functional.cross_entropy(head(out[:, -1]), y[b]).backward()
            opt.step()
        with torch.no_grad():
            for b in torch.arange(n_train, n_train + n_eval).split(batch):
                lstm(x[b])
        times.append(time.perf_counter() - t)
    return median(times[1:])


def imports_mib() -> int:
    """RSS (MiB) of a process that has imported what train imports and done nothing else: the fixed part of train's
    peak (torch alone is about 500 MiB), which does not grow with the cache."""
    code = ("import featseq.sequence.train; print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0]"
            ".split()[1])")
    return round(int(subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                                    text=True).stdout.split()[-1]) / 1024)


def train_section(big: Path, tmp: Path, epochs: int) -> dict:
    """featseq train and sweep --jobs 2 on the big cache; the plain loop; CacheDataset items/s."""
    import json

    mb = big.stat().st_size / 2**20
    r = run_with_peak_rss(FEATSEQ + ["train", str(big), *TRAIN, "--epochs", str(epochs), "--out", str(tmp / "run")],
                          pss=False)  # timed: no page-table walks beside it (one process: its RSS is the figure)
    res = json.loads((tmp / "run" / "results.json").read_text())
    t = res["timings"]
    plain = plain_epoch_s(big, res["n_train"], res["n_val"] + res["n_test"], res["seq_len"], 32, epochs)
    train = {"cache_mib": round(mb), "epochs": res["epochs_run"], "load_s": t["load_s"],
             "per_epoch_s": round(t["per_epoch_s"], 2), "plain_loop_per_epoch_s": round(plain, 2),
             "per_epoch_ratio": round(t["per_epoch_s"] / plain, 2),
             "setup_s": t.get("setup_s"),
             "tail_s": round(t["total_s"] - t["load_s"] - t.get("setup_s", 0.0) - t["train_s"], 2), "total_s": t["total_s"],
             "wall_s": round(r["seconds"], 1), "peak_rss_mib": round(r["peak_tree_mib"]),
             "peak_rss_x_cache": round(r["peak_tree_mib"] / mb, 2), "test_accuracy": round(res["test_accuracy"], 3)}
    train["imports_mib"] = imports_mib()
    train["beyond_imports_x_cache"] = round((r["peak_tree_mib"] - train["imports_mib"]) / mb, 2)
    if "score_train_s" in t:  # the tail's parts (results.json's timings)
        train.update(tail_score_train_s=t["score_train_s"], tail_write_s=t["write_s"])
    print(train, flush=True)
    r = run_with_peak_rss(FEATSEQ + ["sweep", str(big), *TRAIN, "--model", "lstm,gru", "--epochs", str(epochs - 1), "--jobs", "2",
                                     "--out", str(tmp / "sweep")])
    sweep = {"jobs": 2, "variants": 2, "wall_s": round(r["seconds"], 1), "peak_rss_mib": round(r["peak_tree_mib"]),
             "peak_pss_mib": round(r["peak_tree_pss_mib"]), "peak_rss_x_cache": round(r["peak_tree_mib"] / mb, 2),
             "peak_pss_x_cache": round(r["peak_tree_pss_mib"] / mb, 2)}
    print(sweep, flush=True)
    return {"train": train, "sweep": sweep, "dataset": dataset_rates(big)}


def dataset_rates(big: Path, items: int = 4000) -> list[dict]:
    import torch
    from featseq.sequence.dataset import CacheDataset

    out = []
    for memory_map in (False, True):
        ds = CacheDataset(big, part="train", fps=5, split="random", memory_map=memory_map)
        if memory_map:
            ds[0]  # the copy is made once per cache version (train and sweep workers make it too): not timed
        for workers in (0, 2):
            loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, num_workers=workers)
            t, n = None, 0
            for x, _, _ in loader:
                if t is None:  # from the first batch on: the workers' start is not an item's cost
                    t = time.perf_counter()
                    continue
                n += len(x)
                if n >= items:
                    break
            out.append({"reads": "memory map" if memory_map else "HDF5", "workers": workers, "items": n,
                        "items_per_s": round(n / (time.perf_counter() - t))})
            print(out[-1], flush=True)
    return out


def kinetics_rows(tmp: Path, n: int) -> list[dict]:
    """Costs that grow with the number of segments, not their size: n x 10 frames x 256 dims."""
    path = tmp / "k400.h5"
    secs = write(path, n, 10, GROUP_SECONDS, dim=256)
    rows = [{"what": "writer", "segments": n, "seconds": round(secs, 2), "segments_per_s": round(n / secs)}]
    for name, cmd in (("cache info", FEATSEQ + ["cache", "info", str(path)]),
                      ("cache verify", FEATSEQ + ["cache", "verify", str(path)]),
                      ("train, 1 epoch (--no-plots)", FEATSEQ + ["train", str(path), *TRAIN, "--epochs", "1",
                                                                 "--no-plots", "--out", str(tmp / "krun")])):
        rows.append({"what": name, "segments": n, "seconds": round(timed(cmd), 2)})
        print(rows[-1], flush=True)
    import json

    t = json.loads((tmp / "krun" / "results.json").read_text())["timings"]
    rows.append({"what": "train: load", "segments": n, "seconds": t["load_s"]})
    rows.append({"what": "train: tail (no plots)", "segments": n,
                 "seconds": round(t["total_s"] - t["load_s"] - t["train_s"], 2)})
    return rows


def train_only() -> dict:
    """Rerun the training and Kinetics-scale rows alone (on a fresh UCF-101-sized cache) into the saved results: for
    a quiet machine, keeping the writer and cache-command rows of the last full run."""
    import json

    saved = json.loads((RESULTS / "scale.json").read_text())
    saved.pop("machine", None)
    tmp = Path(tempfile.mkdtemp(prefix="featseq-scale-"))
    try:
        n = saved.get("train_segments", 13320)
        write(tmp / "ucf.h5", n, 35, GROUP_SECONDS)
        saved.update(train_section(tmp / "ucf.h5", tmp, 3), train_segments=n)
        saved["kinetics"] = kinetics_rows(tmp, 100000)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save("scale", saved)
    return saved


def main(quick: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="featseq-scale-"))
    sizes = [(500, 10), (2000, 10)] if quick else [(1000, 10), (13320, 10), (13320, 35)]
    rounds = 1 if quick else 2
    out = {"feature_dim": DIM, "dtype": "float16", "group_seconds": GROUP_SECONDS, "writer": [], "commands": []}
    try:
        for n, frames in sizes:
            got = {"per_segment": [], "grouped": []}
            for _ in range(rounds):
                for name, gs in (("per_segment", 0.0), ("grouped", GROUP_SECONDS)):
                    p = tmp / f"w_{name}.h5"
                    got[name].append(write(p, n, frames, gs))
                    p.unlink()
            row = {"segments": n, "frames_per_segment": frames}
            for name, secs in got.items():
                s = median(secs)
                row[f"{name}_segments_per_s"] = round(n / s)
                row[f"{name}_frames_per_s"] = round(n * frames / s)
            row["speedup"] = round(row["grouped_segments_per_s"] / row["per_segment_segments_per_s"], 1)
            out["writer"].append(row)
            print(row, flush=True)
        n, frames = sizes[-1]
        big = tmp / "ucf.h5"
        write(big, n, frames, GROUP_SECONDS)
        mb = big.stat().st_size / 1e6
        merged = tmp / "merged" / "ucf.h5"
        merged.parent.mkdir()
        for k in range(2):
            write(merged.with_name(f"ucf.part-{k}-of-2.h5"), n, frames, GROUP_SECONDS, shard=(k, 2))
        for name, cmd in (("cache info", FEATSEQ + ["cache", "info", str(big)]),
                          ("cache verify", FEATSEQ + ["cache", "verify", str(big)]),
                          ("cache merge (2 parts)", FEATSEQ + ["cache", "merge", str(merged)])):
            row = {"command": name, "segments": n, "frames_per_segment": frames, "mb": round(mb), "seconds": round(timed(cmd), 2)}
            out["commands"].append(row)
            print(row, flush=True)
        out.update(train_section(big, tmp, 2 if quick else 3), train_segments=n)
        out["kinetics"] = kinetics_rows(tmp, 4000 if quick else 100000)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save("scale", out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train-only", action="store_true", help="rerun the train, sweep, CacheDataset and Kinetics-scale rows into the saved results")
    args = ap.parse_args()
    train_only() if args.train_only else main(args.quick)
