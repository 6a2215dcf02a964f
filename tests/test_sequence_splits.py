"""Split properties: seed-compat equals sklearn's, stratification, group disjointness, CV coverage, honest validation."""
import numpy as np
import pytest
from sklearn.model_selection import GroupShuffleSplit, train_test_split

from featseq.sequence.splits import SplitError, make_folds

RNG = np.random.default_rng(0)
# Gingerbread-like: 184 segments, 3 classes (60/64/60), 23 groups of 8
LABELS = np.array(["Classical"] * 60 + ["Instrumental"] * 64 + ["Pop"] * 60)[RNG.permutation(184)]
GROUPS = np.array([f"P{i // 8 + 1:02d}" for i in range(184)])


def check_partition(f, n):
    parts = [set(f.train), set(f.val), set(f.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(f.train) + len(f.val) + len(f.test) == n


def test_seed_compat_is_sklearns_split():
    (f,) = make_folds("seed-compat", LABELS, GROUPS, val_size=0.15)
    tr, te = train_test_split(np.arange(184), test_size=0.2, random_state=42)
    assert len(f.test) == 37
    assert np.array_equal(f.test, te)  # same clips, same order as the original study
    assert set(f.train) | set(f.val) == set(tr) and set(f.val) < set(tr)  # validation carved from training only
    # independent of --seed and --test-size
    (g,) = make_folds("seed-compat", LABELS, GROUPS, seed=7, test_size=0.5)
    assert np.array_equal(g.test, te)
    check_partition(f, 184)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_is_stratified(seed):
    (f,) = make_folds("random", LABELS, GROUPS, test_size=0.2, val_size=0.15, seed=seed)
    check_partition(f, 184)
    for part in (f.test, f.val):
        for c, n in zip(*np.unique(LABELS, return_counts=True)):
            share = (LABELS[part] == c).mean()
            assert abs(share - n / 184) < 0.06
    assert len(f.test) == 37


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_split_is_group_disjoint(seed):
    (f,) = make_folds("group", LABELS, GROUPS, test_size=0.2, val_size=0.15, seed=seed)
    check_partition(f, 184)
    g = [set(GROUPS[p]) for p in (f.train, f.val, f.test)]
    assert not (g[0] & g[2]) and not (g[0] & g[1]) and not (g[1] & g[2]) and g[1]


def test_kfold_tests_every_segment_once():
    folds = make_folds("kfold", LABELS, GROUPS, folds=5, seed=0)
    assert len(folds) == 5
    test = np.concatenate([f.test for f in folds])
    assert sorted(test) == list(range(184))
    for f in folds:
        check_partition(f, 184)


@pytest.mark.parametrize("seed", [0, 1])
def test_group_kfold_holds_out_whole_groups(seed):
    folds = make_folds("group-kfold", LABELS, GROUPS, folds=5, seed=seed, val_size=0.15)
    assert len(folds) == 5
    assert sorted(np.concatenate([f.test for f in folds])) == list(range(184))
    for f in folds:
        check_partition(f, 184)
        g = [set(GROUPS[p]) for p in (f.train, f.val, f.test)]
        assert not (g[0] & g[2]) and not (g[1] & g[2]) and not (g[0] & g[1]) and g[1]
        assert len(set(LABELS[f.test])) == 3  # stratified: every class in every test fold
    other = make_folds("group-kfold", LABELS, GROUPS, folds=5, seed=seed + 10)
    assert [sorted(f.test) for f in folds] != [sorted(f.test) for f in other]  # --seed reshuffles the groups
    with pytest.raises(SplitError, match="number of groups"):
        make_folds("group-kfold", LABELS, GROUPS, folds=30)


def test_logo_leaves_one_group_out():
    folds = make_folds("logo", LABELS, GROUPS, val_size=0.15)
    assert len(folds) == 23
    for f in folds:
        check_partition(f, 184)
        assert len(set(GROUPS[f.test])) == 1
        assert GROUPS[f.test][0] not in set(GROUPS[f.train]) | set(GROUPS[f.val])
    assert sorted(np.concatenate([f.test for f in folds])) == list(range(184))


def test_keep_mask_and_class_missing_from_training():
    # class c lives in group g3 only (a and b are in both g1 and g2): a group split loses c from training
    # exactly when it puts g3 in the test part, for every seed (which seeds do: sklearn's GroupShuffleSplit,
    # what --split group is, computed here on its own)
    lab3 = np.array(["a", "b"] * 8 + ["c"] * 2)
    grp3 = np.array(["g1"] * 8 + ["g2"] * 8 + ["g3"] * 2)
    outcomes = set()
    for seed in range(10):
        _, te = next(GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=seed).split(grp3, groups=grp3))
        loses_c = "g3" in set(grp3[te])
        outcomes.add(loses_c)
        if loses_c:
            with pytest.raises(SplitError, match=r"--split group: class\(es\) c have no sample in the training part"):
                make_folds("group", lab3, grp3, seed=seed, val_size=0)
        else:
            (f,) = make_folds("group", lab3, grp3, seed=seed, val_size=0)
            assert np.array_equal(np.sort(f.test), np.sort(te)) and "c" in set(lab3[f.train])
    assert outcomes == {True, False}  # both cases were exercised
    # leave-one-group-out always has the fold that holds out g3
    with pytest.raises(SplitError, match=r"--split logo \(fold_g3\): class\(es\) c have no sample"):
        make_folds("logo", lab3, grp3, val_size=0)
    labels = np.array(["a"] * 10 + ["b"] * 10 + ["c"])  # one "c": stratification impossible
    groups = np.array(["g1"] * 11 + ["g2"] * 10)
    keep = np.ones(21, bool)
    keep[:3] = False
    (f,) = make_folds("random", labels, groups, keep=keep, seed=0, val_size=0)
    assert not (set(f.train) | set(f.test)) & {0, 1, 2}
    with pytest.raises(SplitError, match="seed-compat"):
        make_folds("seed-compat", labels, groups, keep=keep)
    with pytest.raises(SplitError, match="--folds"):
        make_folds("kfold", labels, groups, folds=5)
    with pytest.raises(SplitError, match="unknown --split"):
        make_folds("stratified", labels, groups)


@pytest.mark.parametrize("split", ["random", "seed-compat", "group", "kfold", "group-kfold", "logo"])
def test_folds_follow_the_ids_not_the_row_order(split):
    """The same segments in another row order (as several decode workers or merged shards publish them) give the same
    folds, each part listing the same segments in the same order."""
    ids = np.array([f"P{i // 8 + 1:02d}_music{i % 8 + 1:02d}" for i in range(184)])
    perm = np.random.default_rng(3).permutation(184)
    a = make_folds(split, LABELS, GROUPS, ids=ids, folds=5, seed=1)
    b = make_folds(split, LABELS[perm], GROUPS[perm], ids=ids[perm], folds=5, seed=1)
    assert len(a) == len(b)
    for fa, fb in zip(a, b):
        for part in ("train", "val", "test"):
            assert ids[getattr(fa, part)].tolist() == ids[perm][getattr(fb, part)].tolist()
    if split == "seed-compat":  # in id order, which is the original study's order
        assert np.array_equal(a[0].test, make_folds(split, LABELS, GROUPS)[0].test)
