"""The backbone registry's contract, weights files and the decoder's resize policies (featurize.backbones, .decoder)."""
import hashlib

import numpy as np
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import EFFNET_WEIGHTS
from featseq.featurize.backbones import REGISTRY, WeightsError, create_backbone

# small inputs keep every registered model fast on 2 CPU cores (vgg16 included: its classifier sits
# behind an adaptive pool, so the input size does not change its 4096-dim output)
SIZE = 32


def _batch(size=SIZE, seed=0):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _embed(backbone, x):
    return backbone.trunk.eval()(x)


def _check_contract(backbone, name):
    entry = backbone.entry
    assert entry.name == name and backbone.weights == "none" and backbone.weights_sha256 == ""
    out = _embed(backbone, _batch())
    assert tuple(out.shape) == (2, entry.feature_dim), (name, tuple(out.shape))
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    stages = backbone.stage_modules()
    assert len(stages) == len(entry.stages) >= 2
    seen = set()
    for spec, module in zip(entry.stages, stages):
        params = list(module.parameters())
        assert params, f"{name}: stage {spec} has no parameters (--unfreeze would train nothing there)"
        ids = {id(p) for p in params}
        assert not ids & seen, f"{name}: stage {spec} overlaps an earlier stage"
        seen |= ids
    trunk_params = {id(p) for p in backbone.trunk.parameters()}
    assert seen <= trunk_params  # the stages are parts of the trunk itself, not copies


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registered_backbone_contract(name):
    """Every registered torchvision backbone: trunk output (N, feature_dim), finite; every declared stage
    resolves to a distinct, trainable part of the trunk."""
    _check_contract(create_backbone(name, "none", 0), name)


def test_timm_backbone_contract():
    pytest.importorskip("timm")
    _check_contract(create_backbone("timm:efficientnet_lite0", "none", 0), "timm:efficientnet_lite0")


def test_a_misspelt_backbone_gets_a_did_you_mean():
    """issue 24 item 11: an unknown timm: name (and a torchvision one) is refused with the closest known names."""
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet-18'; did you mean resnet18"):
        create_backbone("resnet-18", "none", 0)
    pytest.importorskip("timm")
    with pytest.raises(ValueError) as e:
        create_backbone("timm:efficientnet_lit0", "none", 0)
    assert "unknown timm model 'efficientnet_lit0'; did you mean timm:efficientnet_lite0" in str(e.value), str(e.value)


def test_random_init_is_seeded():
    a, b, c = (create_backbone("resnet18", "none", s) for s in (0, 0, 1))
    x = _batch()
    assert torch.equal(_embed(a, x), _embed(b, x)) and not torch.equal(_embed(a, x), _embed(c, x))


def test_torchvision_weights_file(tmp_path):
    """--weights FILE: a state dict saved from the full torchvision model (classifier included) rebuilds
    exactly that model's trunk; its sha256 is recorded. 'module.' prefixes and a {'state_dict': ...}
    wrapper load the same."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        src = torchvision.models.resnet18(weights=None)
        for m in src.modules():  # non-trivial BatchNorm statistics, so buffers must load too
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    plain, wrapped = tmp_path / "r18.pth", tmp_path / "r18_wrapped.pth"
    torch.save(src.state_dict(), plain)
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, wrapped)
    src.fc = torch.nn.Identity()
    src.eval()
    x = _batch(64)
    with torch.no_grad():
        want = src(x)
    for f in (plain, wrapped):
        b = create_backbone("resnet18", str(f), 0)
        assert b.weights == str(f)
        assert b.weights_sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
        assert torch.equal(_embed(b, x), want)
    assert not torch.allclose(_embed(create_backbone("resnet18", "none", 0), x), want)


@pytest.fixture
def r18_file(tmp_path):
    path = tmp_path / "resnet18_weights.pth"
    torch.save(create_backbone("resnet18", "none", 0).trunk.state_dict(), path)
    return path


def test_bad_weights_files(tmp_path, r18_file):
    with pytest.raises(WeightsError, match="does not fit vgg16") as e:  # other parameter names
        create_backbone("vgg16", str(r18_file), 0)
    assert str(r18_file) in str(e.value) and "missing key" in str(e.value) and "unexpected key" in str(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict" * 10)
    with pytest.raises(WeightsError, match="cannot load it as a PyTorch state dict") as e:
        create_backbone("resnet18", str(junk), 0)
    assert str(junk) in str(e.value)
    with pytest.raises(WeightsError, match="no such file"):
        create_backbone("resnet18", str(tmp_path / "absent.pth"), 0)


def test_weights_file_with_other_shapes(r18_file):
    """resnet18's file into resnet50: the same parameter names, other shapes."""
    with pytest.raises(WeightsError, match="does not fit resnet50") as e:
        create_backbone("resnet50", str(r18_file), 0)
    assert str(r18_file) in str(e.value)


