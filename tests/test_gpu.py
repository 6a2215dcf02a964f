"""GPU paths: pinned, non-blocking, overlapped copies in the Embedder; featurize on CUDA with several decode workers;
NVDEC decoding through torchcodec. Skipped with the reason on a machine without CUDA; run on a GPU machine."""
import numpy as np
import pytest
import torch

from helpers import featurize_cfg
from featseq.featurize.backbones import Embedder, create_backbone
from featseq.featurize.cache import read_cache
from featseq.featurize.decoder import unavailable
from featseq.featurize.pipeline import featurize

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here; run on a GPU machine")]


def test_submitted_batches_equal_one_call_and_the_cpu():
    bb = create_backbone("resnet18", "none", 0)
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8) for n in (16, 7, 33)]
    gpu = Embedder(bb, torch.device("cuda"), "fp32")
    handles = [gpu.submit(x) for x in xs]  # all in flight at once
    got = [gpu.result(h) for h in handles]
    cpu = Embedder(create_backbone("resnet18", "none", 0), torch.device("cpu"), "fp32")
    for x, g in zip(xs, got):
        assert g.shape == (len(x), 512)
        assert np.allclose(g, gpu(x), atol=1e-5)
        assert np.allclose(g, cpu(x), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("decode_device", ["cpu", "cuda"])
def test_featurize_on_cuda_with_two_workers_equals_the_cpu(synth_data, tmp_path, decode_device):
    if decode_device == "cuda" and (why := unavailable("torchcodec", "cuda")):
        pytest.skip(why)
    kw = {"decoder": "torchcodec", "decode_device": "cuda"} if decode_device == "cuda" else {}
    gpu = featurize(featurize_cfg(synth_data["clips_root"], tmp_path / "gpu.h5", device="cuda", precision="fp32",
                                  decode_workers=2, **kw))
    same_decoder = {"decoder": "torchcodec"} if decode_device == "cuda" else {}
    cpu = featurize(featurize_cfg(synth_data["clips_root"], tmp_path / "cpu.h5", **same_decoder))
    a, b = read_cache(gpu.path), read_cache(cpu.path)
    assert sorted(a.ids) == sorted(b.ids) and len(a) == 6
    for i, sid in enumerate(b.ids):
        fa, ta = a.segment(a.ids.index(sid))
        fb, tb = b.segment(i)
        assert np.array_equal(ta, tb)
        # NVDEC's colour conversion may differ from FFmpeg's by a level or two; the features stay close
        assert np.allclose(fa.astype(np.float32), fb.astype(np.float32), atol=5e-2 if decode_device == "cuda" else 2e-2)


def test_resident_features_give_the_same_batches_as_host_gathers(tmp_path):
    """sequence.loop.FeatureInputs on CUDA: features, rows and mask live on the GPU once and batches are gathered
    there, the same tensors as gathering on the host, also with rows redrawn (random offsets)."""
    from helpers import write_fake_cache
    from featseq.sequence.loop import FeatureInputs
    from featseq.sequence.reader import ReaderConfig, build

    data = build(read_cache(write_fake_cache(tmp_path / "c.h5", ["a", "b"] * 6, dim=8)), ReaderConfig(seq_len=6))
    gpu, cpu = FeatureInputs.of(data, torch.device("cuda")), FeatureInputs.of(data)
    assert gpu.features.is_cuda and gpu.rows.is_cuda and gpu.mask.is_cuda
    idx = [np.array([3, 0, 5]), np.array([11])]
    rows = data.resample("random", np.random.default_rng(1))
    for rows_ in (None, rows):
        for (_, xg, mg), (_, xc, mc) in zip(gpu.batches(idx, rows_), cpu.batches(idx, rows_)):
            assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(mg.cpu(), mc)
