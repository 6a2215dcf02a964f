"""The options of train, sweep and finetune: one dataclass per command, validated up front with messages naming
the CLI flag. Each dataclass owns its defaults; the CLI builds its flags from these fields and
:data:`OPTION_HELP`, so the Python API and the command line agree.

Kept free of torch imports so the command line starts fast.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


MODEL_NAMES = ("lstm", "gru", "rnn", "conv1d", "transformer", "mlp", "frame")  # tests check this equals models.MODELS
SPLIT_NAMES = ("random", "seed-compat", "group", "kfold", "group-kfold", "logo", "predefined", "ucf101",
               "hmdb51")  # and splits.SPLITS
SPLIT_LISTS = {"ucf101": 3, "hmdb51": 3}  # splits read from a dataset's official lists: --split NAME:K, K in 1..this
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


AUTO_SPLIT = "auto"  # the default --split: group when the cache's groups hold several segments, else random
                    # (sequence.splits.choose_split resolves it from the cache before anything is split)


def parse_split(split: str) -> tuple[str, int | None]:
    """--split -> (name, K): 'ucf101:1' -> ('ucf101', 1), 'group' -> ('group', None). ValueError naming --split."""
    if split == AUTO_SPLIT:
        return AUTO_SPLIT, None
    name, sep, k = str(split).partition(":")
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown --split {split!r}; known splits: {AUTO_SPLIT}, "
                         f"{', '.join(n + ':K' if n in SPLIT_LISTS else n for n in SPLIT_NAMES)}")
    if name not in SPLIT_LISTS:
        if sep:
            raise ValueError(f"--split {split}: {name} takes no :K (only {', '.join(SPLIT_LISTS)} do)")
        return name, None
    n = SPLIT_LISTS[name]
    if not (k.isdigit() and 1 <= int(k) <= n):
        raise ValueError(f"--split {split}: give {name}:K with K in 1..{n}, the official split number "
                         f"(e.g. --split {name}:1)")
    return name, int(k)


CLASS_WEIGHTS = ("none", "balanced")
# TrainConfig fields that are options of a sequence model: each model uses those its registry entry lists
# (sequence.models), and the sweep treats the rest as irrelevant to it.
MODEL_OPTIONS = ("hidden", "layers", "bidirectional", "dropout", "pooling", "kernel", "heads")


def model_option_problems(opts: dict) -> list[str]:
    """What is wrong with sequence-model options (None: the model's default), each naming its flag. The one check,
    used by TrainConfig.validate and by sequence.models.create_model."""
    checks = {"hidden": (lambda v: v >= 1, "must be >= 1"), "layers": (lambda v: 1 <= v <= 8, "must be in 1..8"),
              "dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"), "kernel": (lambda v: v >= 1, "must be >= 1"),
              "heads": (lambda v: v >= 1, "must be >= 1"),
              "pooling": (lambda v: v in POOLINGS, f"must be one of {', '.join(POOLINGS)}")}
    return [f"--{k} {text}, got {opts[k]!r}" for k, (ok, text) in checks.items()
            if opts.get(k) is not None and not ok(opts[k])]


# options that change nothing a run computes (how it runs or what it writes)
RUNTIME_OPTIONS = ("device", "threads", "plots", "overwrite")


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
    split: str = AUTO_SPLIT          # resolved from the cache's groups (sequence.splits.choose_split)
    split_dir: str | None = None     # ucf101:K / hmdb51:K: the folder of the official lists (None: next to the source)
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
    overwrite: bool = False          # replace a finished run in ``out`` (its files are deleted first)

    def reader(self) -> ReaderConfig:
        return ReaderConfig(fps=self.fps, seconds=self.seconds, percent=self.percent, seq_len=self.seq_len,
                            offset=self.offset, min_coverage=self.min_coverage)

    def model_kwargs(self) -> dict:
        """The options of this config's model (None: the model's default)."""
        from . import models as M

        return M.model_options(self.model, **{k: getattr(self, k) for k in MODEL_OPTIONS})

    def validate(self) -> None:
        problems = []
        if self.model not in MODEL_NAMES:
            problems.append(f"--model: unknown model {self.model!r}; known models: {', '.join(MODEL_NAMES)}")
        try:
            parse_split(self.split)
        except ValueError as e:
            problems.append(str(e))
        problems += model_option_problems({k: getattr(self, k) for k in MODEL_OPTIONS})
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


PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# what --from RUN hands down to finetune when the option is left at None
INHERITED = ("model",) + MODEL_OPTIONS + ("fps", "seconds", "percent", "seq_len", "offset", "min_coverage", "split",
                                          "split_dir", "test_size", "val_size", "folds", "seed", "weight_decay", "class_weights",
                                          "label_smoothing", "standardize")


@dataclass
class FinetuneConfig(TrainConfig):
    """finetune's options. A field left at None is inherited from ``--from RUN`` (its config and split), or
    takes train's default without --from; finetune's own defaults (epochs, batch size) are its own."""
    model: str | None = None
    hidden: int | None = None
    layers: int | None = None
    bidirectional: bool | None = None
    dropout: float | None = None
    kernel: int | None = None
    heads: int | None = None
    percent: float | None = None
    offset: str | None = None
    min_coverage: float | None = None
    split: str | None = None
    test_size: float | None = None
    val_size: float | None = None
    folds: int | None = None
    seed: int | None = None
    weight_decay: float | None = None
    class_weights: str | None = None
    label_smoothing: float | None = None
    standardize: bool | None = None
    epochs: int = 5
    batch_size: int = 8
    from_run: str | None = None
    unfreeze: str = "0"              # "0" (frozen CNN), N (last N stages), "all"
    backbone_lr: float = 1e-4
    freeze_bn: bool = True           # keep BatchNorm statistics (small batches)
    augment: bool = False            # random resized crop + flip, the same for every frame of a clip
    accumulate: int = 1              # gradient accumulation steps
    checkpointing: bool = False      # gradient checkpointing through the trunk
    precision: str = "auto"          # auto: bf16/fp16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True
    resume: bool = False
    keep_frames: bool = False        # when SOURCE is a video source: featurize with --keep-frames
    # to featurize a video SOURCE without --from (with --from, the run's featurize spec is used)
    backbone: str | None = None
    weights: str | None = None
    size: int | None = None
    decode_timeout: float = 120.0
    dist_timeout: float = 1800.0     # under torchrun: seconds a rank waits for the others in a collective

    def inherit(self, run_config: dict | None, reader: dict | None) -> "FinetuneConfig":
        """Every None of :data:`INHERITED` filled from a run's config (or train's defaults without one). With none of
        --fps/--seconds/--percent/--seq-len given, the run's resolved fps and sequence length are kept."""
        base = TrainConfig(cache=self.cache, out=self.out)
        window = ("fps", "seconds", "percent", "seq_len")
        keep_window = run_config is not None and reader is not None and all(getattr(self, k) is None for k in window)
        filled = {}
        for k in INHERITED:
            if getattr(self, k) is None:
                filled[k] = run_config[k] if run_config is not None and k in run_config else getattr(base, k)
        if keep_window:
            filled.update(fps=reader["fps"], seq_len=reader["seq_len"])
        return replace(self, **filled)

    def validate(self) -> None:
        unset = [f"--{k.replace('_', '-')}" for k in INHERITED if getattr(self, k) is None
                 and getattr(TrainConfig, k, None) is not None]
        if unset:
            raise ValueError(f"finetune options {', '.join(unset)} are unset; call FinetuneConfig.inherit() first")
        super().validate()
        problems = []
        if self.unfreeze != "all" and not (str(self.unfreeze).isdigit()):
            problems.append(f"--unfreeze must be 0, a number of stages or 'all', got {self.unfreeze!r}")
        if self.backbone_lr <= 0:
            problems.append(f"--backbone-lr must be > 0, got {self.backbone_lr}")
        if self.accumulate < 1:
            problems.append(f"--accumulate must be >= 1, got {self.accumulate}")
        if self.dist_timeout <= 0:
            problems.append(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.from_run is None and (why := cv_split_problem(self.split)):
            # (with --from, the run's own train/val/test ids are used: a cross-validation's best fold has its
            # split inherited; a cross-validation asked for with --from is refused before inherit, by finetune)
            problems.append(why)
        if problems:
            raise ValueError("; ".join(problems))


def cv_split_problem(split: str | None) -> str | None:
    """Why finetune refuses ``split`` (a cross-validation: finetune trains one model), else None."""
    from .splits import split_entry

    if split is None or split == AUTO_SPLIT or not split_entry(split).cv:
        return None
    return (f"--split {split}: finetune trains one model; use random, seed-compat or group "
            f"(cross-validate with cached features: featseq train --split {split})")


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
    "fps": "Frames per second read from the cache (its fps divided by a whole number) [default: the cache's fps].",
    "seconds": "Window length in seconds [default: 5th percentile of the clip durations].",
    "percent": "Percentage of the window used: seq_len = floor(seconds * percent/100 * fps).",
    "seq_len": "Frames per sequence, overriding --seconds/--percent (original study: 25/20/12 at 1 fps, 51/41/25 at 2, 77/62/38 at 3).",
    "offset": "Where the window starts: start, center, random (temporal jitter in training; center for evaluation).",
    "min_coverage": "Drop segments whose window is covered less than this fraction (0-1); shorter ones are padded and masked.",
    "split": "auto (the default): group when the cache's groups hold several segments each (participants, source "
             "videos), random when every segment is its own group; the choice is printed. random (stratified), "
             "seed-compat (the original study's sklearn split, random_state 42), group, kfold, "
             "group-kfold (whole groups per fold), logo, predefined (the manifest's split column), ucf101:K or "
             "hmdb51:K (the dataset's official split K from its lists, see --split-dir).",
    "split_dir": "Folder of the official split lists of --split ucf101:K (classInd.txt, trainlist0K.txt, "
                 "testlist0K.txt) or hmdb51:K (<class>_test_splitK.txt) [default: found next to the source].",
    "test_size": "Test fraction (random, group).",
    "val_size": "Validation fraction, carved out of the training part (0: no early stopping, last epoch kept).",
    "folds": "Folds of --split kfold and group-kfold.",
    "seed": "Seed of the split, the initialisation and the batch order.",
    "epochs": "Maximum epochs.",
    "batch_size": "Batch size (finetune under torchrun: the global batch, shared out among the ranks).",
    "lr": "AdamW learning rate.",
    "weight_decay": "AdamW weight decay.",
    "patience": "Early stopping: epochs without validation improvement.",
    "class_weights": "none or balanced (inverse class frequency in the loss).",
    "label_smoothing": "Label smoothing of the loss.",
    "standardize": "Z-score features with the training frames' mean/std (stored in the model).",
    "device": "auto, cpu or cuda.",
    "threads": "torch CPU threads [default: torch's; a sweep uses cores // jobs].",
    "plots": "Write curves.png and confusion.png.",
    "overwrite": "Replace the finished run --out holds (its files are deleted first); without it such a folder is "
                 "refused.",
    # finetune
    "from_run": "Warm-start from a cached-feature run: its sequence model, options, split and featurize settings "
                "(a cross-validation folder, e.g. a cross-validated sweep variant: its best fold by validation accuracy).",
    "unfreeze": "0: frozen CNN (the original CRNN); N: its last N stages; all.",
    "backbone_lr": "Learning rate of the CNN (--lr is the sequence model's).",
    "freeze_bn": "Keep BatchNorm statistics frozen (small batches); --train-bn on several GPUs: SyncBatchNorm.",
    "augment": "Random resized crop + flip per clip (off: position can carry meaning).",
    "accumulate": "Gradient accumulation steps.",
    "checkpointing": "Gradient checkpointing through the CNN (less memory, more compute).",
    "precision": "Autocast: auto is bf16 (or fp16) on CUDA, fp32 on CPU.",
    "channels_last": "NHWC memory format for the CNN on CUDA.",
    "resume": "Continue an interrupted run from its last.pt (without it, or --overwrite, such a folder is refused).",
    "keep_frames": "When SOURCE is a video source: featurize it with --keep-frames first.",
    "backbone": "Without --from, to featurize a video SOURCE: the backbone.",
    "weights": "Without --from, to featurize a video SOURCE: the weights.",
    "size": "Without --from, to featurize a video SOURCE: the input size.",
    "decode_timeout": "Seconds without a frame before a decoder is declared hung (frames decoded from video).",
    "dist_timeout": "Under torchrun: seconds a rank waits for the others in a collective before it stops.",
}
