"""Apply a trained run to new videos: whole clips or sliding windows over long videos.

``featseq predict RUN_DIR VIDEO... [--window S --stride S] [--threshold P] [--out DIR] [--cache FILE]``

1. The backbone, weights, seed, input size, resize policy, fps and precision come from the featurize
   spec recorded in the run's checkpoint (sequence.run.Run.spec), never from its training cache. A
   finetune run's trained trunk is written to a temporary weights file while the videos are featurized (no copy
   is kept in OUT), so featurize rebuilds exactly that trunk. A run whose weights file is gone or changed is
   refused with the fix. A cross-validation run (a cross-validated sweep variant) predicts with its best fold
   (sequence.run.resolve_run_folder).
2. The videos are featurized by :func:`featurize.pipeline.featurize` itself (same decoder worker,
   same frame grid, same preprocessing), handed over as segment records, into a feature cache
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
import re
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from featseq.featurize.backbones import resolve_device
from featseq.featurize.cache import read_cache
from featseq.featurize.config import FeaturizeConfig
from featseq.common.errors import UserError
from featseq.featurize.sources import Segment
from featseq.featurize.spec import FeatureSpec, weights_id

from . import checkpoint, plots
from .loop import FeatureInputs, probabilities
from .config import PredictConfig
from .reader import EPS, select, shifts
from .run import CHECKPOINT, Run, resolve_run_folder, write_json


class PredictError(UserError):
    """The run or the request cannot be used for prediction; the message says why and what to do."""


@contextmanager
def featurize_spec(run: Run) -> Iterator[FeatureSpec]:
    """The spec to featurize new videos with: the run's. A finetune run's trunk is written, for the block only, to a
    temporary weights file that the spec names (its id ``finetuned_trunk-<sha256[:8]>`` depends on the weights alone,
    so a kept --cache is resumed); no copy of the trunk is left in the output folder: the run's checkpoint holds it."""
    spec = run.spec
    if run.trunk_state is None:
        spec.check_weights(str(run.path))
        yield spec
        return
    from featseq.featurize.backbones import sha256_file

    with tempfile.TemporaryDirectory(prefix="featseq-trunk-") as d:
        trunk = Path(d) / "finetuned_trunk.pt"
        checkpoint.save(run.trunk_state, trunk)
        sha = sha256_file(str(trunk))
        yield replace(spec, weights_path=str(trunk), weights_sha256=sha, weights=weights_id(str(trunk), sha, spec.seed))


