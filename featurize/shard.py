"""Featurize on many processes, GPUs or machines: shards of the segments, one part file each, and a verified merge.

* ``featurize SOURCE --shard K/N`` featurizes shard K of N into ``<cache>.part-K-of-N.h5`` (the usual crash-safe
  cache format, lock, resume and error report). The shares are balanced by expected frame count with a greedy
  longest-first assignment over the segments sorted by id: the same for every shard, every rerun and any row
  order of the source. ``--shard auto`` takes K and N from torchrun (RANK, WORLD_SIZE) or a SLURM array
  (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_MIN).
* :func:`merge` copies the parts into one cache of the usual format under a temporary name, checks every
  segment against its part (rows and a checksum of its features), then renames it over the target. It refuses
  parts of other requests, of another N, ids found in two parts and (unless ``allow_missing``) segments that no
  part holds. Merging again, or after a crash, is safe: segments the target already holds are kept.
* Under torchrun every rank featurizes its shard, waits at a barrier (torch.distributed, gloo) and rank 0 merges
  (:func:`after_torchrun`). Correctness never relies on the collective: a
  rank that dies leaves its part resumable, and rerunning the command (or ``featseq cache merge``) completes it.
* What a torchrun rank is, which GPU it takes and its process group are featseq.common.procgroup's, shared with
  finetune's DistributedDataParallel.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .cache import STR_FIELDS, CacheError, iter_segments, open_read, read_cache, read_table, row_record
from .spec import IDENTITY_KEYS, with_defaults
from .writer import CacheWriter
from featseq.common.errors import UserError
from featseq.common.lock import FileLock
from featseq.common.procgroup import process_group, torchrun_env

_PART = re.compile(r"\.part-(\d+)-of-(\d+)\.h5$")


# ---------------------------------------------------------------- which shard

def from_env(env: dict | None = None) -> tuple[int, int] | None:
    """(K, N) from torchrun's RANK / WORLD_SIZE or a SLURM array's task variables; None outside both."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return torchrun_env(env)  # torchrun numbers its ranks 0..N-1; one process: the whole source into the cache
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    k = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    n = int(env["SLURM_ARRAY_TASK_COUNT"])
    if n == 1:
        return None  # one process: the whole source into the cache itself
    if not 0 <= k < n:
        raise UserError(f"--shard auto: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN gives shard {k} of {n}; shards are "
                        f"numbered 0..N-1, so a SLURM array must be contiguous with step 1 (e.g. --array=0-{n - 1}); "
                        f"otherwise pass --shard K/N yourself")
    return k, n


def parse(text: str | None, env: dict | None = None) -> tuple[int, int] | None:
    """--shard: 'K/N' (0-based), 'auto' (from the environment; None when it names no shard) or None / 'none'."""
    if text in (None, "", "none"):
        return None
    if text == "auto":
        return from_env(env)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"--shard {text!r}: give K/N (shard K of N, 0-based, e.g. 0/4), auto or none")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= k < n:
        raise UserError(f"--shard {text}: K must be in 0..N-1 and N >= 1")
    return k, n


def assign(frames: dict[str, int], n: int) -> dict[str, int]:
    """Segment id -> shard in 0..n-1: the longest segments first (ties by id), each to the shard with the fewest
    frames so far (ties to the lowest index). Depends only on the ids and their frame counts."""
    load = [0] * n
    out = {}
    for sid in sorted(frames, key=lambda s: (-frames[s], s)):
        k = min(range(n), key=lambda i: (load[i], i))
        out[sid] = k
        load[k] += frames[sid]
    return out


def expected_frames(segments, infos: dict, fps: float) -> dict[str, int]:
    """Frames each segment will give at ``fps`` (featurize.sampling's grid), from its bounds and its video's probed
    duration (0 if unreadable)."""
    from .sampling import expected_frames as grid_frames

    out = {}
    for s in segments:
        info = infos.get(s.path)
        dur = info["duration"] if isinstance(info, dict) else 0.0
        end = dur if s.end is None else min(s.end, dur)
        out[s.id] = grid_frames(s.start, end, fps) if end > s.start else 0
    return out


def part_path(target: str, k: int, n: int) -> str:
    """Where shard K of N of the cache ``target`` is written: ``<target without .h5>.part-K-of-N.h5``."""
    stem = target[:-3] if target.endswith(".h5") else target
    return f"{stem}.part-{k}-of-{n}.h5"


