"""``featseq cache import``: features another tool made (featurize.interop.readers) become an ordinary featseq
cache, written by CacheWriter under the usual commit protocol. Every file and manifest row is checked before
anything is written (one SourceError listing them all); the cache's attributes say it was imported, from what format
and path, and what is unknown (the backbone above all, so predict refuses new videos: featurize.spec). A rerun
resumes an interrupted import of the same files (published segments are kept and skipped); another import into the
same --out is refused; labels, groups and splits a rerun's manifest changed are updated in place (featurize.reconcile).
"""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..cache import CacheError, now_iso, read_table, string_widths
from ..reconcile import reconcile
from ..sources import Segment, SourceError, bad_row, csv_rows, folder_group, parse_seconds, manifest_split
from ..spec import identity as cache_identity
from ..writer import CacheWriter
from .config import INDEX_COLUMNS, MANIFEST_REQUIRED, ImportConfig
from .readers import Entry, default_manifest, find

# what an imported cache cannot say about its features (its attribute "unknown")
UNKNOWN = ["backbone", "weights", "size", "resize", "precision", "decoder", "videos"]


@dataclass
class ImportResult:
    path: str
    written: int
    skipped_done: int
    frames: int
    seconds: float
    not_listed: int  # files found that the manifest does not list (not imported)


@dataclass
class _Item:
    entry: Entry
    id: str
    label: str
    group: str
    split: str
    fps: float | None
    start: float | None
    end: float | None
    where: str


def _positive(value, what: str, where: str, problems: list[str]) -> float | None:
    if value in (None, ""):
        return None
    try:
        x = float(value)
        if not math.isfinite(x) or x <= 0:
            raise ValueError
        return x
    except (TypeError, ValueError):
        problems.append(f"{where}: {what} {value!r} is not a rate > 0")
        return None


def _from_manifest(path: Path, entries: list[Entry], problems: list[str]) -> tuple[list[_Item], int]:
    by_key = {e.key: e for e in entries}
    by_stem: dict[str, list[Entry]] = {}
    for e in entries:
        by_stem.setdefault(e.stem, []).append(e)
    items, used = [], set()
    for n, r, extra in csv_rows(path, MANIFEST_REQUIRED, tuple(c for c in INDEX_COLUMNS if c not in MANIFEST_REQUIRED)):
        where = f"{path.name} line {n}"
        if bad_row(r, extra, where, problems, MANIFEST_REQUIRED):
            continue
        e = by_key.get(r["file"]) or (by_stem[r["file"]][0] if len(by_stem.get(r["file"], [])) == 1 else None)
        if e is None:
            problems.append(f"{where}: no features for file {r['file']!r} in the source (found e.g. "
                            f"{', '.join(repr(x.key) for x in entries[:3]) or 'none'}); fix the row or add the file")
            continue
        if e.key in used:
            problems.append(f"{where}: file {r['file']!r} is listed twice; list each file once")
            continue
        used.add(e.key)
        split = manifest_split(r.get("split", ""), where, problems)
        items.append(_Item(e, r.get("id") or e.meta.get("id") or e.key, r["label"],
                           r.get("group") or folder_group(e.stem), split or "",
                           _positive(r.get("fps") or e.meta.get("fps"), "fps", where, problems),
                           parse_seconds(r.get("start", ""), "start", where, problems),
                           parse_seconds(r.get("end", ""), "end", where, problems), where))
    return items, len(entries) - len(used)


def _from_files(entries: list[Entry], problems: list[str]) -> list[_Item]:
    items = []
    for e in entries:
        m = e.meta
        if not m.get("label"):
            problems.append(f"{e.where}: no label: give --manifest CSV (file,label[,id,group,split,fps,start,end]) or "
                            f"put the files in SOURCE/<label>/ folders")
            continue
        split = manifest_split(str(m.get("split") or ""), e.where, problems)
        nums = [parse_seconds(str(m[k]) if m.get(k) not in (None, "") else "", k, e.where, problems)
                for k in ("start", "end")]
        items.append(_Item(e, str(m.get("id") or e.key), str(m["label"]), str(m.get("group") or folder_group(e.stem)),
                           split or "", _positive(m.get("fps"), "fps", e.where, problems), *nums, e.where))
    return items


