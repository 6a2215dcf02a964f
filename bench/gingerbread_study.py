"""The Gingerbread study, reproduced and extended with featseq; writes docs/gingerbread.md.

    .venv/bin/python bench/gingerbread_study.py [--fresh] [--jobs 2] [--work cache/gingerbread_study]

Steps (each timed; a rerun reuses finished caches and runs unless --fresh):

1. featurize ../shared/data/gingerbread/segments at 6 fps (1, 2 and 3 fps are read back exactly) with
   (a) timm:efficientnet_lite0 and the ImageNet weights in ../shared/weights, 224 px, and
   (b) resnet34 with random weights (an untrained control) at 112 px, which keeps the whole study under 30 minutes.
2. The study's grid, fps 1/2/3 x percent 100/80/50 (the study's counts: floor(25.9 s x fps x percent),
   i.e. 25/20/12, 51/41/25, 77/62/38 frames), with an LSTM and the order-blind mean-pooled MLP, under two
   protocols: ``seed-compat`` (the study's random 80/20 clip split, 37 test clips; several training seeds)
   and ``group-kfold`` (5 folds of whole participants; several fold shuffles). Model selection (best epoch)
   always uses validation clips carved out of the training part, never the test clips.
3. A wider sweep (LSTM/GRU/Conv1D/Transformer x hidden x direction) at 1 fps / 100 % on the ImageNet
   features, ranked by mean validation accuracy over participant-held-out folds; the best three are then
   scored under both protocols.
4. A duration-only classifier: clip length alone, same splits (the leak fixed-length windows close).
5. docs/gingerbread.md and bench/results/gingerbread_study.json.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import GINGERBREAD, RESULTS, ROOT, machine  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "weights" / "efficientnet_lite0_timm.pth"
BACKBONES = {
    "effnet": {"title": "EfficientNet-Lite0, ImageNet weights", "backbone": "timm:efficientnet_lite0",
               "weights": str(WEIGHTS), "size": 224},
    "r34": {"title": "ResNet-34, random weights (untrained control)", "backbone": "resnet34", "weights": "none",
            "size": 112},
}
CACHE_FPS = 6.0
PROTOCOLS = {
    "seed-compat": {"title": "seed-compat: the study's random 80/20 split of clips (37 test clips)",
                    "grid": {"split": ["seed-compat"], "seed": [0, 1, 2]}},
    "group-kfold": {"title": "group-kfold: 5 folds of whole participants (every clip tested once per shuffle)",
                    "grid": {"split": ["group-kfold"], "folds": [5], "seed": [0, 1]}},
}
FPS, PERCENTS, WINDOW_S = [1.0, 2.0, 3.0], [100.0, 80.0, 50.0], 25.9
MODELS = {"lstm": "LSTM", "mlp": "mean-pooled MLP (order-blind)"}
TRAINING = {"epochs": [40], "patience": [8], "hidden": [128], "plots": [False], "seconds": [WINDOW_S]}
WIDE = {"model": ["lstm", "gru", "conv1d", "transformer"], "hidden": [64, 256], "bidirectional": [False, True],
        "fps": [1.0], "percent": [100.0], "split": ["group-kfold"], "folds": [5], "seed": [0]}
TOP = 3
CLASSES = ["Classicalmusic", "Instrumentalmusic", "Popmusic"]


# ---------------------------------------------------------------- steps

def featurize_all(work: Path, log) -> dict:
    from featseq.featurize.cache import read_cache
    from featseq.featurize.pipeline import FeaturizeConfig, featurize

    precision = "auto"  # fp16 on CUDA; bf16 on a CPU only where it is native, else fp32
    out = {}
    for key, b in BACKBONES.items():
        t = time.monotonic()
        r = featurize(FeaturizeConfig(source=str(GINGERBREAD), backbone=b["backbone"], weights=b["weights"], size=b["size"],
                                      fps=CACHE_FPS, precision=precision, out=str(work / f"{key}.h5")))
        if r.failures:
            raise SystemExit(f"featurize {key}: {len(r.failures)} clip(s) failed: {r.failures}")
        out[key] = {"path": r.path, "seconds": round(time.monotonic() - t, 1), "frames": r.frames,
                    "written": r.written, "already_cached": r.skipped_done,
                    "cached_frames": len(read_cache(r.path, features=False).timestamps)}
        log(f"featurize {key}: {out[key]}")
    return out


def run_sweep(cache: str, out: Path, grid: dict, jobs: int, log) -> tuple[list[dict], float]:
    """Train every variant (finished ones are skipped); (results of each variant, wall seconds)."""
    from featseq.sequence.results import Results
    from featseq.sequence.sweep import SweepConfig, sweep, variants

    cfg = SweepConfig(cache=cache, out=str(out), grid=grid, jobs=jobs, threads=1 if jobs > 1 else None)
    t = time.monotonic()
    res = sweep(cfg, log=lambda s: None)
    failed = [r for r in res["rows"] if r.get("status") != "complete"]
    if failed:
        raise SystemExit(f"{out}: {len(failed)} variant(s) failed, e.g. {failed[0]}")
    seconds = time.monotonic() - t
    log(f"sweep {out.name}: {res['variants']} variants ({res['trained']} trained) in {seconds:.0f} s")
    return [Results.read(tc.out).content for _, tc in variants(cfg.grid, cfg.cache, cfg.out)], seconds


def fold_scores(r: dict) -> list[float]:
    """Test accuracies a run contributes: one (seed-compat) or one per fold (cross-validation)."""
    return [f["test_accuracy"] for f in fits(r)]


def fits(r: dict) -> list[dict]:
    """The model fits of a run: itself, or one per fold (cross-validation)."""
    return r["per_fold"] if "per_fold" in r else [r]


def clip_frames(r: dict) -> int:
    """Clip-frames passed through the model over the whole run (every used clip once per epoch)."""
    return sum(f["epochs_run"] * (f["n_train"] + f["n_val"] + f["n_test"]) * r["seq_len"] for f in fits(r))


def cell_stats(results: list[dict], **match) -> dict:
    rs = [r for r in results if all(_eq(r["config"][k], v) for k, v in match.items())]
    acc = [a for r in rs for a in fold_scores(r)]
    conf = np.sum([np.asarray(r["confusion"]) for r in rs], axis=0) if rs else None
    return {"n": len(acc), "mean": float(np.mean(acc)) if acc else None, "std": float(np.std(acc)) if acc else None,
            "confusion": conf.tolist() if conf is not None else None, "seq_len": rs[0]["seq_len"] if rs else None}


def _eq(a, b) -> bool:
    return math.isclose(a, b) if isinstance(a, float) or isinstance(b, float) else a == b


def duration_baseline(cache_path: str) -> dict:
    """Clip length alone as the feature: a depth-3 decision tree, scored on the same splits as the grid."""
    from sklearn.tree import DecisionTreeClassifier

    from featseq.featurize.cache import read_cache
    from featseq.sequence.splits import make_folds

    c = read_cache(cache_path, features=False)
    s = c.segments
    dur = np.asarray(s["video_duration"], np.float64)
    labels = np.asarray(s["label"]).astype(str)
    groups = np.asarray(s["group"]).astype(str)
    pieces = np.array([str(i).split("_")[-1] for i in s["id"]])
    out = {"per_class": {k: [round(float(dur[labels == k].mean()), 1), round(float(dur[labels == k].std()), 1),
                             round(float(dur[labels == k].min()), 1), round(float(dur[labels == k].max()), 1)]
                         for k in CLASSES},
           "per_piece": {p: round(float(np.median(dur[pieces == p])), 2) for p in sorted(set(pieces))}}
    for proto, p in PROTOCOLS.items():
        accs = []
        for seed in p["grid"]["seed"]:
            folds = make_folds(p["grid"]["split"][0], labels, groups, seed=seed, folds=p["grid"].get("folds", [5])[0],
                               val_size=0, ids=s["id"])  # the same folds as train's (sequence.splits.folds_for)
            for f in folds:
                tree = DecisionTreeClassifier(max_depth=3, random_state=seed).fit(dur[f.train, None], labels[f.train])
                accs.append(float((tree.predict(dur[f.test, None]) == labels[f.test]).mean()))
        out[proto] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "n": len(accs)}
    return out


# ---------------------------------------------------------------- the document

def _pct(m, s=None) -> str:
    if m is None:
        return "—"
    return f"{100 * m:.1f}" + ("" if s is None else f" ± {100 * s:.1f}")


def _table(head: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def grid_table(cells: dict) -> str:
    rows = []
    for model, mtitle in MODELS.items():
        for fps in FPS:
            rows.append([f"{mtitle}, {fps:g} fps"] + [
                f"{_pct(cells[(model, fps, p)]['mean'], cells[(model, fps, p)]['std'])} "
                f"({cells[(model, fps, p)]['seq_len']} fr.)" for p in PERCENTS])
    return _table(["test accuracy %, mean ± std (frames)"] + [f"{p:g} % of the clip" for p in PERCENTS], rows)


def confusion_table(conf: list[list[int]]) -> str:
    short = [c.replace("music", "") for c in CLASSES]
    return _table(["true \\ predicted"] + short, [[short[i]] + list(row) for i, row in enumerate(conf)])


def findings(d: dict) -> list[str]:
    """Sentences computed from the tables (so they stay true when the numbers change)."""
    out = []
    for key, b in BACKBONES.items():
        for proto in PROTOCOLS:
            cells = d["cells"][key][proto]
            parts = []
            for model, title in MODELS.items():
                v = [100 * cells[(model, f, p)]["mean"] for f in FPS for p in PERCENTS]
                parts.append(f"{title.split(' (')[0]} {min(v):.1f}-{max(v):.1f} % (mean {np.mean(v):.1f})")
            out.append(f"- {b['title']}, {proto}: " + "; ".join(parts) + " over the 9 cells.")
    se = math.sqrt(1 / 3 * 2 / 3 / 184)
    lo, hi = 100 * (1 / 3 - 2 * se), 100 * (1 / 3 + 2 * se)
    above = [f"{BACKBONES[k]['title'].split(',')[0]} {MODELS[m].split(' (')[0]} {f:g} fps {p:g} %"
             for k in BACKBONES for (m, f, p), c in d["cells"][k]["group-kfold"].items() if 100 * c["mean"] > hi]
    out.append("- On participants the models never saw (group-kfold), "
               + ("every cell lies within two standard errors of chance "
                  f"({lo:.0f}-{hi:.0f} %): neither backbone, sequence model, frame rate nor clip percentage "
                  "generalises to new people here." if not above else
                  f"{len(above)} of {len(BACKBONES) * 2 * 9} cells lie above two standard errors of chance "
                  f"({hi:.0f} %): {', '.join(above)}."))
    mean = {(k, p): 100 * np.mean([c["mean"] for c in d["cells"][k][p].values()]) for k in BACKBONES for p in PROTOCOLS}
    gap = mean[("effnet", "seed-compat")] - mean[("effnet", "group-kfold")]
    if gap > 5:
        out.append(f"- With ImageNet features the models average {mean[('effnet', 'seed-compat')]:.1f} % under seed-compat "
                   f"but {mean[('effnet', 'group-kfold')]:.1f} % under group-kfold: what they learn does not carry over to "
                   "new participants. A random split of clips puts each test participant's other clips in the training "
                   f"part. The untrained control averages {mean[('r34', 'seed-compat')]:.1f} % under seed-compat, a "
                   "measure of what that split gives away without trained visual features.")
    else:
        out.append(f"- Both protocols agree within {abs(gap):.1f} points on average with ImageNet features.")
    du = d["duration"]
    out.append(f"- Clip length alone predicts the class {100 * du['group-kfold']['mean']:.0f} % of the time (see the caution "
               "below): a published accuracy on these clips means little unless the model could not see the length.")
    return out


def render(d: dict) -> str:
    m, t = d["machine"], d["timings"]
    se37 = math.sqrt(1 / 3 * 2 / 3 / 37)
    se184 = math.sqrt(1 / 3 * 2 / 3 / 184)
    lines = [
        "# The Gingerbread study with featseq", "",
        "Regenerated from scratch by `make study` (`.venv/bin/python bench/gingerbread_study.py --fresh`) from "
        "`../shared/data/gingerbread/segments`: 184 clips of animated physiological signals, 23 participants x 8 "
        "pieces, three classes (Classicalmusic = pieces 01-04, Instrumentalmusic = 05-08, Popmusic = 09-12). "
        f"Every number below comes from that run ({m['date']}, {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}, "
        f"torch {m['torch']}); the raw results are in `bench/results/gingerbread_study.json`.", "",
        "## What the numbers mean", "",
        "- Chance is about 33 % (classes: " + ", ".join(f"{k} {v}" for k, v in d["class_counts"].items()) + " clips).",
        f"- `seed-compat` tests the same 37 clips every time: one accuracy has a binomial standard error of about "
        f"{100 * se37:.0f} points, and the ± (over training seeds) does not include it. Differences under ~15 points "
        "between cells of that protocol are not evidence of anything.",
        f"- `group-kfold` tests every clip once per shuffle on participants the model never saw (standard error over "
        f"184 clips about {100 * se184:.1f} points); ± is the spread over its {d['protocol_n']['group-kfold']} "
        "held-out folds (5 folds x shuffles). This is the protocol that says whether a model generalises to new people.",
        "- In both, the best epoch is chosen on validation clips carved out of the training part (participants "
        "held out as well under `group-kfold`); the test clips never influence training or selection, unlike the "
        "original study, which reported test accuracy per epoch.",
        f"- Sequences are the study's: the first {WINDOW_S:g} s window of each clip at 1/2/3 fps, keeping 100/80/50 % "
        "of it (frame counts in brackets). One clip (P09/music02, 6 s) is shorter and is padded and masked.", ""]
    lines += ["## Findings", "", *findings(d), ""]
    for key, b in BACKBONES.items():
        lines += [f"## {b['title']}", "",
                  f"`{b['backbone']}`, {b['size']} px, features cached once at {CACHE_FPS:g} fps "
                  f"({d['featurize'][key]['cached_frames']} frames, {d['featurize'][key]['seconds']:.0f} s). "
                  f"± is the spread over seeds (seed-compat) or over held-out folds (group-kfold).", ""]
        for proto, p in PROTOCOLS.items():
            lines += [f"### {p['title']}", "", grid_table(d["cells"][key][proto]), ""]
    lines += ["## Confusion matrices", "",
              "LSTM at 1 fps, 100 %, summed over seeds (seed-compat: the 37 test clips x seeds; group-kfold: "
              "every clip once per shuffle, out of fold).", ""]
    for key, b in BACKBONES.items():
        for proto in PROTOCOLS:
            c = d["cells"][key][proto][("lstm", 1.0, 100.0)]
            lines += [f"**{b['title']}, {proto}** (accuracy {_pct(c['mean'])} %)", "", confusion_table(c["confusion"]), ""]
    w = d["wide"]
    lines += ["## A wider sweep", "",
              f"{w['variants']} variants ({', '.join(WIDE['model'])} x hidden {'/'.join(map(str, WIDE['hidden']))} x "
              "uni/bidirectional for the recurrent ones) on the ImageNet features at 1 fps, 100 %, ranked by mean "
              f"validation accuracy over 5 participant-held-out folds ({w['seconds']:.0f} s). The best {TOP}, then "
              "scored like the grid (test accuracy %, mean ± std):", "",
              _table(["variant", "sweep validation %", "seed-compat test %", "group-kfold test %"],
                     [[r["name"], _pct(r["val"]), _pct(r["seed-compat"]["mean"], r["seed-compat"]["std"]),
                       _pct(r["group-kfold"]["mean"], r["group-kfold"]["std"])] for r in w["top"]]), ""]
    du = d["duration"]
    lines += ["## A caution: clip length gives the label away", "",
              "Clips last as long as their piece of music, and the pieces of one class have similar lengths:", "",
              _table(["class", "mean s", "std s", "min s", "max s"], [[k] + v for k, v in du["per_class"].items()]), "",
              "Median length per piece (s): " + ", ".join(f"{k} {v}" for k, v in du["per_piece"].items()) + ".", "",
              "A classifier that sees nothing but the clip's length (a depth-3 decision tree on the duration) scores "
              + ", ".join(f"**{_pct(du[p]['mean'], du[p]['std'] or None)} %** under {p}" for p in PROTOCOLS)
              + ". Any model that can see how long a clip is (variable-length sequences, a padding mask it can count, "
              "a frame count as a feature) can learn this shortcut instead of the signals. featseq's sequences have a "
              "fixed length cut from the start of every clip (`--seconds`/`--percent`/`--seq-len`), so they carry no "
              "length information; keep it that way (e.g. do not train on whole clips with `--seconds` above the "
              "shortest clip's length).", ""]
    orig = d["original"]
    lines += ["## How long it took", "",
              _table(["step", "seconds"], [[k, f"{v:.0f}"] for k, v in t.items()]), "",
              f"The whole study ({d['fits']} model fits, {d['epochs']} epochs) took **{t['total'] / 60:.1f} minutes** "
              f"on this machine. The original pipeline re-runs a frozen CNN over JPEG frames of every clip in every "
              f"epoch: its cost per clip-frame and epoch measured by `make bench` (bench/train_bench.py, ResNet-18, the "
              f"cheapest backbone) is {1000 * orig['s_per_clip_frame']:.1f} ms, so the same {orig['clip_frames'] / 1e6:.1f} "
              f"million clip-frame passes would take about **{orig['seconds'] / 3600:.0f} hours** "
              f"({orig['ratio']:.0f}x longer), before its one-time JPEG extraction per frame rate.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / "cache" / "gingerbread_study"), help="caches and run folders")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="delete --work first (the whole study from scratch)")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "gingerbread.md"))
    a = ap.parse_args()
    if not GINGERBREAD.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"the study needs {GINGERBREAD} and {WEIGHTS} (../shared beside the repository)")
    work = Path(a.work)
    if a.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def log(s: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f} s] {s}", flush=True)

    timings: dict[str, float] = {}
    feats = featurize_all(work, log)
    for key in BACKBONES:
        timings[f"featurize {key}"] = feats[key]["seconds"]
    base = {**TRAINING, "fps": FPS, "percent": PERCENTS, "model": list(MODELS)}
    cells, all_results = {}, []
    for key in BACKBONES:
        cells[key] = {}
        for proto, p in PROTOCOLS.items():
            results, sec = run_sweep(feats[key]["path"], work / f"{key}__{proto}", {**base, **p["grid"]}, a.jobs, log)
            timings[f"grid {key} {proto}"] = sec
            all_results += results
            cells[key][proto] = {(m, f, pc): cell_stats(results, model=m, fps=f, percent=pc)
                                 for m in MODELS for f in FPS for pc in PERCENTS}
    wide_results, sec = run_sweep(feats["effnet"]["path"], work / "wide", {**TRAINING, **WIDE}, a.jobs, log)
    timings["wide sweep"] = sec
    all_results += wide_results
    ranked = sorted(wide_results, key=lambda r: (-r["val_accuracy"], r["val_loss"]))[:TOP]
    top, t = [], time.monotonic()
    for i, r in enumerate(ranked):
        c = r["config"]
        arch = {k: [c[k]] for k in ("model", "hidden", "bidirectional")}
        name = f"{c['model']} hidden {c['hidden']}" + (" bidirectional" if c["bidirectional"] and c["model"] in ("lstm", "gru") else "")
        row = {"name": name, "val": r["val_accuracy"]}
        for proto, p in PROTOCOLS.items():
            res, _ = run_sweep(feats["effnet"]["path"], work / f"top{i + 1}__{proto}",
                               {**TRAINING, **p["grid"], **arch, "fps": [1.0], "percent": [100.0]}, a.jobs, log)
            all_results += res
            row[proto] = cell_stats(res)
        top.append(row)
    timings["best variants, both protocols"] = time.monotonic() - t
    t = time.monotonic()
    duration = duration_baseline(feats["effnet"]["path"])
    timings["duration-only classifier"] = time.monotonic() - t
    timings["total"] = time.monotonic() - t0

    orig = json.loads((RESULTS / "train.json").read_text()) if (RESULTS / "train.json").exists() else None
    passes = sum(clip_frames(r) for r in all_results)
    # bench/train_bench.py times one original epoch over its clips x frames per clip
    per = orig["times"]["original: one epoch"] / (orig["clips"] * orig["seq_len"]) if orig else float("nan")
    original = {"s_per_clip_frame": per, "clip_frames": passes, "seconds": passes * per,
                "ratio": passes * per / timings["total"]}
    from featseq.featurize.cache import read_cache

    labels = np.asarray(read_cache(feats["effnet"]["path"], features=False).segments["label"]).astype(str)
    d = {"machine": machine(), "timings": {k: round(v, 1) for k, v in timings.items()}, "featurize": feats,
         "cells": cells, "wide": {"variants": len(wide_results), "seconds": timings["wide sweep"], "top": top},
         "duration": duration, "original": original,
         "fits": sum(len(fold_scores(r)) for r in all_results),
         "epochs": sum(f["epochs_run"] for r in all_results for f in fits(r)),
         "class_counts": {k: int((labels == k).sum()) for k in CLASSES},
         "protocol_n": {proto: cells["effnet"][proto][("lstm", 1.0, 100.0)]["n"] for proto in PROTOCOLS}}
    doc = Path(a.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render(d))
    flat = {**d, "cells": {k: {p: [{"model": m, "fps": f, "percent": pc, **v} for (m, f, pc), v in cells[k][p].items()]
                               for p in cells[k]} for k in cells}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gingerbread_study.json").write_text(json.dumps(flat, indent=2, default=str))
    log(f"wrote {doc} and {RESULTS / 'gingerbread_study.json'} in {timings['total'] / 60:.1f} min")


if __name__ == "__main__":
    main()
