"""--compile (featurize.compiled): the CNN through torch.compile with one input shape, an eager fallback when the
compiler fails, the compilation's time kept apart, and features that agree with eager ones."""
import numpy as np
import pytest
import torch

from helpers import featurize_cfg
from featseq.featurize.backbones import Embedder, create_backbone
from featseq.featurize.cache import read_cache
from featseq.featurize.pipeline import featurize


def _frames(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


def test_the_compiled_cnn_sees_one_shape_and_the_padding_is_dropped(monkeypatch):
    """Every call of the compiled CNN gets the same batch shape (slices of at most --batch-size frames, the last one
    padded with zero frames), and the features of the real frames equal eager ones."""
    shapes = []

    def fake_compile(module, **options):
        assert options.get("dynamic") is False
        return lambda x: (shapes.append(tuple(x.shape)), module(x))[1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    eager = Embedder(create_backbone("resnet18", "none", 0), torch.device("cpu"), "fp32")
    comp = Embedder(create_backbone("resnet18", "none", 0), torch.device("cpu"), "fp32", compile=True, batch_size=8)
    for n in (20, 3, 8):
        x = _frames(n, seed=n)
        got = comp(x)
        assert got.shape == (n, 512) and np.allclose(got, eager(x), atol=1e-5)
    assert set(shapes) == {(8, 3, 32, 32)} and len(shapes) == 3 + 1 + 1
    assert comp.compiled.compiled is True and comp.warmup_s >= 0


def test_a_failing_compiler_falls_back_to_eager_with_one_note(monkeypatch):
    def broken_compile(module, **options):
        def run(x):
            raise RuntimeError("InductorError: no working C++ compiler found\nmore lines")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    notes = []
    comp = Embedder(create_backbone("resnet18", "none", 0), torch.device("cpu"), "fp32", compile=True, batch_size=4,
                    log=notes.append)
    eager = Embedder(create_backbone("resnet18", "none", 0), torch.device("cpu"), "fp32")
    x = _frames(10)
    assert np.allclose(comp(x), eager(x), atol=1e-5) and np.allclose(comp(x[:3]), eager(x[:3]), atol=1e-5)
    assert comp.compiled.compiled is False
    assert notes == ["--compile: torch.compile failed (RuntimeError: InductorError: no working C++ compiler found); "
                     "running the CNN eagerly instead"]


@pytest.mark.slow
def test_featurize_compile_agrees_with_eager_and_resumes_an_eager_cache(synth_data, tmp_path):
    """A real torch.compile (inductor, C++ on the CPU): the cache's features agree with an eager run's within fp32
    rounding, the compilation is reported apart, and --compile is not part of the identity: an eager cache resumes
    with it (nothing left to do, no identity error)."""
    src = synth_data["clips_root"]
    eager = featurize(featurize_cfg(src, tmp_path / "eager.h5", batch_size=16))
    logs = []
    comp = featurize(featurize_cfg(src, tmp_path / "comp.h5", batch_size=16, compile=True), log=logs.append)
    assert comp.compile_s > 0 and any("compiled the CNN in" in s for s in logs), logs
    assert comp.steady_frames_per_s > comp.frames_per_s
    a, b = read_cache(eager.path), read_cache(comp.path)
    assert sorted(a.ids) == sorted(b.ids) and len(a) > 0  # segments are stored in the order they were finished
    for i, sid in enumerate(a.ids):
        fa, ta = a.segment(i)
        fb, tb = b.segment(b.ids.index(sid))
        assert np.array_equal(ta, tb)
        assert np.allclose(fa.astype(np.float32), fb.astype(np.float32), atol=2e-3, rtol=2e-3), sid
    again = featurize(featurize_cfg(src, tmp_path / "eager.h5", batch_size=16, compile=True))
    assert again.written == 0 and again.skipped_done == len(a)
