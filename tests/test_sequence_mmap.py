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
    """Standardize.fit over rows of the features table, block by block in float64, gives the mean and std of the
    gathered frames."""
    import torch

    from featseq.sequence.models import Standardize

    feats = (torch.randn(5000, 24) * 3 + 2).half()
    rows = torch.randint(0, 5000, (300, 7))
    a, b = Standardize(24), Standardize(24)
    a.fit(feats, rows, block_bytes=8 * 24 * 100)  # 100 rows a block
    x = feats[rows.reshape(-1)].double()
    b.fit(x)
    assert torch.allclose(a.mean, x.mean(0).float(), atol=1e-5) and torch.allclose(a.std, x.std(0, unbiased=False).float(), atol=1e-5)
    assert torch.allclose(a.mean, b.mean) and torch.allclose(a.std, b.std)
