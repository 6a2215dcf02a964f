"""Foundation image models through timm (issue 28 item 2): DINOv2, SigLIP, CLIP ViTs and EVA, random init. Each gets
its own preprocessing from its pretrained configuration (mean/std, input size), its feature dimension, and the same
features for the same frames; a ViT at another size runs (dynamic_img_size) or is refused before any cache exists."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

timm = pytest.importorskip("timm")

from featseq.cli import main  # noqa: E402
from featseq.featurize.backbones import Embedder, create_backbone, own_size  # noqa: E402
from featseq.featurize.cache import summary  # noqa: E402

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# name, test size (a multiple of the patch, small: fast), own size, feature dim, mean, std
FAMILIES = {
    "dinov2": ("vit_small_patch14_dinov2", 56, 518, 384, *IMAGENET),
    "siglip": ("vit_base_patch16_siglip_224", 64, 224, 768, (0.5,) * 3, (0.5,) * 3),
    "clip": ("vit_base_patch32_clip_224", 64, 224, 768, CLIP_MEAN, CLIP_STD),
    "eva": ("eva02_tiny_patch14_224", 56, 224, 192, CLIP_MEAN, CLIP_STD),
}


def _frames(size, n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# SigLIP and CLIP have no variant smaller than base (86 M parameters): their random init alone takes seconds
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in ("siglip", "clip") else f
                                    for f in sorted(FAMILIES)])
def test_foundation_family_preprocessing_dimension_determinism(family):
    name, size, own, dim, mean, std = FAMILIES[family]
    assert own_size(f"timm:{name}") == own  # --size defaults to it
    bone = create_backbone(f"timm:{name}", "none", 0, size=size)
    assert bone.entry.size == own and bone.entry.feature_dim == dim and bone.entry.interpolation == "bicubic"
    np.testing.assert_allclose(bone.entry.mean, mean) and np.testing.assert_allclose(bone.entry.std, std)
    seen = []
    embed = Embedder(bone, torch.device("cpu"), "fp32")
    embed.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    frames = _frames(size)
    a, b = embed(frames), embed(frames)
    assert a.shape == (3, dim) and np.isfinite(a).all()
    x = seen[0]  # what the model was given: the frames at the test size, normalised with the model's own mean/std
    assert tuple(x.shape) == (3, 3, size, size)
    want = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a, b)  # the same frames, the same features
    assert not np.allclose(a[0], a[1])  # and different frames, different ones


def test_same_seed_same_features_other_seed_others():
    name = "timm:eva02_tiny_patch14_224"
    f = _frames(56, 2)
    runs = [Embedder(create_backbone(name, "none", s, size=56), torch.device("cpu"), "fp32")(f) for s in (0, 0, 1)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])


def test_vit_token_choice_changes_the_feature():
    """--pool token (class token) and avg (mean of patch tokens) are two different features of one model."""
    f = _frames(56, 2)
    tok, avg = (Embedder(create_backbone("timm:eva02_tiny_patch14_224", "none", 0, pool=p, size=56),
                         torch.device("cpu"), "fp32")(f) for p in ("token", "avg"))
    assert tok.shape == avg.shape == (2, 192) and not np.allclose(tok, avg)
    with pytest.raises(Exception, match="--pool gem does not apply to timm:eva02_tiny_patch14_224 .a ViT"):
        create_backbone("timm:eva02_tiny_patch14_224", "none", 0, pool="gem", size=56)


def test_dinov2_featurizes_at_another_size_and_a_bad_size_is_refused_before_any_cache(synth_data, tmp_path):
    """The issue's crash (DINOv2 built for 518 px, given 224): at another --size it now runs; a size that is not a
    multiple of its 14 px patch is refused with the fix, and no cache file is left behind."""
    src = synth_data["clips_root"]
    bad = tmp_path / "bad.h5"
    r = CliRunner().invoke(main, ["featurize", src, "--backbone", "timm:vit_small_patch14_dinov2", "--weights", "none",
                                  "--size", "50", "--fps", "1", "--device", "cpu", "--out", str(bad), "-q"])
    assert r.exit_code != 0 and "multiple of 14" in str(r.output) + str(r.exception) and not bad.exists()
    out = tmp_path / "dino.h5"
    r = CliRunner().invoke(main, ["featurize", src, "--backbone", "timm:vit_small_patch14_dinov2", "--weights", "none",
                                  "--size", "42", "--fps", "0.5", "--device", "cpu", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    a = summary(str(out))["attrs"]
    assert a["size"] == 42 and a["feature_dim"] == 384 and a["model_interpolation"] == "bicubic"
    np.testing.assert_allclose(a["mean"], IMAGENET[0])
