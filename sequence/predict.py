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
   nearest cached timestamps (:func:`sequence.windows.sliding_selection`), the run's offset policy inside the
   window (``center``/``random`` -> centred, ``start`` -> from the window's start), padding masked.
   Without ``--window`` the whole video is one window.

Outputs in OUT (default ``RUN_DIR/predict``): ``predictions.csv`` (video, window_start,
window_end, p_<class>..., predicted, above_threshold), ``timeline_<video stem>.png`` and
``predict.json`` (settings, throughput). With ``--explain`` also ``attributions.csv`` and ``importance_<video stem>.png``
(sequence.explain.explain_windows: the importance of every frame of every window for its predicted class).
"""
from __future__ import annotations

import csv
import hashlib
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from featseq.featurize.backbones import resolve_device
from featseq.featurize.cache import Cache, read_cache
from featseq.featurize.config import FeaturizeConfig
from featseq.common.errors import UserError
from featseq.common.files import unique_stem
from featseq.featurize.sources import Segment
from featseq.featurize.spec import FeatureSpec, weights_id

from . import checkpoint, plots
from .loop import FeatureInputs, probabilities
from .config import PredictConfig
from .run import CHECKPOINT, Run, resolve_run_folder, write_json
from .windows import EPS, eval_offset, sliding_selection

if TYPE_CHECKING:
    from featseq.featurize.pipeline import FeaturizeResult


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


def _video_id(path: str) -> str:
    p = Path(path).resolve()
    return f"{p.stem}-{hashlib.sha1(str(p).encode()).hexdigest()[:10]}"


# ---------------------------------------------------------------- predict

def _check_run(cfg: PredictConfig, run: Run) -> None:
    spec, fps = run.spec, float(run.reader.fps)
    spec.check_featurizable(str(cfg.run))  # imported features: no backbone to make them, refused before any writing
    if spec.feature_dim and spec.feature_dim != run.input_dim:
        raise PredictError(f"{cfg.run}: its model takes {run.input_dim}-dim features but its features were "
                           f"{spec.feature_dim}-dim; the run folder is inconsistent")
    if fps > spec.fps + EPS:
        raise PredictError(f"{cfg.run}: the run reads {fps:g} fps from features made at {spec.fps:g} fps; "
                           f"inconsistent run folder")


@contextmanager
def _cache_file(cfg: PredictConfig) -> Iterator[Path]:
    """Where the new videos' features go: ``--cache`` (kept, resumed next time) or a temporary file."""
    if cfg.cache:
        path = Path(cfg.cache)
        path.parent.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="featseq-predict-") as d:
        yield Path(d) / "predict.h5"


@dataclass
class _Featurized:
    cache: Cache           # the features (float32, in memory)
    result: "FeaturizeResult"
    precision: str         # the precision featurize ran at
    failed: dict           # video id -> why it was skipped
    todo: list             # (video, position in the cache's segment table) of every video that was featurized


