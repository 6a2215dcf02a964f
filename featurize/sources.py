"""Where segments come from: a folder-per-class tree, a CSV manifest, or the Gingerbread layout.

Every source yields the same record, :class:`Segment`. :func:`validate` checks all of them
(files, ids, bounds, readability) before any decoding and raises one :class:`SourceError`
listing every offending row.
"""
from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cache import SPLIT_VALUES
from featseq.common.errors import UserError

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
GINGERBREAD_LABELS = ((range(1, 5), "Classicalmusic"), (range(5, 9), "Instrumentalmusic"), (range(9, 13), "Popmusic"))
_GB_DIR = re.compile(r"^P\d+$")
_GB_FILE = re.compile(r"^music(\d+)\.mp4$", re.IGNORECASE)
_UCF_GROUP = re.compile(r"_(g\d+)(?:_|$)")
CSV_REQUIRED = ("path", "label")
CSV_OPTIONAL = ("start", "end", "group", "id", "split")
# a manifest's split column: the cache's values (featurize.cache.SPLIT_VALUES) and the spellings datasets use for them
SPLIT_SPELLINGS = {**{v: v for v in SPLIT_VALUES}, "training": "train", "valid": "val", "validation": "val",
                   "dev": "val", "testing": "test"}


@dataclass(frozen=True)
class Segment:
    """One labelled stretch of one video: [start, end) seconds, end None = to the video's end."""

    id: str
    path: str
    label: str
    group: str
    start: float = 0.0
    end: float | None = None
    split: str = ""  # train, val or test from a manifest's split column; empty: none given
    where: str = ""  # how to find it in the source, for error messages ("row 3", a path)


class SourceError(UserError):
    """Invalid source; ``problems`` lists every offending row or file."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{source}: {len(problems)} problem(s), nothing was written:\n  " + "\n  ".join(shown) + more)


def gingerbread_label(piece: int) -> str | None:
    for pieces, label in GINGERBREAD_LABELS:
        if piece in pieces:
            return label
    return None


def detect_kind(source: str | os.PathLike) -> str:
    """'csv', 'gingerbread' or 'folder'."""
    p = Path(source)
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return "csv"
        raise SourceError(str(p), ["a source file must be a CSV manifest (columns path,label[,start,end,group,id,split])"])
    if not p.is_dir():
        raise SourceError(str(p), ["no such file or folder"])
    subdirs = [d for d in p.iterdir() if d.is_dir()]
    if subdirs and all(_GB_DIR.match(d.name) for d in subdirs) and any(
        _GB_FILE.match(f.name) for d in subdirs for f in d.iterdir()
    ):
        return "gingerbread"
    return "folder"


def read_source(source: str | os.PathLike) -> tuple[str, list[Segment], list[str]]:
    """(kind, valid segments, row problems) of a source; raises SourceError when it has no structure at all."""
    kind = detect_kind(source)
    segs, problems = {"csv": _from_csv, "gingerbread": _from_gingerbread, "folder": _from_folder}[kind](Path(source))
    return kind, segs, problems


def load_segments(source: str | os.PathLike) -> tuple[str, list[Segment]]:
    """(kind, segments) of a source; raises SourceError listing every bad row."""
    kind, segs, problems = read_source(source)
    if problems:
        raise SourceError(str(source), problems)
    return kind, segs


def _from_gingerbread(root: Path) -> list[Segment]:
    segs, problems = [], []
    for d in sorted(x for x in root.iterdir() if x.is_dir()):
        for f in sorted(d.iterdir()):
            m = _GB_FILE.match(f.name)
            if not m:
                continue
            label = gingerbread_label(int(m.group(1)))
            if label is None:
                problems.append(f"{f}: piece number {int(m.group(1))} is outside 01-12, so it has no label")
                continue
            segs.append(Segment(id=f"{d.name}_{f.stem}", path=str(f.resolve()), label=label, group=d.name, where=str(f)))
    return segs, problems


def folder_group(stem: str) -> str:
    """The group of a clip in a folder-per-class tree: UCF-101's ``_gNN_`` in its name, else the clip itself."""
    m = _UCF_GROUP.search(stem)
    return m.group(1) if m else stem


