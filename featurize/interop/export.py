"""``featseq cache export``: a cache's segments written in a layout other tools read (featurize.interop.config's
FORMATS), a block of segments at a time (featurize.cache.cache_segments), so memory stays bounded whatever the cache's
size. Every file is written under a temporary name and renamed, the index CSV last: a killed export leaves whole
files and no index, and a rerun writes them all again.
"""
from __future__ import annotations

import csv
import io
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featseq.common.files import replaced

from ..cache import cache_segments
from .config import (H5_NAME, H5_TIMESTAMPS, INDEX_COLUMNS, INDEX_NAME, WDS_FEATURES, WDS_META,
                     WDS_TIMESTAMPS, ExportConfig, safe_name, safe_names)


@dataclass
class ExportResult:
    out: str
    format: str
    segments: int
    frames: int
    seconds: float
    index: str


def _npy(path: Path, arr: np.ndarray) -> None:
    with replaced(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.asarray(arr), allow_pickle=False)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def _end(entered, ok: bool) -> None:
    """Leave a :func:`replaced` context entered by hand (a file that stays open across segments): rename the
    temporary file over its target when ``ok``, else remove it."""
    if ok:
        entered.__exit__(None, None, None)
    else:
        stop = RuntimeError("export stopped")
        entered.__exit__(type(stop), stop, None)


def _meta(row: dict, fps: float) -> dict:
    return {"id": row["id"], "label": row["label"], "group": row["group"], "split": row["split"], "fps": fps,
            "start": float(row["start"]), "end": float(row["end"])}


class _VideoFeatures:
    """video_features' ``save_numpy`` layout: OUT/<feature_type>/<stem>_<feature>.npy (T x D), <stem>_timestamps_ms.npy
    (T,) and <stem>_fps.npy (a 0-d array)."""

    def __init__(self, out: Path, feature_type: str):
        self.dir, self.key = out / feature_type, feature_type
        self.dir.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, row: dict, feats: np.ndarray, ts: np.ndarray, fps: float) -> None:
        _npy(self.dir / f"{name}_{self.key}.npy", feats)
        _npy(self.dir / f"{name}_timestamps_ms.npy", ts * 1000.0)
        _npy(self.dir / f"{name}_fps.npy", np.array(fps, dtype=np.float64))

    def close(self, ok: bool = True) -> None:
        pass


class _Npy:
    """OUT/<stem>.npy (T, D) and OUT/<stem>_timestamps.npy (T,) seconds."""

    def __init__(self, out: Path):
        self.dir = out

    def add(self, name, row, feats, ts, fps) -> None:
        _npy(self.dir / f"{name}.npy", feats)
        _npy(self.dir / f"{name}_timestamps.npy", ts)

    def close(self, ok: bool = True) -> None:
        pass


class _H5:
    """OUT/features.h5: a dataset per segment at the root (f[name] -> (T, D), its id, label, group, split, fps, start
    and end as attributes) and its timestamps (seconds) in /timestamps/<name>; written under a temporary name."""

    def __init__(self, out: Path):
        import h5py

        self.path = out / H5_NAME
        self._replaced = replaced(self.path)
        self.f = h5py.File(self._replaced.__enter__(), "w")
        self.ts = self.f.create_group(H5_TIMESTAMPS)

    def add(self, name, row, feats, ts, fps) -> None:
        d = self.f.create_dataset(name, data=np.asarray(feats))
        for k, v in _meta(row, fps).items():
            d.attrs[k] = v
        self.ts.create_dataset(name, data=np.asarray(ts, dtype=np.float64))

    def close(self, ok: bool = True) -> None:
        self.f.close()
        _end(self._replaced, ok)


class _WebDataset:
    """OUT/shard-NNNNNN.tar, ``shard_samples`` segments each: per segment <key>.features.npy, <key>.timestamps.npy
    and <key>.json (id, label, group, split, fps, start, end); each shard written under a temporary name."""

    def __init__(self, out: Path, shard_samples: int):
        self.out, self.per = out, shard_samples
        self.n, self.tar, self._replaced = 0, None, None

    def add(self, name, row, feats, ts, fps) -> None:
        import json

        if self.n % self.per == 0:
            self.close()
            self._replaced = replaced(self.out / f"shard-{self.n // self.per:06d}.tar")
            self.tar = tarfile.open(self._replaced.__enter__(), "w")
        for ext, data in ((WDS_FEATURES, _npy_bytes(feats)), (WDS_TIMESTAMPS, _npy_bytes(ts)),
                          (WDS_META, json.dumps(_meta(row, fps)).encode())):
            info = tarfile.TarInfo(f"{name}.{ext}")
            info.size, info.mtime = len(data), int(time.time())
            self.tar.addfile(info, io.BytesIO(data))
        self.n += 1

    def close(self, ok: bool = True) -> None:
        if self.tar is not None:
            self.tar.close()
            _end(self._replaced, ok)
            self.tar = None


def export(cfg: ExportConfig, log=lambda s: None) -> ExportResult:
    """Write the cache ``cfg.cache`` into ``cfg.out`` in ``cfg.format``, then its index CSV (featseq_index.csv: file,
    id, label, group, split, fps, start, end per segment), which import reads back as its manifest."""
    cfg.validate()
    t0 = time.monotonic()
    it = cache_segments(cfg.cache)
    attrs, ids = next(it)
    fps = float(attrs.get("fps", 0) or 0)
    names = safe_names(ids, reserved=(H5_TIMESTAMPS,) if cfg.format == "h5-per-video" else ())
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    feature_type = safe_name(cfg.feature_type or attrs.get("backbone") or "", "features")
    writer = {"video_features": lambda: _VideoFeatures(out, feature_type),
              "npy": lambda: _Npy(out), "h5-per-video": lambda: _H5(out),
              "webdataset": lambda: _WebDataset(out, cfg.shard_samples)}[cfg.format]()
    rows, frames, ok = [], 0, False
    try:
        for row, feats, ts in it:
            writer.add(names[row["id"]], row, feats, ts, fps)
            rows.append(_meta(row, fps))
            frames += len(feats)
        ok = True
    finally:
        writer.close(ok)
    index = out / INDEX_NAME
    with replaced(index) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(INDEX_COLUMNS)
        for m in rows:
            w.writerow([names[m["id"]]] + [m[k] for k in INDEX_COLUMNS[1:]])
    log(f"exported {len(rows)} segment(s), {frames} frames, as {cfg.format} into {out}")
    return ExportResult(str(out), cfg.format, len(rows), frames, time.monotonic() - t0, str(index))