def _featurize(cfg: PredictConfig, run: Run, spec: FeatureSpec, cache_path: Path, log) -> _Featurized:
    """The videos featurized by featurize itself, with ``spec``; PredictError when none could be, or when the
    features made would differ from the run's."""
    from featseq.featurize.pipeline import featurize

    ids = [_video_id(v) for v in cfg.videos]
    records = [Segment(id=i, path=str(Path(v).resolve()), label="unknown", group=i, where=v)
               for v, i in zip(cfg.videos, ids)]
    fcfg = FeaturizeConfig(source="featseq predict", **spec.featurize_options(precision=cfg.precision, device=cfg.device),
                           device=cfg.device, out=str(cache_path), batch_size=cfg.batch_size, compile=cfg.compile,
                           decode_timeout=cfg.decode_timeout, skip_errors=True,
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
    for why in failed.values():
        log(f"skipped: {why}")
    pos = {s: k for k, s in enumerate(cache.segments["id"])}
    todo = [(v, pos[i]) for v, i in zip(cfg.videos, ids) if i in pos]
    if not todo:
        raise PredictError("no video could be decoded: " + "; ".join(failed.values()))
    return _Featurized(cache, fres, fcfg.precision, failed, todo)


def _classify(cfg: PredictConfig, run: Run, spec: FeatureSpec, f: _Featurized) -> tuple[list, np.ndarray, float, object]:
    """([(video, window start, window end)], probabilities (windows, C), seconds it took, the windows' Selection)."""
    reader = run.reader
    recs, sel = sliding_selection(f.cache.segments, [k for _, k in f.todo], f.cache.timestamps, cfg.window, cfg.stride,
                                  float(reader.fps), int(reader.seq_len), spec.fps, reader.offset)
    recs = [(f.todo[n][0], a, b) for n, a, b in recs]
    device = resolve_device(cfg.device)
    run.model.to(device)
    t1 = time.monotonic()
    inputs = FeatureInputs(torch.from_numpy(f.cache.features), torch.from_numpy(sel.rows), torch.from_numpy(sel.mask))
    probs = probabilities(run.model, inputs, sel.mask, len(run.classes), device)
    return recs, probs, time.monotonic() - t1, sel


def _write_predictions(path: Path, recs: list, probs: np.ndarray, pred: np.ndarray, classes: list, threshold: float):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video", "window_start", "window_end"] + [f"p_{c}" for c in classes] + ["predicted", "above_threshold"])
        for r, (v, a, b) in enumerate(recs):
            ok = pred[r] >= 0
            w.writerow([v, f"{a:.3f}", f"{b:.3f}"] + [("" if np.isnan(p) else f"{p:.6f}") for p in probs[r]]
                       + [classes[pred[r]] if ok else "", int(ok and probs[r, pred[r]] >= threshold)])


def _timelines(out: Path, videos: list, recs: list, probs: np.ndarray, pred: np.ndarray, classes: list,
               threshold: float) -> dict:
    """timeline_<video stem>.png per video; video -> its path."""
    timelines, used = {}, set()
    for v in videos:
        rows = [r for r, rec in enumerate(recs) if rec[0] == v]
        path = out / f"timeline_{unique_stem(v, used)}.png"
        plots.timeline(path, v, [recs[r][1] for r in rows], [recs[r][2] for r in rows], probs[rows], pred[rows],
                       classes, threshold)
        timelines[v] = str(path)
    return timelines


def predict(cfg: PredictConfig, log=lambda s: None) -> dict:
    """Featurize ``cfg.videos`` like the run's features, classify windows, write OUT; returns predict.json's content."""
    cfg.validate()
    t0 = time.monotonic()
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / "predict"
    run = Run(resolve_run_folder(cfg.run, "RUN", log))  # a cross-validation: its best fold
    _check_run(cfg, run)
    out.mkdir(parents=True, exist_ok=True)
    # a finetune run's trunk is a temporary weights file until the videos are featurized
    with _cache_file(cfg) as cache_path, featurize_spec(run) as spec:
        f = _featurize(cfg, run, spec, cache_path, log)
        recs, probs, t_cls, sel = _classify(cfg, run, spec, f)
    classes, videos = run.classes, [v for v, _ in f.todo]
    pred = np.where(np.isnan(probs).any(1), -1, np.nan_to_num(probs).argmax(1))
    _write_predictions(out / "predictions.csv", recs, probs, pred, classes, cfg.threshold)
    timelines = _timelines(out, videos, recs, probs, pred, classes, cfg.threshold) if cfg.plots else {}
    explained = None
    if cfg.explain:  # the importance of every frame of every window (sequence/explain.py)
        from .explain import explain_windows

        explained = explain_windows(out, run, f.cache, recs, sel, resolve_device(cfg.device), cfg.plots)
    fres = f.result
    res = {
        "status": "complete", "run": str(cfg.run), "kind": run.kind, "videos": videos,
        "failed": f.failed, "classes": classes, "window": cfg.window, "stride": cfg.stride or cfg.window,
        "threshold": cfg.threshold, "fps": float(run.reader.fps), "seq_len": int(run.reader.seq_len),
        "offset": eval_offset(run.reader.offset), "featurize": {**spec_record(run, spec), "precision": f.precision},
        "windows": len(recs), "frames": int(sum(int(f.cache.segments["length"][k]) for _, k in f.todo)),
        "frames_featurized": fres.frames, "featurize_s": round(fres.seconds, 3), "classify_s": round(t_cls, 4),
        "frames_per_s": round(fres.frames / fres.stream_seconds, 2) if fres.frames and fres.stream_seconds else None,
        "windows_per_s": round(len(recs) / t_cls, 1) if t_cls > 0 else None,
        "cache": str(cache_path) if cfg.cache else None, "plots": timelines, "explain": explained,
        "total_s": round(time.monotonic() - t0, 3), "out": str(out),
    }
    write_json(out / "predict.json", res)
    return res
