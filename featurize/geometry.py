"""The geometry of preprocessing, pure arithmetic importing nothing heavy (the command line and the cache readers use
it): a frame is resized to ``resize_size`` by the resize policy, with an interpolation, then centre-cropped to
``size`` (or, with --crops 5/10, to the square the crops are cut from). Used by the decoders (what they output), by
featurize.preprocessing (the defaults each model family gets) and by featurize.spec (what a cache that records no
resize_size was made with)."""
from __future__ import annotations

from .decoders import RESIZE_POLICIES

CROP_FRACTION = 0.875  # crop size / decode size of multi-crop (224 of 256, as torchvision's recipes)


def parse_resize_size(text: str, policy: str) -> tuple[int, ...]:
    """``--resize-size``: 'N' (the shorter side with --resize crop; N x N with squash) or 'HxW' (exactly, squash
    only) -> (N,) or (H, W); ValueError naming the flag otherwise."""
    parts = str(text).lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or len(dims) > 2 or min(dims) < 1:
        raise ValueError(f"--resize-size must be N or HxW in pixels (e.g. 256 or 128x171), got {text!r}")
    if len(dims) == 2 and policy == "crop" and dims[0] != dims[1]:
        raise ValueError(f"--resize-size {text}: HxW resizes to exactly that, which --resize crop (the shorter side "
                         f"to N, keeping the aspect ratio) cannot do; give N, or use --resize squash")
    return dims


def resize_dims(width: int, height: int, resize_size: str, policy: str) -> tuple[int, int]:
    """(width, height) a ``width`` x ``height`` frame is resized to before the centre crop.

    squash: to N x N, or H x W (aspect ratio not kept, nothing cut off before the crop).
    crop:   the shorter side to N keeping the aspect ratio.
    """
    dims = parse_resize_size(resize_size, policy)
    if policy == "squash":
        return (dims[-1], dims[0])
    if policy == "crop":
        n = dims[0]
        if width <= height:
            return n, max(n, int(round(height * n / width)))
        return max(n, int(round(width * n / height))), n
    raise ValueError(f"unknown resize policy {policy!r}; choose one of {', '.join(RESIZE_POLICIES)}")


def default_resize_size(size: int, policy: str) -> str:
    """The --resize-size that resizes to ``size`` itself (nothing cut but what --resize crop cuts)."""
    return f"{size}x{size}" if policy == "squash" else str(size)


def decode_size(size: int, crops: int) -> int:
    """The side multi-crop frames were decoded at before resize_size was recorded, and the default with --crops 5 /
    10: ``size`` for one crop, size / CROP_FRACTION (rounded; 256 for 224) for 5 or 10."""
    return size if crops == 1 else int(round(size / CROP_FRACTION))


def legacy_resize_size(size: int, policy: str, crops: int) -> str:
    """What a cache that records no resize_size was resized to: ``size`` (multi-crop: :func:`decode_size`)."""
    return default_resize_size(decode_size(size, crops), policy)


def decode_side(size: int, crops: int, resize_size: str, policy: str) -> int:
    """The side of the square frames the decoder hands over: ``size`` itself for one crop; with --crops 5 / 10 the
    shorter side of the resized frame, which the backbone cuts the crops from (featurize.pooling.MultiCrop)."""
    return size if crops == 1 else min(parse_resize_size(resize_size, policy))
