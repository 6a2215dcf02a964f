"""GPU paths: pinned, non-blocking, overlapped copies in the Embedder; featurize on CUDA with several decode workers;
NVDEC decoding through torchcodec. Skipped with the reason on a machine without CUDA; run on a GPU machine."""
from pathlib import Path

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


def test_fp32_on_cuda_is_fp32_not_tf32():
    """TF32 off for fp32: ResNet-18 within 1e-4 of the CPU (with TF32, 1.6 % of values were beyond 1e-3)."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, (16, 112, 112, 3), dtype=np.uint8)
    gpu = Embedder(create_backbone("resnet18", "none", 0), torch.device("cuda"), "fp32")(x)
    cpu = Embedder(create_backbone("resnet18", "none", 0), torch.device("cpu"), "fp32")(x)
    assert not torch.backends.cudnn.allow_tf32
    assert np.allclose(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_an_empty_batch_on_cuda_gives_no_features():
    emb = Embedder(create_backbone("resnet18", "none", 0), torch.device("cuda"), "bf16")
    assert emb(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 512)


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """helpers.small_run: (clips root, cache, a conv1d run), made on the CPU."""
    from helpers import small_run

    return small_run(tmp_path_factory.mktemp("gpu_run"))


def test_finetune_predict_and_stream_on_cuda_in_fp16_with_its_gradscaler(gpu_run, tmp_path):
    """finetune with the fp16 GradScaler and --resume from its state, predict and predict --stream, all on the GPU."""
    import json
    import subprocess
    import sys

    from helpers import CHILD_ENV, ROOT

    src, cache, run, _ = gpu_run
    out = tmp_path / "ft"
    base = [sys.executable, "-m", "featseq", "finetune", cache, "--from", run, "--out", str(out), "--unfreeze", "1",
            "--device", "cuda", "--no-plots", "--batch-size", "4"]
    for extra in (["--epochs", "1", "--precision", "fp16"], ["--epochs", "2", "--precision", "fp16", "--resume"]):
        r = subprocess.run(base + extra, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["precision"] == "fp16" and res["epochs_run"] == 2
    video = next(Path(src).rglob("*.mp4"))
    r = subprocess.run([sys.executable, "-m", "featseq", "predict", str(out), str(video), "--device", "cuda",
                        "--out", str(tmp_path / "pred"), "--no-plots"], cwd=ROOT, env=CHILD_ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "featseq", "predict", run, "--stream", str(video), "--device", "cuda",
                        "--out", str(tmp_path / "stream"), "--no-plots"], cwd=ROOT, env=CHILD_ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: nccl and SyncBatchNorm across ranks")
def test_two_ranks_on_nccl_with_syncbatchnorm(gpu_run, tmp_path):
    import json
    import subprocess

    from helpers import CHILD_ENV, ROOT, torchrun_cmd

    _, cache, run, _ = gpu_run
    out = tmp_path / "ddp"
    r = subprocess.run(torchrun_cmd(2, "finetune", cache, "--from", run, "--out", out, "--unfreeze", "1", "--train-bn",
                                    "--epochs", "1", "--batch-size", "4", "--device", "cuda", "--no-plots"),
                       cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["ranks"] == 2 and res["backend"] == "nccl"


def test_parts_gathered_into_pinned_memory_equal_one_array():
    emb = Embedder(create_backbone("resnet18", "none", 0), torch.device("cuda"), "fp32")
    rng = np.random.default_rng(3)
    parts = [rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8) for n in (5, 1, 9)]
    handles = [emb.submit(parts), emb.submit(parts[::-1])]  # two in flight, as featurize keeps them
    got = [emb.result(h) for h in handles]
    assert np.allclose(got[0], emb(np.concatenate(parts)), atol=1e-5)
    assert np.allclose(got[1], emb(np.concatenate(parts[::-1])), atol=1e-5)
