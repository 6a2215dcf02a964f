"""The cache writer: appends segments under the commit protocol of README's cache schema section (rows first, then
their table rows, each flushed; published in groups, by featurize on a writer thread), in SWMR mode, under a lock
file; and the whole-file rewrite (a killed writer's file, --refresh, new labels) under a temporary name renamed over
the cache.
"""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager

import h5py
import numpy as np

from .cache import (FORMAT_VERSION, READABLE_VERSIONS, STR_FIELDS, CacheError, check_identity, decode_attrs, left_open,
                    published_ids, published_rows, rows_end, segment_dtype)
from featseq.common import signals
from featseq.common.errors import UserError
from featseq.common.files import DiskFullError, disk_full, quiet_unraisable, writing
from featseq.common.lock import FileLock

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
            table = published_rows(src["segments"][()])
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
                 group_seconds: float | None = None, group_bytes: int = GROUP_BYTES, background: bool = False):
        """``drop``: ids of published segments to remove first (featurize --refresh: their videos changed); the cache is
        rewritten without them (:func:`_rewrite`), so they are gone whole or not at all.

        Segments are published in groups (:meth:`publish`): :meth:`append` holds a segment until the group is
        ``group_seconds`` old (default :func:`publish_seconds`) or holds ``group_bytes`` of rows, then writes the group
        with one write and one flush per dataset; :meth:`close` publishes what is held. A kill loses at most the group
        not yet published.
        ``background``: a group that fills or comes due is written by a writer thread while the caller goes on (one
        group at a time; the next waits, held, until it is done). The protocol is the same, in that thread; its error
        is raised in the caller's next call; :meth:`publish` and :meth:`close` wait for it first. featurize sets it
        when a GPU runs the CNN: its main thread then mostly waits (on pipes, on the GPU), and h5py releases the GIL
        while it writes (bench/h5_gil_bench.py), so the commits leave it (bench/writer_thread_bench.py: 0.19-0.27 s
        in the writer's calls instead of 1.11-2.11 s). A main thread that computes (the CNN on the CPU) gains
        nothing (1.88-2.19 s either way, and more wall time): there the writes stay on it."""
        self.path = str(path)
        self.group_seconds = publish_seconds() if group_seconds is None else group_seconds
        self.group_bytes = group_bytes
        self._held: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []  # (record, feats, ts, frames)
        self._held_bytes, self._held_since = 0, 0.0
        self.background = background
        self._thread: threading.Thread | None = None  # the writer thread of the group being written
        self._failed: BaseException | None = None  # what it raised, for the caller's next call
        self._broken = False  # a background write failed: close() publishes nothing more
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
        self._dtype = self._seg.dtype  # read once: an h5py call would wait for a write in the writer thread
        # rows and table rows the published segments use (a resumed file is truncated to them); what lies past them
        # is an interrupted group's, written over when it is written again
        self._end, self._n = self.f["features"].shape[0], self._seg.shape[0]
        self.done_ids = {x.decode() for x in self._seg["id"]} if len(self._seg) else set()  # published or held
        # string columns of this table (a version 1 table has no split) and their widths
        self._widths = {f: self._dtype[f].itemsize for f in STR_FIELDS if f in self._dtype.names}

    def holds(self, field: str) -> bool:
        """Does this cache's segment table have the column ``field`` (a version 1 table lacks ``split``)?"""
        return field in self._dtype.names

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
            if not left_open(e):
                raise CacheError(f"{self.path}: exists but is not a readable HDF5 file ({e}); move it away or choose another --out") from e
            _rewrite(self.path)  # a writer was killed or ran out of space: keep its published segments
            f = h5py.File(self.path, "a", libver="latest")
        have = decode_attrs(f)
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
        table = published_rows(f["segments"][()])
        end = rows_end(table)
        f["segments"].resize((len(table),))
        for name in ("features", "timestamps", "frames"):
            if name in f:
                f[name].resize(end, axis=0)
        f.flush()
        return f

    def append(self, row: dict, features: np.ndarray, timestamps: np.ndarray, frames: np.ndarray | None = None) -> None:
        """Add one segment to the group to be published (:meth:`publish`: its rows first, then its table row)."""
        self._reap()
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
        rec = np.zeros(1, dtype=self._dtype)
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
            self._due(wait=True)
        else:
            self.publish_due()

    def publish_due(self) -> None:
        """Publish the held segments if the oldest has waited ``group_seconds`` (callers that wait on other work call
        this now and then, so a slow stream of segments is still published within about that time)."""
        self._reap()
        if self._held and time.monotonic() - self._held_since >= self.group_seconds:
            self._due(wait=False)

    def _due(self, wait: bool) -> None:
        """A group is due: written here, or (``background``) handed to a writer thread once the last one is done
        (``wait``: a full group waits for it; a due one stays held until then)."""
        if not self.background:
            return self.publish()
        if self._thread is not None and not wait:
            return
        self._wait()
        with signals.held():  # a stop signal between taking the group and starting its thread would lose the group:
            held, self._held, self._held_bytes = self._held, [], 0  # it is handled once the thread has it
            self._thread = threading.Thread(target=self._write_behind, args=(held,), name="featseq-cache-writer",
                                            daemon=True)
            self._thread.start()

    def _write_behind(self, held: list) -> None:
        try:
            self._publish(held)
        except BaseException as e:  # raised in the caller's next call
            self._failed = e

    def _reap(self) -> None:
        """Raise the writer thread's error once it has ended."""
        if self._thread is not None and not self._thread.is_alive():
            self._wait()

    def _wait(self) -> None:
        """Wait for the writer thread's group, raising its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failed is not None:
            e, self._failed, self._broken = self._failed, None, True
            raise e

    def publish(self) -> None:
        """Write the held segments: their rows, flushed, then their table rows, flushed (the commit protocol); after
        the writer thread's group, if one is being written."""
        self._wait()
        if self._held:
            held, self._held, self._held_bytes = self._held, [], 0
            self._publish(held)

    def _publish(self, held: list) -> None:
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
        except KeyboardInterrupt:  # a stop signal mid-write (the main thread's): close() writes the group again (a
            self._held = held + self._held  # second signal is ignored)
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
            self._wait()
            if getattr(self, "f", None) is not None and self._held and not self._broken:
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

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            return self.close()
        try:
            self.close()
        except Exception as e:  # the writer failing too (its thread's error): the error already on its way stays
            exc.add_note(f"the cache writer also failed: {type(e).__name__}: {e}")  # the one raised
