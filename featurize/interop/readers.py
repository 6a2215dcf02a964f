"""What ``featseq cache import`` finds in each format (featurize.interop.config's FORMATS): one :class:`Entry` per
video or segment, with its array's shape and dtype read from the file's header (no features read yet), what the
files say about it themselves (fps; label, group, split, id, start, end where our exports put them; a class folder),
and how to load its features and timestamps later, one at a time. Files are data: .npy without pickles, JSON parsed,
tar members read into memory, never extracted onto disk.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .config import H5_TIMESTAMPS, INDEX_NAME, WDS_FEATURES, WDS_META, WDS_TIMESTAMPS

META_KEYS = ("id", "label", "group", "split", "fps", "start", "end")


@dataclass
class Entry:
    key: str          # how a manifest's file column names it: the stem ("<label>/<stem>" under a class folder), the
    stem: str         # HDF5 dataset name or the webdataset sample key; stem: the last part of the key
    where: str        # the features' file (file::member), for messages and the segment table's path column
    shape: tuple
    dtype: np.dtype
    features: Callable[[], np.ndarray]                  # loads the (T, D) array
    timestamps: Callable[[], np.ndarray | None]         # loads the (T,) seconds, None where the files give none
    meta: dict = field(default_factory=dict)


@dataclass
class Found:
    entries: list[Entry]
    problems: list[str]
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for c in self.closers:
            c()


def _header(path: Path, problems: list[str]) -> tuple[tuple, np.dtype] | None:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
        return a.shape, a.dtype
    except (ValueError, OSError, EOFError) as e:
        problems.append(f"{path}: not a readable .npy array ({e}); re-save it with numpy.save")
        return None


def _read_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def video_features(root: Path, feature: str | None, problems: list[str]) -> Found:
    """OUTPUT/<feature_type>/<stem>_<feature>.npy, <stem>_timestamps_ms.npy, <stem>_fps.npy (video_features'
    save_numpy), found under ``root`` (OUTPUT, OUTPUT/<feature_type>, or per class OUTPUT/<label>/<feature_type>)."""
    tails = ("_timestamps_ms.npy", "_fps.npy")
    out = []
    ts_files = sorted(root.rglob("*_timestamps_ms.npy"))
    if not ts_files:
        problems.append(f"no <stem>_timestamps_ms.npy files under {root}: not a video_features output folder "
                        f"(OUTPUT/<feature_type>/<stem>_<feature>.npy, <stem>_timestamps_ms.npy, <stem>_fps.npy)")
    by_dir: dict[Path, list[Path]] = {}
    for t in ts_files:
        by_dir.setdefault(t.parent, []).append(t)
    for d, ts_list in by_dir.items():
        names = {p.name for p in d.glob("*.npy")}
        stems = [t.name[:-len(tails[0])] for t in ts_list]
        rel = d.relative_to(root).parts
        label = rel[-2] if len(rel) >= 2 else ""  # OUTPUT/<label>/<feature_type>/...
        for stem, ts in zip(stems, ts_list):
            longer = [s for s in stems if len(s) > len(stem) and s.startswith(stem + "_")]
            keys = sorted(n[len(stem) + 1:-4] for n in names if n.startswith(stem + "_") and n.endswith(".npy")
                          and not n.endswith(tails) and not any(n.startswith(s + "_") for s in longer))
            if feature is not None and feature not in keys:
                problems.append(f"{d / f'{stem}_{feature}.npy'}: missing (--feature {feature}; beside it: "
                                f"{', '.join(keys) or 'no features file'})")
                continue
            if feature is None and len(keys) != 1:
                problems.append(f"{ts}: " + (f"no {stem}_<feature>.npy beside it; restore the features file" if not keys
                                              else f"several features beside it ({', '.join(keys)}): pass --feature NAME"))
                continue
            feats = d / f"{stem}_{feature or keys[0]}.npy"
            head = _header(feats, problems)
            meta = {"label": label} if label else {}
            fps_file = d / f"{stem}_fps.npy"
            if fps_file.is_file():
                try:
                    meta["fps"] = float(np.asarray(_read_npy(fps_file), dtype=np.float64).reshape(-1)[0])
                except (ValueError, OSError, EOFError, IndexError, TypeError) as e:
                    problems.append(f"{fps_file}: not one number ({e}); restore it, or pass --fps")
            if head is None:
                continue
            out.append(Entry(key=f"{label}/{stem}" if label else stem, stem=stem, where=str(feats), shape=head[0],
                             dtype=head[1], meta=meta,
                             features=lambda f=feats: _read_npy(f),
                             timestamps=lambda t=ts: _read_npy(t).astype(np.float64) / 1000.0))
    return Found(out, problems)


def npy(root: Path, problems: list[str]) -> Found:
    """ROOT/<stem>.npy (T, D) with ROOT/<stem>_timestamps.npy (seconds) beside when there is one; per class
    ROOT/<label>/<stem>.npy."""
    out = []
    for f in sorted(root.rglob("*.npy")):
        if f.name.endswith("_timestamps.npy"):
            continue
        rel = f.relative_to(root)
        head = _header(f, problems)
        if head is None:
            continue
        ts = f.with_name(f"{f.stem}_timestamps.npy")
        out.append(Entry(key=rel.with_suffix("").as_posix(), stem=f.stem, where=str(f), shape=head[0], dtype=head[1],
                         meta={"label": rel.parts[0]} if len(rel.parts) > 1 else {},
                         features=lambda f=f: _read_npy(f),
                         timestamps=lambda t=ts: _read_npy(t).astype(np.float64) if t.is_file() else None))
    if not out and not problems:
        problems.append(f"no .npy files under {root}")
    return Found(out, problems)


def _one_file(path: Path, pattern: str, what: str, problems: list[str]) -> list[Path]:
    if path.is_file():
        return [path]
    found = sorted(path.glob(pattern))
    if not found:
        problems.append(f"{path}: no {pattern} {what} in it; give the file itself")
    return found


def _attr(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v.item() if isinstance(v, np.generic) else v


def h5_per_video(path: Path, problems: list[str]) -> Found:
    """One HDF5 with a (T, D) dataset per video (f[video_id]); timestamps, when given, in /timestamps/<name>; id,
    label, group, split, fps, start and end read from a dataset's attributes where it has them."""
    import h5py

    files = _one_file(path, "*.h5", "HDF5 file", problems)
    if len(files) > 1:
        problems.append(f"{path}: several .h5 files ({', '.join(p.name for p in files[:5])}); give one of them")
        return Found([], problems)
    if not files:
        return Found([], problems)
    try:
        f = h5py.File(files[0], "r")
    except OSError as e:
        problems.append(f"{files[0]}: not a readable HDF5 file ({e})")
        return Found([], problems)
    out = []
    ts_group = f.get(H5_TIMESTAMPS) if isinstance(f.get(H5_TIMESTAMPS), h5py.Group) else None

    def visit(name, obj):
        if not isinstance(obj, h5py.Dataset) or name.split("/")[0] == H5_TIMESTAMPS:
            return
        if obj.ndim != 2 or obj.dtype.kind not in "fiu":
            problems.append(f"{files[0]}::{name}: a {obj.ndim}-d {obj.dtype} dataset, not (T, D) numbers; remove it "
                            f"or list only the others in --manifest")
            return
        meta = {k: _attr(obj.attrs[k]) for k in META_KEYS if k in obj.attrs}
        out.append(Entry(key=name, stem=name.rsplit("/", 1)[-1], where=f"{files[0]}::{name}", shape=obj.shape,
                         dtype=obj.dtype, meta=meta,
                         features=lambda n=name: f[n][()],
                         timestamps=lambda n=name: ts_group[n][()].astype(np.float64)
                         if ts_group is not None and n in ts_group else None))
    f.visititems(visit)
    if not out and not problems:
        problems.append(f"{files[0]}: no (T, D) datasets in it")
    return Found(out, problems, [f.close])


