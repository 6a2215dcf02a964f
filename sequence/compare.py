"""Compare two feature caches of the same segments (low vs high resolution, two backbones, ...).

``featseq compare CACHE_A CACHE_B --out DIR [--model lstm,conv1d --seeds 3 ...]``

* Only the segments common to both caches (matched by id) are used, in A's order, so both sides
  see the same ids, labels and groups and every split is identical given the same seed.
* Feature similarity: frames matched by timestamp (nearest, within half a frame period of the
  faster cache). Mean cosine per segment (only where the feature dims match) and linear CKA over
  all matched frames (defined for any two dims; Kornblith et al. 2019).
* The same variants (sequence.grid's expansion of the training options, as in a sweep) trained on each cache
  with seeds 0..N-1; mean +- std of test accuracy over seeds; per-class accuracy side by side.
* Cross-evaluation when dims match: the model trained on A scored on B's features of its own test
  ids, and the reverse.

Outputs: ``summary.md`` (tables), ``compare.json``, ``compare.png``, ``similarity.csv`` (per segment),
``runs/A|B/<variant>/seed<k>/`` run folders.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from featseq.featurize.backbones import resolve_device
from featseq.featurize.cache import Cache, read_cache
from featseq.common.errors import UserError

from . import plots, tracking
from .grid import refuse_ranges, resolve_split, variants
from .reader import check_fps
from .results import mean_std, write_json
from .run import CHECKPOINT, Run
from .train import train
from .windows import EPS, match_frames, resolve_seq_len


class CompareError(UserError):
    """The two caches cannot be compared as asked; the message says why."""


@dataclass
class CompareConfig:
    cache_a: str
    cache_b: str
    out: str
    grid: dict = field(default_factory=dict)   # train option -> list of values (as for sweep), without seed
    seeds: int = 3
    plots: bool = True
    track: str = "none"   # trackers of the comparison and its runs (sequence.tracking)

    def validate(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        tracking.parse_track(self.track)
        refuse_ranges(self.grid, "compare trains every combination of comma lists; search ranges with featseq sweep "
                                 "--search tpe")


# ---------------------------------------------------------------- caches restricted to common segments

def subset(cache: Cache, ids: list[str]) -> Cache:
    """A new in-memory cache holding only ``ids`` (in that order), offsets renumbered."""
    pos = {s: i for i, s in enumerate(cache.segments["id"])}
    idx = np.array([pos[s] for s in ids], dtype=np.int64)
    seg = {k: np.asarray(v)[idx] for k, v in cache.segments.items()}
    off, length = cache.segments["offset"][idx], cache.segments["length"][idx]
    rows = np.concatenate([np.arange(o, o + n) for o, n in zip(off, length)]) if len(idx) else np.zeros(0, np.int64)
    seg["offset"] = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64) if len(idx) else off
    feats = cache.features[rows] if cache.features is not None else None
    return Cache(cache.path, dict(cache.attrs), seg, feats, cache.timestamps[rows])


def common_ids(a: Cache, b: Cache) -> list[str]:
    have = set(b.segments["id"])
    ids = [s for s in a.segments["id"] if s in have]
    if not ids:
        raise CompareError(f"{a.path} and {b.path} share no segment id (e.g. {a.segments['id'][:2].tolist()} vs "
                           f"{b.segments['id'][:2].tolist()}); featurize the same source into both caches")
    return ids


def check_sampling(a: Cache, b: Cache, fps: float | None) -> float:
    """The fps both sides are read at; CompareError when the caches' sampling makes the comparison meaningless."""
    fa, fb = float(a.attrs.get("fps", 0) or 0), float(b.attrs.get("fps", 0) or 0)
    if fa <= 0 or fb <= 0:
        raise CompareError(f"{a.path if fa <= 0 else b.path}: the cache has no fps attribute")
    read = min(fa, fb) if fps is None else float(fps)
    for c, f in ((a, fa), (b, fb)):
        check_fps(read, f, c.path, attrs=c.attrs)
    if fps is None and abs(fa - fb) > EPS:
        # both are read on the slower grid; it must be a sub-grid of the faster one or frames won't line up
        ratio = max(fa, fb) / min(fa, fb)
        if abs(ratio - round(ratio)) > 1e-6:
            raise CompareError(f"the caches sample at {fa:g} and {fb:g} fps: neither grid is a sub-grid of the other, "
                               f"so their frames do not line up; pass --fps F with F dividing both (or re-featurize)")
    sa, sb = a.segments, b.segments
    pos = {s: i for i, s in enumerate(sb["id"])}
    bad_label, bad_bounds = [], []
    tol = 1.0 / min(fa, fb) + EPS
    for i, s in enumerate(sa["id"]):
        j = pos[s]
        if sa["label"][i] != sb["label"][j]:
            bad_label.append(f"{s} ({sa['label'][i]} vs {sb['label'][j]})")
        if abs(sa["start"][i] - sb["start"][j]) > tol or abs(sa["end"][i] - sb["end"][j]) > tol:
            bad_bounds.append(f"{s} ([{sa['start'][i]:g}, {sa['end'][i]:g}) vs [{sb['start'][j]:g}, {sb['end'][j]:g}))")
    if bad_label:
        raise CompareError(f"{len(bad_label)} common segment(s) have different labels in the two caches, e.g. "
                           f"{'; '.join(bad_label[:3])}; they were not made from the same source")
    if bad_bounds:
        raise CompareError(f"{len(bad_bounds)} common segment(s) cover different time ranges, e.g. "
                           f"{'; '.join(bad_bounds[:3])}; the same ids were cut differently, so they are not the same clips")
    return read