@pytest.mark.skipif(not EFFNET_WEIGHTS.is_file(), reason=f"offline EfficientNet-Lite0 weights not found at {EFFNET_WEIGHTS}")
def test_timm_weights_file(tmp_path):
    """The offline ImageNet weights of timm:efficientnet_lite0: loaded, sha256 recorded (in the Backbone and in
    a cache's attributes), and outputs unlike the random init's."""
    pytest.importorskip("timm")
    from helpers import featurize_cfg
    from featseq.featurize.cache import read_cache
    from featseq.featurize.pipeline import featurize
    from featseq.featurize.synth import render_clip

    sha = hashlib.sha256(EFFNET_WEIGHTS.read_bytes()).hexdigest()
    pre = create_backbone("timm:efficientnet_lite0", str(EFFNET_WEIGHTS), 0)
    rnd = create_backbone("timm:efficientnet_lite0", "none", 0)
    assert pre.weights_sha256 == sha and pre.entry.feature_dim == 1280
    x = _batch(64)
    a, b = _embed(pre, x), _embed(rnd, x)
    assert a.shape == b.shape == (2, 1280) and torch.isfinite(a).all()
    assert (a - b).abs().mean() > 0.1 * b.abs().mean()
    # through featurize --weights FILE: the cache records the file's sha256
    (tmp_path / "src" / "ascending").mkdir(parents=True)
    render_clip(tmp_path / "src" / "ascending" / "v_ascending_g01_c01.mp4", label="ascending", group_index=1,
                clip_index=1, width=32, height=32, video_fps=10, duration=1.0, seed=0)
    res = featurize(featurize_cfg(tmp_path / "src", tmp_path / "e.h5", backbone="timm:efficientnet_lite0",
                                  weights=str(EFFNET_WEIGHTS), fps=2.0))
    cache = read_cache(res.path)
    assert cache.attrs["weights_sha256"] == sha and cache.features.shape == (2, 1280)


# ---------------------------------------------------------------- resize policies at the decoder


@pytest.fixture(scope="module")
def wide_video(tmp_path_factory):
    """A real rendered 128x64 (2:1) video with burned-in frame numbers (16 bands across the top rows)."""
    from featseq.featurize.synth import render_clip

    path = tmp_path_factory.mktemp("wide") / "wide.mp4"
    render_clip(path, label="pingpong", group_index=1, clip_index=1, width=128, height=64, video_fps=10, duration=1.0,
                seed=0, burn_frame_numbers=True)
    return str(path)


def _resize(frames, w, h):
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in frames]).astype(np.float64)


