"""How features were made: the one record that featurize writes into a cache and a run carries in its checkpoint.

A :class:`FeatureSpec` holds everything that changes a frame's embedding: the backbone, its weights
(id, file and sha256), the seed of a random init, the input size and resize policy, the sampling fps,
the autocast precision, the preprocessing mean/std, what frames were resized to before their centre crop and with
which interpolation, the decoder backend and the device it decoded on, the pooling, the crops and a clip backbone's
clip length and stride. predict and finetune rebuild the same features from it alone, never from the training cache. The weights-id encoding lives here only.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .decoders import LEGACY_DECODER
from .geometry import decode_side, legacy_resize_size
from featseq.common.errors import UserError

BUILTIN_WEIGHTS = ("none", "imagenet")

# A cache is identified by what changes its features: a different request aimed at an existing file is refused, parts
# of different requests are not merged. The source's path is recorded (attribute "source") but not compared: segments
# are identified by id, so a dataset folder that moved, or is mounted elsewhere on another node, resumes.
IDENTITY_KEYS = ("backbone", "weights", "weights_sha256", "seed", "size", "resize", "fps", "precision", "dtype",
                 "keep_frames", "decoder", "decode_device", "pool", "crops", "clip_frames", "clip_stride",
                 "interpolation", "resize_size")
# identity attributes older caches lack, and what their absence means (every cache before decode_device was recorded
# was decoded on the CPU: --decode-device cuda had never run; clip_frames, clip_stride: 0 for a frame backbone, and a
# clip cache's fps is its rate of rows, clips per second)
# interpolation: every decoder resized bilinearly before it was recorded; resize_size: :func:`with_defaults`)
IDENTITY_DEFAULTS = {"decoder": LEGACY_DECODER, "decode_device": "cpu", "pool": "default", "crops": 1, "clip_frames": 0,
                     "clip_stride": 0, "interpolation": "bilinear"}
# Of those, what changes one frame's embedding (with the feature dimension): fps picks the frames, dtype and
# keep_frames say how they are stored, and precision changes an embedding within rounding only.
# The decode device is like precision: NVDEC's colour conversion moves pixels by a level or two, not the frame.
FRAME_KEYS = tuple(k for k in IDENTITY_KEYS
                   if k not in ("fps", "precision", "dtype", "keep_frames", "decode_device", "clip_stride")) \
    + ("feature_dim",)


def with_defaults(attrs: dict) -> dict:
    """A cache's attributes with what the absence of an identity attribute means filled in: :data:`IDENTITY_DEFAULTS`,
    and the resize_size that follows from its size, resize and crops (caches made before it was recorded were resized
    to their size, multi-crop ones to size / 0.875: featurize.geometry.legacy_resize_size)."""
    out = {**IDENTITY_DEFAULTS, **attrs}
    if not out.get("resize_size") and "size" in out:
        out["resize_size"] = legacy_resize_size(int(out["size"]), str(out.get("resize") or "squash"),
                                                int(out.get("crops") or 1))
    return out


def identity(**values) -> dict:
    """A cache's identity attributes, in :data:`IDENTITY_KEYS` order, from exactly those keys (TypeError naming
    a key missing or unknown: the one list stays the one list)."""
    if set(values) != set(IDENTITY_KEYS):
        raise TypeError(f"identity: missing {sorted(set(IDENTITY_KEYS) - set(values))}, "
                        f"unknown {sorted(set(values) - set(IDENTITY_KEYS))}")
    return {k: values[k] for k in IDENTITY_KEYS}


def weights_id(weights: str, sha256: str, seed: int) -> str:
    """The cache's ``weights`` attribute: 'none-seedN', 'imagenet' or '<file stem>-<sha256[:8]>'."""
    if weights == "none":
        return f"none-seed{seed}"
    if weights == "imagenet":
        return "imagenet"
    return f"{Path(weights).stem}-{sha256[:8]}"


