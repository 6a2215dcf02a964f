"""glibc malloc settings for processes that run a CNN or train a sequence model on the CPU (large activations and
batches, allocated and freed per batch)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Let glibc keep large freed blocks for reuse instead of returning them to the kernel (once per process).

    A CNN on the CPU allocates and frees activations of tens to hundreds of MB per batch. Above its
    (at most 32 MB) mmap threshold glibc maps each one afresh and unmaps it when freed, so every batch
    page-faults and zeroes the same memory again, a large share of the CPU time spent in the kernel. Serving them
    from the heap, kept at its peak size, together with the Embedder's CPU slices, makes the forward pass faster
    with a lower peak (BENCHMARKS.md, bench/cpu_slices_bench.py); without the slices the fragmented heap would
    raise the peak. train sets it too: with 16 MiB evaluation batches an epoch at UCF-101 size spent 3-5 s in
    the kernel instead of 21-27 s and ran 0.86-0.94x as long, at the same peak (bench/train_allocator_bench.py).
    ``FEATSEQ_MALLOC=default`` leaves the allocator alone. Returns whether the setting was applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux") or os.environ.get("FEATSEQ_MALLOC") == "default":
        return _ALLOCATOR_TUNED
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    _ALLOCATOR_TUNED = bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))
    return _ALLOCATOR_TUNED
