"""``--compile``: the CNN through ``torch.compile``, with batches of one shape and an eager fallback.

torch.compile specialises on input shapes, so every call gets the same shape: :func:`padded` pads a batch with
zero frames up to a multiple of a fixed size (the Embedder drops the padding's outputs again). The first call
compiles (seconds to a minute); its time is kept apart (``warmup_s``) so that frames/s stay the steady rate. A
compiler that fails (no C++ compiler, an operator inductor cannot lower, an old GPU) falls back to eager with one
note, never a crash. Compiling changes how the CNN is computed, not what it computes: features agree with eager
ones within the precision's rounding (tests/test_compile.py), so it is not part of a cache's identity and a cache
begun without it resumes with it (like --device or --decode-workers).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


class CompiledOrEager:
    """Call ``module`` through torch.compile; if compiling fails on the first call, use ``module`` itself from then
    on (``log`` gets one note). A plain callable, not a Module: the module's parameters and state dict stay as they
    are. ``warmup_s``: seconds of the first call (the compilation); ``compiled``: whether the compiled path runs."""

    def __init__(self, module, log: Callable[[str], None] = lambda s: None, **options):
        import torch

        self.module, self.log = module, log
        self._fn = torch.compile(module, **options)
        self.compiled: bool | None = None  # None until the first call
        self.warmup_s = 0.0

    def __call__(self, *args, **kwargs):
        if self.compiled:
            return self._fn(*args, **kwargs)
        if self.compiled is False:
            return self.module(*args, **kwargs)
        t = time.perf_counter()
        try:
            out = self._fn(*args, **kwargs)
            self.compiled = True
        except Exception as e:  # the compiler's own failure (the module is run again, eagerly, just below)
            self.compiled = False
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.log(f"--compile: torch.compile failed ({type(e).__name__}: {first}); running the CNN eagerly instead")
            out = self.module(*args, **kwargs)
        self.warmup_s = time.perf_counter() - t
        return out


def padded(frames: np.ndarray, multiple: int) -> np.ndarray:
    """``frames`` (k, ...) with zero frames appended up to a multiple of ``multiple`` (itself when it is one)."""
    extra = -len(frames) % multiple
    if not extra:
        return frames
    return np.concatenate([frames, np.zeros((extra,) + frames.shape[1:], frames.dtype)])
