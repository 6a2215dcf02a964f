"""The CUDA paths' logic, exercised on the CPU (issue 31): which GPU a rank and its decode workers take, how many
decode workers a rank starts under ranks and CPU quotas, threads in the workers, the empty batch, the identity of
the decode device, precision on CUDA (bf16 default, fp32 without TF32), the GradScaler on resume, channels_last in
finetune and the normalisation buffers. What only a GPU can settle is in tests/test_gpu.py and bench/gpu_check.py."""
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from helpers import CHILD_ENV, write_fake_cache
from featseq.common.cpus import available_cpus, cgroup_quota, cpu_share
from featseq.common.errors import UserError
from featseq.common.procgroup import decode_device, rank_device
from featseq.featurize import backbones as bb
from featseq.featurize.precision import reproduce_precision, resolve_precision
from featseq.featurize.worker import default_workers


@pytest.fixture
def gpus(monkeypatch):
    """Pretend ``n`` GPUs are visible (device_count, is_available) and record torch.cuda.set_device's calls."""
    made_current = []

    def set_n(n: int):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: made_current.append(torch.device(d)))
        return made_current
    return set_n


# ---------------------------------------------------------------- which GPU (items 1, 11)

def test_each_rank_takes_its_local_gpu_and_makes_it_current(gpus):
    current = gpus(4)
    env = {"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}
    assert rank_device("auto", torch.device("cuda"), env) == torch.device("cuda", 2)
    assert current == [torch.device("cuda", 2)]  # featurize never called set_device before


def test_a_rank_that_sees_one_gpu_takes_cuda_0(gpus):
    """A launcher that shows each task one GPU while LOCAL_RANK > 0, or two ranks on a 1-GPU box: cuda:0, not cuda:1."""
    gpus(1)
    assert rank_device("cuda", torch.device("cuda"), {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == torch.device("cuda", 0)


def test_more_local_ranks_than_gpus_is_refused_with_the_fix(gpus):
    gpus(2)
    with pytest.raises(UserError, match=r"local rank 3 of 4.*2 GPU\(s\).*--nproc-per-node 2"):
        rank_device("auto", torch.device("cuda"), {"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"})


def test_an_explicit_gpu_under_several_local_ranks_is_refused(gpus):
    gpus(2)
    with pytest.raises(UserError, match=r"--device cuda:0 under torchrun with 2 ranks.*--device cuda"):
        rank_device("cuda:0", torch.device("cuda", 0), {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert rank_device("cuda:1", torch.device("cuda", 1), {}) == torch.device("cuda", 1)  # outside torchrun: as asked


def test_the_cpu_stays_the_cpu_under_torchrun(gpus):
    current = gpus(2)
    assert rank_device("cpu", torch.device("cpu"), {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == torch.device("cpu")
    assert current == []


def test_decode_workers_decode_on_their_ranks_gpu(gpus, monkeypatch):
    gpus(2)
    assert decode_device("cuda", torch.device("cuda", 1)) == "cuda:1"
    assert decode_device("cpu", torch.device("cuda", 1)) == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "1")  # the CNN on the CPU, NVDEC on the rank's GPU
    assert decode_device("cuda", torch.device("cpu")) == "cuda:1"


def test_torchcodec_opens_the_gpu_it_is_given_not_the_current_one(tmp_path, monkeypatch):
    """The worker is handed 'cuda:1'; before, torchcodec got torch.cuda.current_device() (GPU 0 on every rank)."""
    from featseq.featurize.decoders import torchcodec_decoder as tc

    opened = []

    class FakeVideoDecoder:
        def __init__(self, path, device, **kw):
            opened.append(device)
            self.metadata = types.SimpleNamespace(num_frames=8, average_fps_from_header=30.0, num_frames_from_header=8)

    fake = types.ModuleType("torchcodec.decoders")
    fake.VideoDecoder = FakeVideoDecoder
    monkeypatch.setitem(sys.modules, "torchcodec", types.ModuleType("torchcodec"))
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    clip = tc.write_probe_clip(str(tmp_path / "c.mp4"), size=64)
    tc.TorchCodecDecoder(clip, size=32, device="cuda:1")
    tc.TorchCodecDecoder(clip, size=32, device="cpu")
    assert opened == ["cuda:1", "cpu"]


# ---------------------------------------------------------------- how many decode workers (item 2)

def _cgroup(tmp_path, files: dict):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_cgroup_v2_and_v1_quotas_are_read(tmp_path):
    assert cgroup_quota(_cgroup(tmp_path / "v2", {"cpu.max": "1600000 100000\n"})) == 16.0
    assert cgroup_quota(_cgroup(tmp_path / "v2max", {"cpu.max": "max 100000\n"})) is None
    v1 = _cgroup(tmp_path / "v1", {"cpu,cpuacct/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroup_quota(v1) == 2.5
    assert cgroup_quota(_cgroup(tmp_path / "v1none", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})) is None
    assert cgroup_quota(tmp_path / "absent") is None


def test_a_container_limited_to_16_cpus_on_a_224_core_host_starts_15_workers(tmp_path):
    root = _cgroup(tmp_path, {"cpu.max": "1600000 100000"})
    assert available_cpus(root, affinity=224) == 16
    assert available_cpus(_cgroup(tmp_path / "half", {"cpu.max": "150000 100000"}), affinity=224) == 2  # rounded up
    assert default_workers("cpu", "cuda", cpu_share({}, root, affinity=224)) == 15  # was 223


def test_ranks_on_a_node_share_its_cpus(tmp_path):
    """8 ranks on a 64-core node: 7 decode workers each (was 63 each), from LOCAL_WORLD_SIZE."""
    share = cpu_share({"LOCAL_WORLD_SIZE": "8"}, tmp_path / "none", affinity=64)
    assert share == 8 and default_workers("cpu", "cuda", share) == 7
    assert default_workers("cpu", "cuda", cpu_share({"LOCAL_WORLD_SIZE": "64"}, tmp_path, affinity=16)) == 1


def test_defaults_on_the_cpu_and_with_nvdec():
    assert [default_workers("cpu", "cpu", n) for n in (1, 2, 16)] == [1, 2, 2]  # unchanged: the CNN takes the cores
    assert [default_workers("cuda", "cuda", n) for n in (1, 2, 16, 64)] == [1, 1, 4, 4]
    assert default_workers("cuda:1", "cuda", 16) == 4


# ---------------------------------------------------------------- the workers' threads and memory (item 3)

def test_a_torchcodec_worker_computes_on_one_thread():
    code = ("import torch; torch.set_num_threads(4); from featseq.featurize.worker_process import one_thread; "
            "one_thread('torchcodec'); import os; print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]


def test_the_resize_runs_in_bounded_slices_and_equals_one_call():
    from featseq.featurize.decoders.torchcodec_decoder import resize

    x = torch.randint(0, 256, (9, 3, 48, 64), dtype=torch.uint8)
    whole = resize(x, 24, 32, max_bytes=1 << 40)
    sliced = resize(x, 24, 32, max_bytes=2 * 4 * 3 * 48 * 64)  # two frames of float32 at a time
    assert whole.shape == (9, 3, 24, 32) and whole.dtype == torch.uint8
    assert torch.equal(whole, sliced)
    assert resize(x[:0], 24, 32).shape == (0, 3, 24, 32)


# ---------------------------------------------------------------- the Embedder (items 6, 8, 9)

def test_an_empty_batch_on_cuda_gives_no_features_instead_of_recursing():
    emb = bb.Embedder(bb.create_backbone("resnet18", "none", 0), torch.device("cpu"), "fp32")
    emb.device = torch.device("cuda")  # the CUDA branch of __call__/submit, reached without a GPU by an empty batch
    out = emb(np.zeros((0, 32, 32, 3), np.uint8))  # was RecursionError (__call__ -> submit -> __call__)
    assert out.shape == (0, 512) and out.dtype == np.float32
    assert emb.result(emb.submit(np.zeros((0, 32, 32, 3), np.uint8))).shape == (0, 512)


def test_mean_and_std_are_made_once_not_per_batch(monkeypatch):
    entry = bb.REGISTRY["resnet18"]
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    bb.preprocess(frames, entry, torch.device("cpu"))
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    a = bb.preprocess(frames, entry, torch.device("cpu"))
    bb.preprocess(frames, entry, torch.device("cpu"))
    assert made == []  # a blocking host-to-device copy per batch on CUDA, before
    assert torch.allclose(a[0, :, 0, 0], -torch.tensor(entry.mean) / torch.tensor(entry.std))


@pytest.fixture
def tf32_on():
    """torch's flags as a GPU process starts: TF32 for cuDNN convolutions (the default) and for matmuls; restored."""
    before = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    yield
    torch.backends.cudnn.allow_tf32 = before[0]
    torch.set_float32_matmul_precision(before[1])


def test_fp32_on_cuda_turns_tf32_off(tf32_on):
    bb.cuda_math("bf16", torch.device("cuda"))
    bb.cuda_math("fp32", torch.device("cpu"))
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # untouched
    bb.cuda_math("fp32", torch.device("cuda"))
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


# ---------------------------------------------------------------- precision on CUDA (item 12)

@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 0), "fp16")])
def test_cuda_defaults_to_bf16_where_the_gpu_has_it(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision(None, "cuda:1") == resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision(None, "cpu") == resolve_precision("auto", "cpu")  # the CPU's: auto's there
    assert resolve_precision("fp16", "cuda") == "fp16"


def test_a_gpu_made_half_precision_run_is_remade_in_fp32_on_a_cpu():
    assert reproduce_precision("fp16", "cpu") == "fp32"
    assert reproduce_precision("fp16", "cuda") == "fp16"
    assert reproduce_precision("fp32", "cpu") == "fp32"


# ---------------------------------------------------------------- the decode device in the identity (item 10)

def test_the_decode_device_is_part_of_a_caches_identity_and_old_caches_resume(tmp_path):
    import h5py

    from featseq.featurize.cache import CacheError, check_identity, read_table
    from featseq.featurize.spec import IDENTITY_KEYS, FeatureSpec, with_defaults

    path = write_fake_cache(tmp_path / "old.h5", ["a", "b"], dim=4)
    with h5py.File(path, "a") as f:  # a cache from before decode_device was recorded
        f.attrs.pop("decode_device", None)
    have, _ = read_table(path)
    assert "decode_device" not in have
    ident = {k: with_defaults(have).get(k) for k in IDENTITY_KEYS if k != "decode_device"}
    check_identity(path, have, {**ident, "decode_device": "cpu"})  # made on the CPU: resumes
    with pytest.raises(CacheError, match="decode_device: cache has 'cpu', request has 'cuda'"):
        check_identity(path, have, {**ident, "decode_device": "cuda"})
    spec = FeatureSpec.from_attrs({**have, "decode_device": "cuda"})
    assert spec.decode_device == "cuda" and FeatureSpec.from_attrs(have).decode_device == "cpu"
    assert spec.featurize_options()["decode_device"] == "cuda"  # predict and finetune decode where it was made
    assert "decode_device" in IDENTITY_KEYS


# ---------------------------------------------------------------- finetune and the loop (items 7, 14, 15)

def test_finetune_puts_the_trunks_weights_in_channels_last_too():
    from featseq.sequence import models as M
    from featseq.sequence.finetune import CNNSequence

    backbone = bb.create_backbone("resnet18", "none", 0)
    head = M.create_model("mlp", 512, 2, hidden=8)
    conv = backbone.trunk.conv1.weight
    assert not conv.is_contiguous(memory_format=torch.channels_last)
    model = CNNSequence(backbone, head, channels_last=True)
    assert model.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    plain = CNNSequence(bb.create_backbone("resnet18", "none", 0), head, channels_last=False)
    assert not plain.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_resuming_an_fp32_state_into_an_fp16_scaler_starts_a_fresh_scale(tmp_path):
    """precision auto resolved to fp32 where last.pt was written (a disabled scaler's empty state) and to fp16 where it
    resumes: loading {} into an enabled GradScaler raised RuntimeError."""
    from featseq.featurize.cache import read_cache
    from featseq.sequence import models as M
    from featseq.sequence.loop import Amp, FeatureInputs, FitOptions, fit
    from featseq.sequence.reader import ReaderConfig, build
    from featseq.sequence.splits import Fold

    seqs = build(read_cache(write_fake_cache(tmp_path / "c.h5", ["a", "b"] * 6, dim=8), dtype=np.float32),
                 ReaderConfig(seq_len=4))
    fold = Fold("f", np.arange(8), np.arange(8, 10), np.arange(10, 12))
    saved = {}

    def run(epochs, amp, resume=None):
        torch.manual_seed(0)
        model = M.create_model("mlp", 8, 2, hidden=8, dropout=0.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return fit(model, FeatureInputs.of(seqs), seqs, fold, opt, FitOptions(epochs=epochs, batch_size=4, patience=5),
                   torch.device("cpu"), amp=amp, resume=resume, on_epoch=saved.update)

    run(1, Amp(torch.device("cpu")))
    assert saved["scaler"] == {}
    fp16 = Amp(torch.device("cpu"))
    fp16.scaler = torch.amp.GradScaler("cpu", enabled=True)  # what an fp16 CUDA run builds
    res = run(2, fp16, resume=dict(saved))
    assert [h["epoch"] for h in res.history] == [1, 2] and fp16.scaler.get_scale() > 0


def test_finetune_frames_take_decode_workers_and_augment_off_the_training_thread(tmp_path, monkeypatch):
    import threading

    from featseq.sequence import frames as F

    class FakeFrames:
        data = types.SimpleNamespace(rows=torch.zeros((4, 2), dtype=torch.long))
        pin = False

        def batch(self, b, table):
            return torch.zeros((len(b), 2, 8, 8, 3), dtype=torch.uint8), torch.ones((len(b), 2), dtype=torch.bool)

    where = []
    monkeypatch.setattr(F, "augment_clip", lambda c, g: where.append(threading.current_thread()) or c)
    batches = list(F.FrameInputs(FakeFrames(), 2, augment=True).batches([np.arange(2), np.arange(2, 4)], train=True,
                                                                       seed=(0, 1)))
    assert len(batches) == 2 and len(where) == 4
    assert threading.main_thread() not in where  # augmentation overlaps the step, in the prefetch thread


def test_finetune_decodes_with_several_workers_for_a_gpu(gpus, monkeypatch):
    from featseq.featurize.spec import FeatureSpec
    from featseq.sequence.frames import Frames

    monkeypatch.setattr("featseq.common.cpus.available_cpus", lambda *a, **k: 16)
    spec = FeatureSpec("resnet18", "none-seed0", "", "", 0, 32, "squash", 6.0, "fp32", 512, (), (), "pyav")
    cache = types.SimpleNamespace(attrs={})
    assert Frames(cache, None, spec, 60.0, torch.device("cpu")).workers == 1  # the CPU's CNN: as before
    assert Frames(cache, None, spec, 60.0, torch.device("cpu"), workers=3).workers == 3  # --decode-workers
    gpus(1)
    gpu = Frames(cache, None, spec, 60.0, torch.device("cuda", 0))
    assert gpu.workers == 15 and gpu.pin and gpu.decode_device == "cpu"  # was one CPU worker for a GPU


# ---------------------------------------------------------------- the featurize parent's host work (item 13)

def test_a_batch_submitted_in_parts_equals_one_array():
    emb = bb.Embedder(bb.create_backbone("resnet18", "none", 0), torch.device("cpu"), "fp32")
    rng = np.random.default_rng(2)
    parts = [rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8) for n in (3, 1, 4)]
    assert np.array_equal(emb.result(emb.submit(parts)), emb(np.concatenate(parts)))


def test_the_parent_uses_one_torch_thread_while_a_gpu_runs_the_cnn():
    from featseq.featurize.pipeline import host_threads

    torch.set_num_threads(2)
    with host_threads(torch.device("cuda")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with host_threads(torch.device("cpu")):  # the CPU's CNN keeps its threads
        assert torch.get_num_threads() == 2


def test_slurm_shards_run_locally_split_the_machines_cpus(monkeypatch, tmp_path):
    from featseq.featurize.slurm import local_decode_workers
    from helpers import featurize_cfg

    monkeypatch.setattr("featseq.common.cpus.available_cpus", lambda *a, **k: 32)
    cfg = featurize_cfg(tmp_path, tmp_path / "x.h5")
    assert local_decode_workers(cfg, 4) == 2  # the CPU's CNN: min(2, 32 // 4)
    gpu = featurize_cfg(tmp_path, tmp_path / "x.h5", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert local_decode_workers(gpu, 4) == 7  # was 31 in each of the 4 processes
