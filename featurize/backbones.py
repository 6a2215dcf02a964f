"""Backbone registry: name -> trunk without classifier, feature dim, preprocessing, stages.

One factory, :func:`create_backbone`, for torchvision models (``resnet18``...) and timm models
(``timm:<name>``, when timm is installed). The preprocessing numbers live in each entry and are
used by featurize, finetune and predict alike through :func:`preprocess`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from featseq.common.errors import UserError

from .choices import POOLS
from .compiled import CompiledOrEager, padded
from .pooling import MultiCrop, check_choice, pool_torchvision
from .precision import PRECISIONS
from .weightfiles import (WeightsError, did_you_mean, download_error, load_into, load_state_dict_file,  # noqa: F401
                          sha256_file)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the torch dtype an autocast of each precision runs in (the precisions: featurize/precision.py)
DTYPES = dict(zip(PRECISIONS, (torch.float32, torch.float16, torch.bfloat16)))


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    feature_dim: int
    head: str  # dotted path of the final classifier layer, replaced by Identity
    stages: tuple[str, ...]  # dotted module paths, input to output; --unfreeze N trains the last N
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = "torchvision"
    size: int = 224  # the input size --size defaults to
    interpolation: str = "bilinear"  # of the model's own preprocessing (--interpolation default: featurize/preprocessing.py)
    crop_pct: float = 1.0  # timm's: the centre fraction its eval transform keeps (torchvision CNNs: the whole frame)
    pool_module: str = "avgpool"  # the global average pool --pool replaces ('' when the features are not pooled)
    frames: int = 0  # a clip backbone's own clip length (featurize/clips.py); 0: it embeds single frames


_RESNET_STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")
_EFFNET_STAGES = tuple(f"features.{i}" for i in range(9))
REGISTRY: dict[str, BackboneEntry] = {
    e.name: e
    for e in [
        BackboneEntry("resnet18", 512, "fc", _RESNET_STAGES),
        BackboneEntry("resnet34", 512, "fc", _RESNET_STAGES),
        BackboneEntry("resnet50", 2048, "fc", _RESNET_STAGES),
        BackboneEntry("resnet101", 2048, "fc", _RESNET_STAGES),
        BackboneEntry("resnet152", 2048, "fc", _RESNET_STAGES),
        BackboneEntry("vgg16", 4096, "classifier.6", ("features.0:5", "features.5:10", "features.10:17", "features.17:24", "features.24:31", "classifier"), pool_module=""),
        BackboneEntry("efficientnet_b0", 1280, "classifier.1", _EFFNET_STAGES),
        BackboneEntry("efficientnet_b1", 1280, "classifier.1", _EFFNET_STAGES),
        BackboneEntry("mobilenet_v3_large", 1280, "classifier.3", tuple(f"features.{i}" for i in range(17)) + ("classifier",)),
        BackboneEntry("convnext_tiny", 768, "classifier.2", tuple(f"features.{i}" for i in range(8))),
    ]
}


def known_backbones() -> list[str]:
    from .clips import CLIP_MODELS

    return sorted(REGISTRY) + [f"{n} (clips)" for n in CLIP_MODELS] + ["timm:<name> (with the timm extra)"]


@dataclass
class Backbone:
    """A ready trunk: ``trunk(x)`` maps (N, 3, S, S) normalised images to (N, feature_dim)."""

    trunk: nn.Module
    entry: BackboneEntry
    weights: str  # 'none', 'imagenet' or the weights file's path
    weights_sha256: str = ""
    seed: int = 0

    def stage_modules(self) -> list[nn.Module]:
        return [_get_stage(self.trunk, s) for s in self.entry.stages]


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _get_stage(module: nn.Module, spec: str) -> nn.Module:
    """A stage is a dotted path, or 'path.a:b' for a slice of a Sequential."""
    if ":" in spec:
        path, rng = spec.rsplit(".", 1)
        a, b = (int(x) for x in rng.split(":"))
        return nn.ModuleList(list(_get(module, path).children())[a:b])
    return _get(module, spec)


def _set(module: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, last = dotted.rpartition(".")
    owner = _get(module, parent) if parent else module
    if last.isdigit():
        owner[int(last)] = new
    else:
        setattr(owner, last, new)


def own_size(name: str) -> int:
    """The input size ``--size`` defaults to: the model's own (a timm model's pretrained input size, 224 otherwise)."""
    if name.startswith("timm:"):
        from . import timm_models

        return timm_models.own_size(name[5:])
    from . import clips

    if clips.is_clip(name):
        return clips.clip_preprocessing(name)["size"]
    return REGISTRY[name].size if name in REGISTRY else 224


def create_backbone(name: str, weights: str = "none", seed: int = 0, pool: str = "default", crops: int = 1,
                    size: int | None = None) -> Backbone:
    """Build the trunk of ``name`` with ``weights`` = 'none' (seeded random init), 'imagenet' or a file path,
    its features pooled by ``pool`` and averaged over ``crops`` crops (featurize/pooling.py) of ``size`` px (None:
    the model's own size).

    The random init draws from its own RNG seeded by ``seed`` (torch's global RNG is left as it was).
    Process-wide settings (the CPU allocator, threads) are the caller's: featurize's pipeline and
    finetune set them once (:func:`featurize.allocator.tune_cpu_allocator`).
    Raises ValueError listing the known names for an unknown one, WeightsError for weights problems, UserError for a
    pooling or size the model cannot take.
    """
    if weights not in ("none", "imagenet") and not os.path.isfile(weights):
        raise WeightsError(f"--weights {weights}: no such file; use 'none', 'imagenet' or the path of a state dict")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bone = _create(name, weights, seed, pool, size)
    if crops != 1:
        check_choice(name, pool, crops, POOLS, "")
        bone.trunk = MultiCrop(bone.trunk, size or bone.entry.size, crops).eval()
    return bone


def _create(name: str, weights: str, seed: int, pool: str, size: int | None) -> Backbone:
    sha = ""
    if name.startswith("timm:"):
        from . import timm_models

        model, fields, sha = timm_models.create(name[5:], weights, pool, size)
        return Backbone(model, BackboneEntry(name=name, **fields), weights, sha, seed)
    from . import clips

    if clips.is_clip(name):
        if pool != "default":
            raise UserError(f"--pool {pool}: {name} is a clip backbone with its own pooling; use --pool default")
        model, fields, sha = clips.create(name, weights)
        return Backbone(model, BackboneEntry(name=name, **fields), weights, sha, seed)

    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}{did_you_mean(name, list(REGISTRY))}; known: "
                         f"{', '.join(known_backbones())}")
    import torchvision

    entry = REGISTRY[name]
    model = torchvision.models.get_model(name, weights=None)
    if weights == "imagenet":
        w = torchvision.models.get_model_weights(name).DEFAULT
        try:
            sd = w.get_state_dict(progress=False)
        except Exception as e:
            raise download_error(name, w.url, e) from e
        local = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
        sha = sha256_file(local) if os.path.isfile(local) else ""
        model.load_state_dict(sd)
    elif weights != "none":
        load_into(model, load_state_dict_file(weights), name, entry.head, weights)
        sha = sha256_file(weights)
    _set(model, entry.head, nn.Identity())
    pool_torchvision(model, name, entry.pool_module, pool)
    return Backbone(model.eval(), entry, weights, sha, seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device {device!r}: choose auto, cpu or cuda")
    return torch.device(device)


def cuda_math(precision: str, device: torch.device) -> None:
    """On CUDA, ``fp32`` means fp32: TF32 off for cuDNN convolutions (torch's default is on) and matmuls, so a GPU's
    fp32 features match the CPU's fp32 within fp32 rounding (featurize.precision's docstring). Process-wide, as
    torch's flags are; other precisions leave torch's defaults."""
    if device.type == "cuda" and precision == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")


_NORM: dict = {}  # (mean, std, device) -> the (1, 3, 1, 1) tensors, made once


def norm_buffers(entry: BackboneEntry, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The entry's mean and std as (1, 3, 1, 1) float32 tensors on ``device``, created once: building them per batch
    is a blocking host-to-device copy on CUDA that stalls the queueing of the next batch."""
    key = (tuple(entry.mean), tuple(entry.std), str(device))
    if key not in _NORM:
        with torch.inference_mode(False):  # plain tensors, usable by training too (finetune) when made in inference
            _NORM[key] = (torch.tensor(entry.mean, device=device).view(1, 3, 1, 1),
                          torch.tensor(entry.std, device=device).view(1, 3, 1, 1))
    return _NORM[key]


def preprocess(frames: np.ndarray | torch.Tensor, entry: BackboneEntry, device: torch.device,
               channels_last: bool = True) -> torch.Tensor:
    """uint8 (k, S, S, 3) RGB frames -> float32 (k, 3, S, S) normalised with the entry's mean/std."""
    x = torch.as_tensor(frames).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = norm_buffers(entry, device)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# On the CPU a batch runs through the CNN in slices of at most this many pixels (16 frames at 224 px):
# as fast or faster than one big call (activations stay cache- and allocator-friendly) and it bounds
# the activations' memory whatever --batch-size is (BENCHMARKS.md, bench/cpu_slices_bench.py). Smaller frames get
# proportionally more per slice.
CPU_SLICE_PIXELS = 16 * 224 * 224


class Embedder:
    """Frozen inference: uint8 frames -> float32 numpy embeddings (k, feature_dim).

    ``embed(frames)`` waits for the result. ``submit(frames)`` / ``result(handle)`` let a caller keep a batch in
    flight: on CUDA the frames are copied from pinned host memory on a copy stream (non-blocking), so the next
    batch's copy runs while the current one is in the CNN, and the features come back into pinned memory without
    blocking; the host thread gathers the next batch meanwhile. On the CPU ``submit`` computes at once.
    """

    def __init__(self, backbone: Backbone, device: torch.device, precision: str, channels_last: bool = True,
                 compile: bool = False, batch_size: int = 64, log=lambda s: None):
        """``compile``: the CNN through torch.compile (featurize.compiled): every call then has one shape, the CPU's
        slices and CUDA's batches padded with zero frames to a multiple of the slice or ``batch_size``."""
        self.backbone = backbone
        self.device = device
        self.precision = precision
        self.channels_last = channels_last
        self.model = backbone.trunk.to(device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.slice_pixels = CPU_SLICE_PIXELS if device.type == "cpu" else None
        cuda_math(precision, device)
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.compiled = CompiledOrEager(self.model, log, dynamic=False) if compile else None
        self.batch_size = max(1, batch_size)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = preprocess(x, self.backbone.entry, self.device, self.channels_last)
        with torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=self.precision != "fp32"):
            return (self.compiled or self.model)(x).float().flatten(1)

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """``frames``: uint8 (k, S, S, 3)."""
        if self.device.type == "cuda":
            return self.result(self.submit(frames))
        step = max(1, self.slice_pixels // (frames.shape[1] * frames.shape[2])) if self.slice_pixels else len(frames)
        if self.compiled is not None:  # one shape: slices of at most a batch, the last one padded
            step = min(step, self.batch_size)
        out = [self._forward(self._shaped(frames[a:a + step], step))[:len(frames[a:a + step])].cpu()
               for a in range(0, len(frames), step)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.backbone.entry.feature_dim), np.float32)

    def _shaped(self, frames: np.ndarray, multiple: int) -> np.ndarray:
        """Compiled: ``frames`` padded to a multiple of ``multiple`` (one shape, one compilation); else themselves."""
        return padded(frames, multiple) if self.compiled is not None else frames

    @property
    def warmup_s(self) -> float:
        """Seconds the compilation took (0 without --compile)."""
        return self.compiled.warmup_s if self.compiled is not None else 0.0

    @torch.inference_mode()
    def submit(self, frames: np.ndarray | list[np.ndarray]):
        """Start embedding ``frames`` (one array, or the parts of a batch in order); :meth:`result` returns the
        features. On CUDA the parts are gathered straight into pinned memory: one copy, where concatenating and then
        pinning made two."""
        parts = frames if isinstance(frames, list) else [frames]
        n = sum(len(p) for p in parts)
        if n == 0:  # nothing to copy or compute (on CUDA, __call__ would come back here)
            return np.zeros((0, self.backbone.entry.feature_dim), np.float32)
        if self.device.type != "cuda":
            return self(np.concatenate(parts) if len(parts) > 1 else parts[0])
        rows = n + (-n % self.batch_size if self.compiled is not None else 0)  # compiled: one shape (zeros after n)
        host = torch.empty((rows,) + parts[0].shape[1:], dtype=torch.uint8, pin_memory=True)  # from torch's host cache
        dst, pos = host.numpy(), 0
        dst[n:] = 0
        for p in parts:  # numpy's copy: no torch thread pool in the parent
            dst[pos:pos + len(p)] = p
            pos += len(p)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            x = host.to(self.device, non_blocking=True)
        compute.wait_stream(self._copy_stream)
        x.record_stream(compute)  # the caching allocator must not reuse x's memory before the CNN has read it
        if self.compiled is not None:  # one shape: --batch-size rows a call (a batch may gather up to twice that)
            y = torch.cat([self._forward(x[a:a + self.batch_size]) for a in range(0, rows, self.batch_size)])[:n]
        else:
            y = self._forward(x)
        out = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(y, non_blocking=True)
        done = torch.cuda.Event()
        done.record(compute)
        return out, done, host  # host stays referenced until the copy has run

    @staticmethod
    def result(handle) -> np.ndarray:
        if isinstance(handle, np.ndarray):
            return handle
        out, done, _host = handle
        done.synchronize()
        return out.numpy()