def find_parts(target: str) -> list[str]:
    stem = Path(target[:-3] if target.endswith(".h5") else target)
    return sorted((str(p) for p in stem.parent.glob(stem.name + ".part-*-of-*.h5") if _PART.search(p.name)),
                  key=lambda p: int(_PART.search(p).group(1)))


# ---------------------------------------------------------------- merge

@dataclass
class MergeResult:
    path: str
    parts: list[str]
    segments: int = 0          # in the merged cache
    copied: int = 0            # from the parts this time
    kept: int = 0              # already in the target
    missing: dict[str, str] = field(default_factory=dict)   # id -> why (allowed with allow_missing)
    mb: float = 0.0
    seconds: float = 0.0


def _identity_diff(a: dict, b: dict) -> list[str]:
    keys = list(IDENTITY_KEYS) + ["feature_dim", "format_version"]
    a, b = with_defaults(a), with_defaults(b)
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _digest(x: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()


def merge(target: str, parts: list[str] | None = None, allow_missing: bool = False,
          log: Callable[[str], None] = lambda s: None) -> MergeResult:
    """Merge shard parts (default: those found next to ``target``) into the cache ``target``; see the module doc."""
    t0 = time.monotonic()
    parts = list(parts) if parts else find_parts(target)
    if not parts:
        raise UserError(f"{target}: no parts to merge (looked for {part_path(target, 0, 1).replace('-0-of-1', '-K-of-N')})")
    info = []
    for p in parts:
        attrs, table = read_table(p)
        ids = [x.decode() for x in table["id"]]
        if "shard_count" not in attrs:
            raise UserError(f"{p}: not a shard part (no shard_count attribute); merge takes files written by "
                            f"featseq featurize --shard K/N")
        info.append((p, attrs, ids))
    p0, a0, _ = info[0]
    for p, a, _ in info[1:]:
        diff = _identity_diff(a0, a)
        if diff:
            hint = ("; featurize's default precision is auto's choice on each machine (bf16 on a CPU that computes "
                    "it natively or a recent GPU, fp32 or fp16 elsewhere): on machines of different kinds pass "
                    "--precision to every shard, and featurize again the parts made in the other one"
                    if any(d.startswith("precision:") for d in diff) else "")
            raise CacheError(f"{p} and {p0} were made with other settings ({'; '.join(diff)}); merge only parts of one "
                             f"request{hint}")
        if a["shard_count"] != a0["shard_count"]:
            raise CacheError(f"{p} is a shard of {a['shard_count']} but {p0} of {a0['shard_count']}; merge parts of one "
                             f"--shard K/N run")
        if a["shard_plan"] != a0["shard_plan"]:
            raise CacheError(f"{p} and {p0} split different segment lists (the source changed between shard runs?); "
                             f"rerun every shard on the same source")
    n = int(a0["shard_count"])
    owner: dict[str, str] = {}
    dups = []
    for p, _, ids in info:
        for s in ids:
            if s in owner:
                dups.append(f"{s!r} in {owner[s]} and {p}")
            owner[s] = p
    if dups:
        raise CacheError(f"{len(dups)} segment id(s) in two parts, e.g. {'; '.join(dups[:3])}; each id must be in one "
                         f"part (parts of different --shard runs?)")
    absent = sorted(set(range(n)) - {int(a["shard_index"]) for _, a, _ in info})
    errors = {s: why for p, _, _ in info for s, why in _errors(p).items()}
    missing = {s: errors.get(s, f"shard {k} has no part file" if k in absent else f"not published in shard {k} (not "
                                f"finished?)") for s, k in a0["shard_plan"].items() if s not in owner}
    lock = FileLock(target, "is writing this cache").acquire()
    try:
        kept_ids = set()
        if os.path.exists(target):
            diff = _identity_diff(read_table(target)[0], a0)
            if diff:
                raise CacheError(f"{target} exists and holds another request ({'; '.join(diff)}); merge into another "
                                 f"TARGET")
            kept_ids = set(read_cache(target, features=False).ids)
        missing = {s: why for s, why in missing.items() if s not in kept_ids}
        if absent or missing:
            what = []
            if absent:
                what.append(f"shard(s) {', '.join(map(str, absent))} of {n} have no part file "
                            f"({part_path(target, absent[0], n)} ...)")
            if missing:
                what.append(f"{len(missing)} segment(s) of the source are in no part, e.g. "
                            + "; ".join(f"{s} ({why})" for s, why in list(missing.items())[:5]))
            if not allow_missing:
                raise CacheError("; ".join(what) + ". Finish the missing shards (rerun their featurize --shard K/N); "
                                 "for videos that fail to decode, featurize with --skip-errors or merge with "
                                 "--allow-missing to merge what there is")
            for line in what:
                log(f"merging without: {line}")
        res = MergeResult(path=target, parts=[p for p, _, _ in info], missing=missing)
        _copy(target, info, kept_ids, res, log)
    finally:
        lock.release()
    res.seconds = time.monotonic() - t0
    return res


def _errors(part: str) -> dict[str, str]:
    """Reasons for failed segments from a part's error report, when there is one."""
    try:
        with open(part + ".errors.json") as fh:
            return json.load(fh)["failed"]
    except (OSError, ValueError, KeyError):
        return {}


def _copy(target: str, info: list, kept_ids: set, res: MergeResult, log) -> None:
    """Write target's kept segments and every part's segments into a temporary cache, verify, rename over target."""
    p0, a0, _ = info[0]
    sources = ([target] if kept_ids else []) + [p for p, _, _ in info]
    with open_read(p0) as f:
        dim, dtype = f["features"].shape[1], f["features"].dtype
        frame_size = f["frames"].shape[1] if "frames" in f else None
    tables = [read_table(path)[1] for path in sources]
    # every string fits (a version 1 target has no split column: its segments' splits are empty)
    widths = {k: max((t.dtype[k].itemsize for t in tables if k in t.dtype.names), default=8) for k in STR_FIELDS}
    identity = {k: a0[k] for k in IDENTITY_KEYS if k in a0}
    attrs = {k: v for k, v in a0.items() if k not in identity and k not in ("shard_index", "shard_count", "shard_plan",
                                                                            "format_version", "feature_dim")}
    attrs["merged_from"] = [os.path.basename(p) for p, _, _ in info]
    tmp = target + ".merge.tmp"
    for leftover in (tmp, tmp + ".lock", tmp + ".new.tmp"):
        if os.path.exists(leftover):
            os.remove(leftover)  # a crashed merge's
    digests = {}
    with CacheWriter(tmp, identity, attrs, dim, widths, str(dtype), frame_size) as w:
        for path in sources:
            taking = kept_ids if path == target else None
            _, table = read_table(path)
            ids = [x.decode() for x in table["id"]]
            table = table[np.array([(sid in taking) if taking is not None else (sid not in kept_ids) for sid in ids], bool)]
            with open_read(path) as f:
                for row, feats, ts, frames in iter_segments(f, table, frames=bool(frame_size)):
                    sid = row["id"].decode()
                    rec = {k: v for k, v in row_record(row).items() if k not in ("offset", "length")}
                    w.append(rec, feats, ts, frames)
                    digests[sid] = (len(feats), _digest(feats))
                    if taking is None:
                        res.copied += 1
                    else:
                        res.kept += 1
            log(f"copied {path}")
    # verify, block by block: every segment's rows and features read back as they were in its part
    _, table = read_table(tmp)
    written = {x.decode() for x in table["id"]}
    bad = [sid for sid in digests if sid not in written]
    with open_read(tmp) as f:
        for row, feats, _, _ in iter_segments(f, table):
            sid = row["id"].decode()
            if digests.get(sid) != (len(feats), _digest(feats)):
                bad.append(sid)
    if bad or len(table) != len(digests):
        raise CacheError(f"{tmp}: verification failed for {len(bad)} segment(s), e.g. {bad[:3]}; the parts are kept, "
                         f"rerun the merge")
    os.replace(tmp, target)
    res.segments = len(table)
    res.mb = os.path.getsize(target) / 1e6


# ---------------------------------------------------------------- torchrun

def after_torchrun(target: str, log: Callable[[str], None] = lambda s: None,
                   allow_missing: bool = False) -> MergeResult | None:
    """Under torchrun (WORLD_SIZE > 1): wait for every rank at a barrier, then rank 0 merges the parts.

    The barrier runs on gloo also on GPU machines: it moves no tensors, and gloo needs no CUDA device bound to the
    rank (nccl would add nothing but that setup)."""
    import torch.distributed as dist

    if torchrun_env() is None:
        return None
    with process_group("gloo", 24 * 3600.0) as group:  # shards may take hours apart
        log(f"rank {dist.get_rank()}: shard done, waiting for the others")
        dist.barrier(group=group)
        res = merge(target, log=log, allow_missing=allow_missing) if dist.get_rank() == 0 else None
        dist.barrier(group=group)  # the merged cache exists when every rank returns
        return res
