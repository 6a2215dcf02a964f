"""The train command's options: one dataclass, validated up front with messages naming the CLI flag.

Kept free of torch imports so the command line starts fast; ``featseq train`` and ``featseq sweep``
build their options from these fields and :data:`OPTION_HELP`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


MODEL_NAMES = ("lstm", "gru", "rnn", "conv1d", "transformer", "mlp", "frame")  # tests check this equals models.MODELS
SPLIT_NAMES = ("random", "seed-compat", "group", "kfold", "group-kfold", "logo")  # and splits.SPLITS
POOLINGS = ("last", "mean", "max", "attention")
OFFSETS = ("start", "center", "random")


@dataclass(frozen=True)
class ReaderConfig:
    fps: float | None = None          # None: the cache's fps
    seconds: float | None = None      # None: 5th percentile of segment durations
    percent: float = 100.0
    seq_len: int | None = None        # overrides seconds/percent
    offset: str = "start"
    min_coverage: float = 0.0         # drop segments whose window is less covered than this (0..1)

    def validate(self) -> None:
        problems = []
        if self.fps is not None and self.fps <= 0:
            problems.append(f"--fps must be > 0, got {self.fps}")
        if self.seconds is not None and self.seconds <= 0:
            problems.append(f"--seconds must be > 0, got {self.seconds}")
        if not 0 < self.percent <= 100:
            problems.append(f"--percent must be in (0, 100], got {self.percent}")
        if self.seq_len is not None and self.seq_len < 1:
            problems.append(f"--seq-len must be >= 1, got {self.seq_len}")
        if self.offset not in OFFSETS:
            problems.append(f"--offset must be one of {', '.join(OFFSETS)}, got {self.offset!r}")
        if not 0 <= self.min_coverage <= 1:
            problems.append(f"--min-coverage must be in [0, 1], got {self.min_coverage}")
        if problems:
            raise ValueError("; ".join(problems))


CLASS_WEIGHTS = ("none", "balanced")


@dataclass
class TrainConfig:
    cache: str
    out: str
    # model
    model: str = "lstm"
    hidden: int = 128
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.2
    pooling: str | None = None       # None: the model's default (last for recurrent, max for conv1d, mean for transformer)
    kernel: int = 3
    heads: int = 4
    # sequences
    fps: float | None = None
    seconds: float | None = None
    percent: float = 100.0
    seq_len: int | None = None
    offset: str = "start"
    min_coverage: float = 0.0
    # split
    split: str = "random"
    test_size: float = 0.2
    val_size: float = 0.15
    folds: int = 5
    seed: int = 0
    # optimisation
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    patience: int = 10
    class_weights: str = "none"
    label_smoothing: float = 0.0
    standardize: bool = True
    device: str = "auto"
    threads: int | None = None
    plots: bool = True

    def reader(self) -> ReaderConfig:
        return ReaderConfig(fps=self.fps, seconds=self.seconds, percent=self.percent, seq_len=self.seq_len,
                            offset=self.offset, min_coverage=self.min_coverage)

    def model_kwargs(self) -> dict:
        from . import models as M

        kw = {"hidden": self.hidden, "layers": self.layers, "bidirectional": self.bidirectional, "dropout": self.dropout,
              "kernel": self.kernel, "heads": self.heads}
        if self.pooling is not None:
            kw["pooling"] = self.pooling
        return M.model_options(self.model, **kw)

    def validate(self) -> None:
        problems = []
        if self.model not in MODEL_NAMES:
            problems.append(f"--model: unknown model {self.model!r}; known models: {', '.join(MODEL_NAMES)}")
        if self.split not in SPLIT_NAMES:
            problems.append(f"--split: unknown split {self.split!r}; known splits: {', '.join(SPLIT_NAMES)}")
        if self.hidden < 1:
            problems.append(f"--hidden must be >= 1, got {self.hidden}")
        if not 1 <= self.layers <= 8:
            problems.append(f"--layers must be in 1..8, got {self.layers}")
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            problems.append(f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.kernel < 1:
            problems.append(f"--kernel must be >= 1, got {self.kernel}")
        if self.heads < 1:
            problems.append(f"--heads must be >= 1, got {self.heads}")
        if not 0 < self.test_size < 1:
            problems.append(f"--test-size must be in (0, 1), got {self.test_size}")
        if not 0 <= self.val_size < 1:
            problems.append(f"--val-size must be in [0, 1), got {self.val_size}")
        if self.epochs < 1:
            problems.append(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.patience < 1:
            problems.append(f"--patience must be >= 1, got {self.patience}")
        if self.class_weights not in CLASS_WEIGHTS:
            problems.append(f"--class-weights must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights!r}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads must be >= 1, got {self.threads}")
        try:
            self.reader().validate()
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))


def config_from_dict(d: dict) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------- command-line help, shared by train and sweep

OPTION_HELP = {
    "model": f"Sequence model: {', '.join(MODEL_NAMES)} (mlp and frame are order-blind baselines).",
    "hidden": "Hidden size.",
    "layers": "Stacked layers (recurrent 1-3 typical; conv1d/transformer layers; mlp/frame hidden layers).",
    "bidirectional": "Bidirectional recurrent model.",
    "dropout": "Dropout.",
    "pooling": "Pooling over time: last, mean, max, attention [default: last for lstm/gru/rnn, max for conv1d, mean for transformer].",
    "kernel": "conv1d kernel size (frames).",
    "heads": "transformer attention heads.",
    "fps": "Frames per second read from the cache (at most the cache's fps) [default: the cache's fps].",
    "seconds": "Window length in seconds [default: 5th percentile of the clip durations].",
    "percent": "Percentage of the window used: seq_len = floor(seconds * percent/100 * fps).",
    "seq_len": "Frames per sequence, overriding --seconds/--percent (original study: 25/20/12 at 1 fps, 51/41/25 at 2, 77/62/38 at 3).",
    "offset": "Where the window starts: start, center, random (temporal jitter in training; center for evaluation).",
    "min_coverage": "Drop segments whose window is covered less than this fraction (0-1); shorter ones are padded and masked.",
    "split": "random (stratified), seed-compat (the original study's sklearn split, random_state 42), group, kfold, group-kfold (whole groups per fold), logo.",
    "test_size": "Test fraction (random, group).",
    "val_size": "Validation fraction, carved out of the training part (0: no early stopping, last epoch kept).",
    "folds": "Folds of --split kfold and group-kfold.",
    "seed": "Seed of the split, the initialisation and the batch order.",
    "epochs": "Maximum epochs.",
    "batch_size": "Batch size.",
    "lr": "AdamW learning rate.",
    "weight_decay": "AdamW weight decay.",
    "patience": "Early stopping: epochs without validation improvement.",
    "class_weights": "none or balanced (inverse class frequency in the loss).",
    "label_smoothing": "Label smoothing of the loss.",
    "standardize": "Z-score features with the training frames' mean/std (stored in the model).",
    "device": "auto, cpu or cuda.",
    "threads": "torch CPU threads [default: torch's; a sweep uses cores // jobs].",
    "plots": "Write curves.png and confusion.png.",
}
