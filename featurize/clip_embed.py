"""Embedding clips (featurize/clips.py): the frames of a segment, decoded as for a frame backbone, cut into clips
of ``clip_frames`` every ``clip_stride`` frames, normalised with the clip model's mean/std and embedded."""
from __future__ import annotations

import numpy as np
import torch

from .backbones import DTYPES, Backbone, cuda_math
from .clips import windows

# clips per forward pass on the CPU (a few: their activations are frames x pixels)
CLIPS_PER_CALL = 4


class ClipEmbedder:
    """Frozen inference of a clip backbone: uint8 clips (m, T, S, S, 3) -> float32 embeddings (m, D)."""

    def __init__(self, backbone: Backbone, device: torch.device, precision: str):
        self.backbone, self.device, self.precision = backbone, device, precision
        cuda_math(precision, device)  # fp32 on CUDA without TF32, as the frame Embedder
        self.model = backbone.trunk.to(device).eval()
        self.mean = torch.tensor(backbone.entry.mean, device=device).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(backbone.entry.std, device=device).view(1, 3, 1, 1, 1)

    @torch.inference_mode()
    def __call__(self, clips: np.ndarray) -> np.ndarray:
        out = []
        for a in range(0, len(clips), CLIPS_PER_CALL):
            x = torch.as_tensor(clips[a:a + CLIPS_PER_CALL]).to(self.device)
            x = (x.permute(0, 4, 1, 2, 3).float().div_(255.0) - self.mean) / self.std  # (m, 3, T, S, S)
            with torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32"):
                out.append(self.model(x).float().flatten(1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.backbone.entry.feature_dim), np.float32)

    def clips_of(self, frames: np.ndarray, times: np.ndarray, clip_frames: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
        """(features (m, D), the clips' centre times (m,)) of a segment's sampled ``frames`` at ``times``."""
        spans = windows(len(frames), clip_frames, stride)
        if not spans:
            return np.zeros((0, self.backbone.entry.feature_dim), np.float32), np.zeros(0)
        idx = np.array([np.minimum(np.arange(a, a + clip_frames), b - 1) for a, b in spans])  # short: last repeated
        centres = np.array([(times[a] + times[b - 1]) / 2.0 for a, b in spans])
        return self(frames[idx]), centres

    def finish(self, st: dict, clip_frames: int, stride: int) -> None:
        """Replace a decoded segment's pending state (pipeline._stream: frames, ts, n) by its clips' features."""
        frames = np.concatenate(st["frames"]) if st["frames"] else np.zeros((0,), np.uint8)
        times = np.concatenate(st["ts"]) if st["ts"] else np.zeros(0)
        feats, centres = self.clips_of(frames, times, clip_frames, stride)
        st.update(feats=[feats], ts=[centres], n=len(feats), frames=[])