def spec_record(run: Run, spec: FeatureSpec) -> dict:
    """How the new videos were featurized, for predict.json: a finetune run's weights are its checkpoint's trunk."""
    d = spec.to_dict()
    if run.trunk_state is not None:
        d["weights_path"] = str(run.path / CHECKPOINT)
    return {**d, "finetuned": run.trunk_state is not None}


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
    """Featurize ``cfg.videos`` like the run's features, classify windows, write OUT; returns predict.json's content."""
    cfg.validate()
    t0 = time.monotonic()
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "predict"
    run = Run(resolve_run_folder(cfg.run, "RUN", log))  # a cross-validation: its best fold
    spec = run.spec
    classes = run.classes
    fps, seq_len, offset = float(run.reader.fps), int(run.reader.seq_len), run.reader.offset
    if spec.feature_dim and spec.feature_dim != run.input_dim:
        raise PredictError(f"{cfg.run}: its model takes {run.input_dim}-dim features but its features were "
                           f"{spec.feature_dim}-dim; the run folder is inconsistent")
    if fps > spec.fps + EPS:
        raise PredictError(f"{cfg.run}: the run reads {fps:g} fps from features made at {spec.fps:g} fps; "
                           f"inconsistent run folder")
    out.mkdir(parents=True, exist_ok=True)

    from featseq.featurize.pipeline import featurize

    tmpdir = None
    if cfg.cache:
        cache_path = Path(cfg.cache)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
    else:
        tmpdir = tempfile.TemporaryDirectory(prefix="featseq-predict-")
        cache_path = Path(tmpdir.name) / "predict.h5"
    trunk = ExitStack()  # a finetune run's trunk as a temporary weights file, until the videos are featurized
    try:
        spec = trunk.enter_context(featurize_spec(run))
        ids = [_video_id(v) for v in cfg.videos]
        records = [Segment(id=i, path=str(Path(v).resolve()), label="unknown", group=i, where=v)
                   for v, i in zip(cfg.videos, ids)]
        fcfg = FeaturizeConfig(source="featseq predict", backbone=spec.backbone, weights=spec.weights_arg(),
                               seed=spec.seed, size=spec.size, resize=spec.resize, fps=spec.fps,
                               precision=cfg.precision or spec.precision, decoder=spec.decoder, device=cfg.device,
                               out=str(cache_path),
                               batch_size=cfg.batch_size, decode_timeout=cfg.decode_timeout, skip_errors=True,
                               shard=None, refresh=True)  # a video changed since --cache kept it: its features now
        log(f"featurizing {len(cfg.videos)} video(s) like the run's features: {spec.describe()}"
            f"{' (fine-tuned trunk)' if run.trunk_state is not None else ''}")
        fres = featurize(fcfg, segments=records)
        cache = read_cache(str(cache_path), dtype=np.float32)
        made = FeatureSpec.from_attrs(cache.attrs)
        if diff := spec.same_features(made) + [f"{k}: {getattr(spec, k)} vs {getattr(made, k)}" for k in ("mean", "std")
                                               if getattr(spec, k) and getattr(spec, k) != getattr(made, k)]:
            raise PredictError(f"{cfg.run}: the new videos' features would differ from the run's ({'; '.join(diff)}); "
                               f"featurize them with the run's settings (check --cache {cache_path})")
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
        sh = shifts(ends - starts, seq_len, fps, spec.fps, off)
        sel = select(cache.timestamps, np.asarray(offs), np.asarray(lens), starts, ends, fps, seq_len, spec.fps, sh)
        device = resolve_device(cfg.device)
        run.model.to(device)
        t1 = time.monotonic()
        inputs = FeatureInputs(torch.from_numpy(cache.features), torch.from_numpy(sel.rows), torch.from_numpy(sel.mask))
        probs = probabilities(run.model, inputs, sel.mask, len(classes), device)
        t_cls = time.monotonic() - t1
    finally:
        trunk.close()
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
    timelines = {}
    if cfg.plots:
        used: set = set()
        for v, _ in todo:
            sel_r = [r for r, rec in enumerate(recs) if rec[0] == v]
            path = out / f"timeline_{_stem(v, used)}.png"
            plots.timeline(path, v, [recs[r][1] for r in sel_r], [recs[r][2] for r in sel_r], probs[sel_r], pred[sel_r],
                           classes, cfg.threshold)
            timelines[v] = str(path)
    frames = int(sum(int(seg["length"][pos[i]]) for _, i in todo))
    res = {
        "status": "complete", "run": str(cfg.run), "kind": run.kind, "videos": [v for v, _ in todo],
        "failed": failed, "classes": classes, "window": cfg.window, "stride": cfg.stride or cfg.window,
        "threshold": cfg.threshold, "fps": fps, "seq_len": seq_len, "offset": off,
        "featurize": {**spec_record(run, spec), "precision": fcfg.precision},
        "windows": len(recs), "frames": frames, "frames_featurized": fres.frames,
        "featurize_s": round(fres.seconds, 3), "classify_s": round(t_cls, 4),
        "frames_per_s": round(fres.frames / fres.stream_seconds, 2) if fres.frames and fres.stream_seconds else None,
        "windows_per_s": round(len(recs) / t_cls, 1) if t_cls > 0 else None,
        "cache": str(cache_path) if cfg.cache else None, "plots": timelines,
        "total_s": round(time.monotonic() - t0, 3), "out": str(out),
    }
    write_json(out / "predict.json", res)
    return res