@dataclass(frozen=True)
class FeatureSpec:
    backbone: str
    weights: str              # the id (weights_id)
    weights_path: str         # the state-dict file ('' for none / imagenet)
    weights_sha256: str
    seed: int
    size: int
    resize: str
    fps: float
    precision: str
    feature_dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    decoder: str = LEGACY_DECODER  # the backend that decoded the frames (backends scale pixels differently)
    imported: str = ""  # the format the features were imported from (featseq cache import); '' when featurize made them
    decode_device: str = "cpu"     # where it decoded them: cpu or cuda (NVDEC's colour conversion differs)
    pool: str = "default"  # --pool (featurize/pooling.py)
    crops: int = 1         # --crops
    clip_frames: int = 0   # a clip backbone's --clip-frames (0: a frame backbone)
    clip_stride: int = 0   # and --clip-stride; then fps is clips per second, frames were sampled at fps * clip_stride
    interpolation: str = "bilinear"  # --interpolation the frames were resized with
    resize_size: str = ""  # --resize-size: what frames were resized to before the centre crop to size ('': size)

    @classmethod
    def from_attrs(cls, attrs: dict) -> "FeatureSpec":
        """The spec of a cache from its attributes (featurize writes every field)."""
        missing = [k for k in ("backbone", "weights", "size", "fps") if k not in attrs]
        if missing:
            raise UserError(f"{attrs.get('source', 'a cache')}: its attributes lack {', '.join(missing)}; it was not "
                            f"written by featseq featurize, so how its features were made is unknown")
        attrs = with_defaults(attrs)
        return cls(backbone=str(attrs["backbone"]), weights=str(attrs["weights"]),
                   weights_path=str(attrs.get("weights_path") or ""), weights_sha256=str(attrs.get("weights_sha256") or ""),
                   seed=int(attrs.get("seed", 0) or 0), size=int(attrs["size"]), resize=str(attrs.get("resize") or "squash"),
                   fps=float(attrs["fps"]), precision=str(attrs.get("precision") or "fp32"),
                   feature_dim=int(attrs.get("feature_dim", 0) or 0),
                   mean=tuple(float(x) for x in attrs.get("mean", ())), std=tuple(float(x) for x in attrs.get("std", ())),
                   decoder=str(attrs.get("decoder") or LEGACY_DECODER), imported=str(attrs.get("import_format") or ""),
                   decode_device=str(attrs.get("decode_device") or "cpu"),
                   pool=str(attrs.get("pool") or IDENTITY_DEFAULTS["pool"]),
                   crops=int(attrs.get("crops") or IDENTITY_DEFAULTS["crops"]),
                   clip_frames=int(attrs.get("clip_frames") or 0), clip_stride=int(attrs.get("clip_stride") or 0),
                   interpolation=str(attrs["interpolation"]), resize_size=str(attrs["resize_size"]))

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        """From :meth:`to_dict` (a run's checkpoint); a spec saved before resize_size was recorded gets the one its
        size, resize and crops imply, as a cache's attributes do (:func:`with_defaults`)."""
        names = {f.name for f in fields(cls)}
        spec = cls(**{k: (tuple(v) if k in ("mean", "std") else v) for k, v in d.items() if k in names})
        if not spec.resize_size:
            spec = replace(spec, resize_size=legacy_resize_size(spec.size, spec.resize, spec.crops))
        return spec

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def weights_arg(self) -> str:
        """The --weights value that rebuilds this backbone: its file, 'imagenet' or 'none' (seeded by ``seed``)."""
        if self.weights_path:
            return self.weights_path
        return "imagenet" if self.weights == "imagenet" else "none"

    def featurize_options(self, weights: str | None = None, precision: str | None = None, device: str | None = None) -> dict:
        """The featurize settings (fields of featurize.config.FeaturizeConfig) that make these features again, for
        predict, stream and finetune alike: ``weights`` replaces :meth:`weights_arg` (e.g. after
        :meth:`check_weights`), ``precision`` the spec's (a run's autocast, unless the caller asks for another).

        ``device`` (the --device the features are remade with): the spec's precision and decode device as far as
        that machine runs them well: half precision on a CPU that computes it slowly (fp16; bf16 without native
        support) becomes fp32, NVDEC decoding on a machine without CUDA becomes CPU decoding; both change an
        embedding within rounding only (not in :data:`FRAME_KEYS`; tests/test_gpu.py bounds the decoder's share)."""
        if precision is None and device is not None:
            from .backbones import resolve_device
            from .precision import reproduce_precision

            precision = reproduce_precision(self.precision, resolve_device(device))
        decode_device = self.decode_device_here() if device is not None else self.decode_device
        return {"backbone": self.backbone, "weights": weights or self.weights_arg(), "seed": self.seed, "size": self.size,
                "resize": self.resize, "resize_size": self.decode_args()["resize_size"],
                "interpolation": self.interpolation,
                "fps": self.frame_fps(), "precision": precision or self.precision,
                "decoder": self.decoder, "decode_device": decode_device, "pool": self.pool, "crops": self.crops,
                "clip_frames": self.clip_frames or None, "clip_stride": self.clip_stride or None}

    def decode_args(self) -> dict:
        """How a decoder makes the frames these features were made from (featurize.decoder.Decoder's size, policy,
        resize_size and interpolation), for every path that decodes new frames: predict, stream, finetune, Grad-CAM."""
        resize_size = self.resize_size or legacy_resize_size(self.size, self.resize, self.crops)
        return {"size": decode_side(self.size, self.crops, resize_size, self.resize), "policy": self.resize,
                "resize_size": resize_size, "interpolation": self.interpolation}

    def frame_fps(self, rows_fps: float | None = None) -> float:
        """The --fps frames were sampled at to give rows at ``rows_fps`` (default the cache's): a clip cache has one
        row every clip_stride frames."""
        fps = self.fps if rows_fps is None else float(rows_fps)
        return fps * self.clip_stride if self.clip_stride else fps

    def decode_device_here(self) -> str:
        """Where to decode frames like these features' on this machine: their decode device, or the CPU where there
        is no CUDA (NVDEC's pixels differ by a level or two: within what FRAME_KEYS tolerates)."""
        if self.decode_device == "cpu":
            return "cpu"
        import torch

        return self.decode_device if torch.cuda.is_available() else "cpu"

    def check_featurizable(self, what: str) -> None:
        """UserError naming ``what`` when featseq cannot make these features itself (they were imported)."""
        if self.imported:
            raise UserError(f"{what}: its features were imported from {self.imported} files (featseq cache import), so "
                            f"featseq does not know the backbone that made them: it can neither make such features for "
                            f"new videos (predict, stream) nor fine-tune that backbone (finetune). Extract the new "
                            f"videos' features with the tool that made the imported ones, import them too (featseq "
                            f"cache import) and score them with featseq evaluate RUN --cache THAT_CACHE")

    def check_weights(self, what: str) -> str:
        """The weights argument, after checking a weights file is still there and unchanged; UserError naming ``what``."""
        self.check_featurizable(what)
        arg = self.weights_arg()
        if arg in BUILTIN_WEIGHTS:
            return arg
        if not os.path.isfile(arg):
            raise UserError(f"{what}: its features were made with the weights file {arg}, which is gone; put that file "
                            f"back (sha256 {self.weights_sha256[:12]}...) to make the same features")
        from .weightfiles import sha256_file

        if self.weights_sha256 and sha256_file(arg) != self.weights_sha256:
            raise UserError(f"{what}: the weights file {arg} changed since its features were made (sha256 differs from "
                            f"{self.weights_sha256[:12]}...); restore the original file")
        return arg

    def same_features(self, other: "FeatureSpec") -> list[str]:
        """What differs in how two specs embed a frame (:data:`FRAME_KEYS`); empty when nothing does."""
        return [f"{k}: {getattr(self, k)!r} vs {getattr(other, k)!r}" for k in FRAME_KEYS
                if getattr(self, k) != getattr(other, k)]

    def describe(self) -> str:
        if self.imported:
            return f"imported from {self.imported} (backbone unknown), {self.fps:g} fps, {self.feature_dim}-dim"
        extra = "".join([f" from {self.resize_size}" if self.resize_size and self.resize_size != legacy_resize_size(
                             self.size, self.resize, self.crops) else "",
                         f", {self.interpolation}" if self.interpolation != "bilinear" else "",
                         f", pool {self.pool}" if self.pool != "default" else "",
                         f", {self.crops} crops" if self.crops != 1 else "",
                         f", clips of {self.clip_frames} frames every {self.clip_stride}" if self.clip_stride else ""])
        return (f"{self.backbone} ({self.weights}), {self.size} px {self.resize}{extra}, {self.fps:g} fps, "
                f"{self.precision}, {self.feature_dim}-dim, decoded by {self.decoder}"
                + (f" on {self.decode_device}" if self.decode_device != "cpu" else ""))


