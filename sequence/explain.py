"""Explain a run's predictions over time: which moments of a clip drove them, on the inputs the model read.

``featseq explain RUN [--cache OTHER] [--ids ID,...] [--part test] [--method integrated-gradients|occlusion]
[--gradcam K] [--out DIR]``

1. The run is loaded as evaluate and predict load it (sequence.run.Run: weights-only checkpoint) and the cache is
   read by the run's reader and window policy (Run.sequences: its fps, seq_len and offset), so every explained
   sequence holds exactly the frames the model was scored on. A frozen-feature run reads the cached features; a
   fine-tuned run reads the frames (the cache's ``/frames`` or decoded at its timestamps) through its own trained
   CNN, as it was trained (the cache must be featurized like the run's features).
2. Segments: ``--ids`` or the ``--part`` (test by default: the run's test ids on its own cache; on another cache,
   every segment whose id the run did not train or validate on, as evaluate scores them; ``all``).
3. Importance over time (sequence.attribution): per segment and step, for the predicted class and for the true one.
4. Where in the frame (sequence.gradcam): Grad-CAM at the ``--gradcam K`` most important frames of each segment.

Outputs in OUT (default ``RUN/explain``): ``attributions.csv`` (one row per real frame: id, group, label, predicted,
correct, p_predicted, step, time (seconds into the video, the cache's timestamp), importance, importance_label,
attribution), ``importance_<id>.png`` per segment, ``class_importance.png`` (mean share of importance along the clip
per true class), ``gradcam_<id>.png`` and ``explain.json`` (settings, files, "status": "complete" written last).
"""
from __future__ import annotations

import csv
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from featseq.common.errors import UserError
from featseq.common.files import replaced, unique_stem
from featseq.featurize.backbones import resolve_device
from featseq.featurize.spec import FeatureSpec

from . import plots
from .attribution import clip_profile, explain_inputs
from .config import ExplainConfig
from .loop import FeatureInputs
from .reader import load_features
from .run import Run, resolve_run_folder
from .results import write_json

BINS = 20  # the class-average plot's resolution: 1/20 of a clip
CHUNK = 256  # segments explained at a time


def chosen(cfg: ExplainConfig, run: Run, data, same_cache: bool) -> np.ndarray:
    """Indices of the sequences to explain (kept by the reader: at least one frame)."""
    pos = {s: i for i, s in enumerate(data.ids)}
    if cfg.ids:
        want = [s.strip() for s in cfg.ids.split(",") if s.strip()]
        missing = [s for s in want if s not in pos]
        if missing:
            raise UserError(f"--ids: {len(missing)} id(s) not in the cache, e.g. {', '.join(missing[:3])}; the cache's "
                            f"ids look like {', '.join(data.ids[:3])}")
        idx = np.array([pos[s] for s in want], dtype=np.int64)
    elif cfg.part == "all":
        idx = np.arange(len(data))
    else:
        if cfg.part == "test" and not same_cache:  # as evaluate: what the run did not train or validate on
            seen = set(run.split_ids.get("train", [])) | set(run.split_ids.get("val", []))
            idx = np.array([i for i, s in enumerate(data.ids) if s not in seen], dtype=np.int64)
        else:  # in the split's order
            idx = np.array([pos[s] for s in run.split_ids.get(cfg.part, []) if s in pos], dtype=np.int64)
    idx = idx[data.keep[idx]] if len(idx) else idx
    if not len(idx):
        raise UserError(f"no segment to explain (--part {cfg.part}{', --ids' if cfg.ids else ''}): "
                        f"{'the run has no such part on this cache' if not cfg.ids else 'none has a frame'}; "
                        f"try --part all or --ids")
    return idx


