"""Train / validation / test splits by name (a registry). Indices are positions in cache order.

Every split returns one or more :class:`Fold`; validation is always carved out of the fold's
training part (never the test part): stratified by label for sample-level splits, by group for
group-level splits (``group``, ``logo``), so it is as honest as the test split.

* ``random``      stratified train/test split (``--test-size``, ``--seed``)
* ``seed-compat`` exactly the original study's: ``train_test_split(arange(N), test_size=0.2,
                  random_state=42)`` over all segments in cache order, not stratified
                  (Gingerbread, 184 clips: 37 test clips)
* ``group``       no group in both train and test (GroupShuffleSplit, ``--test-size`` of the groups)
* ``kfold``       stratified k-fold cross-validation (``--folds``)
* ``group-kfold`` k-fold cross-validation with whole groups per fold, stratified by label as far as the
                  groups allow (StratifiedGroupKFold; ``--folds``, ``--seed`` shuffles the groups)
* ``logo``        leave one group out cross-validation
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from featurize.errors import UserError
from sklearn.model_selection import (GroupShuffleSplit, LeaveOneGroupOut, StratifiedGroupKFold, StratifiedKFold,
                                     train_test_split)


class SplitError(UserError):
    """A split that cannot be made on this data (the message names the flag)."""


@dataclass
class Fold:
    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class SplitEntry:
    name: str
    make: Callable                  # make(idx, labels, groups, test_size, seed, folds) -> [(name, train, test)]
    uses: tuple[str, ...] = ()      # the options it reads among test_size and folds (seed always)
    cv: bool = False                # several folds: cross-validation
    by_group: bool = False          # whole groups per part (validation is then carved by group too)


SPLITS: dict[str, SplitEntry] = {}
SPLIT_OPTIONS = ("test_size", "folds")  # the options a split may use (SplitEntry.uses)


def register(name: str, uses: tuple[str, ...] = (), cv: bool = False, by_group: bool = False):
    def deco(fn):
        SPLITS[name] = SplitEntry(name, fn, uses, cv, by_group)
        return fn
    return deco


def _can_stratify(labels: np.ndarray, n_test: float) -> bool:
    _, counts = np.unique(labels, return_counts=True)
    n = len(labels)
    k = int(np.ceil(n_test * n)) if n_test < 1 else int(n_test)
    return counts.min() >= 2 and len(counts) <= k <= n - len(counts)


@register("random", uses=("test_size",))
def split_random(idx, labels, groups, test_size, seed, folds):
    strat = labels[idx] if _can_stratify(labels[idx], test_size) else None
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=strat)
    return [("main", np.sort(tr), np.sort(te))]


@register("seed-compat")
def split_seed_compat(idx, labels, groups, test_size, seed, folds):
    tr, te = train_test_split(idx, test_size=0.2, random_state=42)
    return [("main", tr, te)]


@register("group", uses=("test_size",), by_group=True)
def split_group(idx, labels, groups, test_size, seed, folds):
    if len(set(groups[idx])) < 2:
        raise SplitError("--split group needs at least 2 groups; this cache has one")
    tr, te = next(GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed).split(idx, groups=groups[idx]))
    return [("main", idx[tr], idx[te])]


@register("kfold", uses=("folds",), cv=True)
def split_kfold(idx, labels, groups, test_size, seed, folds):
    _, counts = np.unique(labels[idx], return_counts=True)
    if folds < 2 or counts.min() < folds:
        raise SplitError(f"--folds {folds}: stratified k-fold needs 2 <= folds <= the smallest class's count ({counts.min()})")
    kf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(f"fold_{i:02d}", idx[tr], idx[te]) for i, (tr, te) in enumerate(kf.split(idx, labels[idx]))]


@register("group-kfold", uses=("folds",), cv=True, by_group=True)
def split_group_kfold(idx, labels, groups, test_size, seed, folds):
    n_groups = len(set(groups[idx]))
    if folds < 2 or n_groups < folds:
        raise SplitError(f"--folds {folds}: group k-fold needs 2 <= folds <= the number of groups ({n_groups})")
    kf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(f"fold_{i:02d}", idx[tr], idx[te]) for i, (tr, te) in enumerate(kf.split(idx, labels[idx], groups[idx]))]


@register("logo", cv=True, by_group=True)
def split_logo(idx, labels, groups, test_size, seed, folds):
    g = groups[idx]
    if len(set(g)) < 2:
        raise SplitError("--split logo needs at least 2 groups; this cache has one")
    return [(f"fold_{g[te][0]}", idx[tr], idx[te]) for tr, te in LeaveOneGroupOut().split(idx, groups=g)]


def carve_validation(train: np.ndarray, labels: np.ndarray, groups: np.ndarray, val_size: float, seed: int,
                     by_group: bool) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) from a training part; empty val when val_size is 0."""
    if val_size <= 0 or len(train) < 4:
        return train, train[:0]
    if by_group and len(set(groups[train])) >= 2:
        tr, va = next(GroupShuffleSplit(n_splits=1, test_size=val_size, random_state=seed).split(train, groups=groups[train]))
        return np.sort(train[tr]), np.sort(train[va])
    strat = labels[train] if _can_stratify(labels[train], val_size) else None
    tr, va = train_test_split(train, test_size=val_size, random_state=seed, stratify=strat)
    return np.sort(tr), np.sort(va)


def make_folds(split: str, labels: np.ndarray, groups: np.ndarray, keep: np.ndarray | None = None, *,
               test_size: float = 0.2, val_size: float = 0.15, seed: int = 0, folds: int = 5,
               classes: list | None = None) -> list[Fold]:
    """Folds over the segments with ``keep`` True (all by default). Refuses a fold whose training part
    lacks a class (a model cannot learn a class it never sees)."""
    if split not in SPLITS:
        raise SplitError(f"unknown --split {split!r}; known splits: {', '.join(SPLITS)}")
    labels, groups = np.asarray(labels), np.asarray(groups)
    n = len(labels)
    keep = np.ones(n, bool) if keep is None else np.asarray(keep, bool)
    if split == "seed-compat" and not keep.all():
        raise SplitError(f"--split seed-compat splits all segments in cache order; {int((~keep).sum())} were dropped "
                         f"(--min-coverage or empty segments), so the split would differ from the original study's")
    idx = np.nonzero(keep)[0]
    if len(idx) < 2:
        raise SplitError(f"only {len(idx)} usable segment(s); a split needs at least 2")
    classes = sorted(set(labels[idx].tolist())) if classes is None else list(classes)
    out = []
    entry = SPLITS[split]
    for name, tr, te in entry.make(idx, labels, groups, test_size, seed, folds):
        tr, va = carve_validation(np.asarray(tr), labels, groups, val_size, seed, entry.by_group)
        missing = [c for c in classes if not (labels[tr] == c).any()]
        if missing:
            raise SplitError(f"--split {split}{'' if name == 'main' else f' ({name})'}: class(es) {', '.join(map(str, missing))} "
                             f"have no sample in the training part; use more data, another --split, a smaller "
                             f"--test-size/--val-size, or drop those segments")
        out.append(Fold(name, np.asarray(tr), np.asarray(va), np.asarray(te)))
    return out
