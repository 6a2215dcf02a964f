"""The preprocessing each backbone family gets unless told otherwise: input size, resize, what frames are resized to
before the centre crop (``resize_size``) and the interpolation, all recorded in the cache's identity.

- torchvision 2D CNNs (resnet18, ...): the whole frame resized to --size (224), bilinear; nothing cut off but what
  --resize crop cuts (featseq's own, as before: not torchvision's 256-then-224 ImageNet crop).
- timm models (``timm:<name>``): their pretrained configuration's interpolation (bicubic for most ViTs, DINOv2, CLIP,
  SigLIP, EVA) and crop_pct: frames resized to floor(size / crop_pct) by --resize, then the centre size x size kept,
  as timm's eval transform (--resize crop: exactly timm's default crop_mode 'center'; squash: its 'squash' mode).
- clip backbones (r3d_18, ...): their Kinetics weights' transforms (``weights.transforms()``): resize to
  resize_size (128 x 171 exactly, or the shorter side to 256), centre crop, their interpolation. An explicit --size or
  --resize replaces that recipe by featseq's own (the frame resized to --size by --resize).
- --crops 5 / 10: frames resized to size / 0.875 (256 for 224), the crops cut from it (featurize/pooling.py).
--resize-size and --interpolation override any of these; --interpolation default is the model's own.
"""
from __future__ import annotations

import math
from dataclasses import replace

from featseq.common.errors import UserError

from .decoders import INTERPOLATIONS
from .geometry import decode_size, default_resize_size, legacy_resize_size, parse_resize_size

DEFAULT_POLICY = "squash"


def model_preprocessing(backbone: str) -> dict:
    """The model's own preprocessing: size, interpolation, crop_pct (frame backbones) or recipe (clip backbones:
    (policy, resize_size) of its weights' transforms). ValueError for an unknown backbone, as create_backbone."""
    if backbone.startswith("timm:"):
        from .timm_models import own_preprocessing, pretrained_cfg

        return {**own_preprocessing(pretrained_cfg(backbone[5:])), "recipe": None}
    from .clips import clip_preprocessing, is_clip

    if is_clip(backbone):
        pre = clip_preprocessing(backbone)
        rs = pre["resize_size"]
        recipe = ("crop", str(rs[0])) if len(rs) == 1 else ("squash", "x".join(map(str, rs)))
        return {"size": pre["size"], "crop_pct": 1.0, "interpolation": pre["interpolation"], "recipe": recipe}
    from .backbones import own_size

    return {"size": own_size(backbone), "crop_pct": 1.0, "interpolation": "bilinear", "recipe": None}


def resolve(cfg):
    """``cfg`` (a FeaturizeConfig) with size, resize, resize_size and interpolation made concrete from the model's own
    preprocessing where they were left to it; UserError naming the flag for a combination that cannot work."""
    own = model_preprocessing(cfg.backbone)
    interpolation = cfg.interpolation
    if interpolation == "default":
        interpolation = own["interpolation"] if own["interpolation"] in INTERPOLATIONS else "bilinear"
    if own["recipe"] and cfg.size is None and cfg.resize is None and cfg.resize_size is None:
        policy, resize_size = own["recipe"]
        size = own["size"]
    else:
        size = cfg.size or own["size"]
        policy = cfg.resize or DEFAULT_POLICY
        resize_size = cfg.resize_size
        if resize_size is None:
            side = decode_size(size, cfg.crops) if cfg.crops != 1 else math.floor(size / own["crop_pct"])
            resize_size = default_resize_size(max(side, size), policy)
    try:
        dims = parse_resize_size(resize_size, policy)
    except ValueError as e:
        raise UserError(str(e)) from None
    if min(dims) < size:
        raise UserError(f"--resize-size {resize_size}: frames resized to it are smaller than their {size} px centre "
                        f"crop (--size); give a resize size of at least {size}")
    if cfg.crops != 1 and min(dims) == size:
        raise UserError(f"--resize-size {resize_size} with --crops {cfg.crops}: the {cfg.crops} crops of {size} px "
                        f"would all be the whole frame; give a larger resize size (default {decode_size(size, 5)})")
    canonical = "x".join(map(str, dims)) if policy == "squash" and len(dims) == 2 else default_resize_size(dims[0], policy)
    return replace(cfg, size=size, resize=policy, resize_size=canonical, interpolation=interpolation)


def older_cache_note(cfg, target: str, path_of) -> str | None:
    """A note when ``target`` (the default cache path of resolved ``cfg``) is new but the default path that featseq
    gave the same command before it applied the model's own preprocessing holds a cache: that cache was resized
    bilinearly to its size, so it is another identity; the note names it and the flags that resume it.
    ``path_of(cfg)``: the default cache path of a config."""
    import os

    legacy = replace(cfg, interpolation="bilinear", resize_size=legacy_resize_size(cfg.size, cfg.resize, cfg.crops))
    old = path_of(legacy)
    if old == target or os.path.exists(target) or not os.path.exists(old):
        return None
    return (f"note: {old} was made by this command before featseq applied the model's own preprocessing (bilinear, "
            f"resized to {legacy.resize_size}); this run starts a new cache, {target}. To resume the older one "
            f"instead, add --interpolation bilinear --resize-size {legacy.resize_size}")
