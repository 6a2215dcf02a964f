"""--pool (avg, max, GeM p=3) for torchvision and timm CNNs and --crops (5/10 averaged crops, as FiveCrop/TenCrop):
the features are what they claim, both are in the cache identity, and caches from before read as the defaults."""
import h5py
import numpy as np
import pytest
import torch

from helpers import featurize_cfg
from featseq.common.errors import UserError
from featseq.featurize.backbones import create_backbone
from featseq.featurize.cache import CacheError, read_cache
from featseq.featurize.pipeline import featurize
from featseq.featurize.geometry import decode_size
from featseq.featurize.pooling import GEM_P, crop_boxes
from featseq.featurize.spec import FeatureSpec, featurize_command


def _x(n=2, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _pooled_and_map(name, pool, feature_module):
    bone = create_backbone(name, "none", 0, pool=pool)
    maps = []
    module = dict(bone.trunk.named_modules())[feature_module]
    module.register_forward_hook(lambda m, i, o: maps.append(o))
    return bone.trunk(_x()).flatten(1), maps[0]


@pytest.mark.parametrize("name,feature_module", [("resnet18", "layer4"), ("timm:resnet18", "model.layer4")])
def test_cnn_pooling_is_avg_max_or_gem_of_the_last_feature_map(name, feature_module):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    for pool, want in (("avg", lambda m: m.mean((2, 3))), ("max", lambda m: m.amax((2, 3))),
                       ("gem", lambda m: m.clamp(min=1e-6).pow(GEM_P).mean((2, 3)).pow(1 / GEM_P))):
        module = feature_module if pool == "gem" or not name.startswith("timm:") else feature_module[6:]
        got, fmap = _pooled_and_map(name, pool, module)
        assert got.shape == (2, 512)
        torch.testing.assert_close(got, want(fmap), rtol=1e-4, atol=1e-5)
    default, _ = _pooled_and_map(name, "default", feature_module[6:] if name.startswith("timm:") else feature_module)
    avg, _ = _pooled_and_map(name, "avg", feature_module[6:] if name.startswith("timm:") else feature_module)
    torch.testing.assert_close(default, avg)  # a CNN's own pooling is the average


def test_a_pool_that_does_not_apply_is_refused_with_the_choices():
    with pytest.raises(UserError, match="vgg16's features come from its fully connected layers"):
        create_backbone("vgg16", "none", 0, pool="max")
    with pytest.raises(UserError, match="--pool token does not apply to resnet18 .a CNN.; choose one of default, avg"):
        create_backbone("resnet18", "none", 0, pool="token")


@pytest.mark.parametrize("crops", [5, 10])
@torch.no_grad()
def test_multi_crop_averages_the_corner_and_centre_crops(crops):
    size = 32
    full = decode_size(size, crops)
    assert full == 37  # 32 / 0.875, as 224 of 256
    one = create_backbone("resnet18", "none", 0).trunk
    multi = create_backbone("resnet18", "none", 0, crops=crops, size=size).trunk
    x = _x(2, full)
    views = [x[:, :, t:t + size, l:l + size] for t, l in crop_boxes(full, size)]
    assert crop_boxes(full, size) == [(0, 0), (0, 5), (5, 0), (5, 5), (2, 2)]
    if crops == 10:
        views += [v.flip(-1) for v in views]
    want = torch.stack([one(v) for v in views]).mean(0)
    torch.testing.assert_close(multi(x), want, rtol=1e-4, atol=1e-5)


def test_pool_and_crops_are_in_the_identity_and_old_caches_read_as_defaults(synth_data, tmp_path):
    src = synth_data["clips_root"]
    out = tmp_path / "gem5.h5"
    featurize(featurize_cfg(src, out, pool="gem", crops=5, fps=2.0))
    c = read_cache(out)
    assert (c.attrs["pool"], c.attrs["crops"], c.attrs["decode_size"], c.attrs["size"]) == ("gem", 5, 37, 32)
    spec = FeatureSpec.from_attrs(c.attrs)
    assert (spec.pool, spec.crops) == ("gem", 5) and "--pool gem --crops 5" in featurize_command(c.attrs, str(out))
    with pytest.raises(CacheError, match="pool: cache has 'gem', request has 'max'"):
        featurize(featurize_cfg(src, out, pool="max", crops=5, fps=2.0))
    with pytest.raises(CacheError, match="crops: cache has 5, request has 1"):
        featurize(featurize_cfg(src, out, pool="gem", fps=2.0))
    assert featurize(featurize_cfg(src, out, pool="gem", crops=5, fps=2.0)).written == 0  # the same request resumes

    old = tmp_path / "old.h5"  # a cache from before --pool and --crops: it resumes as pool default, one crop
    featurize(featurize_cfg(src, old, fps=2.0))
    with h5py.File(old, "a") as f:
        del f.attrs["pool"], f.attrs["crops"]
        f["segments"].resize((len(f["segments"]) - 1,))
    spec = FeatureSpec.from_attrs(read_cache(old).attrs)
    assert (spec.pool, spec.crops) == ("default", 1)
    assert featurize(featurize_cfg(src, old, fps=2.0)).written == 1
    with pytest.raises(CacheError, match="pool: cache has 'default', request has 'avg'"):
        featurize(featurize_cfg(src, old, pool="avg", fps=2.0))
