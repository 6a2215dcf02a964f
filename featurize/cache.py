"""The HDF5 feature cache: schema, crash-safe writer, fast reader. The schema is a contract (README).

Layout of one file (format_version 2):

    /features    (total_frames, D)  float16 (or float32), chunked, grown by appending
    /timestamps  (total_frames,)    float64, presentation time (s) of each sampled frame in its video
    /segments    (n_segments,)      compound table, one row per *published* segment:
                 id, label, group, path, split (fixed-width UTF-8 bytes; split: train, val, test or
                 empty, from a manifest's split column), offset, length (rows in /features), start,
                 end (segment bounds, s), video_width, video_height, video_fps, video_duration,
                 video_frames, video_size (bytes), video_mtime
    /frames      (total_frames, S, S, 3) uint8, lzf-compressed  -- only with --keep-frames
    attributes   format_version, backbone, weights, weights_sha256, seed, size, resize, fps,
                 precision, dtype, feature_dim, keep_frames, source, source_kind, created,
                 versions (JSON), config (JSON)

Commit protocol: segments are published in groups (CacheWriter.publish: what arrived within
GROUP_SECONDS or GROUP_BYTES, and on close): the group's rows are appended to /features and
/timestamps and flushed, then its rows are appended to /segments and flushed. Readers trust
/segments only, so a half-written segment is never visible; a kill loses the unpublished group.
The writer runs in SWMR mode (libver "latest"), which keeps the file consistent if the writer is killed; such a file then carries HDF5's "open for write" flag, so it opens with
``h5py.File(path, "r", swmr=True)`` (which :func:`open_read` does) until the next featurize run on
it rewrites it cleanly. A lock file ``<cache>.lock`` (flock) stops a second writer. A change of published rows
(``--refresh`` dropping stale segments, :func:`relabel` writing a manifest's new labels, groups or splits) rewrites
the whole file under a temporary name and renames it: a kill leaves the old file or the new one.

Checksums: datasets created by this version carry HDF5's fletcher32 filter (readers check it transparently; older
files without it stay readable); :func:`verify` reads everything back and names damaged segments.

Versions: 2 added the ``split`` column. Version 1 files (no ``split`` column) are read as if every split
were empty, and featurize resumes them as version 1 files (refusing segments that carry a split, which
such a table cannot hold); a version 1 featseq refuses version 2 files rather than drop their splits.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .decoder import LEGACY_DECODER
from featseq.common.errors import UserError
from featseq.common.files import DiskFullError, disk_full, quiet_unraisable, writing
from featseq.common.lock import FileLock

FORMAT_VERSION = 2              # what this featseq writes
READABLE_VERSIONS = (1, 2)      # what it reads (and resumes): 1 lacks the segments' split column
# identity attributes older caches lack, and what their absence means
IDENTITY_DEFAULTS = {"decoder": LEGACY_DECODER}
# A cache is identified by what changes its features; a different request aimed at an existing file is refused.
# The source's path is recorded (attribute "source") but not compared: segments are identified by id, so a
# dataset folder that moved, or is mounted elsewhere on another node, resumes.
IDENTITY_KEYS = ("backbone", "weights", "weights_sha256", "seed", "size", "resize", "fps", "precision",
                 "dtype", "keep_frames", "decoder")
_NUM_FIELDS = [("offset", "i8"), ("length", "i8"), ("start", "f8"), ("end", "f8"), ("video_width", "i4"),
               ("video_height", "i4"), ("video_fps", "f8"), ("video_duration", "f8"), ("video_frames", "i8"),
               ("video_size", "i8"), ("video_mtime", "f8")]
STR_FIELDS = ("id", "label", "group", "path", "split")
SPLIT_VALUES = ("train", "val", "test")  # a segment's split: one of these, or empty (none given)
_MIN_WIDTH = {"path": 256, "split": 8}   # bytes; the others 64


# Group commits: segments are published together once the oldest has waited this long or the group holds this much.
# FEATSEQ_PUBLISH_SECONDS sets the wait (0: every segment is published as it completes, as before group commits).
GROUP_SECONDS = 1.0
GROUP_BYTES = 64 << 20


def publish_seconds() -> float:
    """How long a finished segment may wait to be published: FEATSEQ_PUBLISH_SECONDS, else GROUP_SECONDS."""
    v = os.environ.get("FEATSEQ_PUBLISH_SECONDS")
    if v is None:
        return GROUP_SECONDS
    try:
        return max(0.0, float(v))
    except ValueError:
        raise UserError(f"FEATSEQ_PUBLISH_SECONDS={v!r}: give seconds, e.g. 1 (0 publishes every segment at once)") from None

# Set when a write failed inside HDF5 (the space ran out in spite of CacheWriter's check): the library can then not
# shut down cleanly, so the CLI ends such a process with os._exit after its error message (cli.Main).
HDF5_WRITE_FAILED = False


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
        if not _left_open(e):
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


def _left_open(e: OSError) -> bool:
    """Does this error opening a file mean a writer has it open, or was killed or ran out of space while writing it
    (then a SWMR read still opens it with every published segment)?"""
    text = str(e).lower()
    return "already open for write" in text or "lock" in text or "truncated file" in text


# Attributes are data from whoever made the file: parsed (JSON, numbers), never evaluated, and checked here.
JSON_ATTRS = ("versions", "config", "mean", "std", "shard_plan", "merged_from")
NUMBER_ATTRS = {"format_version": int, "feature_dim": int, "size": int, "seed": int, "fps": float}
MAX_ATTR_BYTES = {"shard_plan": 256 * 2**20}  # a shard plan names every segment; other attributes are small
MAX_ATTR_DEFAULT = 2**20


def _decode_attrs(f: h5py.File) -> dict:
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


def _published(table: np.ndarray) -> np.ndarray:
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
        attrs = _decode_attrs(f)
        table = _published(f["segments"][()])
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
        table = _published(f["segments"][()])
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
    from .spec import featurize_command

    try:
        cmd = f"`{featurize_command(_decode_attrs(f), str(path), keep_frames=True)}`"
    except UserError:  # attributes not written by featurize
        cmd = "featurize it again with --keep-frames"
    return CacheError(f"{path}: frames were not kept; make a cache that keeps them, as this one was made: {cmd}")


def summary(path: str | os.PathLike) -> dict:
    """What `featseq cache info/list` shows; reads the table and attributes, not the features."""
    with open_read(path) as f:
        attrs = _decode_attrs(f)
        table = _published(f["segments"][()])
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
    have = {**IDENTITY_DEFAULTS, **have}
    diff = [f"{k}: cache has {have.get(k)!r}, request has {v!r}" for k, v in identity.items() if have.get(k) != v]
    if diff:
        raise CacheError(f"{path} holds a different request, refusing to mix them in:\n  " + "\n  ".join(diff)
                         + "\n  Use another --out (or the default path, which is named after these settings).")


def read_table(path: str | os.PathLike) -> tuple[dict, np.ndarray]:
    """(attributes, the published rows of the segment table as stored) without reading features."""
    with open_read(path) as f:
        return _decode_attrs(f), _published(f["segments"][()])


def published_ids(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """(attributes, ids of published segments) without reading features."""
    attrs, table = read_table(path)
    return attrs, [x.decode() for x in table["id"]]


@contextmanager
def _removed_on_error(tmp: str):
    try:
        yield
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _rewrite(path: str, drop: set[str] = frozenset(), relabel: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Rewrite a cache with its published segments but those in ``drop``, under a temporary name, then rename it over
    ``path``: a writer killed before the rename leaves the old file as it was, after it the new one, both whole.
    Used for a cache whose writer was killed or ran out of space (its flags are cleared), by ``--refresh`` (the
    stale segments' rows go, the others keep their features) and by :func:`relabel`. ``relabel``: id -> {string
    column: new value} written into the new table (a column too narrow for a value is widened). Returns the ids
    dropped."""
    tmp = path + ".recover.tmp"
    gone = []
    with _removed_on_error(tmp), writing(path, kept=f"{path} is unchanged"):
        with h5py.File(path, "r", swmr=True, locking=False) as src, h5py.File(tmp, "w", libver="latest") as dst:
            table = _published(src["segments"][()])
            keep = np.array([x.decode() not in drop for x in table["id"]], dtype=bool)
            gone = [x.decode() for x in table["id"][~keep]]
            table = table[keep]
            if relabel:
                table = _relabelled(table, relabel, path)
            for k, v in src.attrs.items():
                dst.attrs[k] = v
            new = table.copy()
            new["offset"] = np.concatenate([[0], np.cumsum(table["length"])[:-1]]).astype(new["offset"].dtype) \
                if len(table) else new["offset"]
            end = int(table["length"].sum())
            for name in ("features", "timestamps", "frames"):
                if name in src:
                    d = src[name]
                    out = dst.create_dataset(name, shape=(end,) + d.shape[1:], maxshape=(None,) + d.shape[1:],
                                             chunks=d.chunks, dtype=d.dtype, compression=d.compression,
                                             fletcher32=d.fletcher32)
                    step = max(1, (64 << 20) // max(1, int(np.prod(d.shape[1:])) * d.dtype.itemsize))
                    # in runs of segments adjacent in the old rows (all of them when none is dropped), block by block
                    for o, n, no in _runs(table["offset"], table["length"], new["offset"]):
                        for a in range(0, n, step):
                            b = min(n, a + step)
                            out[no + a:no + b] = d[o + a:o + b]
            dst.create_dataset("segments", data=new, maxshape=(None,), chunks=src["segments"].chunks,
                               fletcher32=src["segments"].fletcher32)
        os.replace(tmp, path)
    return gone


def _runs(offsets: np.ndarray, lengths: np.ndarray, new_offsets: np.ndarray) -> list[tuple[int, int, int]]:
    """(old offset, rows, new offset) of each run of segments whose rows follow one another in the old file (new
    offsets are consecutive by construction)."""
    runs: list[list[int]] = []
    for o, n, no in zip(offsets.tolist(), lengths.tolist(), new_offsets.tolist()):
        if runs and runs[-1][0] + runs[-1][1] == o:
            runs[-1][1] += n
        else:
            runs.append([o, n, no])
    return [tuple(r) for r in runs]


def _relabelled(table: np.ndarray, changes: dict[str, dict[str, str]], path: str) -> np.ndarray:
    """A copy of a segment table with string columns of some rows changed (id -> {column: value}); a column too narrow
    for a new value is widened (the table's fixed widths hold what the first featurize saw)."""
    need = {name: table.dtype[name].itemsize for name in STR_FIELDS if name in table.dtype.names}
    for fields in changes.values():
        for name, value in fields.items():
            if name not in need:
                raise CacheError(f"{path}: this cache's segment table has no {name} column (a format-1 cache); featurize into a "
                                 f"new --out to keep the source's {name}s")
            need[name] = max(need[name], 2 * len(value.encode()))
    dtype = np.dtype([(n, f"S{need[n]}") if n in need else (n, table.dtype[n]) for n in table.dtype.names])
    out = np.zeros(len(table), dtype=dtype)
    for n in table.dtype.names:
        out[n] = table[n]
    pos = {x.decode(): i for i, x in enumerate(table["id"])}
    for sid, fields in changes.items():
        if sid in pos:
            for name, value in fields.items():
                out[name][pos[sid]] = value.encode()
    return out


def relabel(path: str, changes: dict[str, dict[str, str]]) -> None:
    """Write new labels, groups or splits (id -> {column: value}) into the segment table of the cache at ``path``; its
    features stay as they are. The whole file is rewritten under a temporary name and renamed (:func:`_rewrite`), so
    a process killed at any moment leaves the old table or the new one, never a mixed or broken one. The caller holds
    the cache's :class:`FileLock`."""
    _rewrite(str(path), relabel=changes)


class CacheWriter:
    """Appends segments to a cache under the commit protocol above. Use as a context manager."""

    def __init__(self, path: str, identity: dict, attrs: dict, feature_dim: int, widths: dict[str, int],
                 dtype: str = "float16", frame_size: int | None = None, drop: set[str] = frozenset(),
                 group_seconds: float | None = None, group_bytes: int = GROUP_BYTES):
        """``drop``: ids of published segments to remove first (featurize --refresh: their videos changed); the cache is
        rewritten without them (:func:`_rewrite`), so they are gone whole or not at all.

        Segments are published in groups (:meth:`publish`): :meth:`append` holds a segment until the group is
        ``group_seconds`` old (default :func:`publish_seconds`) or holds ``group_bytes`` of rows, then writes the group
        with one write and one flush per dataset; :meth:`close` publishes what is held. A kill loses at most the group
        not yet published."""
        self.path = str(path)
        self.group_seconds = publish_seconds() if group_seconds is None else group_seconds
        self.group_bytes = group_bytes
        self._held: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []  # (record, feats, ts, frames)
        self._held_bytes, self._held_since = 0, 0.0
        self.lock = FileLock(self.path, "is writing this cache").acquire()
        self.dropped: list[str] = []
        try:
            if os.path.exists(self.path):
                if drop and drop & set(published_ids(self.path)[1]):
                    self.dropped = _rewrite(self.path, set(drop))
                self.f = self._open_existing(identity, feature_dim)
            else:
                self.f = self._create(identity, attrs, feature_dim, widths, dtype, frame_size)
            self.f.swmr_mode = True
        except BaseException:
            self.lock.release()
            raise
        self._seg = self.f["segments"]
        # rows and table rows the published segments use (a resumed file is truncated to them); what lies past them
        # is an interrupted group's, written over when it is written again
        self._end, self._n = self.f["features"].shape[0], self._seg.shape[0]
        self.done_ids = {x.decode() for x in self._seg["id"]} if len(self._seg) else set()  # published or held
        # string columns of this table (a version 1 table has no split) and their widths
        self._widths = {f: self._seg.dtype[f].itemsize for f in STR_FIELDS if f in self._seg.dtype.names}

    def holds(self, field: str) -> bool:
        """Does this cache's segment table have the column ``field`` (a version 1 table lacks ``split``)?"""
        return field in self._seg.dtype.names

    def _create(self, identity, attrs, feature_dim, widths, dtype, frame_size) -> h5py.File:
        tmp = self.path + ".new.tmp"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with writing(self.path, kept="nothing was written"), h5py.File(tmp, "w", libver="latest") as f:
            for k, v in {**attrs, **identity, "format_version": FORMAT_VERSION, "feature_dim": feature_dim}.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)
            rows = max(1, min(1024, (1 << 20) // (feature_dim * np.dtype(dtype).itemsize)))
            # fletcher32: every chunk carries a checksum, so bits that rot on disk fail the read (cache verify)
            f.create_dataset("features", shape=(0, feature_dim), maxshape=(None, feature_dim), chunks=(rows, feature_dim),
                             dtype=dtype, fletcher32=True)
            f.create_dataset("timestamps", shape=(0,), maxshape=(None,), chunks=(4096,), dtype="f8", fletcher32=True)
            f.create_dataset("segments", shape=(0,), maxshape=(None,), chunks=(256,), dtype=segment_dtype(widths),
                             fletcher32=True)
            if frame_size:
                f.create_dataset("frames", shape=(0, frame_size, frame_size, 3), maxshape=(None, frame_size, frame_size, 3),
                                 chunks=(1, frame_size, frame_size, 3), dtype="u1", compression="lzf", fletcher32=True)
        os.replace(tmp, self.path)
        return h5py.File(self.path, "a", libver="latest")

    def _open_existing(self, identity, feature_dim) -> h5py.File:
        try:
            f = h5py.File(self.path, "a", libver="latest")
        except OSError as e:
            if not _left_open(e):
                raise CacheError(f"{self.path}: exists but is not a readable HDF5 file ({e}); move it away or choose another --out") from e
            _rewrite(self.path)  # a writer was killed or ran out of space: keep its published segments
            f = h5py.File(self.path, "a", libver="latest")
        have = _decode_attrs(f)
        if have.get("format_version") not in READABLE_VERSIONS:
            f.close()
            raise CacheError(f"{self.path}: format version {have.get('format_version')} is not one this featseq writes "
                             f"({', '.join(map(str, READABLE_VERSIONS))}); choose another --out")
        try:
            check_identity(self.path, have, identity)
        except CacheError:
            f.close()
            raise
        # drop anything past the last published segment (a killed writer's half segment)
        table = _published(f["segments"][()])
        end = rows_end(table)
        f["segments"].resize((len(table),))
        for name in ("features", "timestamps", "frames"):
            if name in f:
                f[name].resize(end, axis=0)
        f.flush()
        return f

    def append(self, row: dict, features: np.ndarray, timestamps: np.ndarray, frames: np.ndarray | None = None) -> None:
        """Add one segment to the group to be published (:meth:`publish`: its rows first, then its table row)."""
        if row["id"] in self.done_ids:
            raise CacheError(f"{self.path}: segment {row['id']!r} is already cached")
        enc = {}
        missing = [k for k in STR_FIELDS if k not in self._widths and row.get(k)]
        if missing:
            raise CacheError(f"{self.path}: this version-1 cache has no {', '.join(missing)} column for segment "
                             f"{row['id']!r}; featurize into a new --out to keep it")
        for k in self._widths:
            b = str(row.get(k, "")).encode()
            if len(b) > self._widths[k]:
                raise CacheError(f"{self.path}: {k} {row[k]!r} is longer than this cache's {self._widths[k]}-byte {k} "
                                 f"column; shorten it or write a new cache (--out)")
            enc[k] = b
        rec = np.zeros(1, dtype=self._seg.dtype)
        for k, v in row.items():
            if k in rec.dtype.names and k not in STR_FIELDS:
                rec[k] = v
        for k, v in enc.items():
            rec[k] = v
        rec["length"] = len(features)
        if not self._held:
            self._held_since = time.monotonic()
        self._held.append((rec, np.asarray(features), np.asarray(timestamps), frames))
        self._held_bytes += self._held[-1][1].nbytes + (frames.nbytes if frames is not None else 0)
        self.done_ids.add(row["id"])
        if self._held_bytes >= self.group_bytes:
            self.publish()
        else:
            self.publish_due()

    def publish_due(self) -> None:
        """Publish the held segments if the oldest has waited ``group_seconds`` (callers that wait on other work call
        this now and then, so a slow stream of segments is still published within about that time)."""
        if self._held and time.monotonic() - self._held_since >= self.group_seconds:
            self.publish()

    def publish(self) -> None:
        """Write the held segments: their rows, flushed, then their table rows, flushed (the commit protocol)."""
        if not self._held:
            return
        held, self._held, self._held_bytes = self._held, [], 0
        first = held[0][0]["id"][0].decode()
        kept = f"every segment published before {first!r} is kept"
        global HDF5_WRITE_FAILED
        short = ""
        try:
            short = self._space_short(sum(len(h[1]) for h in held))
            fit = self._fitting(held) if short else len(held)
            if fit:
                with quiet_unraisable(), writing(self.path, kept=kept):
                    self._write(held[:fit])
                held = held[fit:]
            if short:  # refused before HDF5 writes a byte: a write that fails inside HDF5 leaves its library unable to
                first = held[0][0]["id"][0].decode()
                raise DiskFullError(f"{self.path}: {short}, so the {len(held)} segment(s) from {first!r} on were not "
                                    f"written; every segment before them is kept. Free space (or raise the file-size "
                                    f"limit, ulimit -f) and rerun the same command")
        except KeyboardInterrupt:  # a stop signal mid-write: close() writes the group again (a second is ignored)
            self._held = held + self._held
            raise
        except BaseException as e:
            for rec, *_ in held:  # not published: a rerun redoes them
                self.done_ids.discard(rec["id"][0].decode())
            if isinstance(e, DiskFullError) and not short:
                HDF5_WRITE_FAILED = True  # it failed inside HDF5
            raise

    def _fitting(self, held: list) -> int:
        """How many of the held segments, from the first, fit in the space left (the rest then wait for a rerun)."""
        ends = np.cumsum([len(h[1]) for h in held])
        lo, hi = 0, len(held)  # the first lo fit; more than hi do not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._space_short(int(ends[mid - 1])):
                hi = mid - 1
            else:
                lo = mid
        return lo

    def _space_short(self, n: int) -> str:
        """Why ``n`` more rows may not fit (the free space of the file system, or the file-size limit), '' when they
        will: every chunk they add counted whole (a chunk is allocated whole), plus room for HDF5's metadata. Asked
        once per group, before it is written."""
        need = 256 << 10
        for name in ("features", "timestamps", "frames"):
            if name in self.f:
                d = self.f[name]
                rows, chunk_bytes = d.chunks[0], int(np.prod(d.chunks)) * d.dtype.itemsize
                need += (-(-(d.shape[0] + n) // rows) - -(-d.shape[0] // rows)) * chunk_bytes  # chunks it adds
        st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        free = st.f_bavail * st.f_frsize
        if free < need:
            return f"the file system has {free / 1e6:.1f} MB free and the next group of segments needs up to {need / 1e6:.1f} MB"
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and os.path.getsize(self.path) + need > limit:
            return (f"the file-size limit (ulimit -f: {limit / 1e6:.1f} MB) leaves {max(0, limit - os.path.getsize(self.path)) / 1e6:.1f} MB "
                    f"and the next group of segments needs up to {need / 1e6:.1f} MB")
        return ""

    def _write(self, held: list) -> None:
        o, i = self._end, self._n
        n = sum(len(h[1]) for h in held)
        columns = [(self.f["features"], 1), (self.f["timestamps"], 2)] + ([(self.f["frames"], 3)] if "frames" in self.f else [])
        for d, col in columns:
            d.resize(o + n, axis=0)
            if n:
                d[o:o + n] = np.concatenate([h[col] for h in held]) if len(held) > 1 else held[0][col]
            d.flush()
        recs = np.concatenate([h[0] for h in held])
        recs["offset"] = o + np.concatenate([[0], np.cumsum(recs["length"])[:-1]])
        self._seg.resize((i + len(recs),))
        self._seg[i:i + len(recs)] = recs
        self._seg.flush()
        self._end, self._n = o + n, i + len(recs)

    def close(self) -> None:
        """Publish what is held, then close the file and release the lock."""
        try:
            if getattr(self, "f", None) is not None and self._held:
                self.publish()
        finally:
            self._close()

    def _close(self) -> None:
        try:
            if getattr(self, "f", None) is not None:
                f, self.f, self._seg = self.f, None, None  # datasets released before their file (h5py)
                try:
                    with quiet_unraisable():
                        f.close()
                except (OSError, RuntimeError) as e:  # a full disk: what is published stays readable (SWMR)
                    if disk_full(e) is None:
                        raise
        finally:
            self.lock.release()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def source_changes(table: np.ndarray, paths: dict[str, str] | None = None) -> dict[str, str]:
    """id -> what changed, for the published segments whose video's size or mtime differ from those recorded when it
    was featurized. ``paths``: id -> the video to check (a source's current path for the id; default the recorded
    one); ids not in ``paths`` are not checked. A video that is gone is not "changed" here (its features stand; a
    source may be archived once cached); rows that recorded no size (0) are not checked."""
    out = {}
    for row in table:
        sid = row["id"].decode()
        path = row["path"].decode() if paths is None else paths.get(sid)
        if path is None or int(row["video_size"]) <= 0:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        what = []
        if st.st_size != int(row["video_size"]):
            what.append(f"size {int(row['video_size'])} -> {st.st_size} bytes")
        if float(st.st_mtime) != float(row["video_mtime"]):
            what.append(f"modified {_when(row['video_mtime'])} -> {_when(st.st_mtime)}")
        if what:
            out[sid] = f"{path}: {', '.join(what)}"
    return out


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t))) + f".{int(round(float(t) % 1 * 1e6)):06d}"


@dataclass
class Verdict:
    """What :func:`verify` found: ``problems`` (each names the segment or object), ``notes`` (no fault, worth
    saying), and what was read."""

    path: str
    segments: int = 0
    frames: int = 0
    checksums: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | os.PathLike, sources: bool = False, block_bytes: int = 64 << 20) -> Verdict:
    """Read a whole cache back and check it (``featseq cache verify``): every chunk of every dataset is read (HDF5
    checks each chunk's fletcher32 checksum on caches that have them), the segment table (ids unique, offsets and
    lengths contiguous, inside the arrays), timestamps (finite, non-decreasing within each segment), features
    (finite); with ``sources`` that every segment's video is there with the size and mtime recorded. Damage is named
    by segment id."""
    path = str(path)
    v = Verdict(path)
    with open_read(path) as f:
        try:
            raw = f["segments"][()]
        except (OSError, RuntimeError) as e:
            v.problems.append(f"/segments: the segment table cannot be read ({e}); the cache is lost, re-featurize it")
            return v
        table = _published(raw)
        ids = [x.decode(errors="replace") for x in table["id"]]
        v.segments, v.frames = len(table), int(table["length"].sum()) if len(table) else 0
        v.checksums = bool(f["features"].fletcher32)
        if not v.checksums:
            v.notes.append("written without chunk checksums (by a featseq before fletcher32 was on): bit rot inside "
                           "the features is caught only where it makes them non-finite")
        seen: dict[str, int] = {}
        for i, sid in enumerate(ids):
            if sid in seen:
                v.problems.append(f"segment {sid!r}: duplicate id (rows {seen[sid]} and {i} of /segments)")
            seen.setdefault(sid, i)
        offset, length = table["offset"].astype(np.int64), table["length"].astype(np.int64)
        expect = np.concatenate([[0], np.cumsum(length)[:-1]]) if len(table) else offset
        for i in np.nonzero((offset != expect) | (length < 0))[0]:
            v.problems.append(f"segment {ids[i]!r}: offset {offset[i]}, length {length[i]}: the table is not "
                              f"contiguous (expected offset {expect[i]})")
        n = {name: f[name].shape[0] for name in ("features", "timestamps", "frames") if name in f}
        for name, rows in n.items():
            if rows < v.frames:
                v.problems.append(f"/{name}: {rows} rows, but the segments use {v.frames}")
            elif rows > v.frames:
                v.notes.append(f"/{name}: {rows - v.frames} rows after the last published segment (a stopped writer's; "
                               f"the next featurize drops them)")
        ends = offset + length

        nonfinite = np.zeros(len(ids), dtype=np.int64)  # rows with NaN / Inf per segment
        for name in n:
            d = f[name]
            end = min(n[name], v.frames)
            step = max(d.chunks[0], (block_bytes // max(1, int(np.prod(d.shape[1:])) * d.dtype.itemsize))
                       // d.chunks[0] * d.chunks[0])
            bad_rows: list[tuple[int, int]] = []
            for a in range(0, end, step):
                b = min(end, a + step)
                try:
                    block = d[a:b]
                except (OSError, RuntimeError):  # find the chunks that fail
                    block = None
                    for c in range(a, b, d.chunks[0]):
                        try:
                            d[c:min(b, c + d.chunks[0])]
                        except (OSError, RuntimeError):
                            bad_rows.append((c, min(b, c + d.chunks[0])))
                if block is None:
                    continue
                if name == "features":
                    bad = np.nonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))[0] + a
                    np.add.at(nonfinite, owner_rows(bad, ends), 1)
            for a, b in bad_rows:
                hit = sorted({ids[j] for j in owner_rows(np.arange(a, b), ends) if j < len(ids)})
                v.problems.append(f"/{name} rows {a}-{b - 1}: unreadable (checksum or read error), segment(s) "
                                  f"{', '.join(repr(s) for s in hit)}; re-featurize into a new --out (or restore the "
                                  f"file from a copy)")
        for i in np.nonzero(nonfinite)[0]:
            v.problems.append(f"segment {ids[i]!r}: {nonfinite[i]} feature row(s) with NaN or Inf")
        try:
            ts = f["timestamps"][:v.frames]
        except (OSError, RuntimeError):
            ts = None  # reported above
        if ts is not None:
            for i, sid in enumerate(ids):
                t = ts[offset[i]:offset[i] + length[i]]
                if not np.isfinite(t).all():
                    v.problems.append(f"segment {sid!r}: {int((~np.isfinite(t)).sum())} timestamp(s) NaN or Inf")
                elif (np.diff(t) < 0).any():
                    j = int(np.nonzero(np.diff(t) < 0)[0][0])
                    v.problems.append(f"segment {sid!r}: timestamps decrease at row {j + 1} ({t[j]:.6f} -> {t[j + 1]:.6f} s)")
    if sources:
        for sid, what in source_changes(table).items():
            v.problems.append(f"segment {sid!r}: its video changed since it was featurized: {what}")
        for sid, row in zip(ids, table):
            if not os.path.isfile(row["path"].decode()):
                v.problems.append(f"segment {sid!r}: its video is gone: {row['path'].decode()}")
    return v


def owner_rows(rows: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The index of the segment each row of /features belongs to (``ends``: offset + length, ascending)."""
    return np.searchsorted(ends, rows, side="right")


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
