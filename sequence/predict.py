"""Apply a trained run to new videos: whole clips or sliding windows over long videos.

``featseq predict RUN_DIR VIDEO... [--window S --stride S] [--threshold P] [--out DIR] [--cache FILE]``

1. The backbone, weights, seed, input size, resize policy and fps come from the run: its cache's
   attributes (a ``train`` run) or its checkpoint's ``backbone`` entry plus the fine-tuned trunk
   (a ``finetune`` run, whose trunk is written once to ``OUT/finetuned_trunk.pt`` and used as the
   weights file, so featurize rebuilds exactly that trunk).
2. The videos are featurized by :func:`featurize.pipeline.featurize` itself (same decoder worker,
   same frame grid, same preprocessing) from a CSV manifest written next to the feature cache
   (``--cache FILE`` keeps it and is resumed on the next call; otherwise a temporary file).
3. Each window is treated like a clip by the reader: the run's ``seq_len`` frames at the run's fps,
   nearest cached timestamps (:func:`sequence.reader.select`), the run's offset policy inside the
   window (``center``/``random`` -> centred, ``start`` -> from the window's start), padding masked.
   Without ``--window`` the whole video is one window.

Outputs in OUT (default ``RUN_DIR/predict``): ``predictions.csv`` (video, window_start,
window_end, p_<class>..., predicted, above_threshold), ``timeline_<video stem>.png`` and
``predict.json`` (settings, throughput).
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featurize.cache import CacheError, published_ids, read_cache
from featurize.pipeline import weights_arg

from .reader import EPS, select, shifts
from .train import CHECKPOINT, _json, load_checkpoint, resolve_device


class PredictError(CacheError):
    """The run or the request cannot be used for prediction; the message says why and what to do."""


@dataclass
class PredictConfig:
    run: str
    videos: list
    window: float | None = None
    stride: float | None = None
    threshold: float = 0.5
    out: str | None = None
    cache: str | None = None
    device: str = "auto"
    batch_size: int = 64
    plots: bool = True
    decode_timeout: float = 60.0

    def validate(self) -> None:
        problems = []
        if not self.videos:
            problems.append("give at least one VIDEO")
        if self.window is not None and self.window <= 0:
            problems.append(f"--window must be > 0 seconds, got {self.window}")
        if self.stride is not None and self.stride <= 0:
            problems.append(f"--stride must be > 0 seconds, got {self.stride}")
        if self.stride is not None and self.window is None:
            problems.append("--stride needs --window")
        if not 0 <= self.threshold <= 1:
            problems.append(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.cache is not None and not str(self.cache).endswith((".h5", ".hdf5")):
            problems.append(f"--cache {self.cache}: give a .h5 file name")
        missing = [v for v in self.videos if not os.path.isfile(v)]
        if missing:
            problems.append(f"no such video file(s): {', '.join(map(str, missing))}")
        if problems:
            raise ValueError("; ".join(problems))


# ---------------------------------------------------------------- the run's featurize settings

def _weights_from_id(wid: str | None) -> tuple[str, int] | None:
    """'none-seedN' -> ('none', N), 'imagenet' -> ('imagenet', 0); a weights file can't be rebuilt from its id."""
    if wid == "imagenet":
        return "imagenet", 0
    m = re.fullmatch(r"none-seed(-?\d+)", str(wid or ""))
    return ("none", int(m.group(1))) if m else None


