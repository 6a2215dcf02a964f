"""Frames of selected sequences for a CNN inside the model (finetune, explain's Grad-CAM): from a cache's /frames or
decoded from the videos at the cached timestamps (featurize's decode workers), prepared one or two batches ahead in a
background thread, with finetune's per-clip augmentation drawn from (seed, epoch, sequence) alone.
"""
from __future__ import annotations

import queue
import sys
import threading

import numpy as np
import torch

from featseq.common.errors import UserError
from featseq.common.procgroup import decode_device as decode_device_for
from featseq.featurize.cache import Cache, read_frames
from featseq.featurize.spec import FeatureSpec

from .reader import Sequences


def clip_generator(seed: tuple[int, int], idx: int) -> torch.Generator:
    """The random draws of sequence ``idx``'s augmentation in one epoch, from (run seed, epoch) and ``idx`` alone: the
    same on any rank, in any batch."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([*seed, int(idx)]).generate_state(1)[0]))


def augment_clip(frames: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (scale 0.6-1) and horizontal flip, the same for every frame of one clip (T, S, S, 3)."""
    import torchvision.transforms.v2.functional as TF

    s = frames.shape[1]
    scale = 0.6 + 0.4 * float(torch.rand(1, generator=gen))
    h = w = max(8, int(round(s * scale ** 0.5)))
    top = int(torch.randint(0, s - h + 1, (1,), generator=gen))
    left = int(torch.randint(0, s - w + 1, (1,), generator=gen))
    x = frames.permute(0, 3, 1, 2)
    x = TF.resized_crop(x, top, left, h, w, [s, s], antialias=True)
    if float(torch.rand(1, generator=gen)) < 0.5:
        x = x.flip(-1)
    return x.permute(0, 2, 3, 1).contiguous()


# ---------------------------------------------------------------- frames for sequences

class Frames:
    """uint8 frames of selected sequences, from the cache's /frames or decoded from the videos at their timestamps."""

    def __init__(self, cache: Cache, data: Sequences, spec: FeatureSpec, timeout: float,
                 device: torch.device = torch.device("cpu"), workers: int | None = None):
        from featseq.featurize.worker import default_workers

        self.cache, self.data, self.spec, self.timeout = cache, data, spec, timeout
        self.kept = bool(cache.attrs.get("keep_frames"))
        # decoded where the cache's frames were (NVDEC on this rank's GPU when the features were, and one is here)
        self.decode_device = decode_device_for(spec.decode_device_here(), device)
        self.pin = device.type == "cuda"  # batches in pinned memory: their copy to the GPU does not block
        # a GPU's CNN wants as many decoders as featurize gives it; on the CPU one (the CNN takes the cores)
        self.workers = workers or (default_workers(self.decode_device, device.type) if device.type == "cuda" else 1)
        self._pool = None

    def batch(self, idx: np.ndarray, rows: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(frames (B, L, S, S, 3) uint8 with zeros at padding, mask (B, L)); ``rows``/``mask``: tables indexed by
        ``idx`` (default mask: the sequences'; explain passes a few chosen frames per sequence)."""
        r = rows[idx].numpy()
        m = (self.data.mask if mask is None else mask)[idx].numpy()
        size = self.spec.size
        out = np.zeros(r.shape + (size, size, 3), np.uint8)
        if self.kept:
            want = np.unique(r[m])
            out[m] = read_frames(self.cache.path, want)[np.searchsorted(want, r[m])]
        else:
            from featseq.featurize.decoder import resolve_decoder
            from featseq.featurize.worker import DecodePool

            if self._pool is None:  # the decoder that made the cache's features
                self._pool = DecodePool(timeout=self.timeout, workers=self.workers,
                                        decoder=resolve_decoder(self.spec.decoder, self.decode_device.partition(":")[0]),
                                        decode_device=self.decode_device,
                                        log=lambda msg: print(msg, file=sys.stderr, flush=True)).start()
            paths = self.cache.segments["path"]
            geo = self.spec.decode_args()  # the frames the features were made from (size: crops are refused here)
            got = self._pool.frames_at([(j, paths[i], self.cache.timestamps[r[j][m[j]]]) for j, i in enumerate(idx)
                                        if m[j].any()], size, geo["policy"], resize_size=geo["resize_size"],
                                       interpolation=geo["interpolation"])
            for j, frames in got.items():
                if isinstance(frames, str):
                    raise UserError(f"every selected frame is needed (finetune, explain --gradcam): {frames}")
                if len(frames) != int(m[j].sum()):
                    raise UserError(f"every selected frame is needed (finetune, explain --gradcam): {paths[idx[j]]} gave {len(frames)} of the "
                                    f"{int(m[j].sum())} frames its cache recorded (did the video change since?)")
                out[j, np.nonzero(m[j])[0]] = frames
        return torch.from_numpy(out), torch.from_numpy(m)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


class FrameInputs:
    """The training loop's inputs for finetune: frames prepared one or two batches ahead, augmented in training.
    ``eval_batch``: sequences per forward pass in evaluation (a rank's share of a training batch)."""

    def __init__(self, frames: Frames, eval_batch: int, augment: bool):
        self.frames, self.eval_batch, self.augment = frames, eval_batch, augment

    def batches(self, index_batches, rows=None, train=False, seed=None):
        table = self.frames.data.rows if rows is None else rows

        def load(b):  # in the prefetch thread: decoding and augmentation overlap the model's step
            x, m = self.frames.batch(b, table)
            if train and self.augment:
                x = torch.stack([augment_clip(c, clip_generator(seed, i)) for c, i in zip(x, b)])
            return (x.pin_memory(), m.pin_memory()) if self.frames.pin else (x, m)

        for b, (x, m) in prefetch(index_batches, load):
            yield b, x, m


def prefetch(batches: list, load, depth: int = 2):
    """Yield load(b) for each b, computed one or two batches ahead in a background thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for b in batches:
                if stop.is_set():
                    return
                q.put((b, load(b)))
        except BaseException as e:  # handed to the consumer
            q.put(e)
        q.put(None)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
