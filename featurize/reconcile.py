"""A source (manifest, folder, Gingerbread layout) against a cache's segment table, matched by segment id.

featurize reruns call :func:`reconcile`: labels, groups and splits the source changed for segments already cached
are written into the table (:func:`featurize.writer.relabel`: the file is rewritten under a temporary name and
renamed, so a kill leaves the old table or the new one; features are untouched), with a note listing every change.
``featseq cache check CACHE SOURCE`` reports the same differences without writing (:func:`differences`), plus the
source's segments the cache lacks, cached segments the source no longer lists and videos that changed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from featseq.common.lock import FileLock

from .cache import CacheError, read_table
from .verify import source_changes
from .writer import relabel
from .sources import Segment

RECONCILED = ("label", "group", "split")  # what a rerun updates in place (the features do not depend on them)


@dataclass
class Differences:
    """What differs between a source and a cache, by segment id."""

    changed: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)  # id -> column -> (cached, source)
    missing: list[str] = field(default_factory=list)  # in the source, not cached
    extra: list[str] = field(default_factory=list)    # cached, not in the source

    def changes(self) -> dict[str, dict[str, str]]:
        """id -> {column: the source's value}: what :func:`featurize.writer.relabel` writes."""
        return {sid: {k: new for k, (_, new) in cols.items()} for sid, cols in self.changed.items()}

    def changed_lines(self) -> list[str]:
        return [f"{sid}: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in cols.items())
                for sid, cols in self.changed.items()]


def differences(table: np.ndarray, segments: Iterable[Segment]) -> Differences:
    """Compare a cache's published segment table (as stored) with a source's segments."""
    cols = [k for k in RECONCILED if k in table.dtype.names]
    cached = {x.decode(): i for i, x in enumerate(table["id"])}
    d = Differences()
    seen = set()
    for s in segments:
        seen.add(s.id)
        i = cached.get(s.id)
        if i is None:
            d.missing.append(s.id)
            continue
        diff = {}
        for k in RECONCILED:
            old = table[k][i].decode() if k in cols else ""
            if old != getattr(s, k):
                diff[k] = (old, getattr(s, k))
        if diff:
            d.changed[s.id] = diff
    d.extra = [sid for sid in cached if sid not in seen]
    return d


def _listed(lines: list[str], limit: int = 50) -> str:
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n  " + "\n  ".join(lines[:limit]) + more


def reconcile(path: str, segments: list[Segment], log: Callable[[str], None], wait: float = 60.0) -> Differences:
    """Bring the labels, groups and splits of ``path``'s cached segments in line with ``segments`` (by id), logging what
    changed; returns the differences found. Takes the cache's writer lock only when something changed (shards of one
    source reconcile their merged cache at once: a lock held by another is waited for, up to ``wait`` seconds, and
    the table read again under it)."""
    _, table = read_table(path)
    d = differences(table, segments)
    if not d.changed:
        return d
    deadline = time.monotonic() + wait
    while True:
        try:
            lock = FileLock(path, "is writing this cache").acquire()
            break
        except CacheError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        _, table = read_table(path)
        d = differences(table, segments)
        if d.changed:
            relabel(path, d.changes())
            log(f"note: {path}: the source gives {len(d.changed)} cached segment(s) another label, group or split; "
                f"updated them in the cache's segment table (features untouched):" + _listed(d.changed_lines()))
    finally:
        lock.release()
    return d


def check(cache_path: str, source: str) -> dict:
    """``featseq cache check``: does the cache at ``cache_path`` hold ``source`` as it is now? Returns ``ok`` and the
    differences by segment id (``changed``: label, group or split; ``missing``: not cached; ``extra``: cached, not in
    the source; ``videos_changed``: size or mtime differ from those recorded), with ``fix``: the featurize command
    that brings the cache in line (it updates labels, groups and splits in place and featurizes what is missing).
    Nothing is written. Raises SourceError for a source with bad rows."""
    from .sources import load_segments
    from .spec import featurize_command

    _, segments = load_segments(source)
    attrs, table = read_table(cache_path)
    d = differences(table, segments)
    videos = source_changes(table, {s.id: s.path for s in segments})
    ok = not (d.changed or d.missing or d.extra or videos)
    try:
        fix = featurize_command(attrs, cache_path, source=source, out=cache_path) + (" --refresh" if videos else "")
    except Exception:  # noqa: BLE001  (attributes not written by featurize: no command to propose)
        fix = ""
    return {"cache": cache_path, "source": source, "ok": ok, "segments": len(segments), "cached": len(table),
            "changed": {sid: {k: list(v) for k, v in cols.items()} for sid, cols in d.changed.items()},
            "missing": d.missing, "extra": d.extra, "videos_changed": videos, "fix": "" if ok else fix}
