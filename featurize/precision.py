"""Autocast precision: the choices, what ``auto`` means, and the one resolver used by featurize, finetune, predict
and stream. Free of torch, so the command line lists the choices without loading it.

``auto`` is the fastest precision that computes correctly on the device: fp16 on CUDA (tensor cores, half the
memory traffic; finetune scales its gradients); on the CPU bf16 where the CPU computes it natively (AVX512-BF16,
AMX-BF16, Arm's BF16 extension: :func:`cpu_bf16_native`), else fp32, since torch emulates bf16 elsewhere at a
fraction of fp32's speed. featurize's default, unset (None), is fp16 on CUDA and fp32 on every CPU: a cache's
precision is part of its identity, so its default name does not depend on the CPU it was made on.
"""
from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "bf16")  # what an autocast runs in
AUTO = "auto"
CHOICES = (AUTO,) + PRECISIONS          # what --precision accepts
AUTO_HELP = ("auto: fp16 on CUDA, bf16 on a CPU that computes it natively (AVX512-BF16/AMX), else fp32")


def cpu_bf16_native(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware (x86: AVX512-BF16 or AMX-BF16; Arm: the BF16 extension); elsewhere
    torch emulates it. ``cpuinfo``: the text of /proc/cpuinfo (read when None; False where there is none)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision: str | None, device) -> str:
    """fp32, fp16 or bf16 for ``precision`` on ``device`` (a torch.device, or its name: "cuda", "cuda:1", "cpu").
    None: fp16 on CUDA, fp32 on the CPU. auto: see the module's docstring. An explicit choice is kept. ValueError
    naming --precision for anything else."""
    device_type = getattr(device, "type", str(device).partition(":")[0])
    if precision is None:
        return "fp16" if device_type == "cuda" else "fp32"
    if precision == AUTO:
        if device_type == "cuda":
            return "fp16"
        return "bf16" if cpu_bf16_native() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(CHOICES)}")
    return precision


def emulated(precision: str, device) -> bool:
    """Is this precision emulated, so slow, on ``device`` (bf16 on a CPU without it)?"""
    return precision == "bf16" and getattr(device, "type", str(device)) == "cpu" and not cpu_bf16_native()
