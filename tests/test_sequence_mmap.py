"""Caches larger than the RAM budget are memory-mapped; training gives the same results."""
import numpy as np

from sequence.config import TrainConfig
from sequence.reader import load_features
from sequence.train import train


def test_memory_mapped_features_train_identically(tmp_path, monkeypatch):
    from seq_fixtures import write_fake_cache

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