def run_settings(run_dir: str, out: Path, log=lambda s: None) -> tuple[torch.nn.Module, dict, dict]:
    """(sequence model, checkpoint, featurize settings) of a run; PredictError when it can't be reproduced."""
    run = Path(run_dir)
    ck = run / CHECKPOINT
    if not ck.is_file():
        hint = " (a cross-validation run keeps one checkpoint per fold under folds/: pass one of those)" \
            if (run / "folds").is_dir() else ""
        raise FileNotFoundError(f"{run}: no {CHECKPOINT}; not a featseq train or finetune run folder{hint}")
    try:
        model, ckpt = load_checkpoint(ck)
    except Exception as e:
        raise PredictError(f"{ck}: cannot load the checkpoint ({type(e).__name__}: {e})") from e
    for key in ("model_config", "classes", "reader", "cache"):
        if key not in ckpt:
            raise PredictError(f"{ck}: the checkpoint has no {key!r} entry; it was not written by featseq train/finetune")
    info = ckpt["cache"]
    attrs = {}
    cache_path = info.get("path")
    if cache_path and os.path.isfile(cache_path):
        try:
            attrs, _ = published_ids(cache_path)
        except CacheError as e:
            log(f"note: the run's cache {cache_path} is unreadable ({e}); using the checkpoint's record")
    finetuned = ckpt.get("kind") == "finetune"
    bbinfo = ckpt.get("backbone", {}) if finetuned else {}
    name = attrs.get("backbone") or bbinfo.get("name") or info.get("backbone")
    fps = float(attrs.get("fps") or info.get("fps") or 0)
    size = attrs.get("size") or bbinfo.get("size") or info.get("size")
    resize = attrs.get("resize") or bbinfo.get("resize")
    seed = int(attrs.get("seed", bbinfo.get("seed", 0)) or 0)
    if not name or not fps or not size:
        raise PredictError(f"{ck}: the run records no backbone/fps/size and its cache {cache_path} is gone; "
                           f"cannot featurize new videos the way it was trained")
    if resize is None:
        resize = "squash"
        log(f"note: the run's cache {cache_path} is gone; assuming --resize squash (the featurize default)")
    if finetuned:
        trunk = out / "finetuned_trunk.pt"
        if not trunk.is_file():
            out.mkdir(parents=True, exist_ok=True)
            tmp = trunk.with_suffix(".tmp")
            torch.save(ckpt["trunk"], tmp)
            os.replace(tmp, trunk)
        weights, wseed = str(trunk.resolve()), seed
    elif attrs:
        weights = weights_arg(attrs)
        wseed = seed
        if weights not in ("none", "imagenet") and not os.path.isfile(weights):
            raise PredictError(f"{run}: the weights file its cache was made with, {weights}, is gone; put it back")
    else:
        got = _weights_from_id(info.get("weights"))
        if got is None:
            raise PredictError(f"{run}: its cache {cache_path} is gone and its weights {info.get('weights')!r} were a "
                               f"file that cannot be found from the run; restore the cache file")
        weights, wseed = got
    dim = int(ckpt["model_config"]["input_dim"])
    feat_dim = attrs.get("feature_dim") or info.get("feature_dim")
    if feat_dim is not None and int(feat_dim) != dim:
        raise PredictError(f"{run}: its model takes {dim}-dim features but its cache {cache_path} holds "
                           f"{int(feat_dim)}-dim ones; the run folder and cache are inconsistent")
    settings = {"backbone": name, "weights": weights, "seed": wseed, "size": int(size), "resize": str(resize),
                "fps": fps, "finetuned": finetuned, "run_cache": cache_path}
    return model, ckpt, settings


# ---------------------------------------------------------------- windows

def windows(duration: float, window: float | None, stride: float | None) -> list[tuple[float, float]]:
    """[start, end) of each window: the whole video, or every ``stride`` s a ``window``-s window that fits
    (one window [0, duration) when the video is shorter than the window)."""
    if window is None:
        return [(0.0, float(duration))]
    stride = stride or window
    out, t = [], 0.0
    while t + window <= duration + EPS:
        out.append((t, t + window))
        t = round(t + stride, 9)
    return out or [(0.0, float(duration))]


def _video_id(path: str) -> str:
    p = Path(path).resolve()
    return f"{p.stem}-{hashlib.sha1(str(p).encode()).hexdigest()[:10]}"


def _stem(name: str, used: set) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem) or "video"
    base, k = s, 2
    while s in used:
        s, k = f"{base}_{k}", k + 1
    used.add(s)
    return s


# ---------------------------------------------------------------- predict