def _from_folder(root: Path) -> list[Segment]:
    segs = []
    for d in sorted(x for x in root.iterdir() if x.is_dir() and not x.name.startswith(".")):
        for f in sorted(d.iterdir()):
            if f.is_file() and f.suffix.lower() in VIDEO_EXTS:
                segs.append(Segment(id=f"{d.name}/{f.stem}", path=str(f.resolve()), label=d.name,
                                    group=folder_group(f.stem), where=str(f)))
    if not segs:
        raise SourceError(str(root), [f"no videos ({', '.join(VIDEO_EXTS)}) found in ROOT/<label>/ folders"])
    return segs, []


def parse_seconds(value: str, col: str, where: str, problems: list[str]) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        x = float(value)
    except ValueError:
        problems.append(f"{where}: {col} {value!r} is not a number of seconds")
        return None
    if not math.isfinite(x) or x < 0:
        problems.append(f"{where}: {col} {value!r} must be a finite number >= 0")
        return None
    return x


def csv_rows(path: Path, required=CSV_REQUIRED, optional=CSV_OPTIONAL) -> list[tuple[int, dict, list | None]]:
    """(line number, {column: stripped value}, fields beyond the header or None) of every row of a manifest CSV;
    SourceError for a missing column, text that is not UTF-8 or a malformed row. Also read by ``featseq cache
    import`` (featurize.interop) for its manifests."""
    # utf-8-sig drops a byte-order mark; the csv module reads CRLF and LF line ends and quoted fields (commas, line
    # breaks); blank lines are skipped, and a row is named by the line it ends on (its line, unless a quoted field
    # spans lines)
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in cols]
            if missing:
                raise SourceError(str(path), [f"missing column(s) {', '.join(missing)}; found {', '.join(cols) or 'no header'}; "
                                              f"required: {', '.join(required)}, optional: {', '.join(optional)}"])
            for r in reader:
                extra = r.pop(None, None)
                rows.append((reader.line_num, {(k or "").strip(): (v or "").strip() for k, v in r.items()}, extra))
    except UnicodeDecodeError as e:
        raise SourceError(str(path), [f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at byte {e.start}); save the "
                                      f"manifest as UTF-8"]) from None
    except csv.Error as e:
        raise SourceError(str(path), [f"line {reader.line_num}: not a CSV row ({e}); quote fields with commas or line "
                                      f"breaks in double quotes"]) from None
    return rows


def bad_row(r: dict, extra: list | None, where: str, problems: list[str], required=CSV_REQUIRED) -> bool:
    """Is a manifest row (from :func:`csv_rows`) unusable: a NUL byte, more fields than columns, an empty ``required``
    column (a problem added)?"""
    if any("\x00" in v for v in r.values()):
        problems.append(f"{where}: a NUL byte in the row; the manifest is not a text CSV (save it as UTF-8 text)")
        return True
    if extra:
        problems.append(f"{where}: {len(extra)} more field(s) than the header has columns ({extra[0]!r} ...); quote "
                        f"a field that contains a comma")
        return True
    empty = next((c for c in required if not r.get(c)), None)
    if empty:
        problems.append(f"{where}: empty {empty}")
        return True
    return False


def manifest_split(value: str, where: str, problems: list[str]) -> str | None:
    """A manifest's split value as the cache stores it ('' for none); None (and a problem) for an unknown one."""
    split = SPLIT_SPELLINGS.get(value.lower(), None if value else "")
    if split is None:
        problems.append(f"{where}: split {value!r} is not one of {', '.join(SPLIT_VALUES)} (or "
                        f"{', '.join(k for k in SPLIT_SPELLINGS if k not in SPLIT_VALUES)}); leave it empty for a "
                        f"segment in no part")
    return split


