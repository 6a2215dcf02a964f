"""What opening a torchcodec VideoDecoder costs in each seek mode (issue 31, item 4), and whether the frames agree:
exact (torchcodec scans every packet), approximate (no scan: frame i at i / header fps), and custom_frame_mappings
built from our own demux (featurize/decoder.py's frame table, passed as torchcodec's JSON). Medians of 5 openings;
also the JSON alone and PyAV's demux. Frames at 12 spread indices are compared with exact mode's.

    python bench/torchcodec_open_bench.py [VIDEO ...]   (default: a Gingerbread clip and a 30,000-frame 64 px H.264
                                                         file written here; needs torchcodec and FFmpeg's libraries)
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

GINGERBREAD = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gingerbread" / "segments" / "P01" / "music01.mp4"


def long_clip(path: str, n: int, size: int = 64) -> str:
    with av.open(path, "w") as out:
        st = out.add_stream("libx264", rate=30)
        st.width = st.height = size
        st.pix_fmt = "yuv420p"
        st.options = {"preset": "ultrafast", "g": "60"}
        for i in range(n):
            out.mux(st.encode(av.VideoFrame.from_ndarray(np.full((size, size, 3), i % 256, np.uint8), format="rgb24")))
        out.mux(st.encode())
    return path


def packets(path: str) -> list[tuple[int, int, int]]:
    with av.open(path) as c:
        st = c.streams.video[0]
        return sorted((p.pts, p.duration or 0, int(p.is_keyframe)) for p in c.demux(st)
                      if not (p.size == 0 and p.pts is None))


def median_s(fn, repeats: int = 5) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main(paths: list[str]) -> None:
    from torchcodec.decoders import VideoDecoder

    for path in paths:
        rows = packets(path)
        mappings = lambda: json.dumps({"frames": [{"pts": p, "duration": d, "key_frame": k} for p, d, k in rows]})  # noqa: E731
        idx = sorted(set(np.linspace(0, len(rows) - 1, 12).astype(int).tolist()))
        exact = VideoDecoder(path, seek_mode="exact").get_frames_at(idx).data
        custom = VideoDecoder(path, custom_frame_mappings=mappings()).get_frames_at(idx).data
        approx = VideoDecoder(path, seek_mode="approximate").get_frames_at(idx).data
        ms = {"exact": median_s(lambda: VideoDecoder(path, seek_mode="exact")),
              "approximate": median_s(lambda: VideoDecoder(path, seek_mode="approximate")),
              "custom (JSON built and parsed)": median_s(lambda: VideoDecoder(path, custom_frame_mappings=mappings())),
              "JSON alone": median_s(mappings), "PyAV demux": median_s(lambda: packets(path))}
        print(f"{path}: {len(rows)} frames; opening, ms: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in ms.items())
              + f"; frames equal to exact mode's: custom {bool((custom == exact).all())}, approximate "
              f"{bool((approx == exact).all())}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1:])
    else:
        with tempfile.TemporaryDirectory() as d:
            main([str(p) for p in [GINGERBREAD.resolve()] if p.exists()] + [long_clip(f"{d}/long30k.mp4", 30000)])