def predict(cfg: PredictConfig, log=lambda s: None) -> dict:
    """Featurize ``cfg.videos`` like the run's cache, classify windows, write OUT; returns predict.json's content."""
    cfg.validate()
    t0 = time.monotonic()
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "predict"
    model, ckpt, st = run_settings(cfg.run, out, log)
    classes = list(ckpt["classes"])
    rd = ckpt["reader"]
    fps, seq_len, offset = float(rd["fps"]), int(rd["seq_len"]), rd.get("offset", "start")
    if fps > st["fps"] + EPS:
        raise PredictError(f"{cfg.run}: the run reads {fps:g} fps from a {st['fps']:g} fps cache; inconsistent run folder")
    out.mkdir(parents=True, exist_ok=True)

    from featurize.pipeline import FeaturizeConfig, featurize

    tmpdir = None
    if cfg.cache:
        cache_path = Path(cfg.cache)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
    else:
        tmpdir = tempfile.TemporaryDirectory(prefix="featseq-predict-")
        cache_path = Path(tmpdir.name) / "predict.h5"
    try:
        manifest = cache_path.with_name(cache_path.stem + ".videos.csv")
        ids = [_video_id(v) for v in cfg.videos]
        rows = {}
        if manifest.is_file():  # keep earlier videos of a kept cache in its manifest (one source per cache)
            with open(manifest, newline="") as fh:
                rows = {r["id"]: r for r in csv.DictReader(fh)}
        for v, i in zip(cfg.videos, ids):
            rows[i] = {"path": str(Path(v).resolve()), "label": "unknown", "id": i, "group": i}
        with open(manifest, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["path", "label", "id", "group"])
            w.writeheader()
            w.writerows(rows.values())
        fcfg = FeaturizeConfig(source=str(manifest), backbone=st["backbone"], weights=st["weights"], seed=st["seed"],
                               size=st["size"], resize=st["resize"], fps=st["fps"], device=cfg.device, out=str(cache_path),
                               batch_size=cfg.batch_size, decode_timeout=cfg.decode_timeout, skip_errors=True)
        log(f"featurizing {len(cfg.videos)} video(s) with {st['backbone']}{' (fine-tuned trunk)' if st['finetuned'] else ''}, "
            f"{st['size']} px {st['resize']}, {st['fps']:g} fps")
        fres = featurize(fcfg)
        cache = read_cache(str(cache_path), dtype=np.float32)
        dim = cache.features.shape[1] if cache.features is not None and cache.features.ndim == 2 else 0
        if dim != ckpt["model_config"]["input_dim"]:
            raise PredictError(f"{cfg.run}: its model takes {ckpt['model_config']['input_dim']}-dim features but "
                               f"{st['backbone']} gives {dim}; the run folder is inconsistent")
        failed = {i: why for i, why in fres.failures.items() if i in ids}
        for i, why in failed.items():
            log(f"skipped: {why}")
        seg = cache.segments
        pos = {s: k for k, s in enumerate(seg["id"])}
        todo = [(v, i) for v, i in zip(cfg.videos, ids) if i in pos]
        if not todo:
            raise PredictError("no video could be decoded: " + "; ".join(failed.values()))

        # windows -> reader selections
        recs, offs, lens, starts, ends = [], [], [], [], []
        for v, i in todo:
            k = pos[i]
            s0, e0 = float(seg["start"][k]), float(seg["end"][k])
            for a, b in windows(e0 - s0, cfg.window, cfg.stride):
                recs.append((v, a, min(b, e0 - s0)))
                offs.append(seg["offset"][k])
                lens.append(seg["length"][k])
                starts.append(s0 + a)
                ends.append(s0 + min(b, e0 - s0))
        starts, ends = np.asarray(starts), np.asarray(ends)
        off = "center" if offset in ("center", "random") else "start"
        sh = shifts(ends - starts, seq_len, fps, st["fps"], off)
        sel = select(cache.timestamps, np.asarray(offs), np.asarray(lens), starts, ends, fps, seq_len, st["fps"], sh)
        feats = torch.from_numpy(np.ascontiguousarray(cache.features, dtype=np.float32))
        device = resolve_device(cfg.device)
        model.to(device).eval()
        t1 = time.monotonic()
        probs = np.full((len(recs), len(classes)), np.nan)
        rows_t, mask_t = torch.from_numpy(sel.rows), torch.from_numpy(sel.mask)
        have = np.nonzero(sel.mask[:, 0])[0]
        with torch.no_grad():
            for a in range(0, len(have), 256):
                idx = torch.as_tensor(have[a:a + 256])
                m = mask_t[idx]
                x = feats[rows_t[idx]] * m.unsqueeze(-1)
                probs[have[a:a + 256]] = torch.softmax(model(x.to(device), m.to(device)).float(), 1).cpu().numpy()
        t_cls = time.monotonic() - t1
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()

    pred = np.where(np.isnan(probs).any(1), -1, np.nan_to_num(probs).argmax(1))
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video", "window_start", "window_end"] + [f"p_{c}" for c in classes] + ["predicted", "above_threshold"])
        for r, (v, a, b) in enumerate(recs):
            ok = pred[r] >= 0
            w.writerow([v, f"{a:.3f}", f"{b:.3f}"] + [("" if np.isnan(p) else f"{p:.6f}") for p in probs[r]]
                       + [classes[pred[r]] if ok else "", int(ok and probs[r, pred[r]] >= cfg.threshold)])
    plots = {}
    if cfg.plots:
        used: set = set()
        for v, _ in todo:
            sel_r = [r for r, rec in enumerate(recs) if rec[0] == v]
            path = out / f"timeline_{_stem(v, used)}.png"
            plot_timeline(path, v, [recs[r][1] for r in sel_r], [recs[r][2] for r in sel_r], probs[sel_r], pred[sel_r],
                          classes, cfg.threshold)
            plots[v] = str(path)
    frames = int(sum(int(seg["length"][pos[i]]) for _, i in todo))
    res = {
        "status": "complete", "run": str(cfg.run), "kind": ckpt.get("kind", "train"), "videos": [v for v, _ in todo],
        "failed": failed, "classes": classes, "window": cfg.window, "stride": cfg.stride or cfg.window,
        "threshold": cfg.threshold, "fps": fps, "seq_len": seq_len, "offset": off, "featurize": st,
        "windows": len(recs), "frames": frames, "frames_featurized": fres.frames,
        "featurize_s": round(fres.seconds, 3), "classify_s": round(t_cls, 4),
        "frames_per_s": round(fres.frames / fres.stream_seconds, 2) if fres.frames and fres.stream_seconds else None,
        "windows_per_s": round(len(recs) / t_cls, 1) if t_cls > 0 else None,
        "cache": str(cache_path) if cfg.cache else None, "plots": plots,
        "total_s": round(time.monotonic() - t0, 3), "out": str(out),
    }
    _json(out / "predict.json", res)
    return res


