"""Peak |activation| of random-init backbones (featseq's seed 0) in fp32 on the CPU: whether fp16 (max 65504) can hold
them, the reason featurize's CUDA default is bf16 (README "On GPUs").

    .venv/bin/python bench/activation_peaks.py resnet50 resnet101 resnet152
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from featseq.featurize import backbones as bb  # noqa: E402

FP16_MAX = 65504.0


def peak(name: str, frames: np.ndarray) -> tuple[float, float]:
    """(largest |output| of any leaf module, largest |feature|) for two random frames through ``name``'s trunk."""
    b = bb.create_backbone(name, "none", 0)
    top = [0.0]
    for m in b.trunk.modules():
        if not list(m.children()):
            m.register_forward_hook(lambda m, i, o: top.__setitem__(0, max(top[0], float(o.abs().max()))))
    with torch.inference_mode():
        feats = b.trunk(bb.preprocess(frames, b.entry, torch.device("cpu"), False))
    return top[0], float(feats.abs().max())


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    frames = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
    for name in names or ["resnet50", "resnet101", "resnet152"]:
        act, feat = peak(name, frames)
        print(f"{name}: peak activation {act:.3g}, feature peak {feat:.3g}, beyond fp16's range: {act > FP16_MAX}")


if __name__ == "__main__":
    main(sys.argv[1:])
