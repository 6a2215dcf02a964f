"""Backbone families (README "Backbones"): feature dimension, input and CPU speed of one embedding with --weights
none (random init), at each model's own input size and clip length, on random uint8 frames through featurize's own
Embedder / ClipEmbedder (fp32; decoding not included).

    PYTHONPATH=<folder with featseq> .venv/bin/python bench/backbones_bench.py [NAME ...]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import save  # noqa: E402
from featseq.featurize import backbones as bb  # noqa: E402
from featseq.featurize.clip_embed import ClipEmbedder  # noqa: E402
from featseq.featurize.clips import clip_settings  # noqa: E402

NAMES = ["resnet18", "resnet50", "efficientnet_b0", "timm:vit_small_patch14_dinov2", "timm:vit_base_patch16_siglip_224",
         "timm:vit_base_patch16_clip_224", "timm:eva02_tiny_patch14_224", "r3d_18", "r2plus1d_18", "s3d", "mvit_v2_s",
         "swin3d_t"]


def measure(name: str, frames: int = 8, clips: int = 2) -> dict:
    bone = bb.create_backbone(name, "none", 0)
    size, (t, _) = bone.entry.size, clip_settings(name, None, None)
    rng = np.random.default_rng(0)
    cpu = torch.device("cpu")
    if t:
        emb, x = ClipEmbedder(bone, cpu, "fp32"), rng.integers(0, 256, (clips, t, size, size, 3), dtype=np.uint8)
        emb(x[:1])
    else:
        emb, x = bb.Embedder(bone, cpu, "fp32"), rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
        emb(x[:2])
    t0 = time.perf_counter()
    out = emb(x)
    dt = time.perf_counter() - t0
    row = {"backbone": name, "feature_dim": int(out.shape[1]), "size": size, "clip_frames": t,
           "mean": list(bone.entry.mean), "std": list(bone.entry.std), "seconds": dt}
    row["clips_per_s" if t else "frames_per_s"] = len(x) / dt
    return row


def clip_note(r: dict) -> str:
    return f" x {r['clip_frames']} frames" if r["clip_frames"] else ""


def main(names: list[str]) -> None:
    rows = []
    for n in names:
        rows.append(measure(n))
        r = rows[-1]
        rate = f"{r['clips_per_s']:.2f} clips/s" if r["clip_frames"] else f"{r['frames_per_s']:.1f} frames/s"
        print(f"{n}: {r['feature_dim']}-dim, {r['size']} px{clip_note(r)}, {rate}",
              flush=True)
    save("backbones", {"description": __doc__.strip().splitlines()[0], "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main(sys.argv[1:] or NAMES)
