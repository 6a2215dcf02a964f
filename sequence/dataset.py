"""A torch ``Dataset`` over a feature cache, for your own training loop: ``featseq train``'s sequences and split.

    ds = CacheDataset("X.h5", part="train", fps=2, percent=80, split="group")
    x, mask, y = ds[0]        # (L, D) float32 with zeros at padding, (L,) bool (a prefix of True), int64 label

The options are train's (:data:`OPTIONS`, the fields of :class:`sequence.config.TrainConfig`, with its defaults
and checks), so the same options give the same sequences, the same parts and the same tensors as the trainer's
reader (:func:`sequence.reader.build`, the window policy of :mod:`sequence.windows`, and
:func:`sequence.splits.folds_for`): ``part`` is ``train``, ``val``,
``test`` or ``all`` (every usable segment), ``fold`` picks a fold of a cross-validation split. Labels index
:attr:`CacheDataset.classes`. With ``offset="random"`` the training part draws a new window shift (on the cache's
frame grid) at every access from torch's RNG, which DataLoader seeds per worker; the other parts use ``center``,
as the trainer does.

Only the segment table and timestamps are read up front, and the file is closed again. Features are read per item
from an HDF5 handle opened in the process that reads (each DataLoader worker opens its own) or, with
``memory_map=True``, gathered from the one memory-mapped copy of the features that train and sweep workers use
(:func:`sequence.reader.features_memmap`: made once per cache version, in the cache's dtype; every worker maps the
same pages, so the features are held once in the page cache, and an item costs a gather instead of an HDF5 read).
An HDF5 handle is never carried across a fork: a handle open in this process is closed before any ``os.fork`` (and reopened on the next access),
and is left out when the dataset is pickled (spawned workers): an HDF5 handle shared across a fork reads garbage
(pytorch issue 11887).
"""
from __future__ import annotations

import os
import weakref

import numpy as np
import torch

from featseq.featurize.cache import open_read, read_cache

from .config import TrainConfig
from .reader import build, features_memmap
from .windows import select, shift_steps
from .splits import choose_split, folds_for, split_entry

OPTIONS = ("fps", "seconds", "percent", "seq_len", "offset", "min_coverage", "split", "split_dir", "test_size",
           "val_size", "folds", "seed")
PARTS = ("train", "val", "test", "all")

_OPEN: "weakref.WeakSet[CacheDataset]" = weakref.WeakSet()


def _close_before_fork() -> None:
    for ds in list(_OPEN):
        ds.close()


os.register_at_fork(before=_close_before_fork)


class CacheDataset(torch.utils.data.Dataset):
    """The sequences of one part of a cache's split; item i is (features (L, D), mask (L,), label)."""

    def __init__(self, cache: str | os.PathLike, part: str = "train", fold: int = 0, memory_map: bool = False,
                 **options):
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"CacheDataset: unknown option(s) {', '.join(unknown)}; it takes {', '.join(OPTIONS)}")
        if part not in PARTS:
            raise ValueError(f"CacheDataset: part must be one of {', '.join(PARTS)}, got {part!r}")
        self.path = str(cache)
        cfg = TrainConfig(cache=self.path, out="", **options)
        cfg.validate()
        meta = read_cache(self.path, features=False)
        seqs = build(meta, cfg.reader())
        cfg = choose_split(cfg, seqs.groups, seqs.keep, labels=seqs.label_names, ids=seqs.ids)  # as train chooses
        self.split = f"{cfg.split}, {part}"
        if part == "all":
            idx = np.nonzero(seqs.keep)[0]
        else:
            folds = folds_for(cfg, seqs, meta)
            if not 0 <= fold < len(folds):
                raise ValueError(f"CacheDataset: fold {fold} of --split {cfg.split}, which has {len(folds)} fold(s)")
            idx = getattr(folds[fold], part)
            if split_entry(cfg.split).cv:
                self.split = f"{cfg.split} {folds[fold].name}, {part}"
        self.index = np.asarray(idx, dtype=np.int64)   # positions in the cache's segment table
        self.classes: list[str] = seqs.classes
        self.ids: list[str] = [seqs.ids[i] for i in self.index]
        self.labels = seqs.labels[self.index]
        self.rows = seqs.rows[self.index].numpy()
        self.mask = seqs.mask[self.index].numpy()
        self.fps, self.seq_len, self.cache_fps = seqs.fps, seqs.seq_len, seqs.cache_fps
        self.feature_dim = int(meta.attrs.get("feature_dim", 0) or 0)
        self.random = cfg.offset == "random" and part == "train"
        s = seqs._seg
        self._timestamps = s["timestamps"]
        self._bounds = {k: np.asarray(s[k])[self.index] for k in ("offset", "length", "start", "end")}
        self._durations = seqs.durations[self.index]
        self._h5, self._pid = None, None
        self.memory_map, self._mm, self._frames = memory_map, None, len(s["timestamps"])

    def __len__(self) -> int:
        return len(self.index)

    def _rows(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.random:
            return self.rows[i], self.mask[i]
        steps = int(shift_steps(self._durations[i:i + 1], self.seq_len, self.fps, self.cache_fps)[0])
        shift = int(torch.randint(0, steps + 1, ())) / self.cache_fps  # torch's RNG: DataLoader seeds it per worker
        b = {k: v[i:i + 1] for k, v in self._bounds.items()}
        sel = select(self._timestamps, b["offset"], b["length"], b["start"], b["end"], self.fps, self.seq_len,
                     self.cache_fps, np.array([shift]))
        return sel.rows[0], sel.mask[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, mask = self._rows(int(i))
        x = np.zeros((self.seq_len, self.feature_dim), dtype=np.float32)
        n = int(mask.sum())  # the mask is a prefix of True values
        if n:
            lo, hi = int(rows[:n].min()), int(rows[:n].max())
            block = self._features()[lo:hi + 1]  # one contiguous read
            x[:n] = block[rows[:n] - lo]
        return torch.from_numpy(x), torch.from_numpy(np.array(mask, dtype=bool)), self.labels[int(i)]

    def _features(self):
        if self.memory_map:
            if self._mm is None:  # a read-only map: shared with forked workers as it is
                self._mm = features_memmap(self.path, self._frames)
            return self._mm
        if self._h5 is None or self._pid != os.getpid():
            self._h5, self._pid = open_read(self.path), os.getpid()
            _OPEN.add(self)
        return self._h5["features"]

    def close(self) -> None:
        """Close this process's HDF5 handle (the next access reopens it)."""
        if self._h5 is not None:
            if self._pid == os.getpid():
                self._h5.close()
            self._h5, self._pid = None, None
        _OPEN.discard(self)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_h5"], state["_pid"], state["_mm"] = None, None, None  # a spawned worker maps or opens its own
        return state

    def __repr__(self) -> str:
        return (f"CacheDataset({self.path!r}: {len(self)} sequences of {self.seq_len} x {self.feature_dim} at "
                f"{self.fps:g} fps, split {self.split}, {len(self.classes)} classes)")
