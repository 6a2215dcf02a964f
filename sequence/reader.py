"""Fixed-length sequences from a feature cache: the window policy (sequence.windows) applied to a cache's segment
table, then tensors in memory.

:func:`build` reads every segment's sequence at the requested fps, length and offset; the rows it selects index
one (frames, D) features tensor that the trainer gathers batches from (sequence.loop.FeatureInputs, the one
gather). :func:`check_fps` refuses a rate the cache cannot give back exactly; :func:`load_features` holds the
features once, in the cache's dtype, in RAM or memory-mapped.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import math
from fractions import Fraction
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featseq.featurize.cache import Cache, features_to_npy, read_cache
from featseq.common.errors import UserError
from featseq.common.files import replaced
from featseq.featurize.spec import featurize_command

from .config import OFFSETS, ReaderConfig  # noqa: F401  (re-exported)
from .windows import EPS, eval_offset, resolve_seq_len, select, shifts


class ReaderError(UserError):
    """A sequence request the cache cannot serve (the message names the flag and the fix)."""


def on_grid(fps: float, cache_fps: float) -> bool:
    """Is ``fps`` read back exactly from a cache sampled at ``cache_fps`` (the cache's rate divided by a whole number,
    so every grid time is a cached frame's)?"""
    ratio = cache_fps / fps
    return fps <= cache_fps + EPS and abs(ratio - round(ratio)) <= 1e-6 * max(1.0, ratio)


def rate_for(fps: float, cache_fps: float) -> float:
    """The lowest rate that gives back both ``fps`` and ``cache_fps`` exactly (their least common multiple), or 6 when
    that is a multiple of it (then 1, 2, 3 and 6 fps read back exactly too)."""
    a, b = Fraction(fps).limit_denominator(1000), Fraction(cache_fps).limit_denominator(1000)
    lcm = Fraction(math.lcm(a.numerator * b.denominator, b.numerator * a.denominator), a.denominator * b.denominator)
    return 6.0 if (6 / lcm).denominator == 1 else float(lcm)


def check_fps(fps: float, cache_fps: float, cache_path: str = "", source: str = "", attrs: dict | None = None) -> None:
    """Refuse an fps the cache cannot give back exactly: above its rate, or not its rate divided by a whole number
    (nearest frames would be unevenly spaced in time). The fix proposed is the featurize command that made the cache
    (``attrs``: its attributes), at a rate that holds both."""
    if on_grid(fps, cache_fps):
        return
    rate = rate_for(fps, cache_fps)
    try:
        cmd = featurize_command(attrs or {}, cache_path, fps=rate, source=source or None)
    except UserError:  # not written by featurize (its attributes say nothing of how)
        cmd = f"featseq featurize {source or 'SOURCE'} --fps {rate:g} (with the options that made {cache_path or 'it'})"
    exact = ", ".join(f"{cache_fps / k:.3g}" for k in range(1, 5))
    if fps > cache_fps + EPS:
        why = f"--fps {fps:g} is above the cache's {cache_fps:g} fps ({cache_path}); a cache cannot give back frames it never sampled"
    else:
        why = (f"--fps {fps:g} is not a rate the cache holds ({cache_path}, sampled at {cache_fps:g} fps): the {fps:g} fps "
               f"grid is not a sub-grid of its {cache_fps:g} fps grid, so the nearest cached frames would be unevenly "
               f"spaced in time")
    raise ReaderError(f"{why}. It reads back exactly at {exact}, ... fps (its rate divided by a whole number): ask "
                      f"for one of those, or featurize the same source at {rate:g} fps, as this cache was made: `{cmd}`")


@dataclass
class Sequences:
    """A cache's sequences in memory: features stay one (frames, D) tensor; rows/mask index into it."""

    features: torch.Tensor | None  # (total_frames, D) in the cache's dtype, shared by every variant of a sweep; None: selection only
    rows: torch.Tensor          # (N, L) int64
    mask: torch.Tensor          # (N, L) bool
    labels: torch.Tensor        # (N,) int64 index into classes (-1: label unknown to `classes`)
    classes: list[str]
    ids: list[str]
    groups: np.ndarray          # (N,) str
    label_names: np.ndarray     # (N,) str
    coverage: np.ndarray        # (N,) float
    keep: np.ndarray            # (N,) bool, False: dropped by --min-coverage (or no frame at all)
    fps: float
    seq_len: int
    seconds: float | None
    cache_fps: float
    durations: np.ndarray
    _seg: dict

    def __len__(self) -> int:
        return len(self.ids)

    def resample(self, offset: str, rng: np.random.Generator) -> torch.Tensor:
        """Rows of every sequence for a new draw of the offset (random jitter)."""
        s = self._seg
        sh = shifts(self.durations, self.seq_len, self.fps, self.cache_fps, offset, rng)
        sel = select(s["timestamps"], s["offset"], s["length"], s["start"], s["end"], self.fps, self.seq_len,
                     self.cache_fps, sh)
        return torch.from_numpy(sel.rows)

    def summary(self) -> dict:
        padded = self.keep & (self.coverage < 1)
        return {"fps": self.fps, "seq_len": self.seq_len, "seconds": self.seconds, "cache_fps": self.cache_fps,
                "segments": len(self), "used": int(self.keep.sum()), "padded": int(padded.sum()),
                "dropped": int((~self.keep).sum()), "mean_coverage": float(self.coverage[self.keep].mean()) if self.keep.any() else 0.0}


def build(cache: Cache, cfg: ReaderConfig, classes: list[str] | None = None, offset: str | None = None,
          features: torch.Tensor | None = None, seq_len: int | None = None) -> Sequences:
    """Sequences of every segment of an in-memory cache.

    ``classes`` fixes the label order (default: sorted labels of the cache); ``offset`` overrides
    cfg.offset (``random`` becomes ``center`` here: the trainer jitters training rows itself);
    ``features`` reuses an already converted features tensor (default: the cache's, when it was read with
    them; a cache read without features gives the selection alone); ``seq_len`` overrides the config's.
    """
    cfg.validate()
    if len(cache) == 0:
        raise ReaderError(f"{cache.path}: the cache holds no segments; run featseq featurize on a source first")
    cache_fps = float(cache.attrs.get("fps", 0) or 0)
    if cache_fps <= 0:
        raise ReaderError(f"{cache.path}: the cache has no fps attribute")
    fps = cache_fps if cfg.fps is None else float(cfg.fps)
    check_fps(fps, cache_fps, cache.path, attrs=cache.attrs)
    s = cache.segments
    durations = np.asarray(s["end"], np.float64) - np.asarray(s["start"], np.float64)
    if seq_len is None:
        seq_len, seconds = resolve_seq_len(cfg, fps, durations)
    else:
        seconds = None
    sh = shifts(durations, seq_len, fps, cache_fps, eval_offset(offset or cfg.offset))
    sel = select(cache.timestamps, s["offset"], s["length"], s["start"], s["end"], fps, seq_len, cache_fps, sh)
    keep = (sel.coverage >= cfg.min_coverage - EPS) & sel.mask.any(axis=1)
    labels_str = np.asarray(s["label"]).astype(str)
    if classes is None:
        classes = sorted(set(labels_str[keep].tolist()))
    lut = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([lut.get(x, -1) for x in labels_str], dtype=torch.long)
    if features is None and cache.features is not None:
        features = torch.from_numpy(np.ascontiguousarray(cache.features))
    seg = {"timestamps": cache.timestamps, "offset": s["offset"], "length": s["length"], "start": s["start"], "end": s["end"]}
    return Sequences(features=features, rows=torch.from_numpy(sel.rows), mask=torch.from_numpy(sel.mask), labels=labels,
                     classes=list(classes), ids=list(s["id"]), groups=np.asarray(s["group"]).astype(str),
                     label_names=labels_str, coverage=sel.coverage, keep=keep, fps=fps, seq_len=seq_len, seconds=seconds,
                     cache_fps=cache_fps, durations=durations, _seg=seg)


# ---------------------------------------------------------------- features in memory

def ram_budget_bytes() -> int:
    """Features larger than this (in the cache's dtype) are memory-mapped instead of read into RAM.

    ``FEATSEQ_RAM_BUDGET_GB`` sets it; by default half of the memory available now.
    """
    if os.environ.get("FEATSEQ_RAM_BUDGET_GB"):
        return int(float(os.environ["FEATSEQ_RAM_BUDGET_GB"]) * 2**30)
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 * 2**30


def features_memmap(path: str, rows: int) -> np.ndarray:
    """A copy of the cache's features, in its dtype, in a .npy file (made once per cache version), memory-mapped.

    The copy is named after the cache's path and its version (mtime, size): making the copy of a new version deletes
    the copies of that path's older versions (a process still mapping one keeps its pages until it ends), so a
    cache that grows or is rewritten leaves one copy, not one per version."""
    st = os.stat(path)
    where = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
    version = hashlib.sha1(f"{st.st_mtime_ns}|{st.st_size}|native".encode()).hexdigest()[:8]
    folder = Path(os.environ.get("FEATSEQ_MMAP_DIR", tempfile.gettempdir())) / "featseq-mmap"
    folder.mkdir(parents=True, exist_ok=True)
    npy = folder / f"{Path(path).stem}-{where}-{version}.npy"
    for attempt in range(3):
        if not npy.exists():
            # one process makes it: the workers of a sweep or a DataLoader start together, and two copies made at
            # once would each be mapped by its maker alone (the features held twice, each written in full)
            with open(f"{npy}.lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # waits for the maker; released by the OS if it dies
                if not npy.exists():
                    with replaced(npy) as tmp:  # atomic: a reader sees the whole copy or none
                        features_to_npy(path, tmp, rows)
            for old in folder.glob(f"{glob.escape(Path(path).stem)}-{where}-*.npy*"):
                if old.name not in (npy.name, f"{npy.name}.lock"):
                    old.unlink(missing_ok=True)
        try:
            return np.load(npy, mmap_mode="r")
        except FileNotFoundError:  # another process, making a newer version's copy, deleted it in between
            if attempt == 2:
                raise


def load_features(path: str, shared: bool = False) -> tuple[Cache, torch.Tensor]:
    """A cache and its features tensor, in the cache's dtype (float16 by default: batches are gathered from it and
    made float32 one at a time, so the features are held once, at the cache's size).

    Features larger than :func:`ram_budget_bytes`, or any with ``shared`` (the workers of a sweep: they then share
    one copy in the page cache instead of holding one each), are memory-mapped from a copy on disk in the cache's
    dtype. Callers that train many models on one cache load it once and pass it on (``train(cfg, data=...)``).
    """
    cache = read_cache(path, features=False)
    dim = int(cache.attrs.get("feature_dim", 0) or 0)
    itemsize = np.dtype(str(cache.attrs.get("dtype") or "float16")).itemsize
    if shared or len(cache.timestamps) * dim * itemsize > ram_budget_bytes():
        cache.features = features_memmap(path, len(cache.timestamps))
        with warnings.catch_warnings():  # a read-only memory map: the trainer only gathers rows from it
            warnings.simplefilter("ignore", UserWarning)
            return cache, torch.from_numpy(cache.features)
    cache = read_cache(path)
    feats = torch.from_numpy(np.ascontiguousarray(cache.features)) if cache.features is not None else torch.zeros(0)
    return cache, feats