def _npy_header(fh) -> tuple[tuple, np.dtype]:
    version = np.lib.format.read_magic(fh)
    shape, _fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)(fh)
    return shape, dtype


def _member(tar: tarfile.TarFile, m: tarfile.TarInfo) -> np.ndarray:
    return np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)


def webdataset(path: Path, problems: list[str]) -> Found:
    """Tar shards (a .tar, or every .tar in a folder) of samples <key>.features.npy (or <key>.npy), optional
    <key>.timestamps.npy and <key>.json (id, label, group, split, fps, start, end)."""
    out, closers = [], []
    for shard in _one_file(path, "*.tar", "tar shards", problems):
        try:
            tar = tarfile.open(shard, "r")
            members = [m for m in tar.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError) as e:
            problems.append(f"{shard}: not a readable tar file ({e})")
            continue
        closers.append(tar.close)
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in members:
            folder, _, base = m.name.rpartition("/")
            stem, _, ext = base.partition(".")
            samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext] = m
        for key, parts in samples.items():
            where = f"{shard}::{key}"
            feats = parts.get(WDS_FEATURES) or parts.get("npy")
            if feats is None:
                problems.append(f"{where}: no {key}.{WDS_FEATURES} (or {key}.npy) member; members: "
                                f"{', '.join(sorted(parts))}")
                continue
            try:
                shape, dtype = _npy_header(tar.extractfile(feats))
                meta = json.loads(tar.extractfile(parts[WDS_META]).read()) if WDS_META in parts else {}
                if not isinstance(meta, dict):
                    raise ValueError(f"{key}.{WDS_META} holds a {type(meta).__name__}, not an object")
            except (ValueError, OSError, tarfile.TarError) as e:
                problems.append(f"{where}: unreadable member ({e})")
                continue
            ts = parts.get(WDS_TIMESTAMPS)
            out.append(Entry(key=key, stem=key.rsplit("/", 1)[-1], where=where, shape=shape, dtype=dtype,
                             meta={k: meta[k] for k in META_KEYS if k in meta},
                             features=lambda t=tar, m=feats: _member(t, m),
                             timestamps=lambda t=tar, m=ts: None if m is None else _member(t, m).astype(np.float64)))
    if not out and not problems:
        problems.append(f"{path}: no samples in its tar shards")
    return Found(out, problems, closers)


def find(fmt: str, source: Path, feature: str | None) -> Found:
    problems: list[str] = []
    if fmt in ("video_features", "npy") and not source.is_dir():
        return Found([], [f"{source}: a {fmt} import reads a folder; give the folder the files are in"])
    if fmt == "video_features":
        return video_features(source, feature, problems)
    if fmt == "npy":
        return npy(source, problems)
    if fmt == "h5-per-video":
        return h5_per_video(source, problems)
    return webdataset(source, problems)


def default_manifest(source: Path) -> Path | None:
    """The index an export wrote (featseq_index.csv) in the folder, or beside the file, when there is one."""
    p = (source if source.is_dir() else source.parent) / INDEX_NAME
    return p if p.is_file() else None