def plot_timeline(path: Path, video: str, starts, ends, probs: np.ndarray, pred: np.ndarray, classes: list[str],
                  threshold: float) -> None:
    """Probability of each class over window start; the predicted class shaded behind."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    starts, ends = np.asarray(starts, float), np.asarray(ends, float)
    fig, ax = plt.subplots(figsize=(9, 3.2))
    fig.subplots_adjust(left=0.07, right=0.8, bottom=0.16, top=0.88)
    step = np.diff(starts).min() if len(starts) > 1 else max(ends[0] - starts[0], 1e-3)
    for r in range(len(starts)):
        if pred[r] >= 0:
            ax.axvspan(starts[r], starts[r] + step, color=colors[pred[r] % len(colors)], alpha=0.15, lw=0)
    for c, name in enumerate(classes):
        if len(starts) > 1:
            ax.plot(starts, probs[:, c], marker=".", color=colors[c % len(colors)], label=name)
        else:
            ax.bar([c], [probs[0, c]], color=colors[c % len(colors)], label=name)
    if len(starts) > 1:
        ax.axhline(threshold, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("window start (s)")
    else:
        ax.set_xticks(range(len(classes)), classes)
        ax.set_xlabel(f"whole clip [{starts[0]:.1f}, {ends[0]:.1f}) s")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("probability")
    ax.set_title(Path(video).name, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="class (shaded: predicted)",
              title_fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)
