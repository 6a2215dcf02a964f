"""torchcodec backend (optional): FFmpeg through torchcodec, on the CPU or on CUDA (NVDEC).

Install: ``pip install 'featseq[torchcodec]'`` and FFmpeg's shared libraries, major version 4 to 8, from the
system (e.g. ``apt install ffmpeg``, ``conda install ffmpeg``); torchcodec loads them at import and fails without.
On CUDA the worker decodes on the GPU it is given (``cuda:N``, its rank's), never simply the current device.
Frames are read with ``get_frames_at`` by index in presentation order (the frame table's order). torchcodec opens in
approximate seek mode (no scan of the file) where that mode finds exactly the frame table's frames: it puts frame
``i`` at ``i / header fps``, which is every frame's timestamp in a constant-frame-rate video starting at 0
(:func:`approximate_is_exact`); any other video (a variable rate, a header that lists fewer frames, and a start
offset, which torchcodec 0.17 handles but the 0.7 source does not) opens in exact mode, whose scan reads every
packet of the file once more. A worker keeps the decoder open across a video's segments (featurize/keep_open.py), so
that scan is paid once per video and worker, not per segment (``bench/torchcodec_open_bench.py``, torchcodec 0.17:
opening a 30,000-frame 64 px H.264 file took 192 ms in exact mode, 12.3 ms in approximate mode; the index from our
demux passed as ``custom_frame_mappings`` JSON took 435 ms, slower than the scan, so it is not used). Frames are
scaled with torch's interpolation (bilinear or bicubic with antialiasing, or nearest-exact), on the decode
device; only the small frames are copied back to host memory, so the worker process boundary costs 150 KB a frame
at 224 px, not an HD frame.
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


def approximate_is_exact(table, header_fps, header_frames) -> bool:
    """Whether torchcodec's approximate seek mode finds exactly ``table``'s frames: it seeks frame ``i`` at
    ``round(i / header_fps)`` in the stream's time base, so every frame's timestamp must be that (within a quarter
    tick), and the header must list at least the frames the table has (approximate mode refuses indices beyond)."""
    if table.pts is None or not table.time_base or not header_fps or not header_frames or header_frames < len(table.pts):
        return False
    at = np.arange(len(table.pts)) / float(header_fps) / table.time_base
    return bool(np.abs(table.pts - at).max() < 0.25)


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
        kw = dict(num_ffmpeg_threads=1, device=str(self._dev), dimension_order="NCHW")
        self._dec = VideoDecoder(self.path, seek_mode="approximate", **kw)
        m = self._dec.metadata
        self.seek_mode = "approximate"
        if not approximate_is_exact(self.table, getattr(m, "average_fps_from_header", None),
                                    getattr(m, "num_frames_from_header", None)):
            self._dec, self.seek_mode = VideoDecoder(self.path, seek_mode="exact", **kw), "exact"
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

    @property
    def fallback(self) -> str:
        """Why FFmpeg decoded this video on the CPU under ``--decode-device cuda`` (NVDEC does not take 10-bit 4:2:2,
        some tiny or unusual streams; torchcodec then decodes on the CPU and hands the frames over as usual), from
        torchcodec's ``VideoDecoder.cpu_fallback`` (known once a frame is decoded); '' when NVDEC decoded it, on the
        CPU, or where torchcodec has no such status (older releases: bench/gpu_check.py's "NVDEC fallback" check)."""
        status = getattr(self._dec, "cpu_fallback", None) if self._dev.type == "cuda" and self._dec is not None else None
        return str(status).split("due to: ")[-1].strip() if status else ""

    def close(self) -> None:
        self._dec = None


_PROBED: dict = {}


def _cuda_problem() -> str | None:
    """:func:`cuda_decode_problem`, once per process."""
    if "cuda" not in _PROBED:
        _PROBED["cuda"] = cuda_decode_problem()
    return _PROBED["cuda"]


DECODER = TorchCodecDecoder
