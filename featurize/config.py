"""featurize's options: one dataclass, its defaults and each option's help beside its field, validated up front with
messages that name the CLI flag. ``featseq featurize`` builds its flags from these fields (featseq.common.options);
predict and finetune take their featurize defaults from here. Free of torch, so the command line starts fast.
"""
from __future__ import annotations

from dataclasses import dataclass

import click

from featseq.common.options import option

from .decoders import DECODE_DEVICES, DECODERS, INTERPOLATIONS, RESIZE_POLICIES
from .choices import CROPS, POOLS
from .precision import AUTO_HELP, CHOICES as PRECISION_CHOICES

DEFAULT_CACHE_DIR = "cache"
DTYPES = ("float16", "float32")  # storage dtypes of the features


@dataclass
class FeaturizeConfig:
    source: str
    backbone: str = option("resnet18", "resnet18/34/50/101/152, vgg16, efficientnet_b0, mobilenet_v3_large, ... or "
                                       "timm:<name>.")
    weights: str = option("none", "'none' (seeded random init), 'imagenet' (torchvision/timm default weights) or a "
                                  "state-dict file.")
    size: int | None = option(None, "Input size in pixels (frames become size x size) [default: the backbone's own: "
                                    "224 for torchvision CNNs, a timm model's pretrained input size, e.g. 518 for "
                                    "DINOv2].")
    pool: str = option("default", "How a frame's feature map becomes one vector: default (the model's own), avg, max, "
                                  "gem (p=3) for CNNs; token (class token), avg (mean of patch tokens), max, map for "
                                  "ViTs.", choices=POOLS)
    crops: int = option(1, "1, or 5 / 10 crops averaged: frames decoded at size/0.875 (256 for 224) and cut into "
                           "corners and centre (10: and their mirror images), as torchvision's FiveCrop/TenCrop.")
    clip_frames: int | None = option(None, "Clip backbones (r3d_18, mc3_18, r2plus1d_18, s3d, mvit_v2_s, swin3d_t): "
                                           "frames per clip [default: the model's own].", metavar="T")
    clip_stride: int | None = option(None, "Clip backbones: one clip every N sampled frames [default: T].",
                                     metavar="N")
    resize: str | None = option(None, "squash: whole frame resized to size x size (to --resize-size, then the centre "
                                      "size x size); crop: shorter side to size (to --resize-size), then centre crop "
                                      "[default: squash; a clip backbone's weights' own transforms].",
                                choices=RESIZE_POLICIES)
    resize_size: str | None = option(None, "What frames are resized to (by --resize) before the centre crop to --size: "
                                           "N (N x N, or the shorter side with --resize crop) or HxW [default: --size; "
                                           "floor(size / crop_pct) for a timm model; size / 0.875 with --crops 5/10; "
                                           "a clip backbone's weights' own, e.g. 128x171 for r3d_18].",
                                     metavar="N|HxW")
    interpolation: str = option("default", "How frames are resized. default: the model's own (timm's pretrained "
                                           "configuration, e.g. bicubic for ViTs and DINOv2; bilinear for torchvision "
                                           "models).", choices=("default",) + INTERPOLATIONS)
    fps: float = option(6.0, "Frames sampled per second of video (read back at 1/2/3/6 fps exactly with the default).")
    device: str = option("auto", "auto, cpu or cuda.")
    precision: str | None = option(None, f"Autocast precision; {AUTO_HELP} [default: auto's choice, except that a "
                                         f"resume keeps the precision its cache was made with].",
                                   choices=PRECISION_CHOICES)
    dtype: str = option("float16", "Storage dtype of the features.", choices=DTYPES)
    batch_size: int = option(64, "Frames gathered per CNN call (on the CPU it runs them in slices of 16 frames at 224 "
                                 "px: faster there, less memory).")
    channels_last: bool = option(True, "Keep NCHW memory format.", flag="--no-channels-last")
    compile: bool = option(False, "Run the CNN through torch.compile: faster once compiled (the first batch waits "
                                  "for the compilation, reported apart); a compiler failure falls back to eager. Not "
                                  "part of the cache's identity.", flag="--compile")
    out: str | None = option(None, "Cache file [default: cache/<source>__<backbone>__<weights>__<size>px__<resize>__"
                                   "<fps>fps__<precision>.h5, with __from<resize-size>__<interpolation> after "
                                   "<resize> when they are not the size itself and bilinear].")
    cache_dir: str = option(DEFAULT_CACHE_DIR, "Folder of default cache paths.")
    skip_errors: bool = option(False, "Skip missing, unreadable and undecodable videos (listed, also in "
                                      "<cache>.errors.json) and exit 0.")
    keep_frames: bool = option(False, "Also store the resized uint8 frames (lzf-compressed) for finetune.")
    decode_timeout: float = option(60.0, "Seconds without a frame before a decoder is declared hung, killed and its "
                                         "video skipped.")
    decoder: str = option("auto", "Video decoder. auto: pyav on the CPU (torchcodec with --decode-device cuda); "
                                  "resuming a cache, the decoder that made it.", choices=DECODERS)
    decode_device: str = option("cpu", "Where frames are decoded: cuda decodes on the GPU (NVDEC) with --decoder "
                                       "torchcodec.", choices=DECODE_DEVICES)
    decode_workers: int | None = option(None, "Decoder processes feeding the CNN [default, from this process's share "
                                              "of the CPUs (cgroup quota, divided among torchrun's ranks on the node): "
                                              "that share - 1 when the CNN runs on CUDA, the same but at most 4 when "
                                              "decoding on CUDA, 2 when the CNN shares the CPU (1 on one core)].",
                                        type=click.IntRange(1), metavar="N")
    seed: int = option(0, "Seed of --weights none.")
    refresh: bool = option(False, "Featurize again the cached segments whose video changed since (size or mtime "
                                  "differ from those recorded); without it such a cache is refused, listing them.")
    shard: str | None = option("auto", "K/N: featurize shard K of N (0-based) into <out>.part-K-of-N.h5, then `featseq "
                                       "cache merge`; auto: K/N from torchrun (RANK/WORLD_SIZE; rank 0 merges) or a SLURM "
                                       "array, else the whole source; none.")

    def validate(self) -> None:
        from .shard import parse  # (h5py: not imported by the command line before a command runs)

        checks = [
            (self.fps > 0, f"--fps must be > 0, got {self.fps}"),
            (self.size is None or self.size >= 16, f"--size must be >= 16 pixels, got {self.size}"),
            (self.pool in POOLS, f"--pool must be one of {', '.join(POOLS)}, got {self.pool!r}"),
            (self.crops in CROPS, f"--crops must be one of {', '.join(map(str, CROPS))}, got {self.crops}"),
            (self.crops == 1 or not self.keep_frames,
             "--keep-frames stores the frames finetune trains on, one per frame: it does not go with --crops "
             f"{self.crops}; featurize with --crops 1 to fine-tune"),
            (self.resize is None or self.resize in RESIZE_POLICIES,
             f"--resize must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}"),
            (self.interpolation in ("default",) + INTERPOLATIONS,
             f"--interpolation must be one of default, {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"),
            (self.dtype in DTYPES, f"--dtype must be {' or '.join(DTYPES)}, got {self.dtype!r}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.decoder in DECODERS, f"--decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}"),
            (self.decode_device in DECODE_DEVICES,
             f"--decode-device must be one of {', '.join(DECODE_DEVICES)}, got {self.decode_device!r}"),
            (self.decode_workers is None or self.decode_workers >= 1,
             f"--decode-workers must be >= 1, got {self.decode_workers}"),
            (self.decode_timeout > 0, f"--decode-timeout must be > 0 seconds, got {self.decode_timeout}"),
        ]
        problems = [why for ok, why in checks if not ok]
        try:
            parse(self.shard)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))