@pytest.mark.parametrize("backend", ["pyav", "decord", "torchcodec"])
def test_resize_crop_keeps_aspect_squash_does_not(wide_video, backend):
    """crop = the centre square of the frame, scaled (aspect kept); squash = the whole frame squeezed to a square,
    with every decoder backend. References are made here from the natively decoded frames (decord directly, PIL resize)."""
    import decord

    from featseq.featurize.decoder import open_decoder, unavailable

    if why := unavailable(backend):
        pytest.skip(why)

    idx = np.array([0, 4, 9])
    native = decord.VideoReader(wide_video).get_batch(idx.tolist()).asnumpy()
    assert native.shape == (3, 64, 128, 3)
    ref_squash = _resize(native, 32, 32)           # whole frame, horizontally squeezed twice as much
    ref_crop = _resize(native[:, :, 32:96], 32, 32)  # centre 64x64 square, scaled uniformly
    got = {}
    for policy in ("squash", "crop"):
        dec = open_decoder(wide_video, size=32, policy=policy, backend=backend)
        try:
            got[policy] = np.concatenate(list(dec.read(idx))).astype(np.float64)
            assert dec.info.width == 128 and dec.info.height == 64
        finally:
            dec.close()
        assert got[policy].shape == (3, 32, 32, 3)

    def err(a, b):
        return float(np.abs(a - b).mean())

    assert err(ref_squash, ref_crop) > 8  # the two policies really show different pixels
    assert err(got["squash"], ref_squash) < 0.3 * err(got["squash"], ref_crop)
    assert err(got["crop"], ref_crop) < 0.3 * err(got["crop"], ref_squash)
    # the burned frame numbers span the full width: squash keeps all 16 bands, so they read back; the crop
    # shows only the middle 8 bands, each twice as wide, so they do not
    from featseq.featurize.synth import read_frame_number

    assert [read_frame_number(f.astype(np.uint8)) for f in got["squash"]] == idx.tolist()
    assert [read_frame_number(f.astype(np.uint8)) for f in got["crop"]] != idx.tolist()


@pytest.mark.parametrize("cpuinfo, native", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n", False),                  # an AVX2 CPU: bf16 emulated
    ("processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512_bf16\n", True),  # AVX512-BF16
    ("flags\t: avx512f amx_tile amx_bf16\n", True),                            # AMX
    ("Features\t: fp asimd bf16 i8mm\n", True),                                # Arm with the BF16 extension
    ("Features\t: fp asimd\n", False),
    ("", False),
])
def test_cpu_bf16_detection_from_cpuinfo(cpuinfo, native):
    from featseq.featurize.precision import cpu_bf16_native

    assert cpu_bf16_native(cpuinfo) is native


def test_featseq_cpu_bf16_overrides_the_detection(monkeypatch):
    """FEATSEQ_CPU_BF16=1/0 says what /proc/cpuinfo would (a VM that hides the flags); unset or other values: read it."""
    from featseq.featurize.precision import cpu_bf16_native

    for value, want in (("1", True), ("0", False)):
        monkeypatch.setenv("FEATSEQ_CPU_BF16", value)
        assert cpu_bf16_native() is want
    monkeypatch.delenv("FEATSEQ_CPU_BF16")
    cpuinfo = Path("/proc/cpuinfo")
    assert cpu_bf16_native() is cpu_bf16_native(cpuinfo.read_text() if cpuinfo.exists() else "")


def test_precision_auto_picks_bf16_on_the_cpu_only_where_native(monkeypatch):
    """auto, featurize's default (None), is bf16 on a CPU that computes it natively and fp32 elsewhere."""
    import featseq.featurize.precision as pm

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(pm, "cpu_bf16_native", lambda cpuinfo=None, native=native: native)
        assert pm.resolve_precision("auto", cpu) == want
        assert pm.resolve_precision(None, cpu) == want and pm.resolve_precision("auto", "cpu") == want
        # on CUDA, auto (and featurize's default) is bf16 from compute capability 8 on, fp16 before (faked here)
        for major, on_cuda in ((8, "bf16"), (7, "fp16")):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, major=major: (major, 0))
            assert pm.resolve_precision("auto", cuda) == on_cuda and pm.resolve_precision(None, "cuda:1") == on_cuda
        assert pm.resolve_precision("bf16", cpu) == "bf16"  # asked for explicitly: kept (featurize warns when emulated)
        assert pm.emulated("bf16", cpu) is not native and not pm.emulated("bf16", cuda)
    with pytest.raises(ValueError, match="--precision"):
        pm.resolve_precision("fp8", cpu)