def featurize_command(attrs: dict, cache_path: str = "", *, fps: float | None = None, keep_frames: bool | None = None,
                      out: str | None = None, source: str | None = None) -> str:
    """The ``featseq featurize`` command line that makes a cache the way the one with ``attrs`` was made (backbone,
    weights, seed, size, resize, resize size, interpolation, precision, dtype, decoder, pool, crops, frames kept), at ``fps`` (default the cache's) and with
    ``keep_frames`` (default as it was), into ``out`` (default a name next to ``cache_path`` that says what differs).
    For the hints of errors that propose to featurize again: run as written, it makes that cache, not a default one."""
    import shlex

    spec = FeatureSpec.from_attrs(attrs)
    if spec.imported:
        raise UserError(f"{cache_path or 'the cache'}: imported from {spec.imported} files by featseq cache import "
                        f"({attrs.get('import_path', '')}); no featurize command makes such features")
    config = attrs.get("config") if isinstance(attrs.get("config"), dict) else {}
    fps = spec.fps if fps is None else float(fps)
    frames = bool(attrs.get("keep_frames")) if keep_frames is None else bool(keep_frames)
    src = source or str(attrs.get("source") or "")
    if not src or attrs.get("source_kind") == "records":  # segments handed over in Python (predict): no source to name
        src = "SOURCE"
    weights = spec.weights_arg()
    args = [src, "--backbone", spec.backbone, "--weights", weights]
    if weights == "none":
        args += ["--seed", str(spec.seed)]
    args += ["--size", str(spec.size), "--resize", spec.resize, "--fps", f"{spec.frame_fps(fps):g}",
             "--precision", spec.precision,
             "--dtype", str(attrs.get("dtype") or "float16"), "--decoder", spec.decoder,
             "--resize-size", spec.decode_args()["resize_size"], "--interpolation", spec.interpolation]
    if spec.pool != "default":
        args += ["--pool", spec.pool]
    if spec.crops != 1:
        args += ["--crops", str(spec.crops)]
    if spec.clip_stride:
        args += ["--clip-frames", str(spec.clip_frames), "--clip-stride", str(spec.clip_stride)]
    if spec.decode_device == "cuda" or config.get("decode_device") == "cuda":
        args += ["--decode-device", "cuda"]
    if frames:
        args.append("--keep-frames")
    if out is None:
        p = Path(cache_path or "cache.h5")
        name = p.stem
        if abs(fps - spec.fps) > 1e-9:
            # the default cache name (pipeline.default_cache_path) says the frames' rate
            old, new = f"__{spec.frame_fps():g}fps__", f"__{spec.frame_fps(fps):g}fps__"
            name = name.replace(old, new) if old in name else f"{name}_{spec.frame_fps(fps):g}fps"
        if frames and not attrs.get("keep_frames"):
            name += "__frames" if "__" in name else "_frames"
        out = str(p.with_name(name + p.suffix))
    args += ["--out", out]
    return "featseq featurize " + " ".join(shlex.quote(a) for a in args)