# ---------------------------------------------------------------- feature similarity

def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two (n, d1), (n, d2) matrices of the same n rows (1: same up to rotation and scale)."""
    x = x.astype(np.float64) - x.mean(0, dtype=np.float64)
    y = y.astype(np.float64) - y.mean(0, dtype=np.float64)
    num = np.linalg.norm(y.T @ x) ** 2
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(num / den) if den > 0 else float("nan")


def similarity(a: Cache, b: Cache) -> dict:
    """Per-segment mean cosine (same dims only) and overall linear CKA over timestamp-matched frames."""
    fa, fb = float(a.attrs["fps"]), float(b.attrs["fps"])
    tol = 0.5 / max(fa, fb) + EPS
    same_dim = a.features.shape[1] == b.features.shape[1]
    per, ia_all, ib_all = [], [], []
    for k, s in enumerate(a.segments["id"]):
        oa, na = int(a.segments["offset"][k]), int(a.segments["length"][k])
        ob, nb = int(b.segments["offset"][k]), int(b.segments["length"][k])
        i, j = match_frames(a.timestamps[oa:oa + na], b.timestamps[ob:ob + nb], tol)
        ia_all.append(oa + i)
        ib_all.append(ob + j)
        cos = None
        if same_dim and len(i):
            xa = a.features[oa + i].astype(np.float64)
            xb = b.features[ob + j].astype(np.float64)
            num = (xa * xb).sum(1)
            den = np.linalg.norm(xa, axis=1) * np.linalg.norm(xb, axis=1)
            cos = float(np.mean(np.where(den > 0, num / np.maximum(den, 1e-30), 0.0)))
        per.append({"id": s, "label": a.segments["label"][k], "matched_frames": int(len(i)), "frames_a": na,
                    "frames_b": nb, "cosine": cos})
    ia, ib = np.concatenate(ia_all), np.concatenate(ib_all)
    cka = linear_cka(a.features[ia], b.features[ib]) if len(ia) > 1 else float("nan")
    cos = [p["cosine"] for p in per if p["cosine"] is not None]
    return {"same_dim": bool(same_dim), "dim_a": int(a.features.shape[1]), "dim_b": int(b.features.shape[1]),
            "matched_frames": int(len(ia)), "mean_cosine": float(np.mean(cos)) if cos else None,
            "min_cosine": float(np.min(cos)) if cos else None, "linear_cka": cka, "per_segment": per}


# ---------------------------------------------------------------- training on both

def _cross(run_dir: Path, other: Cache, device) -> float | None:
    """Accuracy of a run's model on ``other``'s features of the run's own test ids. A cross-validation run: each
    fold's model on its own fold's test ids, averaged over the folds (as its test accuracy is)."""
    folds = sorted(Path(run_dir).glob(f"folds/*/{CHECKPOINT}"))
    if folds and not (Path(run_dir) / CHECKPOINT).is_file():
        return mean_std([_cross(f.parent, other, device) for f in folds])[0]
    run = Run(run_dir)
    data = run.sequences(other)
    probs = run.probabilities(data, device)
    pos = {s: i for i, s in enumerate(data.ids)}
    test = [pos[s] for s in run.split_ids["test"] if s in pos]
    y = data.labels.numpy()[test]
    p = probs[test]
    ok = ~np.isnan(p).any(1)
    return float((p[ok].argmax(1) == y[ok]).mean()) if ok.any() else None


def _test_sizes(res: dict) -> tuple:
    """The test part's size of a run, or of each fold of a cross-validation."""
    return (res.get("n_test"),) + tuple(f["n_test"] for f in res.get("per_fold") or [])


