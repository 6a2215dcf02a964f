"""The HDF5 feature cache: its schema (columns, versions) and the readers. The schema is a contract: README's
"The cache (HDF5 schema, format_version 2)" section is where it is written down (objects, columns, attributes, commit
protocol, checksums, versions); this module implements that text. The writer is featurize/writer.py, the whole-file
check featurize/verify.py.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .spec import featurize_command, with_defaults
from featseq.common.errors import UserError

FORMAT_VERSION = 2              # what this featseq writes
READABLE_VERSIONS = (1, 2)      # what it reads (and resumes): 1 lacks the segments' split column
_NUM_FIELDS = [("offset", "i8"), ("length", "i8"), ("start", "f8"), ("end", "f8"), ("video_width", "i4"),
               ("video_height", "i4"), ("video_fps", "f8"), ("video_duration", "f8"), ("video_frames", "i8"),
               ("video_size", "i8"), ("video_mtime", "f8")]
STR_FIELDS = ("id", "label", "group", "path", "split")
SPLIT_VALUES = ("train", "val", "test")  # a segment's split: one of these, or empty (none given)
_MIN_WIDTH = {"path": 256, "split": 8}   # bytes; the others 64


class CacheError(UserError):
    """A cache cannot be used as asked; the message names the file and the fix."""


def segment_dtype(widths: dict[str, int]) -> np.dtype:
    return np.dtype([(f, f"S{widths[f]}") for f in STR_FIELDS] + _NUM_FIELDS)


def string_widths(rows: list[dict]) -> dict[str, int]:
    """Generous fixed widths so later rows of the same source fit too (a field a row lacks is empty)."""
    w = {}
    for f in STR_FIELDS:
        longest = max((len(str(r.get(f, "")).encode()) for r in rows), default=1)
        w[f] = max(_MIN_WIDTH.get(f, 64), 2 * longest)
    return w


def open_read(path: str | os.PathLike) -> h5py.File:
    """Open a cache for reading, also one whose writer is running or was killed (SWMR read)."""
    path = str(path)
    if not os.path.isfile(path):
        raise CacheError(f"{path}: no such cache file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        if not left_open(e):
            raise CacheError(f"{path}: not a readable HDF5 cache ({e})") from e
        try:
            f = h5py.File(path, "r", swmr=True, locking=False)
        except OSError as e2:
            raise CacheError(f"{path}: cannot open ({e2})") from e2
    version = f.attrs.get("format_version")
    if version is None or "segments" not in f:
        f.close()
        raise CacheError(f"{path}: not a featseq cache (no format_version attribute / segments table)")
    try:
        version = int(version)
    except (TypeError, ValueError):
        version = None
    if version not in READABLE_VERSIONS:
        f.close()
        if version is None:
            raise CacheError(f"{path}: its format_version attribute is not a number; not a featseq cache, or a damaged one")
        raise CacheError(f"{path}: cache format version {int(version)} is not supported by this featseq "
                         f"(reads versions {', '.join(map(str, READABLE_VERSIONS))}); re-run featseq featurize or "
                         f"upgrade featseq")
    problem = _table_problem(f["segments"], version)
    if problem:
        f.close()
        raise CacheError(f"{path}: its segments table {problem}; not a featseq cache, or a damaged one")
    return f


def _table_problem(table, version: int) -> str | None:
    """What is wrong with a /segments object for this format version (None: the fields and kinds featseq writes)."""
    if not isinstance(table, h5py.Dataset) or table.dtype.names is None or table.ndim != 1:
        return "is not a one-dimensional table of records"
    need = [(n, "S") for n in STR_FIELDS if n != "split" or version >= 2] + [(n, t[0]) for n, t in _NUM_FIELDS]
    for name, kind in need:
        if name not in table.dtype.names:
            return f"has no {name!r} column"
        if table.dtype[name].kind != kind and not (kind in "if" and table.dtype[name].kind in "if"):
            return f"has a {name!r} column of kind {table.dtype[name].kind!r}, expected {kind!r}"
    return None


def left_open(e: OSError) -> bool:
    """Does this error opening a file mean a writer has it open, or was killed or ran out of space while writing it
    (then a SWMR read still opens it with every published segment)?"""
    text = str(e).lower()
    return "already open for write" in text or "lock" in text or "truncated file" in text


# Attributes are data from whoever made the file: parsed (JSON, numbers), never evaluated, and checked here.
JSON_ATTRS = ("versions", "config", "mean", "std", "shard_plan", "merged_from", "unknown")
NUMBER_ATTRS = {"format_version": int, "feature_dim": int, "size": int, "seed": int, "fps": float}
MAX_ATTR_BYTES = {"shard_plan": 256 * 2**20}  # a shard plan names every segment; other attributes are small
MAX_ATTR_DEFAULT = 2**20


def decode_attrs(f: h5py.File) -> dict:
    out = {}
    for k in f.attrs:
        size = h5py.h5a.open(f.id, k.encode()).get_storage_size()
        limit = MAX_ATTR_BYTES.get(k, MAX_ATTR_DEFAULT)
        if size > limit:
            raise CacheError(f"{f.filename}: attribute {k!r} holds {size} bytes (at most {limit} expected); this "
                             f"file was not written by featseq or is damaged")
        try:
            v = f.attrs[k]
        except (OSError, TypeError, ValueError) as e:
            raise CacheError(f"{f.filename}: attribute {k!r} cannot be read ({e}); this file was not written by featseq "
                             f"or is damaged") from e
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, np.generic):
            v = v.item()
        if k in JSON_ATTRS and isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError as e:
                raise CacheError(f"{f.filename}: attribute {k!r} is not valid JSON ({e}); this file was not written "
                                 f"by featseq or is damaged") from e
        if k in NUMBER_ATTRS and v is not None:
            try:
                if isinstance(v, (bool, str)) or not np.isscalar(v):
                    raise ValueError
                v = NUMBER_ATTRS[k](v)
            except (TypeError, ValueError):
                raise CacheError(f"{f.filename}: attribute {k!r} is {str(v)[:60]!r} ({type(v).__name__}), not a "
                                 f"{NUMBER_ATTRS[k].__name__}; this file was not written by featseq or is damaged") from None
        out[k] = v
    return out


def published_rows(table: np.ndarray) -> np.ndarray:
    """Rows that were fully written (a row is written in one go; a zero id means not yet)."""
    n = len(table)
    while n and not table[n - 1]["id"]:
        n -= 1
    return table[:n]


def rows_end(table: np.ndarray) -> int:
    """Rows of /features and /timestamps that published segments use (later rows are a killed writer's)."""
    return int((table["offset"] + table["length"]).max()) if len(table) else 0


def table_to_columns(table: np.ndarray) -> dict[str, np.ndarray]:
    """Segment table -> dict of columns, strings decoded to str; a string column the table lacks (``split`` of a
    version 1 cache) reads as empty strings."""
    cols = {name: (np.array([x.decode() for x in table[name]], dtype=object) if name in STR_FIELDS else np.asarray(table[name]))
            for name in table.dtype.names}
    for name in STR_FIELDS:
        cols.setdefault(name, np.array([""] * len(table), dtype=object))
    return cols


@dataclass
class Cache:
    """A whole cache in memory. ``segments`` is a dict of columns (strings decoded)."""

    path: str
    attrs: dict
    segments: dict[str, np.ndarray]
    features: np.ndarray | None
    timestamps: np.ndarray

    def __len__(self) -> int:
        return len(self.segments["id"])

    @property
    def ids(self) -> list[str]:
        return list(self.segments["id"])

    def segment(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(features (n, D), timestamps (n,)) of segment i."""
        o, n = int(self.segments["offset"][i]), int(self.segments["length"][i])
        return self.features[o:o + n], self.timestamps[o:o + n]


def read_cache(path: str | os.PathLike, features: bool = True, dtype=None) -> Cache:
    """Load a cache: the table and timestamps in one read each, features in one contiguous read.

    ``dtype`` converts features on load (e.g. np.float32); None keeps the stored dtype.
    """
    with open_read(path) as f:
        attrs = decode_attrs(f)
        table = published_rows(f["segments"][()])
        end = rows_end(table)
        ts = f["timestamps"][:end]
        feats = None
        if features:
            feats = f["features"][:end]
            if dtype is not None:
                feats = feats.astype(dtype, copy=False)
    return Cache(str(path), attrs, table_to_columns(table), feats, ts)


def read_segment(path: str | os.PathLike, seg_id: str, frames: bool = False) -> dict:
    """One segment without reading the others: features, timestamps (and frames when kept)."""
    with open_read(path) as f:
        table = published_rows(f["segments"][()])
        hit = np.nonzero(table["id"] == seg_id.encode())[0]
        if not len(hit):
            raise CacheError(f"{path}: no segment with id {seg_id!r}")
        row = table[hit[0]]
        o, n = int(row["offset"]), int(row["length"])
        out = {"features": f["features"][o:o + n], "timestamps": f["timestamps"][o:o + n],
               **{k: v for k, v in table_to_columns(table[hit[0]:hit[0] + 1]).items()}}
        out = {k: (v[0] if isinstance(v, np.ndarray) and k not in ("features", "timestamps") else v) for k, v in out.items()}
        if frames:
            if "frames" not in f:
                raise _no_frames(path, f)
            out["frames"] = f["frames"][o:o + n]
    return out


def iter_segments(f: h5py.File, table: np.ndarray, frames: bool = False, block_bytes: int = 64 << 20):
    """(row, features, timestamps, frames or None) of every row of ``table`` (rows of the open cache ``f``), in offset
    order: read in blocks of about ``block_bytes`` that span many segments, not one HDF5 read per segment (at 13,320
    segments the per-read cost alone is seconds); memory stays bounded whatever the cache's size."""
    d, t = f["features"], f["timestamps"]
    fr = f["frames"] if frames else None
    row_bytes = d.shape[1] * d.dtype.itemsize + (int(np.prod(fr.shape[1:])) * fr.dtype.itemsize if fr is not None else 0)
    limit = max(1, block_bytes // row_bytes)
    offsets, lengths = table["offset"].astype(np.int64), table["length"].astype(np.int64)
    order = np.argsort(offsets, kind="stable")
    i = 0
    while i < len(order):
        a = end = int(offsets[order[i]])
        j = i
        while j < len(order) and (j == i or offsets[order[j]] + lengths[order[j]] - a <= limit):
            end = max(end, int(offsets[order[j]] + lengths[order[j]]))
            j += 1
        feats, ts = d[a:end], t[a:end]
        kept = fr[a:end] if fr is not None else None
        for k in order[i:j]:
            o, n = int(offsets[k]) - a, int(lengths[k])
            yield table[k], feats[o:o + n], ts[o:o + n], (kept[o:o + n] if kept is not None else None)
        i = j


def row_record(row: np.void) -> dict:
    """One row of the segment table as {column: value}, strings decoded; a string column the row lacks (``split`` of a
    version 1 cache) reads as empty."""
    rec = {name: (row[name].decode() if name in STR_FIELDS else row[name].item()) for name in row.dtype.names}
    return {**{name: "" for name in STR_FIELDS}, **rec}


def cache_segments(path: str | os.PathLike):
    """A generator over a whole cache with bounded memory (``featseq cache export``): first (attributes, ids of the
    published segments), then one (row: :func:`row_record`, features (n, D), timestamps (n,)) per segment, in offset
    order, read in blocks by :func:`iter_segments`."""
    with open_read(path) as f:
        table = published_rows(f["segments"][()])
        yield decode_attrs(f), [x.decode() for x in table["id"]]
        for row, feats, ts, _ in iter_segments(f, table):
            yield row_record(row), feats, ts


def features_to_npy(path: str | os.PathLike, dest: str | os.PathLike, rows: int, block_bytes: int = 256 << 20) -> None:
    """Write the first ``rows`` rows of the features, in the cache's dtype, into the .npy file ``dest``, block by
    block (bounded memory; for a memory map of a cache larger than RAM: HDF5's chunked, checksummed layout cannot be
    mapped itself)."""
    with open_read(path) as f:
        d = f["features"]
        out = np.lib.format.open_memmap(dest, mode="w+", dtype=d.dtype, shape=(rows, d.shape[1]))
        step = max(1, block_bytes // (d.dtype.itemsize * d.shape[1]))
        for a in range(0, rows, step):
            out[a:a + step] = d[a:min(rows, a + step)]
        out.flush()
        del out


def read_frames(path: str | os.PathLike, rows: np.ndarray) -> np.ndarray:
    """uint8 frames (len(rows), S, S, 3) kept with --keep-frames, for sorted unique ``rows`` of /features."""
    with open_read(path) as f:
        if "frames" not in f:
            raise _no_frames(path, f)
        return f["frames"][np.asarray(rows)]


def _no_frames(path, f: h5py.File) -> CacheError:
    """The error for a cache without /frames, proposing the featurize command that made it, with --keep-frames."""
    try:
        cmd = f"`{featurize_command(decode_attrs(f), str(path), keep_frames=True)}`"
    except UserError:  # attributes not written by featurize
        cmd = "featurize it again with --keep-frames"
    return CacheError(f"{path}: frames were not kept; make a cache that keeps them, as this one was made: {cmd}")


def summary(path: str | os.PathLike) -> dict:
    """What `featseq cache info/list` shows; reads the table and attributes, not the features."""
    with open_read(path) as f:
        attrs = decode_attrs(f)
        table = published_rows(f["segments"][()])
        cols = table_to_columns(table)
        labels, counts = np.unique(cols["label"].astype(str), return_counts=True) if len(table) else ([], [])
        return {
            "path": str(path),
            "segments": int(len(table)),
            "frames": int(table["length"].sum()) if len(table) else 0,
            "feature_dim": int(attrs.get("feature_dim", 0)),
            "fps": float(attrs.get("fps", 0)),
            "backbone": attrs.get("backbone"),
            "weights": attrs.get("weights"),
            "size": int(attrs.get("size", 0)),
            "precision": attrs.get("precision"),
            "dtype": attrs.get("dtype"),
            "classes": {str(k): int(v) for k, v in zip(labels, counts)},
            "groups": int(len(set(cols["group"]))) if len(table) else 0,
            "splits": {**{v: int((cols["split"] == v).sum()) for v in SPLIT_VALUES},
                       "none": int(sum(x not in SPLIT_VALUES for x in cols["split"]))},
            "mb": round(os.path.getsize(path) / 1e6, 2),
            "attrs": attrs,
        }


def check_identity(path: str, have: dict, identity: dict) -> None:
    """Refuse a request whose identity attributes differ from those of the cache at ``path``."""
    have = with_defaults(have)
    diff = [f"{k}: cache has {have.get(k)!r}, request has {v!r}" for k, v in identity.items() if have.get(k) != v]
    if diff:
        try:
            again = f"; to resume it, ask for what made it: {featurize_command(have, path, out=path)}"
        except (UserError, KeyError, TypeError, ValueError):  # an imported cache, or attributes too odd to repeat
            again = ""
        raise CacheError(f"{path} holds a different request, refusing to mix them in:\n  " + "\n  ".join(diff)
                         + "\n  Use another --out (or the default path, which is named after these settings)" + again)


def read_attrs(path: str | os.PathLike) -> dict:
    """A cache's attributes, without reading its segment table or features."""
    with open_read(path) as f:
        return decode_attrs(f)


def read_table(path: str | os.PathLike) -> tuple[dict, np.ndarray]:
    """(attributes, the published rows of the segment table as stored) without reading features."""
    with open_read(path) as f:
        return decode_attrs(f), published_rows(f["segments"][()])


def published_ids(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """(attributes, ids of published segments) without reading features."""
    attrs, table = read_table(path)
    return attrs, [x.decode() for x in table["id"]]


def list_caches(cache_dir: str | os.PathLike) -> list[dict]:
    """Summaries of every *.h5 under cache_dir (unreadable ones carry an 'error')."""
    out = []
    for p in sorted(Path(cache_dir).glob("**/*.h5")):
        try:
            out.append(summary(p))
        except (CacheError, OSError) as e:
            out.append({"path": str(p), "error": str(e)})
    return out


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
