"""Autocast precision: the choices, what ``auto`` means, and the one resolver used by featurize, finetune, predict
and stream. Free of torch, so the command line lists the choices without loading it.

``auto`` is the fastest precision that computes correctly on the device: on CUDA bf16 where the GPU has bf16
tensor cores (compute capability 8 and up: A100, H100, H200, L4, RTX 30xx+), which run it as fast as fp16 and keep
fp32's range (random-init ResNet-101 activations peak at 4.8e5 and ResNet-152's at 9.1e8, beyond fp16's 65504:
fp16 gave Inf on the first segment), fp16 on older GPUs (V100, T4: no bf16 tensor cores; finetune scales its
gradients); on the CPU bf16 where the CPU computes it natively (AVX512-BF16,
AMX-BF16, Arm's BF16 extension: :func:`cpu_bf16_native`), else fp32, since torch emulates bf16 elsewhere at a
fraction of fp32's speed. featurize's default, unset (None), is auto's choice on every device, except where it
resumes a cache: there it keeps the precision that cache was made with, whatever this machine's default
(featurize.resume), so a command run on two machines resumes one cache. bf16 features are the fp32 ones within
rounding for classification (cosine and accuracy on the real clips: BENCHMARKS.md, "Precision").
``FEATSEQ_CPU_BF16=1`` / ``=0`` overrides the detection of native CPU bf16 (a VM whose /proc/cpuinfo hides the
flags; tests of what such a CPU does).

``fp32`` is fp32 everywhere: on CUDA featseq turns TF32 off for it (featurize.backbones.cuda_math), since torch runs
cuDNN convolutions in TF32 by default (10-bit mantissa: ResNet-18 differed from fp32 by up to 5.6e-3), and a cache's
"fp32" must mean the same on a GPU as on a CPU.
"""
from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "bf16")  # what an autocast runs in
AUTO = "auto"
CHOICES = (AUTO,) + PRECISIONS          # what --precision accepts
AUTO_HELP = ("auto: bf16 on CUDA (fp16 on GPUs before compute capability 8), bf16 on a CPU that computes it natively "
             "(AVX512-BF16/AMX), else fp32")


def cpu_bf16_native(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware (x86: AVX512-BF16 or AMX-BF16; Arm: the BF16 extension); elsewhere
    torch emulates it. ``cpuinfo``: the text of /proc/cpuinfo (read when None, unless FEATSEQ_CPU_BF16 is 0 or 1;
    False where there is none)."""
    if cpuinfo is None:
        import os

        forced = os.environ.get("FEATSEQ_CPU_BF16", "").strip()
        if forced in ("0", "1"):
            return forced == "1"
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


def cuda_bf16_native(device) -> bool:
    """Whether the GPU ``device`` has bf16 tensor cores (compute capability 8.0 and up)."""
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str | None, device) -> str:
    """fp32, fp16 or bf16 for ``precision`` on ``device`` (a torch.device, or its name: "cuda", "cuda:1", "cpu").
    None or auto: see the module's docstring (a resume's precision is featurize's to choose). An explicit choice is
    kept. ValueError naming --precision for anything else."""
    device_type = getattr(device, "type", str(device).partition(":")[0])
    if precision in (None, AUTO):
        if device_type == "cuda":
            return "bf16" if cuda_bf16_native(device) else "fp16"
        return "bf16" if cpu_bf16_native() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(CHOICES)}")
    return precision


def reproduce_precision(made: str, device) -> str:
    """The precision to remake features made at ``made`` with on ``device`` (predict, stream, finetune's featurize):
    the same, except half precision that a CPU computes slowly (fp16 always, bf16 without native support) is fp32
    there: a GPU-made fp16 run predicted on a CPU must not run fp16 autocast on it."""
    device_type = getattr(device, "type", str(device).partition(":")[0])
    if device_type == "cpu" and (made == "fp16" or emulated(made, device)):
        return "fp32"
    return made


def emulated(precision: str, device) -> bool:
    """Is this precision emulated, so slow, on ``device`` (bf16 on a CPU without it)?"""
    return precision == "bf16" and getattr(device, "type", str(device)) == "cpu" and not cpu_bf16_native()