def _check(items: list[_Item], cfg: ImportConfig, problems: list[str]) -> float:
    """Shapes, dimensions, ids, fps and timestamps of every item (timestamps read one item at a time); the rate."""
    seen, rates = {}, {}
    dims: dict[int, list[str]] = {}
    for it in items:
        if len(it.entry.shape) == 2:
            dims.setdefault(int(it.entry.shape[1]), []).append(it.entry.where)
    common = max(dims, key=lambda k: len(dims[k])) if dims else 0  # the width most files have
    for it in items:
        e = it.entry
        if it.id in seen:
            problems.append(f"{it.where}: duplicate id {it.id!r} (also {seen[it.id]}); give each segment its own id")
        seen.setdefault(it.id, it.where)
        if len(e.shape) != 2 or e.dtype.kind not in "fiu":
            problems.append(f"{e.where}: a {len(e.shape)}-d {e.dtype} array of shape {e.shape}, not (T, D) numbers")
            continue
        if e.shape[0] == 0:
            problems.append(f"{e.where}: no rows (0 frames); remove it or extract its features again")
            continue
        if e.shape[1] != common:
            problems.append(f"{e.where}: {e.shape[1]} features per frame, but {len(dims[common])} other file(s) have "
                            f"{common} (e.g. {dims[common][0]}): every file must come from the same extractor; remove or "
                            f"re-extract the odd ones")
        fps = cfg.fps or it.fps
        if fps is None:
            row = "" if it.where == e.where else f" ({it.where})"
            problems.append(f"{e.where}{row}: no fps (video_features writes <stem>_fps.npy beside the features): "
                            f"restore it, give a fps column in the manifest, or pass --fps")
        else:
            rates.setdefault(round(fps, 6), []).append(it.where)
        if it.start is not None and it.end is not None and it.end <= it.start:
            problems.append(f"{it.where}: end {it.end:g} <= start {it.start:g}")
        try:
            ts = e.timestamps()
        except (ValueError, OSError, EOFError, KeyError) as err:
            problems.append(f"{e.where}: its timestamps cannot be read ({err})")
            continue
        if ts is None:
            continue
        if ts.ndim != 1 or len(ts) != e.shape[0]:
            problems.append(f"{e.where}: {len(ts)} timestamps for {e.shape[0]} feature rows; one timestamp per row")
        elif not np.isfinite(ts).all():
            problems.append(f"{e.where}: {int((~np.isfinite(ts)).sum())} timestamp(s) NaN or Inf")
        elif (np.diff(ts) <= 0).any():
            j = int(np.nonzero(np.diff(ts) <= 0)[0][0])
            problems.append(f"{e.where}: timestamps not increasing at row {j + 1} ({ts[j]:.6f} -> {ts[j + 1]:.6f} s); "
                            f"each row must be a later frame than the one before")
    if len(rates) > 1 and cfg.fps is None:
        problems.append("the files give several rates (" + "; ".join(f"{r:g} fps: {len(w)} file(s), e.g. {w[0]}"
                                                                      for r, w in rates.items())
                        + "); extract them at one rate (video_features: extraction_fps), or pass --fps F to declare "
                          "one (featseq then picks the frames nearest in time)")
    return cfg.fps or (next(iter(rates)) if rates else 0.0)


def import_features(cfg: ImportConfig, log=lambda s: None) -> ImportResult:
    """Import ``cfg.source`` (a folder or file in ``cfg.format``) into the cache ``cfg.out``."""
    cfg.validate()
    t0 = time.monotonic()
    source = Path(cfg.source).resolve()
    if not source.exists():
        raise SourceError(str(cfg.source), ["no such file or folder"])
    _check_out(cfg, source)
    found = find(cfg.format, source, cfg.feature)
    try:
        problems = list(found.problems)
        manifest = Path(cfg.manifest).resolve() if cfg.manifest else default_manifest(source)
        if manifest is not None and not manifest.is_file():
            raise SourceError(str(manifest), ["--manifest: no such file"])
        if manifest is not None:
            items, not_listed = _from_manifest(manifest, found.entries, problems)
            if not_listed:
                log(f"note: {not_listed} file(s) under {source} are not in {manifest.name}; not imported")
        else:
            items, not_listed = _from_files(found.entries, problems), 0
        if not items and not problems:
            problems.append("nothing to import")
        fps = _check(items, cfg, problems) if items else 0.0
        if problems:
            raise SourceError(str(cfg.source), sorted(dict.fromkeys(problems)))
        return _write(cfg, source, manifest, items, fps, not_listed, t0, log)
    finally:
        found.close()