def model_inputs(run: Run, cache, data, idx: np.ndarray, device: torch.device, timeout: float):
    """(x (B, L, D) float32 zero at padding, mask (B, L)): what the run's sequence model reads for ``idx``. A
    fine-tuned run's inputs are its own CNN's embeddings of the frames (the cached features are the original CNN's)."""
    if run.trunk_state is None:
        _, x, m = next(FeatureInputs.of(data).batches([idx]))
        return x, m
    from .finetune import CNNSequence
    from .frames import Frames
    from .gradcam import run_backbone

    spec = FeatureSpec.from_attrs(cache.attrs)
    if diff := run.spec.same_features(spec):
        raise UserError(f"{cache.path} was not featurized like the fine-tuned run's features ({'; '.join(diff)}); "
                        f"explain it on the run's cache or one made with its settings")
    model = CNNSequence(run_backbone(run, spec, str(cache.path)), run.model, channels_last=False).to(device).eval()
    frames = Frames(cache, data, spec, timeout)
    xs, ms = [], []
    try:
        for a in range(0, len(idx), 8):
            f, m = frames.batch(idx[a:a + 8], data.rows)
            with torch.no_grad():
                emb = model.embed(f[m].to(device)).float().cpu()
            x = emb.new_zeros(m.shape + (emb.shape[1],))
            x[m] = emb
            xs.append(x)
            ms.append(m)
    finally:
        frames.close()
    return torch.cat(xs), torch.cat(ms)


