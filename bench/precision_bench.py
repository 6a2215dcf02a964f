"""fp32 against bf16 features on the real Gingerbread clips (issue 27): does the fast precision change results?

    .venv/bin/python bench/precision_bench.py [--fps 1] [--seeds 3] [--work /tmp/featseq-precision]

1. featurize all 184 clips with timm:efficientnet_lite0 and its ImageNet weights (../shared/weights), 224 px, at
   ``--fps``, once with ``--precision fp32`` and once with ``--precision bf16`` (timed: whole command, frames/s);
2. what the features mean: the backbone's own ImageNet classifier (the weights file's ``classifier`` layer) applied
   to every frame's fp32 and bf16 features: how often the top-1 class agrees, the top-5 sets' overlap (a task on
   which the features are informative, unlike the study's three pieces, where test accuracy stays near chance);
3. ``featseq compare`` of the two caches: per-segment cosine of timestamp-matched frames, linear CKA, and the same
   LSTM and mean-pooled MLP trained on each over ``--seeds`` seeds under seed-compat (the study's 80/20 clip split)
   and group-kfold (5 folds of whole participants), plus cross-evaluation (a model trained on one cache tested on
   the other);
4. bench/results/precision.json, rendered by bench/run.py into BENCHMARKS.md ("Precision").

bf16's speed depends on the CPU (native with AVX512-BF16/AMX, emulated and slow elsewhere: the JSON records which);
its numerics do not, so the similarity and accuracy columns answer the default-precision question on any machine.
Not part of ``make bench``'s default list: on a 2-core AVX2 machine bf16 took 45 minutes (emulated), fp32 under 3.
``--reuse`` keeps caches already made in ``--work`` (and their timing rows from the last results) and redoes the rest.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import GINGERBREAD, RESULTS, ROOT, machine, save  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "weights" / "efficientnet_lite0_timm.pth"
FEATSEQ = [sys.executable, "-m", "featseq"]


def featurize(out: Path, precision: str, fps: float) -> dict:
    cmd = FEATSEQ + ["featurize", str(GINGERBREAD), "--backbone", "timm:efficientnet_lite0", "--weights", str(WEIGHTS),
                     "--size", "224", "--fps", f"{fps:g}", "--precision", precision, "--out", str(out), "-q"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t
    import h5py

    with h5py.File(out, "r") as f:
        frames = int(f["features"].shape[0])
    return {"precision": precision, "seconds": round(seconds, 1), "frames": frames,
            "frames_per_s": round(frames / seconds, 1)}


def imagenet_agreement(a_path: Path, b_path: Path) -> dict:
    """Top-1 agreement and top-5 overlap of the weights' ImageNet classifier on the frames of two caches of the same
    segments (matched by segment id; frame k of one against frame k of the other)."""
    import numpy as np
    import torch
    from featseq.featurize.cache import read_cache

    sd = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    w, bias = sd["classifier.weight"].float().numpy(), sd["classifier.bias"].float().numpy()
    a, b = read_cache(a_path), read_cache(b_path)
    where = {sid: k for k, sid in enumerate(b.ids)}
    top1, top5, n = 0, 0.0, 0
    for k, sid in enumerate(a.ids):
        j = where[sid]
        oa, na = int(a.segments["offset"][k]), int(a.segments["length"][k])
        ob, nb = int(b.segments["offset"][j]), int(b.segments["length"][j])
        assert na == nb, (sid, na, nb)
        la = a.features[oa:oa + na].astype(np.float32) @ w.T + bias
        lb = b.features[ob:ob + nb].astype(np.float32) @ w.T + bias
        top1 += int((la.argmax(1) == lb.argmax(1)).sum())
        ta, tb = np.argsort(-la, 1)[:, :5], np.argsort(-lb, 1)[:, :5]
        top5 += sum(len(set(x) & set(y)) / 5 for x, y in zip(ta.tolist(), tb.tolist()))
        n += na
    return {"frames": n, "top1_agreement": round(top1 / n, 4), "top5_overlap": round(top5 / n, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/featseq-precision"))
    ap.add_argument("--reuse", action="store_true", help="keep caches already in --work and their timing rows")
    args = ap.parse_args()
    if not GINGERBREAD.is_dir() or not WEIGHTS.is_file():
        sys.exit(f"needs {GINGERBREAD} and {WEIGHTS} (../shared)")
    from featseq.featurize.precision import cpu_bf16_native

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    saved = {}
    if args.reuse and (RESULTS / "precision.json").exists():
        saved = {r["precision"]: r for r in json.loads((RESULTS / "precision.json").read_text())["featurize"]}
    for p in ("fp32", "bf16"):
        cache = args.work / f"gingerbread_{p}.h5"
        if args.reuse and cache.exists() and p in saved:
            rows.append(saved[p])
            continue
        if cache.exists():
            cache.unlink()  # timed from scratch
        rows.append(featurize(cache, p, args.fps))
        print(rows[-1], flush=True)
    agreement = imagenet_agreement(args.work / "gingerbread_fp32.h5", args.work / "gingerbread_bf16.h5")
    print("ImageNet classifier on both:", agreement, flush=True)
    out = args.work / "compare"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(FEATSEQ + ["compare", str(args.work / "gingerbread_fp32.h5"), str(args.work / "gingerbread_bf16.h5"),
                              "--out", str(out), "--model", "lstm,mlp", "--seeds", str(args.seeds),
                              "--split", "seed-compat,group-kfold", "--fps", f"{args.fps:g}", "--seconds", "25.9",
                              "--epochs", "40", "--patience", "8", "--plots", "false"], check=True)
    res = json.loads((out / "compare.json").read_text())
    variants = [{"variant": v["variant"], "split": v["split"], "seeds": v["seeds"],
                 **{k: v[k] for k in ("test_A", "test_A_std", "test_B", "test_B_std", "cross_A->B", "cross_B->A")}}
                for v in res["variants"]]
    data = {"machine": machine(), "cpu_bf16_native": cpu_bf16_native(), "fps": args.fps, "seeds": args.seeds,
            "backbone": "timm:efficientnet_lite0 (ImageNet weights), 224 px", "featurize": rows,
            "similarity": res["similarity"], "imagenet": agreement, "variants": variants,
            "command": "python bench/precision_bench.py " + " ".join(sys.argv[1:])}
    print(json.dumps({k: data[k] for k in ("featurize", "similarity", "imagenet", "variants")}, indent=1))
    print("saved", save("precision", data))


if __name__ == "__main__":
    main()
