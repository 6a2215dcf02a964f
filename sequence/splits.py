"""Train / validation / test splits by name (a registry over sequence/catalog.py's splits). Indices are positions
in cache order.

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
* ``predefined``  the parts the cache's split column gives (a manifest's ``split`` column): exactly those; validation
                  from its ``val`` rows, else carved out of train by group
* ``ucf101:K``    UCF-101's official split K (trainlist0K.txt / testlist0K.txt), ``hmdb51:K`` HMDB-51's
                  (<class>_test_splitK.txt): as ``predefined``, the parts from the lists (sequence.split_lists)

:func:`folds_for` is the one place a train / finetune config's ``--split`` becomes folds over a cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import catalog
from .catalog import AUTO_SPLIT, parse_split
from featseq.featurize.cache import Cache
from featseq.common.errors import UserError
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
    report: dict = field(default_factory=dict)  # predefined parts: what the lists or the column did not cover


@dataclass(frozen=True)
class SplitEntry:
    """A split of the catalog (sequence/catalog.py: the options it uses, cv, by_group, predefined) and its maker."""
    name: str
    make: Callable                  # make(idx, labels, groups, test_size, seed, folds) -> [(name, train, test)];
                                    # predefined: make(idx, parts) -> (train, val, test)
    uses: tuple[str, ...] = ()      # the options it reads among catalog.SPLIT_OPTIONS (seed always)
    cv: bool = False                # several folds: cross-validation
    by_group: bool = False          # whole groups per part (validation is then carved by group too)
    predefined: bool = False        # the parts are given per segment (sequence.split_lists)


_MAKERS: dict[str, Callable] = {}


def register(name: str):
    """Implement the catalog's split ``name`` (what it uses and is are the catalog's)."""
    catalog.SPLITS[name]  # a name the catalog lacks fails here

    def deco(fn):
        _MAKERS[name] = fn
        return fn
    return deco


def split_entry(split: str) -> SplitEntry:
    """The registry entry of a --split value ('ucf101:1' -> ucf101's); ValueError naming --split if unknown."""
    if split == AUTO_SPLIT:
        raise SplitError(f"--split {AUTO_SPLIT} is chosen from a cache's groups first (sequence.splits.choose_split)")
    try:
        return SPLITS[parse_split(split)[0]]
    except ValueError as e:
        raise SplitError(str(e)) from None


def _can_stratify(labels: np.ndarray, n_test: float) -> bool:
    _, counts = np.unique(labels, return_counts=True)
    n = len(labels)
    k = int(np.ceil(n_test * n)) if n_test < 1 else int(n_test)
    return counts.min() >= 2 and len(counts) <= k <= n - len(counts)


@register("random")
def split_random(idx, labels, groups, test_size, seed, folds):
    strat = labels[idx] if _can_stratify(labels[idx], test_size) else None
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=strat)
    return [("main", np.sort(tr), np.sort(te))]


@register("seed-compat")
def split_seed_compat(idx, labels, groups, test_size, seed, folds):
    tr, te = train_test_split(idx, test_size=0.2, random_state=42)
    return [("main", tr, te)]


@register("group")
def split_group(idx, labels, groups, test_size, seed, folds):
    if len(set(groups[idx])) < 2:
        raise SplitError("--split group needs at least 2 groups; this cache has one")
    tr, te = next(GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed).split(idx, groups=groups[idx]))
    return [("main", idx[tr], idx[te])]


@register("kfold")
def split_kfold(idx, labels, groups, test_size, seed, folds):
    _, counts = np.unique(labels[idx], return_counts=True)
    if folds < 2 or counts.min() < folds:
        raise SplitError(f"--folds {folds}: stratified k-fold needs 2 <= folds <= the smallest class's count ({counts.min()})")
    kf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(f"fold_{i:02d}", idx[tr], idx[te]) for i, (tr, te) in enumerate(kf.split(idx, labels[idx]))]


@register("group-kfold")
def split_group_kfold(idx, labels, groups, test_size, seed, folds):
    n_groups = len(set(groups[idx]))
    if folds < 2 or n_groups < folds:
        raise SplitError(f"--folds {folds}: group k-fold needs 2 <= folds <= the number of groups ({n_groups})")
    kf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(f"fold_{i:02d}", idx[tr], idx[te]) for i, (tr, te) in enumerate(kf.split(idx, labels[idx], groups[idx]))]


