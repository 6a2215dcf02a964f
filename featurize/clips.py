"""Clip (3D) backbones: torchvision's r3d_18, mc3_18, r2plus1d_18, s3d, mvit_v2_s, swin3d_t (Kinetics-400).

One embedding per clip of T frames (``--clip-frames``, default the model's own clip length), one clip every
``--clip-stride`` sampled frames (default T), the frames sampled at ``--fps`` from the segment's range as for frame
backbones. A clip cache keeps the cache contract: one row per clip, its timestamp the clip's centre (the mean of the
times of its first and last frame), and its ``fps`` attribute the rate of rows, clips per second (--fps / stride), so
train, sweep, compare and predict read it unchanged; ``frame_fps``, ``clip_frames`` and ``clip_stride`` say how it
was sampled. A segment shorter than one clip gets one clip, its last frame repeated. Preprocessing (mean/std, the
resize and its interpolation, the centre crop: 128 x 171 then 112 for r3d_18, mc3_18, r2plus1d_18; 256 x 256 then 224
for s3d; the shorter side to 256 then 224 for mvit_v2_s and swin3d_t) comes from the weights' transforms
(featurize/preprocessing.py); --weights imagenet downloads the Kinetics-400 weights.
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from .weightfiles import download_error, load_into, load_state_dict_file, sha256_file

# name -> (feature dim, the head replaced by Identity)
CLIP_MODELS = {"r3d_18": (512, "fc"), "mc3_18": (512, "fc"), "r2plus1d_18": (512, "fc"), "s3d": (1024, "classifier.1"),
               "mvit_v2_s": (768, "head.1"), "swin3d_t": (768, "head")}


def is_clip(name: str) -> bool:
    return name in CLIP_MODELS


def clip_preprocessing(name: str) -> dict:
    """size (the crop of the weights' transforms), resize_size (what they resize to first: [H, W] exactly, or [N]
    the shorter side), interpolation, mean, std and the clip length of ``name``'s Kinetics weights."""
    import torchvision

    w = torchvision.models.get_model_weights(name).DEFAULT
    t = w.transforms()
    m = re.search(r"clip_len=(\d+)", w.meta.get("_docs", ""))
    return {"size": int(t.crop_size[0]), "resize_size": [int(x) for x in t.resize_size],
            "interpolation": str(t.interpolation.value), "mean": tuple(t.mean), "std": tuple(t.std),
            "frames": int(m.group(1)) if m else 16, "min_frames": int(w.meta.get("min_temporal_size") or 1)}


def create(name: str, weights: str) -> tuple[nn.Module, dict, str]:
    """(trunk mapping (N, 3, T, S, S) to (N, D), the entry's fields, weights sha256)."""
    import torchvision

    dim, head = CLIP_MODELS[name]
    pre = clip_preprocessing(name)
    model = torchvision.models.get_model(name, weights=None)
    sha = ""
    if weights == "imagenet":
        w = torchvision.models.get_model_weights(name).DEFAULT
        try:
            model.load_state_dict(w.get_state_dict(progress=False))
        except Exception as e:
            raise download_error(name, w.url, e, "Kinetics-400") from e
        local = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
        sha = sha256_file(local) if os.path.isfile(local) else ""
    elif weights != "none":
        load_into(model, load_state_dict_file(weights), name, head, weights)
        sha = sha256_file(weights)
    parent, _, last = head.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if last.isdigit():
        owner[int(last)] = nn.Identity()
    else:
        setattr(owner, last, nn.Identity())
    stages = tuple(n for n, _ in model.named_children() if n not in (head.split(".")[0], "avgpool"))
    fields = dict(feature_dim=dim, head=head, stages=stages, mean=pre["mean"], std=pre["std"], source="torchvision",
                  size=pre["size"], pool_module="", frames=pre["frames"])
    return model.eval(), fields, sha


def windows(n: int, frames: int, stride: int) -> list[tuple[int, int]]:
    """[a, b) of each clip over ``n`` sampled frames (b - a == frames, or fewer for the one clip of a short segment)."""
    if n == 0:
        return []
    return [(a, a + frames) for a in range(0, n - frames + 1, stride)] or [(0, n)]


def clip_settings(backbone: str, clip_frames: int | None, clip_stride: int | None, keep_frames: bool = False,
                  crops: int = 1, pool: str = "default") -> tuple[int, int]:
    """(T, stride) of a clip backbone's request, (0, 0) for a frame backbone; UserError naming the flag otherwise."""
    from featseq.common.errors import UserError

    if not is_clip(backbone):
        if clip_frames or clip_stride:
            raise UserError(f"--clip-frames/--clip-stride apply to clip backbones ({', '.join(CLIP_MODELS)}), not "
                            f"{backbone}, which embeds single frames")
        return 0, 0
    pre = clip_preprocessing(backbone)
    frames = clip_frames or pre["frames"]
    problems = [why for bad, why in [
        (frames < pre["min_frames"], f"--clip-frames {frames}: {backbone} needs clips of at least {pre['min_frames']}"),
        (backbone == "mvit_v2_s" and frames != 16, "--clip-frames: mvit_v2_s takes clips of exactly 16 frames"),
        (clip_stride is not None and clip_stride < 1, f"--clip-stride must be >= 1, got {clip_stride}"),
        (keep_frames, "--keep-frames keeps the frames finetune trains a frame backbone on; a clip backbone's cache "
                      "holds clips: featurize it without --keep-frames"),
        (crops != 1, "--crops applies to frame backbones"),
        (pool != "default", f"--pool {pool}: a clip backbone's features are its own pooled clip embedding; use "
                            f"--pool default"),
    ] if bad]
    if problems:
        raise UserError(f"--backbone {backbone}: " + "; ".join(problems))
    return frames, clip_stride or frames
