"""torchcodec backend (optional): FFmpeg through torchcodec, on the CPU or on CUDA (NVDEC).

Install: ``pip install 'featseq[torchcodec]'`` and FFmpeg's shared libraries, major version 4 to 7, from the
system (e.g. ``apt install ffmpeg``, ``conda install ffmpeg``); torchcodec loads them at import and fails without.
Frames are read with ``get_frames_at`` in exact seek mode (indices in presentation order, the frame table's order)
and scaled with torch's bilinear interpolation with antialiasing, on the decode device; only the small frames
are copied back to host memory, so the worker process boundary costs 150 KB a frame at 224 px, not an HD frame.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..decoder import DecodeError, Decoder

FIX = ("install torchcodec with `pip install 'featseq[torchcodec]'` and FFmpeg's shared libraries (major version 4 "
       "to 7) from the system, e.g. `apt install ffmpeg` or `conda install -c conda-forge 'ffmpeg<8'`; or use "
       "--decoder pyav")


class TorchCodecDecoder(Decoder):
    name = "torchcodec"

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        try:
            from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads FFmpeg's libraries)
        except ImportError:
            return f"--decoder torchcodec: torchcodec is not installed; {FIX}"
        except (RuntimeError, OSError) as e:  # torchcodec found no usable FFmpeg
            return f"--decoder torchcodec: torchcodec cannot load FFmpeg ({str(e).strip().splitlines()[0][:200]}); {FIX}"
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return "--decode-device cuda: no CUDA device is visible; use --decode-device cpu"
        return None

    def _open(self) -> None:
        import torch
        from torchcodec.decoders import VideoDecoder

        self._torch = torch
        self._dev = torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else torch.device("cpu")
        self._dec = VideoDecoder(self.path, seek_mode="exact", num_ffmpeg_threads=1, device=str(self._dev),
                                 dimension_order="NCHW")
        n = self._dec.metadata.num_frames
        if n is not None and n < len(self.frame_starts):
            raise DecodeError(f"{self.path}: torchcodec sees {n} frames, the container lists {len(self.frame_starts)}")

    def _chunks(self, indices: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
        torch = self._torch
        w, h = self.out_dims
        for a in range(0, len(indices), chunk):
            part = indices[a:a + chunk]
            uniq, inverse = np.unique(part, return_inverse=True)
            x = self._dec.get_frames_at(indices=uniq.tolist()).data  # (k, 3, H, W) uint8 on the decode device
            if x.shape[-2:] != (h, w):
                x = torch.nn.functional.interpolate(x.float(), size=(h, w), mode="bilinear", antialias=True,
                                                    align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
            x = x[torch.as_tensor(inverse, device=x.device)].permute(0, 2, 3, 1).contiguous()
            yield x.cpu().numpy()

    def close(self) -> None:
        self._dec = None


DECODER = TorchCodecDecoder