def _from_csv(path: Path) -> list[Segment]:
    rows = csv_rows(path)
    segs, problems = [], []
    base = path.parent
    resolved: dict[str, tuple[str, str]] = {}  # a row's path -> (the video's resolved path, its stem)
    for n, r, extra in rows:
        where = f"{path.name} line {n}"
        if bad_row(r, extra, where, problems):
            continue
        video = resolved.get(r["path"])
        if video is None:  # rows cut from one video resolve its path once
            raw = Path(r["path"])
            full = (raw if raw.is_absolute() else base / raw).resolve()
            video = resolved[r["path"]] = (str(full), full.stem)
        start = parse_seconds(r.get("start", ""), "start", where, problems)
        end = parse_seconds(r.get("end", ""), "end", where, problems)
        if start is not None and end is not None and end <= start:
            problems.append(f"{where}: end {end:g} <= start {start:g}")
            continue
        split = manifest_split(r.get("split", ""), where, problems)
        if split is None:
            continue
        cut = start is not None or end is not None
        seg_id = r.get("id") or (f"{r['path']}@{start or 0:g}-{'end' if end is None else f'{end:g}'}" if cut else r["path"])
        segs.append(Segment(id=seg_id, path=video[0], label=r["label"], group=r.get("group") or video[1],
                            start=start or 0.0, end=end, split=split, where=where))
    if not segs and not problems:
        raise SourceError(str(path), ["the manifest has no rows"])
    return segs, problems


def _row_order(problem: str) -> tuple:
    m = re.search(r" line (\d+):", problem)
    return (0, int(m.group(1))) if m else (1, 0)


def validate(source: str, segments: list[Segment], probe: Callable[[list[str]], dict],
             skip_unreadable: bool = False, only: set[str] | None = None,
             problems: list[str] | None = None) -> tuple[dict[str, dict], dict[str, str]]:
    """Check every segment before decoding; return (path -> video info, id -> reason skipped).

    ``probe`` maps a list of paths to path -> info dict (or an error string) and is normally
    :meth:`featurize.worker.DecodePool.probe`, so a file that hangs the decoder cannot hang this.
    With ``skip_unreadable`` a video that is missing, not readable or cannot be opened is skipped (reported) instead
    of failing the whole source; every other problem still fails it. ``only``: ids whose files to
    check (the ones still to do on a resume); ids are always checked across all segments.
    ``problems``: row problems already found while reading the source, reported together.
    """
    skipped: dict[str, str] = {}
    problems = list(problems or [])
    seen: dict[str, str] = {}
    folded: dict[str, tuple[str, str]] = {}  # ids compared without case and inner whitespace -> (id, where)
    for s in segments:
        key = " ".join(s.id.split()).casefold()
        if s.id in seen:
            problems.append(f"{s.where}: duplicate id {s.id!r} (first at {seen[s.id]}); give each segment its own id")
        elif key in folded:
            problems.append(f"{s.where}: id {s.id!r} differs from {folded[key][0]!r} ({folded[key][1]}) only in case or "
                            f"whitespace; split lists and file systems may not tell them apart: give distinct ids")
        else:
            seen[s.id] = s.where
            folded[key] = (s.id, s.where)
    present = []
    if only is not None:
        segments = [s for s in segments if s.id in only]
    unreadable: dict[str, str | None] = {}  # path -> why it cannot be read (None: it can), each file looked at once
    for s in segments:
        if s.path not in unreadable:
            unreadable[s.path] = (f"video not found: {s.path}" if not os.path.isfile(s.path) else
                               f"video not readable (permissions): {s.path}" if not os.access(s.path, os.R_OK) else None)
            if unreadable[s.path] is None:
                present.append(s.path)
        why = unreadable[s.path]
        if why is None:
            continue
        if skip_unreadable:
            skipped[s.id] = f"{why} ({s.where})"
        else:
            problems.append(f"{s.where}: {why} (fix or remove the row, or pass --skip-errors)")
    infos = probe(present) if present else {}
    for s in segments:
        info = infos.get(s.path)
        if info is None:
            continue
        if isinstance(info, str):
            if skip_unreadable:
                skipped[s.id] = f"unreadable video: {info}"
            else:
                problems.append(f"{s.where}: unreadable video: {info} (fix or remove it, or pass --skip-errors)")
        elif s.start >= info["duration"]:
            problems.append(f"{s.where}: start {s.start:g} s is beyond the video's end ({info['duration']:.3f} s): {s.path}")
    if problems:
        # one line per problem, unique, in source order
        raise SourceError(source, sorted(dict.fromkeys(problems), key=_row_order))
    return {p: i for p, i in infos.items() if isinstance(i, dict)}, skipped
