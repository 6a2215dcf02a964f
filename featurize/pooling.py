"""How a frame's feature map becomes one vector, and multi-crop features.

``--pool``: default (the model's own: global average for CNNs, timm's ``global_pool`` for timm models), avg, max,
gem (generalised mean, p = 3 fixed, of the last feature map) for CNNs; token (class token), avg (mean of patch
tokens), max or map (attention pooling, where the model has it) for ViTs. ``--crops`` 5 or 10: frames are decoded
at --resize-size (default size / 0.875: 256 px for 224; featurize/geometry.py) and cut into the four corners and the
centre at size (10: those and their mirror images), as torchvision's FiveCrop / TenCrop; the features of the crops are averaged. Both are in the cache identity.
"""
from __future__ import annotations

import torch
from torch import nn

from featseq.common.errors import UserError

from .choices import CNN_POOLS, CROPS

GEM_P = 3.0


class SpatialPool(nn.Module):
    """(N, C, H, W) -> (N, C, 1, 1): average, maximum or generalised mean (p = GEM_P, values clamped at 1e-6)."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in ("avg", "max", "gem"):
            raise ValueError(kind)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "avg":
            return x.mean((2, 3), keepdim=True)
        if self.kind == "max":
            return x.amax((2, 3), keepdim=True)
        return x.float().clamp(min=1e-6).pow(GEM_P).mean((2, 3), keepdim=True).pow(1.0 / GEM_P).to(x.dtype)


class FeatureMapPool(nn.Module):
    """A model's last feature map (``forward_features``) pooled by :class:`SpatialPool`, flattened."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.pool = model, SpatialPool(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.model.forward_features(x)).flatten(1)


def crop_boxes(full: int, size: int) -> list[tuple[int, int]]:
    """(top, left) of the five crops of ``size`` in a ``full`` x ``full`` frame: four corners, then the centre."""
    c, e = (full - size) // 2, full - size
    return [(0, 0), (0, e), (e, 0), (e, e), (c, c)]


class MultiCrop(nn.Module):
    """(N, 3, F, F) -> the mean of ``trunk`` over the 5 (or 10, with mirrors) crops of ``size``."""

    def __init__(self, trunk: nn.Module, size: int, crops: int):
        super().__init__()
        self.trunk, self.size, self.crops = trunk, size, crops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.size
        if min(x.shape[-2:]) < s:
            raise ValueError(f"multi-crop: frames of {tuple(x.shape[-2:])} px are smaller than the {s} px crops "
                             f"(decode them at featurize.geometry.decode_side)")
        views = [x[:, :, t:t + s, l:l + s] for t, l in crop_boxes(x.shape[-1], s)]
        if self.crops == 10:
            views += [v.flip(-1) for v in views]
        y = self.trunk(torch.cat(views).contiguous(memory_format=torch.channels_last))
        return y.flatten(1).view(len(views), x.shape[0], -1).mean(0)


def check_choice(backbone: str, pool: str, crops: int, allowed: tuple[str, ...], family: str) -> None:
    if pool not in allowed:
        raise UserError(f"--pool {pool} does not apply to {backbone} ({family}); choose one of {', '.join(allowed)}")
    if crops not in CROPS:
        raise UserError(f"--crops must be one of {', '.join(map(str, CROPS))}, got {crops}")


def pool_torchvision(model: nn.Module, backbone: str, pool_module: str, pool: str) -> None:
    """Replace a torchvision CNN's global average pool (``pool_module``) by the ``pool`` asked for."""
    if pool in ("default", "avg"):
        check_choice(backbone, pool, 1, CNN_POOLS, "a CNN")
        return
    if not pool_module:
        raise UserError(f"--pool {pool}: {backbone}'s features come from its fully connected layers, not a pooled "
                        f"feature map; use --pool default with it, or a CNN such as resnet18")
    check_choice(backbone, pool, 1, CNN_POOLS, "a CNN")
    owner = model
    *parents, last = pool_module.split(".")
    for p in parents:
        owner = getattr(owner, p)
    setattr(owner, last, SpatialPool(pool))
