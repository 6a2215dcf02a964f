"""Checks of a cache's contents: every chunk read back (``featseq cache verify``), and whether the videos its segments
were cut from changed since (size, mtime).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from .cache import open_read, published_rows

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
        table = published_rows(raw)
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