@register("logo")
def split_logo(idx, labels, groups, test_size, seed, folds):
    g = groups[idx]
    if len(set(g)) < 2:
        raise SplitError("--split logo needs at least 2 groups; this cache has one")
    return [(f"fold_{g[te][0]}", idx[tr], idx[te]) for tr, te in LeaveOneGroupOut().split(idx, groups=g)]


@register("hmdb51")
@register("ucf101")
@register("predefined")
def split_predefined(idx, parts):
    return tuple(idx[parts[idx] == p] for p in ("train", "val", "test"))


if set(_MAKERS) != set(catalog.SPLITS):
    raise ImportError(f"sequence.splits implements {sorted(_MAKERS)}, the catalog names {sorted(catalog.SPLITS)}")
SPLITS: dict[str, SplitEntry] = {n: SplitEntry(n, _MAKERS[n], s.uses, s.cv, s.by_group, s.predefined)
                                 for n, s in catalog.SPLITS.items()}


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
               classes: list | None = None, parts: np.ndarray | None = None, ids=None) -> list[Fold]:
    """Folds over the segments with ``keep`` True (all by default). Refuses a fold whose training part
    lacks a class (a model cannot learn a class it never sees). ``parts``: (N,) train / val / test / "" per
    segment, for the predefined splits (``predefined``, ``ucf101:K``, ``hmdb51:K``).

    ``ids``: the segments' ids. Given, the segments are split in the order of their ids, not in the order of the
    arrays, and each part lists its segments in that order: a cache's rows follow the order in which segments
    were completed (several decode workers, shards merged), and the same segments must give the same folds (and
    the same batches) however the cache was made. Returned indices are still positions in the arrays given."""
    if ids is not None:
        order = np.argsort(np.asarray(ids).astype(str), kind="stable")
        got = make_folds(split, np.asarray(labels)[order], np.asarray(groups)[order],
                         None if keep is None else np.asarray(keep, bool)[order], test_size=test_size,
                         val_size=val_size, seed=seed, folds=folds, classes=classes,
                         parts=None if parts is None else np.asarray(parts, dtype=object)[order])
        for f in got:
            f.train, f.val, f.test = order[f.train], order[f.val], order[f.test]
        return got
    entry = split_entry(split)
    labels, groups = np.asarray(labels), np.asarray(groups)
    n = len(labels)
    keep = np.ones(n, bool) if keep is None else np.asarray(keep, bool)
    if split == "seed-compat" and not keep.all():
        raise SplitError(f"--split seed-compat splits all segments in id order; {int((~keep).sum())} were dropped "
                         f"(--min-coverage or empty segments), so the split would differ from the original study's")
    idx = np.nonzero(keep)[0]
    if len(idx) < 2:
        raise SplitError(f"only {len(idx)} usable segment(s); a split needs at least 2")
    classes = sorted(set(labels[idx].tolist())) if classes is None else list(classes)
    out = []
    if entry.predefined:
        made = [("main",) + _given_parts(split, idx, parts)]
    else:
        made = [(name, tr, idx[:0], te) for name, tr, te in entry.make(idx, labels, groups, test_size, seed, folds)]
    for name, tr, va, te in made:
        if not len(va):
            tr, va = carve_validation(np.asarray(tr), labels, groups, val_size, seed, entry.by_group)
        missing = [c for c in classes if not (labels[tr] == c).any()]
        if missing:
            raise SplitError(f"--split {split}{'' if name == 'main' else f' ({name})'}: class(es) {', '.join(map(str, missing))} "
                             f"have no sample in the training part; use more data, another --split, a smaller "
                             f"--test-size/--val-size, or drop those segments")
        out.append(Fold(name, np.asarray(tr), np.asarray(va), np.asarray(te)))
    return out


