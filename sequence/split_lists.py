"""A cache's predefined parts: one of train / val / test / "" (in no part) per segment, from the segments' split
column (``--split predefined``) or from a dataset's official split lists (``--split ucf101:K``, ``hmdb51:K``).

Official lists name videos as ``<Class>/<video>.avi`` (UCF-101: ``classInd.txt`` ``1 ApplyEyeMakeup``,
``trainlist0K.txt`` ``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1``, ``testlist0K.txt``
``ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi``) or per class (HMDB-51: ``<class>_test_splitK.txt``,
``<video>.avi 1|2|0``: train, test, unused). A cache segment is matched by the video it was cut from: the
folder holding its file and the file's name without extension (``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01``,
case-insensitive), which is also a folder source's segment id; a video transcoded to another container still
matches. Where that fails, a file name that occurs once in the lists matches alone (a manifest over another
folder layout). Every segment cut from a listed video takes the video's part.

Listed videos the cache lacks, and cache segments no list names, are reported (not refused): a cache of part
of a dataset trains on what it has.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featseq.featurize.cache import SPLIT_VALUES, Cache

from .catalog import parse_split

LIST_DIRS = {"ucf101": ("ucfTrainTestlist",), "hmdb51": ("testTrainMulti_7030_splits", "test_train_splits")}
HMDB_CODES = {"1": "train", "2": "test", "0": ""}
EXAMPLES = 5


class ListError(ValueError):
    """Split lists that cannot be used (sequence.splits re-raises it as a SplitError naming --split)."""


@dataclass
class Parts:
    """One part per cache segment and what to report about how they were found."""

    parts: np.ndarray                     # (N,) object: train / val / test / ""
    report: dict = field(default_factory=dict)


def video_key(path: str) -> str:
    """'<folder>/<name without extension>' of a video, lower case: how lists and segments are matched."""
    p = Path(path)
    return f"{p.parent.name}/{p.stem}".lower()


def _lines(path: Path):
    for n, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), start=1):
        line = line.strip()
        if line:
            yield n, line


def find_dir(kind: str, k: int, source: str, split_dir: str | None) -> Path:
    """The folder holding split K's lists: --split-dir, else the source folder (a manifest's folder), its parent,
    or the official list folder (ucfTrainTestlist, testTrainMulti_7030_splits) in either."""
    need = _needed(kind, k)
    if split_dir:
        d = Path(split_dir)
        if not d.is_dir():
            raise ListError(f"--split-dir {split_dir}: no such folder")
        if not need(d):
            raise ListError(f"--split-dir {split_dir}: no {_what(kind, k)} there")
        return d
    src = Path(source) if source else None
    if src is None or not str(source):
        raise ListError(f"the cache does not record its source, so the {kind} lists can't be found next to it; "
                        f"pass --split-dir DIR holding {_what(kind, k)}")
    base = src if src.is_dir() else src.parent
    tried = []
    for d in (base, base.parent):
        for c in (d,) + tuple(d / name for name in LIST_DIRS[kind]):
            tried.append(str(c))
            if c.is_dir() and need(c):
                return c
    raise ListError(f"no {_what(kind, k)} found next to the source (looked in {', '.join(tried)}); pass "
                    f"--split-dir DIR (the {LIST_DIRS[kind][0]} folder of the {kind} download)")


def _what(kind: str, k: int) -> str:
    return f"trainlist{k:02d}.txt and testlist{k:02d}.txt" if kind == "ucf101" else f"<class>_test_split{k}.txt files"


def _needed(kind: str, k: int):
    if kind == "ucf101":
        return lambda d: (d / f"trainlist{k:02d}.txt").is_file() and (d / f"testlist{k:02d}.txt").is_file()
    return lambda d: any(d.glob(f"*_test_split{k}.txt"))


def read_ucf101(folder: Path, k: int) -> dict[str, tuple[str, str]]:
    """video key -> (part, 'file line N') from trainlist0K.txt and testlist0K.txt; the class indices of the
    trainlist are checked against classInd.txt when it is there."""
    problems, out = [], {}
    classes = {}
    if (folder / "classInd.txt").is_file():
        for n, line in _lines(folder / "classInd.txt"):
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                problems.append(f"{folder / 'classInd.txt'} line {n}: expected 'INDEX Class', got {line!r}")
                continue
            classes[int(parts[0])] = parts[1].lower()
    for part, name in (("train", f"trainlist{k:02d}.txt"), ("test", f"testlist{k:02d}.txt")):
        for n, line in _lines(folder / name):
            where = f"{folder / name} line {n}"
            fields = line.split()
            video = fields[0].replace("\\", "/")
            if "/" not in video or len(fields) > 2 or (len(fields) == 2 and not fields[1].isdigit()):
                problems.append(f"{where}: expected 'Class/video.avi[ INDEX]', got {line!r}")
                continue
            cls = video.split("/")[0].lower()
            if len(fields) == 2 and classes and classes.get(int(fields[1])) != cls:
                problems.append(f"{where}: class index {fields[1]} is {classes.get(int(fields[1]), 'not in classInd.txt')}"
                                f" in classInd.txt, but the video is in {video.split('/')[0]}/")
            _put(out, video_key(video), part, where, problems)
    if problems:
        raise ListError("\n  ".join([f"{len(problems)} problem(s) in the UCF-101 lists of split {k}:"] + problems[:20]))
    return out


def read_hmdb51(folder: Path, k: int) -> dict[str, tuple[str, str]]:
    """video key -> (part, 'file line N') from every <class>_test_splitK.txt (1 train, 2 test, 0 unused: '')."""
    problems, out = [], {}
    pat = re.compile(rf"^(.+)_test_split{k}\.txt$")
    for f in sorted(folder.iterdir()):
        m = pat.match(f.name)
        if not m:
            continue
        for n, line in _lines(f):
            where = f"{f} line {n}"
            fields = line.split()
            if len(fields) != 2 or fields[1] not in HMDB_CODES:
                problems.append(f"{where}: expected '<video>.avi 1|2|0' (train, test, unused), got {line!r}")
                continue
            _put(out, video_key(f"{m.group(1)}/{fields[0]}"), HMDB_CODES[fields[1]], where, problems)
    if problems:
        raise ListError("\n  ".join([f"{len(problems)} problem(s) in the HMDB-51 lists of split {k}:"] + problems[:20]))
    return out


def _put(out: dict, key: str, part: str, where: str, problems: list) -> None:
    if key in out and out[key][0] != part:
        problems.append(f"{where}: {key} is also listed as {out[key][0] or 'unused'} at {out[key][1]}")
    out.setdefault(key, (part, where))


def _examples(items: list[str]) -> list[str]:
    return items[:EXAMPLES]


def from_lists(listed: dict[str, tuple[str, str]], paths: np.ndarray, lists: str, ids=None) -> Parts:
    """Each segment's part from its video's list entry (see the module docstring); the report counts listed
    videos the cache lacks and segments no list names (shown by ``ids``, default their paths)."""
    ids = paths if ids is None else ids
    by_stem: dict[str, list[str]] = {}
    for key in listed:
        by_stem.setdefault(key.split("/", 1)[1], []).append(key)
    parts = np.array([""] * len(paths), dtype=object)
    found, unlisted, unused = set(), [], 0
    for i, path in enumerate(paths):
        key = video_key(path)
        if key not in listed:
            alone = by_stem.get(key.split("/", 1)[1], [])
            key = alone[0] if len(alone) == 1 else None
        if key is None:
            unlisted.append(str(ids[i]))
            continue
        found.add(key)
        parts[i] = listed[key][0]
        unused += parts[i] == ""
    missing = sorted(k for k, (part, _) in listed.items() if part and k not in found)
    return Parts(parts, {"lists": lists, "listed": sum(1 for p, _ in listed.values() if p),
                         "listed_not_in_cache": len(missing), "listed_not_in_cache_examples": _examples(missing),
                         "segments_not_listed": len(unlisted), "segments_not_listed_examples": _examples(unlisted),
                         "segments_listed_unused": int(unused)})


def segment_parts(split: str, split_dir: str | None, cache: Cache) -> Parts | None:
    """The predefined parts of ``cache``'s segments for ``--split``, or None for a split that makes its own."""
    name, k = parse_split(split)
    if name == "predefined":
        col = np.asarray(cache.segments["split"], dtype=object)
        counts = {p: int((col == p).sum()) for p in SPLIT_VALUES}
        empty = [str(s) for s, p in zip(cache.segments["id"], col) if p == ""]
        return Parts(col, {"lists": "the cache's split column", **counts, "segments_not_listed": len(empty),
                           "segments_not_listed_examples": _examples(empty)})
    if k is None:
        return None
    folder = find_dir(name, k, str(cache.attrs.get("source", "") or ""), split_dir)
    listed = (read_ucf101 if name == "ucf101" else read_hmdb51)(folder, k)
    return from_lists(listed, np.asarray(cache.segments["path"], dtype=object), str(folder), cache.segments["id"])
