"""torchcodec backend (optional): FFmpeg through torchcodec, on the CPU or on CUDA (NVDEC).

Install: ``pip install 'featseq[torchcodec]'`` and FFmpeg's shared libraries, major version 4 to 8, from the
system (e.g. ``apt install ffmpeg``, ``conda install ffmpeg``); torchcodec loads them at import and fails without.
On CUDA the worker decodes on the GPU it is given (``cuda:N``, its rank's), never simply the current device.
Frames are read with ``get_frames_at`` in exact seek mode (indices in presentation order, the frame table's order)
and scaled with torch's interpolation (bilinear or bicubic with antialiasing, or nearest-exact), on the decode device; only the small frames
are copied back to host memory, so the worker process boundary costs 150 KB a frame at 224 px, not an HD frame.
The resize runs on at most :data:`RESIZE_BYTES` of float32 at a time (a 64-frame 1080p chunk would be 1.6 GB).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..decoder import DecodeError, Decoder

FIX = ("install torchcodec with `pip install 'featseq[torchcodec]'` and FFmpeg's shared libraries (major version 4 "
       "to 8) from the system, e.g. `apt install ffmpeg` or `conda install -c conda-forge ffmpeg`; or use "
       "--decoder pyav")
RESIZE_BYTES = 256 << 20  # float32 frames resized at once, per worker


def write_probe_clip(path: str, size: int = 256, frames: int = 8) -> str:
    """A tiny H.264 clip (grey levels 0, 16, 32, ...; 30 fps) at ``path``, written with PyAV; returns ``path``."""
    import av
    import numpy as np

    with av.open(path, "w") as out:
        st = out.add_stream("libx264", rate=30)
        st.width, st.height, st.pix_fmt = size, size, "yuv420p"
        for i in range(frames):
            out.mux(st.encode(av.VideoFrame.from_ndarray(np.full((size, size, 3), 16 * i, np.uint8), format="rgb24")))
        out.mux(st.encode())
    return path


def cuda_decode_problem() -> str | None:
    """Why torchcodec cannot decode on CUDA here, found by decoding a tiny H.264 clip on the GPU (a CPU-only
    torchcodec wheel, or an FFmpeg built without NVDEC, fails here rather than in every worker); None when it can."""
    import tempfile

    from torchcodec.decoders import VideoDecoder

    with tempfile.TemporaryDirectory(prefix="featseq-nvdec-") as d:
        path = write_probe_clip(f"{d}/probe.mp4")
        try:
            x = VideoDecoder(path, device="cuda", seek_mode="exact").get_frames_at(indices=[0, 7]).data
        except Exception as e:  # noqa: BLE001  (whatever torchcodec raises: reported, with the fix)
            return (f"--decode-device cuda: torchcodec could not decode on the GPU ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); it needs a CUDA build of "
                    f"torchcodec and an FFmpeg with NVDEC (cuvid); use --decode-device cpu")
        if x.device.type != "cuda":
            return f"--decode-device cuda: torchcodec decoded on {x.device}, not the GPU; use --decode-device cpu"
    return None


def resize(x, h: int, w: int, max_bytes: int = RESIZE_BYTES, interpolation: str = "bilinear"):
    """uint8 (k, 3, H, W) -> uint8 (k, 3, h, w): bilinear or bicubic with antialiasing (as PIL's), or nearest-exact,
    rounded, on x's device, in slices of at most ``max_bytes`` of float32 input (at least one frame)."""
    import torch

    step = max(1, max_bytes // (4 * x[0].numel())) if len(x) else 1
    kw = dict(mode="nearest-exact") if interpolation == "nearest" else \
        dict(mode=interpolation, antialias=True, align_corners=False)
    parts = [torch.nn.functional.interpolate(x[a:a + step].float(), size=(h, w), **kw).round_().clamp_(0, 255)
             .to(torch.uint8) for a in range(0, len(x), step)]
    return torch.cat(parts) if parts else x.new_zeros((0, x.shape[1], h, w))


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
            return _cuda_problem()
        return None

    def _open(self) -> None:
        import torch
        from torchcodec.decoders import VideoDecoder

        self._torch = torch
        # the worker is handed its rank's GPU (cuda:N); a bare "cuda" is cuda:0, never whatever is current
        self._dev = torch.device("cuda", torch.device(self.device).index or 0) if self.device.startswith("cuda") \
            else torch.device("cpu")
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
                x = resize(x, h, w, interpolation=self.interpolation)
            x = x[torch.as_tensor(inverse, device=x.device)].permute(0, 2, 3, 1).contiguous()
            yield x.cpu().numpy()

    def close(self) -> None:
        self._dec = None


_PROBED: dict = {}


def _cuda_problem() -> str | None:
    """:func:`cuda_decode_problem`, once per process."""
    if "cuda" not in _PROBED:
        _PROBED["cuda"] = cuda_decode_problem()
    return _PROBED["cuda"]


DECODER = TorchCodecDecoder
