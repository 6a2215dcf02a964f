"""sequence.dataset.CacheDataset: the trainer's tensors through a DataLoader with worker processes, the HDF5 file
opened per process (never across a fork), and the README's own-loop example run as written."""
import os
import pickle
from pathlib import Path
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import CHILD_ENV, ROOT, write_fake_cache
from featseq.featurize.cache import read_cache
from featseq.sequence.config import TrainConfig
from featseq.sequence.dataset import CacheDataset
from featseq.sequence.loop import FeatureInputs
from featseq.sequence.reader import build, load_features
from featseq.sequence.splits import folds_for

N = 40
LABELS = ["a", "b", "c", "d"] * 10
DURATIONS = [3.0 + (i * 0.37) % 5 for i in range(N)]  # 3-8 s: some sequences are padded


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    splits = ["train"] * 24 + ["val"] * 8 + ["test"] * 8
    return write_fake_cache(tmp_path_factory.mktemp("ds") / "c.h5", LABELS, groups=[f"g{i // 4}" for i in range(N)],
                            durations=DURATIONS, dim=16, jitter=1.0, splits=splits)


def trainer_tensors(path, part, fold=0, **options):
    """What the trainer feeds its model for these options: reader.build + splits.folds_for + FeatureInputs.batches
    (the gather sequence.loop.fit takes its batches from), on the features as train loads them."""
    cfg = TrainConfig(cache=path, out="", **options)
    c, features = load_features(path)
    seqs = build(c, cfg.reader(), features=features)
    idx = getattr(folds_for(cfg, seqs, c)[fold], part)
    ((_, x, m),) = FeatureInputs.of(seqs).batches([idx])
    return x, m, seqs.labels[idx], [seqs.ids[i] for i in idx]


@pytest.mark.parametrize("part,fold,options", [
    ("train", 0, dict(fps=3, seconds=6, percent=80, split="group", offset="center")),
    ("test", 0, dict(fps=2, seq_len=9, split="predefined", min_coverage=0.9)),
    ("val", 0, dict(fps=6, seconds=4, split="random", seed=3)),
    ("test", 2, dict(fps=1, split="group-kfold", folds=4)),
])
def test_dataloader_with_two_workers_equals_the_trainers_reader(cache, part, fold, options):
    ds = CacheDataset(cache, part=part, fold=fold, **options)
    x0, m0, y0 = ds[0]  # read in this process first: its handle must not reach the workers
    assert ds._h5 is not None
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    xs, ms, ys = zip(*loader)
    assert ds._h5 is None  # closed before the workers were forked
    x, m, y = torch.cat(xs), torch.cat(ms), torch.cat(ys)
    tx, tm, ty, ids = trainer_tensors(cache, part, fold, **options)
    assert ds.ids == ids and len(ds) == len(ids) > 0
    assert x.dtype == torch.float32 and m.dtype == torch.bool and y.dtype == torch.int64
    assert torch.equal(x, tx) and torch.equal(m, tm) and torch.equal(y, ty)
    assert torch.equal(x0, tx[0]) and torch.equal(m0, tm[0])
    if "seconds" in options:  # windows longer than some clips: padding is exercised
        assert (~m).any() and (x[~m] == 0).all()
    assert ds.classes == ["a", "b", "c", "d"] and ds.feature_dim == 16


def test_memory_mapped_items_equal_the_trainers_and_share_the_sweeps_copy(cache, tmp_path, monkeypatch):
    """memory_map=True: items gathered from the memory-mapped copy of the features equal the trainer's tensors
    through a DataLoader with two workers, and that copy is the one file train/sweep workers map (load_features with
    shared=True), made once: no HDF5 handle is opened for items."""
    monkeypatch.setenv("FEATSEQ_MMAP_DIR", str(tmp_path))
    options = dict(fps=3, seconds=6, split="group", offset="center")
    ds = CacheDataset(cache, part="train", memory_map=True, **options)
    xs, ms, ys = zip(*torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2))
    tx, tm, ty, _ = trainer_tensors(cache, "train", **options)
    assert torch.equal(torch.cat(xs), tx) and torch.equal(torch.cat(ms), tm) and torch.equal(torch.cat(ys), ty)
    assert ds._h5 is None
    copies = list((tmp_path / "featseq-mmap").glob("*.npy"))
    assert len(copies) == 1
    c, _ = load_features(cache, shared=True)
    assert isinstance(c.features, np.memmap) and Path(c.features.filename) == copies[0]
    assert pickle.loads(pickle.dumps(ds))._mm is None  # a spawned worker maps the file itself


def test_random_offset_redraws_on_the_cache_grid_and_eval_parts_stay_centred(cache):
    ds = CacheDataset(cache, part="train", fps=2, seq_len=4, offset="random", split="predefined")
    full = read_cache(cache, dtype=np.float32)
    i = int(np.argmax([DURATIONS[k] for k in ds.index]))  # the longest clip has room to move
    seen = set()
    torch.manual_seed(0)
    for _ in range(20):
        x, m, _ = ds[i]
        assert m.all()
        o = int(full.segments["offset"][ds.index[i]])
        first = int(np.nonzero((full.features == x[0].numpy()).all(1))[0][0]) - o
        seen.add(first)
        assert torch.equal(x[1], torch.from_numpy(full.features[o + first + 3]))  # 2 fps from a 6 fps cache
    assert len(seen) > 3
    tx, tm, _, _ = trainer_tensors(cache, "test", fps=2, seq_len=4, offset="random", split="predefined")
    xs = torch.stack([CacheDataset(cache, part="test", fps=2, seq_len=4, offset="random", split="predefined")[k][0]
                      for k in range(len(tx))])
    assert torch.equal(xs, tx)  # evaluation parts: centre, as the trainer


def test_pickles_without_its_handle_and_refuses_bad_options(cache):
    ds = CacheDataset(cache, part="all", fps=3)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker gets
    assert clone._h5 is None and torch.equal(clone[3][0], ds[3][0]) and len(ds) == N
    pid = os.fork()
    if pid == 0:  # the child starts without the parent's handle and opens its own
        os._exit(0 if ds._h5 is None and ds[1][0].shape == (ds.seq_len, 16) else 1)
    assert os.waitpid(pid, 0)[1] == 0
    with pytest.raises(TypeError, match="unknown option.*hidden"):
        CacheDataset(cache, hidden=8)
    with pytest.raises(ValueError, match="--percent must be in"):
        CacheDataset(cache, percent=0)
    with pytest.raises(ValueError, match="part must be one of"):
        CacheDataset(cache, part="dev")


def test_readme_example_trains_a_model_of_your_own(cache, tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- own-loop example -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    script = tmp_path / "own.py"
    script.write_text(code.replace('"X.h5"', repr(cache)).replace('split="ucf101:1"', 'split="predefined"')
                      + "\nprint('loss', float(loss))\n")
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=CHILD_ENV)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) > 0