def write_rows(path: Path, header: list, rows) -> None:
    with replaced(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _fmt(v: float) -> str:
    return "" if not np.isfinite(v) else f"{v:.6f}"


def _no_gradcam(spec: FeatureSpec) -> str | None:
    """Why Grad-CAM cannot be drawn through the CNN that made these features (None: it can)."""
    if spec.imported:
        return f"they were imported from {spec.imported} files, so featseq does not have the CNN that made them"
    if spec.clip_stride:
        return f"{spec.backbone} embeds clips with 3D convolutions, not frames"
    if spec.crops != 1:
        return f"each frame's feature averages {spec.crops} crops"
    return None


def _gradcams(cfg, run, cache, data, idx, x, m, res, out: Path, names: dict, device, log) -> dict:
    """gradcam_<id>.png for the first --max-plots explained segments; id -> path."""
    from .frames import Frames
    from .gradcam import FINETUNED, FROZEN, frame_cams, run_backbone

    spec = FeatureSpec.from_attrs(cache.attrs)
    backbone = run_backbone(run, spec, str(cache.path))
    k = min(cfg.gradcam, x.shape[1])
    n = min(len(idx), cfg.max_plots)
    top = np.argsort(-np.where(m.numpy(), res["importance"], -1), axis=1, kind="stable")[:n, :k]
    top.sort(axis=1)  # in time order: the decoder reads a video forwards
    rows = torch.from_numpy(np.take_along_axis(data.rows[idx[:n]].numpy(), top, 1))
    keep = torch.from_numpy(np.take_along_axis(m[:n].numpy(), top, 1))
    sub = np.arange(n)
    frames = Frames(cache, data, spec, cfg.decode_timeout)
    label = FINETUNED if run.trunk_state is not None else FROZEN
    done = {}
    try:
        # Frames indexes its tables by sequence; here the tables hold just the chosen frames of the n segments
        pics, _ = frames.batch(idx[:n], _expand(rows, data, idx[:n]), _expand(keep, data, idx[:n]))
        for j in sub:
            pos = [int(t) for t, ok in zip(top[j], keep[j]) if ok]
            f = pics[j, keep[j]].numpy()
            heat = frame_cams(backbone, run.model, f, pos, x[j], m[j], int(res["pred"][j]), device)
            times = [float(cache.timestamps[int(data.rows[idx[j], t])]) for t in pos]
            path = out / f"gradcam_{names[data.ids[idx[j]]]}.png"
            plots.gradcam(path, list(f), heat, [f"{t:.2f} s, importance {res['importance'][j, p]:.2f}"
                                                for t, p in zip(times, pos)],
                          f"{data.ids[idx[j]]}: {run.classes[res['pred'][j]]}\n{label}")
            done[data.ids[idx[j]]] = str(path)
    finally:
        frames.close()
    log(f"Grad-CAM at {k} frame(s) of {len(done)} segment(s): {label}")
    return done


def _expand(table: torch.Tensor, data, idx: np.ndarray) -> torch.Tensor:
    """A (N, k) table with ``table``'s rows at the positions ``idx`` (Frames.batch indexes tables by sequence)."""
    full = torch.zeros((len(data),) + tuple(table.shape[1:]), dtype=table.dtype)
    full[torch.as_tensor(idx)] = table
    return full


def explain(cfg: ExplainConfig, log=lambda s: None) -> dict:
    """Explain the run's predictions on a cache as configured; write OUT; returns explain.json's content."""
    cfg.validate()
    t0 = time.monotonic()
    run = Run(resolve_run_folder(cfg.run, "RUN", log))
    path = cfg.cache or run.cache_path
    if not path:
        raise UserError(f"{cfg.run}: the run does not record its cache; pass --cache FILE")
    cache, feats = load_features(path)
    data = run.sequences(cache, feats)
    same = run.cache_path is not None and Path(path).resolve() == Path(run.cache_path).resolve()
    idx = chosen(cfg, run, data, same)
    device = resolve_device(cfg.device)
    gradcam = cfg.gradcam
    if gradcam and (why := _no_gradcam(FeatureSpec.from_attrs(cache.attrs))):
        log(f"note: no Grad-CAM for these features: {why}; explaining over time only")
        gradcam = 0
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "explain"
    out.mkdir(parents=True, exist_ok=True)
    if (out / "explain.json").is_file() or (out / "attributions.csv").is_file():  # an earlier explanation's figures
        for old in [*out.glob("importance_*.png"), *out.glob("gradcam_*.png")]:
            old.unlink()
    (out / "explain.json").unlink(missing_ok=True)  # written last: its absence marks an unfinished explanation
    log(f"explaining {len(idx)} segment(s) of {run.describe()} ({cfg.method})")
    t_attr = time.monotonic()
    parts, kept = [], []  # in chunks: the inputs of a whole part at once could be several GB
    for a in range(0, len(idx), CHUNK):
        xc, mc = model_inputs(run, cache, data, idx[a:a + CHUNK], device, cfg.decode_timeout)
        parts.append((mc, explain_inputs(run.model, xc, mc, data.labels[idx[a:a + CHUNK]], cfg.method, device,
                                         cfg.baseline, cfg.steps, cfg.occlusion_window)))
        if a < cfg.max_plots and gradcam:  # Grad-CAM needs the inputs of the segments it draws
            kept.append(xc[:max(0, cfg.max_plots - a)])
    m = torch.cat([mc for mc, _ in parts])
    res = {k: np.concatenate([r[k] for _, r in parts]) for k in parts[0][1]}
    x = torch.cat(kept) if kept else None
    t_attr = time.monotonic() - t_attr  # the model's inputs (a fine-tuned run: its CNN on the frames) and attribution
    rows_t = data.rows[idx].numpy()
    times = np.asarray(cache.timestamps)[rows_t]
    mask = m.numpy()
    classes, y = run.classes, data.labels[idx].numpy()
    starts = np.asarray(cache.segments["start"], float)[idx]
    ends = np.asarray(cache.segments["end"], float)[idx]

    def csv_rows():
        for j, i in enumerate(idx):
            p = int(res["pred"][j])
            for t in np.nonzero(mask[j])[0]:
                yield [data.ids[i], data.groups[i], data.label_names[i], classes[p], int(y[j] == p),
                       f"{res['probs'][j, p]:.6f}", int(t), f"{times[j, t]:.4f}", _fmt(res["importance"][j, t]),
                       _fmt(res["importance_label"][j, t]), f"{res['attr'][j, t]:.6g}"]

    write_rows(out / "attributions.csv", ["id", "group", "label", "predicted", "correct", "p_predicted", "step", "time",
                                          "importance", "importance_label", "attribution"], csv_rows())
    names, figs = {}, {}
    used: set = set()
    for i in idx:
        names[data.ids[i]] = unique_stem(data.ids[i], used)
    for j, i in enumerate(idx[:cfg.max_plots]):
        p = int(res["pred"][j])
        real = mask[j]
        title = (f"{data.ids[i]}: predicted {classes[p]} (p={res['probs'][j, p]:.2f}), label {data.label_names[i]}"
                 f" — {cfg.method}")
        figs[data.ids[i]] = str(out / f"importance_{names[data.ids[i]]}.png")
        plots.importance(Path(figs[data.ids[i]]), title, times[j, real], res["importance"][j, real],
                         res["importance_label"][j, real], [times[j, real][0]], [res["probs"][j, p]],
                         f"predicted class {classes[p]}")
    prof = clip_profile(np.where(np.isfinite(res["importance_label"]), res["importance_label"], 0), times, mask,
                        starts, ends, BINS)
    profiles = {c: prof[y == k] for k, c in enumerate(classes) if (y == k).any()}
    if profiles:
        plots.class_importance(out / "class_importance.png", profiles, BINS,
                               f"importance for the true class along the clip ({cfg.method}, {len(idx)} segments)")
    cams = _gradcams(cfg, run, cache, data, idx, x, m, res, out, names, device, log) if gradcam else {}
    correct = y == res["pred"]
    doc = {
        "status": "complete", "run": str(cfg.run), "kind": run.kind, "cache": str(path), "segments": len(idx),
        "correct": int(correct.sum()), "classes": classes, "fps": data.fps, "seq_len": data.seq_len,
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("run", "out")},
        "gradcam_through": (("fine-tuned CNN" if run.trunk_state is not None else "frozen backbone") if cams else None),
        "class_profile": {c: np.round(np.mean(r, 0), 4).tolist() for c, r in profiles.items()},
        "attribution_s": round(t_attr, 3), "total_s": round(time.monotonic() - t0, 3), "out": str(out),
        "files": {"attributions": str(out / "attributions.csv"), "importance": figs, "gradcam": cams,
                  "class_importance": str(out / "class_importance.png") if profiles else None},
    }
    write_json(out / "explain.json", doc)
    return doc