def _fmt_ms(m, s) -> str:
    return "—" if m is None else f"{m:.3f} ± {s:.3f}"


def compare(cfg: CompareConfig, log=lambda s: None) -> dict:
    """Similarity, training on both, cross-evaluation; writes OUT; returns compare.json's content. With ``cfg.track``
    the comparison is one tracked run (its similarity and accuracies, its plot and tables), its runs nested in it."""
    cfg.validate()
    tracking.require(cfg.track)
    options = {"cache_a": os.path.abspath(cfg.cache_a), "cache_b": os.path.abspath(cfg.cache_b), "seeds": cfg.seeds,
               **{f"grid.{k}": ",".join(map(str, v)) for k, v in cfg.grid.items()}}
    with tracking.tracked(cfg.track, cfg.out, options, name=f"compare {Path(cfg.out).name}") as parent:
        res = _compare(cfg, log, parent)
        parent.finish({**res["similarity"], **{f"{r['variant']}.{k}": v for r in res["variants"] for k, v in r.items()
                                               if k.startswith(("test_", "val_", "cross_"))}},
                      [Path(cfg.out) / f for f in ("compare.json", "summary.md", "compare.png")])
    return res


def _compare(cfg: CompareConfig, log, parent: tracking.Tracking) -> dict:
    grid = {k: list(v) for k, v in cfg.grid.items()}
    if "seed" in grid:
        raise ValueError("--seed: compare trains seeds 0..N-1 on each cache; use --seeds N")
    full_a, full_b = read_cache(cfg.cache_a), read_cache(cfg.cache_b)  # features in their dtype: held once
    for c in (full_a, full_b):
        if len(c) == 0:
            raise CompareError(f"{c.path}: the cache holds no segments")
    ids = common_ids(full_a, full_b)
    a, b = subset(full_a, ids), subset(full_b, ids)
    fps_req = grid.get("fps", [None])
    for f in fps_req:
        check_sampling(a, b, f)
    if grid.get("fps") is None:
        grid["fps"] = [check_sampling(a, b, None)]
    log(f"{len(ids)} common segments ({len(full_a)} in A, {len(full_b)} in B)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sim = similarity(a, b)
    with open(out / "similarity.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(sim["per_segment"][0]))
        w.writeheader()
        w.writerows(sim["per_segment"])
    log(f"similarity: linear CKA {sim['linear_cka']:.4f}" +
        (f", mean cosine {sim['mean_cosine']:.4f}" if sim["mean_cosine"] is not None else " (dims differ: no cosine)"))

    grid = resolve_split(grid, a, log)  # --split auto: from the common segments' groups
    vs = variants(grid, cfg.cache_a, str(out / "runs"))
    device = resolve_device(grid.get("device", ["auto"])[0])
    durations = np.asarray(a.segments["end"], float) - np.asarray(a.segments["start"], float)
    features = {side: (c, torch.from_numpy(np.ascontiguousarray(c.features))) for side, c in (("A", a), ("B", b))}
    rows = []
    for name, tc in vs:
        vname = name if name != "run" else tc.model
        if tc.seq_len is None:  # one seq_len for both sides (the default window depends on the durations)
            tc = replace(tc, seq_len=resolve_seq_len(tc.reader(), float(tc.fps), durations)[0])
        res = {"A": [], "B": []}
        cross = {"A->B": [], "B->A": []}
        for seed in range(cfg.seeds):
            runs = {}
            for side, path in (("A", cfg.cache_a), ("B", cfg.cache_b)):
                run = out / "runs" / side / vname / f"seed{seed}"
                # compare's own run folders: an older run in one (an earlier compare into OUT) is replaced
                r = train(replace(tc, cache=path, out=str(run), seed=seed, plots=cfg.plots, overwrite=True,
                                  track=cfg.track), data=features[side],
                          nest=parent.child(**{"compare.side": side, "compare.seed": seed, "variant": vname}))
                res[side].append(r)
                runs[side] = run
            if sim["same_dim"]:
                cross["A->B"].append(_cross(runs["A"], b, device))
                cross["B->A"].append(_cross(runs["B"], a, device))
            if _test_sizes(res["A"][-1]) != _test_sizes(res["B"][-1]):
                raise CompareError(f"{vname} seed {seed}: the two sides got different splits; check the caches' groups")
        classes = res["A"][0]["classes"]
        row = {"variant": vname, "model": tc.model, "fps": tc.fps, "seq_len": tc.seq_len, "split": tc.split,
               "seeds": cfg.seeds, "classes": classes}
        for side in ("A", "B"):
            row[f"test_{side}"], row[f"test_{side}_std"] = mean_std([r["test_accuracy"] for r in res[side]])
            row[f"val_{side}"], row[f"val_{side}_std"] = mean_std([r["val_accuracy"] for r in res[side]])
            row[f"per_class_{side}"] = {c: mean_std([r["per_class_accuracy"].get(c) for r in res[side]])[0] for c in classes}
            row[f"runs_{side}"] = [str(out / "runs" / side / vname / f"seed{s}") for s in range(cfg.seeds)]
        for k, v in cross.items():
            row[f"cross_{k}"], row[f"cross_{k}_std"] = mean_std(v)
        rows.append(row)
        log(f"{vname}: A {_fmt_ms(row['test_A'], row['test_A_std'])}  B {_fmt_ms(row['test_B'], row['test_B_std'])}"
            + (f"  A->B {_fmt_ms(row['cross_A->B'], row['cross_A->B_std'])}  B->A "
               f"{_fmt_ms(row['cross_B->A'], row['cross_B->A_std'])}" if sim["same_dim"] else ""))

    res = {"status": "complete", "cache_a": _describe(full_a), "cache_b": _describe(full_b), "common_segments": len(ids),
           "fps": grid["fps"], "seeds": cfg.seeds, "grid": grid,
           "similarity": {k: v for k, v in sim.items() if k != "per_segment"}, "variants": rows, "out": str(out)}
    write_json(out / "compare.json", res)
    (out / "summary.md").write_text(summary_md(res))
    if cfg.plots:
        plots.compare(out / "compare.png", res, [p["cosine"] for p in sim["per_segment"] if p["cosine"] is not None])
    return res


def _describe(c: Cache) -> dict:
    a = c.attrs
    return {"path": os.path.abspath(c.path), "segments": len(c), "backbone": a.get("backbone"), "weights": a.get("weights"),
            "size": a.get("size"), "resize": a.get("resize"), "fps": a.get("fps"), "feature_dim": a.get("feature_dim")}


def _cache_line(tag: str, d: dict) -> str:
    return (f"- **{tag}**: `{d['path']}` — {d['backbone']} ({d['weights']}), {d['size']} px {d['resize']}, "
            f"{d['fps']:g} fps, {d['feature_dim']}-dim, {d['segments']} segments")


def _f4(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def summary_md(res: dict) -> str:
    s = res["similarity"]
    lines = ["# featseq compare", "", _cache_line("A", res["cache_a"]), _cache_line("B", res["cache_b"]), "",
             f"{res['common_segments']} common segments; read at {', '.join(f'{f:g}' for f in res['fps'])} fps; "
             f"seeds 0..{res['seeds'] - 1} on identical splits.", "", "## Feature similarity", "",
             "| measure | value |", "|---|---|",
             f"| matched frames | {s['matched_frames']} |",
             f"| linear CKA | {_f4(s['linear_cka'])} |",
             f"| mean cosine (per segment) | {_f4(s['mean_cosine'])} |",
             f"| lowest segment cosine | {_f4(s['min_cosine'])} |", "",
             "## Test accuracy (mean ± std over seeds)", "",
             "| variant | A | B | A → B | B → A |", "|---|---|---|---|---|"]
    for r in res["variants"]:
        lines.append(f"| {r['variant']} | {_fmt_ms(r['test_A'], r['test_A_std'])} | {_fmt_ms(r['test_B'], r['test_B_std'])} | "
                     f"{_fmt_ms(r['cross_A->B'], r['cross_A->B_std'])} | {_fmt_ms(r['cross_B->A'], r['cross_B->A_std'])} |")
    lines += ["", "A → B: the model trained on A scored on B's features of its test segments (only when dims match).", ""]
    for r in res["variants"]:
        lines += [f"### Per-class test accuracy: {r['variant']}", "", "| class | A | B |", "|---|---|---|"]
        for c in r["classes"]:
            pa, pb = r["per_class_A"].get(c), r["per_class_B"].get(c)
            lines.append(f"| {c} | {'—' if pa is None else f'{pa:.3f}'} | {'—' if pb is None else f'{pb:.3f}'} |")
        lines.append("")
    lines += ["![compare](compare.png)", ""]
    return "\n".join(lines)