def _given_parts(split: str, idx: np.ndarray, parts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) of a predefined split: exactly the given parts of the usable segments ``idx``."""
    if parts is None:
        raise SplitError(f"--split {split}: the segments' parts were not given (use folds_for, which reads them)")
    parts = np.asarray(parts, dtype=object)
    tr, va, te = split_predefined(idx, parts)
    if not len(tr) or not len(te):
        have = ", ".join(f"{int((parts[idx] == p).sum())} {p}" for p in ("train", "val", "test"))
        fix = {"predefined": "give rows split=train and split=test in the manifest's split column and featurize it "
                             "into a new --out (a cache keeps the splits it was made with)",
               "ucf101": "check that the cache holds UCF-101's videos (folders <Class>/v_<Class>_gXX_cYY.avi) and "
                         "that --split-dir holds that split's lists",
               "hmdb51": "check that the cache holds HMDB-51's videos (folders <class>/<video>.avi) and that "
                         "--split-dir holds that split's lists"}[parse_split(split)[0]]
        raise SplitError(f"--split {split}: the {'training' if not len(tr) else 'test'} part is empty (usable "
                         f"segments: {have}, {int((parts[idx] == '').sum())} in no part); {fix}")
    return tr, va, te


def folds_for(cfg, data, cache: Cache, log=lambda s: None) -> list[Fold]:
    """The folds of a TrainConfig / FinetuneConfig ``cfg`` over ``data`` (sequence.reader.Sequences of ``cache``,
    in cache order; split in id order, see :func:`make_folds`): the one place a --split option becomes folds. A predefined split reads its parts from the
    cache's split column or the official lists, and logs what they did not cover."""
    from .split_lists import ListError, segment_parts

    try:
        given = segment_parts(cfg.split, cfg.split_dir, cache)
    except ListError as e:
        raise SplitError(f"--split {cfg.split}: {e}") from None
    out = make_folds(cfg.split, data.label_names, data.groups, data.keep, test_size=cfg.test_size,
                     val_size=cfg.val_size, seed=cfg.seed, folds=cfg.folds, classes=data.classes,
                     parts=None if given is None else given.parts, ids=data.ids)
    if given is not None:
        r = given.report
        for f in out:
            f.report = r
        if r.get("listed_not_in_cache"):
            log(f"--split {cfg.split}: {r['listed_not_in_cache']} listed video(s) are not in the cache, e.g. "
                f"{', '.join(r['listed_not_in_cache_examples'])}")
        if r.get("segments_not_listed"):
            log(f"--split {cfg.split}: {r['segments_not_listed']} cache segment(s) are in no part, e.g. "
                f"{', '.join(r['segments_not_listed_examples'])}")
    return out


# ---------------------------------------------------------------- the default split

def grouping(groups, keep=None) -> tuple[int, int]:
    """(distinct non-empty groups, segments) among the segments with ``keep`` True."""
    g = np.asarray(groups).astype(str)
    if keep is not None:
        g = g[np.asarray(keep, bool)]
    return len(set(g[g != ""].tolist())), len(g)


def default_split(groups, keep=None) -> tuple[str, str]:
    """(split, why) of --split auto: ``group`` when the groups hold several segments each (participants, source
    videos: a random split would put segments of one group in both train and test), ``random`` when there are none
    (every segment its own group, or a single group)."""
    n_groups, n = grouping(groups, keep)
    if 2 <= n_groups < n:
        return "group", f"its {n_groups} groups hold {n} segments, so whole groups go to test"
    why = "every segment is its own group" if n_groups == n else f"it has {n_groups} group(s)"
    return "random", f"{why}, so there is nothing to hold out by group"


def choose_split(cfg, groups, keep=None, log=lambda s: None, labels=None, ids=None):
    """``cfg`` with --split auto resolved (:func:`default_split`), the choice logged; an explicit sample-level split
    (random, kfold, seed-compat) on a cache whose groups hold several segments is logged as a warning. With
    ``labels``, a group split that cannot be made (a class in no training part) falls back to random, saying why."""
    from dataclasses import replace

    n_groups, n = grouping(groups, keep)
    if cfg.split != AUTO_SPLIT:
        name = parse_split(cfg.split)[0]
        if name in ("random", "kfold", "seed-compat") and 2 <= n_groups < n:
            log(f"warning: --split {cfg.split} splits segments, not groups: the cache's {n_groups} groups (participants, "
                f"source videos) leak across train and test, which inflates test accuracy for unseen groups; use "
                f"--split group or group-kfold to hold whole groups out")
        return cfg
    name, why = default_split(groups, keep)
    if name == "group" and labels is not None:
        try:
            make_folds("group", labels, groups, keep, test_size=cfg.test_size, val_size=cfg.val_size, seed=cfg.seed,
                       ids=ids)
        except SplitError as e:
            name, why = "random", f"a group split cannot be made ({e}); groups leak across train and test"
    log(f"--split {name} (the default for this cache: {why}; pass --split to choose another)")
    return replace(cfg, split=name)