# ---------------------------------------------------------------- predict --explain

def explain_windows(out: Path, run: Run, cache, recs: list, sel, device: torch.device, plot: bool = True,
                    cfg: ExplainConfig | None = None) -> dict:
    """predict --explain: the importance of every frame of every window ``recs`` ((video, start, end), read by
    ``sel``, the windows predict classified) for its predicted class. Writes attributions.csv (video, window_start,
    window_end, predicted, p_predicted, step, time, importance, attribution: the window columns of predictions.csv)
    and importance_<video>.png (per frame the mean importance over the windows holding it, under each window's
    probability of its predicted class); returns {"attributions": path, "importance": {video: path}}."""
    cfg = cfg or ExplainConfig(run=str(run.path))
    feats = torch.from_numpy(np.ascontiguousarray(cache.features))
    inputs = FeatureInputs(feats, torch.from_numpy(sel.rows), torch.from_numpy(sel.mask))
    have = np.nonzero(sel.mask[:, 0])[0]
    parts = []
    for a in range(0, len(have), 256):
        b, x, m = next(inputs.batches([have[a:a + 256]]))
        parts.append((b, m.numpy(), explain_inputs(run.model, x, m, None, cfg.method, device, cfg.baseline, cfg.steps,
                                                   cfg.occlusion_window)))
    times = np.asarray(cache.timestamps)[sel.rows]
    per_video: dict = {}
    rows = []
    for b, mask, res in parts:
        for j, r in enumerate(b):
            v, w0, w1 = recs[r]
            p = int(res["pred"][j])
            pv = per_video.setdefault(v, {"t": [], "imp": [], "w": [], "p": []})
            pv["w"].append(w0)
            pv["p"].append(float(res["probs"][j, p]))
            for t in np.nonzero(mask[j])[0]:
                rows.append([v, f"{w0:.3f}", f"{w1:.3f}", run.classes[p], f"{res['probs'][j, p]:.6f}", int(t),
                             f"{times[r, t]:.4f}", _fmt(res["importance"][j, t]), f"{res['attr'][j, t]:.6g}"])
                pv["t"].append(float(times[r, t]))
                pv["imp"].append(float(res["importance"][j, t]))
    write_rows(out / "attributions.csv", ["video", "window_start", "window_end", "predicted", "p_predicted", "step",
                                          "time", "importance", "attribution"], rows)
    figs, used = {}, set()
    for v, pv in per_video.items() if plot else ():
        t, inv = np.unique(np.round(pv["t"], 4), return_inverse=True)
        imp = np.bincount(inv, weights=pv["imp"]) / np.bincount(inv)
        figs[v] = str(out / f"importance_{unique_stem(v, used)}.png")
        plots.importance(Path(figs[v]), f"{Path(v).name}: importance along the video ({cfg.method}; mean over the "
                                        f"windows holding each frame)", t, imp, None, pv["w"], pv["p"],
                         "class each window predicts")
    return {"attributions": str(out / "attributions.csv"), "importance": figs}
