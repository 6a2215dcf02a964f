"""Caches larger than the RAM budget are memory-mapped; training gives the same results."""
import numpy as np

from featseq.sequence.config import TrainConfig
from featseq.sequence.reader import load_features
from featseq.sequence.train import train


def test_memory_mapped_features_train_identically(tmp_path, monkeypatch):
    from helpers import write_fake_cache

    path = write_fake_cache(tmp_path / "c.h5", ["a", "b", "c"] * 10, groups=[f"g{i % 5}" for i in range(30)])
    cfg = dict(model="gru", hidden=16, epochs=3, split="random", seed=0, plots=False, device="cpu")
    in_ram = train(TrainConfig(cache=str(path), out=str(tmp_path / "ram"), **cfg))
    monkeypatch.setenv("FEATSEQ_RAM_BUDGET_GB", "1e-9")
    monkeypatch.setenv("FEATSEQ_MMAP_DIR", str(tmp_path / "mm"))
    cache, feats = load_features(str(path))
    assert isinstance(cache.features, np.memmap) or isinstance(getattr(cache.features, "base", None), np.memmap)
    assert list((tmp_path / "mm" / "featseq-mmap").glob("*.npy"))
    mapped = train(TrainConfig(cache=str(path), out=str(tmp_path / "mm_run"), **cfg))
    for k in ("test_accuracy", "val_accuracy", "best_epoch", "seq_len"):
        assert mapped[k] == in_ram[k], k
    a = (tmp_path / "ram" / "predictions.csv").read_text()
    b = (tmp_path / "mm_run" / "predictions.csv").read_text()
    assert a == b


def test_features_are_held_once_in_the_caches_dtype(tmp_path, monkeypatch):
    """load_features keeps a float16 cache's features as float16 (no float32 copy, the tensor shares the array's
    memory); the trainer's batches come out float32 with the same values; sweep workers (shared=True) map one
    copy on disk instead of reading their own."""
    import torch

    from helpers import write_fake_cache
    from featseq.sequence.loop import FeatureInputs
    from featseq.sequence.reader import ReaderConfig, build

    path = write_fake_cache(tmp_path / "c.h5", ["a", "b"] * 6, dim=32)
    cache, feats = load_features(str(path))
    assert feats.dtype == torch.float16 and cache.features.dtype == np.float16
    assert feats.data_ptr() == cache.features.ctypes.data  # one copy
    data = build(cache, ReaderConfig(seq_len=8), features=feats)
    inputs = FeatureInputs.of(data)
    (idx, x, m), = list(inputs.batches([np.arange(len(data))]))
    assert x.dtype == torch.float32
    want = torch.from_numpy(cache.features.astype(np.float32))[data.rows] * data.mask.unsqueeze(-1)
    assert torch.equal(x, want)
    monkeypatch.setenv("FEATSEQ_MMAP_DIR", str(tmp_path / "mm"))
    shared, sfeats = load_features(str(path), shared=True)
    assert isinstance(shared.features, np.memmap)
    assert sfeats.dtype == torch.float16 and torch.equal(sfeats, feats)


def test_standardize_fits_in_blocks_like_the_whole(tmp_path):
    """Standardize.fit over rows of the features table, in float32 blocks merged in float64, gives the mean and std of the
    gathered frames."""
    import torch

    from featseq.sequence.models import Standardize

    feats = (torch.randn(5000, 24) * 3 + 2).half()
    rows = torch.randint(0, 5000, (300, 7))
    a, b = Standardize(24), Standardize(24)
    a.fit(feats, rows, block_bytes=4 * 24 * 100)  # 100 rows a block
    x = feats[rows.reshape(-1)].double()
    b.fit(x)
    assert torch.allclose(a.mean, x.mean(0).float(), atol=1e-5) and torch.allclose(a.std, x.std(0, unbiased=False).float(), atol=1e-5)
    assert torch.allclose(a.mean, b.mean) and torch.allclose(a.std, b.std)


def test_standardize_keeps_a_small_spread_on_a_large_offset():
    """Features far from zero with a small spread (1e4 +- 0.1): the blocks' float32 deviations merged in float64
    give the spread to 1e-3, where sum(x^2) - n*mean^2 in float32 would lose it entirely."""
    import torch

    from featseq.sequence.models import Standardize

    g = torch.Generator().manual_seed(0)
    feats = 1e4 + 0.1 * torch.randn(20000, 8, generator=g)
    s = Standardize(8)
    s.fit(feats, block_bytes=4 * 8 * 777)  # uneven blocks
    ref = feats.double()
    assert torch.allclose(s.mean.double(), ref.mean(0), atol=1e-3)
    assert torch.allclose(s.std.double(), ref.std(0, unbiased=False), rtol=1e-3)


def test_a_new_version_of_a_cache_replaces_its_old_memory_mapped_copy(tmp_path, monkeypatch):
    """The memory-mapped copy is made once per cache version; when the cache changes (featurize appended, a rerun
    rewrote it) the next copy deletes the older one of the same path, and another cache's copy stays."""
    import os

    from helpers import write_fake_cache

    monkeypatch.setenv("FEATSEQ_MMAP_DIR", str(tmp_path / "mm"))
    folder = tmp_path / "mm" / "featseq-mmap"
    a = write_fake_cache(tmp_path / "a" / "c.h5", ["x", "y"] * 4, dim=8)
    b = write_fake_cache(tmp_path / "b" / "c.h5", ["x", "y"] * 4, dim=8)  # same file name, another folder
    load_features(str(a), shared=True)
    load_features(str(b), shared=True)
    load_features(str(a), shared=True)  # same version: the copy is reused
    first = sorted(folder.glob("*.npy"))
    assert len(first) == 2
    os.unlink(a)
    write_fake_cache(a, ["x", "y", "z"] * 4, dim=8)  # a new version of a
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cache, feats = load_features(str(a), shared=True)
    now = sorted(folder.glob("*.npy"))
    assert len(now) == 2 and len(set(now) & set(first)) == 1  # b's copy kept, a's old one replaced
    assert feats.shape[0] == len(cache.timestamps)


def _map_after(barrier, out, path, rows):
    import time

    from featseq.sequence import reader

    made = []
    real = reader.features_to_npy

    def slow(*a, **k):  # a copy that takes a while, as a large cache's does
        made.append(True)
        time.sleep(1.0)
        real(*a, **k)

    reader.features_to_npy = slow
    barrier.wait()
    mm = reader.features_memmap(path, rows)
    out.put((bool(made), float(mm.sum())))


def test_workers_starting_together_make_one_copy_and_map_it(tmp_path, monkeypatch):
    """Two processes asking for the memory-mapped copy at the same moment (a sweep's workers, a DataLoader's): one
    makes it, the other waits and maps that same copy; two copies would hold the features twice."""
    import multiprocessing as mp

    from helpers import write_fake_cache
    from featseq.featurize.cache import read_cache

    monkeypatch.setenv("FEATSEQ_MMAP_DIR", str(tmp_path / "mm"))
    path = write_fake_cache(tmp_path / "c.h5", ["x", "y"] * 4, dim=8)
    rows = len(read_cache(path, features=False).timestamps)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_map_after, args=(barrier, out, str(path), rows)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert sorted(m for m, _ in got) == [False, True]  # one maker
    assert got[0][1] == got[1][1] == float(read_cache(path).features.sum())
    assert len(list((tmp_path / "mm" / "featseq-mmap").glob("*.npy"))) == 1