def _check_out(cfg: ImportConfig, source: Path) -> None:
    """An existing --out is resumed only when it is an import of the same files (CacheWriter then checks the rest of
    its identity: fps, dtype)."""
    if os.path.exists(cfg.out):
        have, _ = read_table(cfg.out)
        if (have.get("import_format"), have.get("import_path")) != (cfg.format, str(source)):
            made = (f"imported from {have['import_format']} files at {have.get('import_path')}" if have.get("import_format")
                    else "made by featseq featurize")
            raise CacheError(f"{cfg.out} exists and was {made}, not from {cfg.format} files at {source}; import into "
                             f"another --out (an import resumes only an interrupted import of the same files)")


def _write(cfg, source: Path, manifest: Path | None, items: list[_Item], fps: float, not_listed: int, t0: float,
           log) -> ImportResult:
    kinds = {np.dtype(it.entry.dtype).name for it in items}
    dtype = cfg.dtype or (kinds.pop() if kinds in ({"float16"}, {"float32"}) else "float32")
    identity = cache_identity(backbone="unknown", weights="unknown", weights_sha256="", seed=0, size=0,
                              resize="unknown", fps=float(fps), precision="unknown", dtype=dtype, keep_frames=False,
                              decoder="unknown", decode_device="unknown", pool="unknown", crops=1, clip_frames=0,
                              clip_stride=0, interpolation="unknown", resize_size="unknown")
    import h5py

    attrs = {"source": str(source), "source_kind": f"import:{cfg.format}", "import_format": cfg.format,
             "import_path": str(source), "import_manifest": str(manifest or ""), "unknown": UNKNOWN,
             "weights_path": "", "mean": [], "std": [], "created": now_iso(), "config": asdict(cfg),
             "versions": {"python": platform.python_version(), "numpy": np.__version__, "h5py": h5py.__version__}}
    rows = [{"id": it.id, "label": it.label, "group": it.group, "path": it.entry.where, "split": it.split}
            for it in items]
    if os.path.exists(cfg.out):  # a rerun: labels, groups and splits follow the manifest, as featurize's do
        reconcile(cfg.out, [Segment(**r, where=it.where) for r, it in zip(rows, items)], log)
    written = frames = 0
    with CacheWriter(cfg.out, identity, attrs, int(items[0].entry.shape[1]), string_widths(rows), dtype) as w:
        done = len([it for it in items if it.id in w.done_ids])
        for it, row in zip(items, rows):
            if it.id in w.done_ids:
                continue
            feats, ts = it.entry.features(), it.entry.timestamps()
            rate = cfg.fps or it.fps
            if ts is None:
                ts = (it.start or 0.0) + np.arange(len(feats)) / rate
            with np.errstate(over="ignore"):  # values beyond float16's range become Inf, refused just below
                stored = np.asarray(feats).astype(dtype)
            if not np.isfinite(stored).all():
                cast = np.isfinite(np.asarray(feats, dtype=np.float64)).all()
                raise CacheError(f"{it.entry.where}: {int((~np.isfinite(stored)).sum())} feature value(s) "
                                 + ("beyond float16's range (+-65504): pass --dtype float32" if cast else
                                    "NaN or Inf: fix or remove the file")
                                 + f"; the {written + done} segment(s) before it are kept, rerun to go on")
            start = it.start if it.start is not None else min(0.0, float(ts[0]))
            end = it.end if it.end is not None else float(ts[-1]) + 1.0 / rate
            w.append({**row, "start": start, "end": end, "video_fps": rate, "video_duration": end,
                      "video_frames": len(feats)}, stored, ts)
            written += 1
            frames += len(feats)
    if done:
        log(f"{done} segment(s) already imported into {cfg.out}; resumed")
    return ImportResult(str(cfg.out), written, done, frames, time.monotonic() - t0, not_listed)
