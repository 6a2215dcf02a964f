"""The options of train, sweep, finetune, predict and predict --stream: one dataclass per command, validated up front
with messages naming the CLI flag. Each field carries its default and its help (featseq.common.options.option); the
CLI builds its flags from them, so the Python API and the command line agree. The names of models and splits, and a
model's option defaults, are sequence/catalog.py's.

Kept free of torch imports so the command line starts fast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import click

from featseq.featurize.precision import AUTO as AUTO_PRECISION, AUTO_HELP as PRECISION_AUTO_HELP, CHOICES as PRECISIONS

from . import catalog
from featseq.common.options import option
from featseq.featurize.config import FeaturizeConfig

from .catalog import AUTO_SPLIT, MODEL_OPTIONS, model_option_problems, option_default, parse_split
from .tracking import parse_track

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
# options that change nothing a run computes (how it runs or what it writes)
RUNTIME_OPTIONS = ("device", "threads", "plots", "score_train", "overwrite", "track")


@dataclass
class TrainConfig:
    cache: str
    out: str
    # model
    model: str = option("lstm", f"Sequence model: {', '.join(catalog.MODELS)} ({' and '.join(catalog.ORDER_BLIND)} "
                                f"are order-blind baselines).")
    # the model's options: None takes its catalog default (sequence/catalog.py), filled in when the config is made
    hidden: int | None = option(None, f"Hidden size [default: {option_default('hidden')}].")
    layers: int | None = option(None, "Stacked layers (recurrent 1-3 typical; conv1d/transformer layers; mlp/frame "
                                      f"hidden layers) [default: {option_default('layers')}].")
    bidirectional: bool | None = option(None, "Bidirectional recurrent model "
                                              f"[default: {option_default('bidirectional')}].")
    dropout: float | None = option(None, f"Dropout [default: {option_default('dropout')}].")
    pooling: str | None = option(None, f"Pooling over time: {', '.join(catalog.POOLINGS)} "
                                       f"[default: {option_default('pooling')}].")
    kernel: int | None = option(None, f"conv1d kernel size (frames) [default: {option_default('kernel')}].")
    heads: int | None = option(None, f"transformer attention heads [default: {option_default('heads')}].")
    # sequences
    fps: float | None = option(None, "Frames per second read from the cache (its fps divided by a whole number) "
                                     "[default: the cache's fps].")
    seconds: float | None = option(None, "Window length in seconds [default: 5th percentile of the clip durations].")
    percent: float = option(100.0, "Percentage of the window used: seq_len = floor(seconds * percent/100 * fps).")
    seq_len: int | None = option(None, "Frames per sequence, overriding --seconds/--percent (original study: 25/20/12 "
                                       "at 1 fps, 51/41/25 at 2, 77/62/38 at 3).")
    offset: str = option("start", "Where the window starts: start, center, random (temporal jitter in training; "
                                  "center for evaluation).")
    min_coverage: float = option(0.0, "Drop segments whose window is covered less than this fraction (0-1); shorter "
                                      "ones are padded and masked.")
    # split
    # resolved from the cache's groups (sequence.splits.choose_split)
    split: str = option(AUTO_SPLIT, "auto (the default): group when the cache's groups hold several segments each "
                                    "(participants, source videos), random when every segment is its own group; the "
                                    "choice is printed. random (stratified), seed-compat (the original study's "
                                    "sklearn split, random_state 42), group, kfold, group-kfold (whole groups per "
                                    "fold), logo, predefined (the manifest's split column), ucf101:K or hmdb51:K (the "
                                    "dataset's official split K from its lists, see --split-dir).")
    split_dir: str | None = option(None, "Folder of the official split lists of --split ucf101:K (classInd.txt, "
                                         "trainlist0K.txt, testlist0K.txt) or hmdb51:K (<class>_test_splitK.txt) "
                                         "[default: found next to the source].")
    test_size: float = option(0.2, "Test fraction (random, group).")
    val_size: float = option(0.15, "Validation fraction, carved out of the training part (0: no early stopping, last "
                                   "epoch kept).")
    folds: int = option(5, "Folds of --split kfold and group-kfold.")
    seed: int = option(0, "Seed of the split, the initialisation and the batch order.")
    # optimisation
    epochs: int = option(30, "Maximum epochs.")
    batch_size: int = option(32, "Batch size (finetune under torchrun: the global batch, shared out among the ranks).")
    lr: float = option(1e-3, "AdamW learning rate.")
    weight_decay: float = option(1e-2, "AdamW weight decay.")
    patience: int = option(10, "Early stopping: epochs without validation improvement.")
    class_weights: str = option("none", "none or balanced (inverse class frequency in the loss).")
    label_smoothing: float = option(0.0, "Label smoothing of the loss.")
    standardize: bool = option(True, "Z-score features with the training frames' mean/std (stored in the model).")
    device: str = option("auto", "auto, cpu or cuda.")
    threads: int | None = option(None, "torch CPU threads [default: torch's; a sweep uses cores // jobs].")
    plots: bool = option(True, "Write curves.png and confusion.png.")
    score_train: bool = option(True, "Score the training part with the best weights too, for predictions.csv's "
                                     "train rows (validation and test are scored anyway). At scale this is most of "
                                     "the time after the last epoch (UCF-101 size, 2 cores: 8.0 of 12.1 s); "
                                     "--no-score-train leaves those rows' probabilities empty (featseq evaluate RUN "
                                     "--score-all scores every part later, into RUN/eval_<cache>/).")
    overwrite: bool = option(False, "Replace the finished run --out holds (its files are deleted first); without it "
                                    "such a folder is refused.")
    track: str = option("none", "Experiment trackers: none, or tensorboard, mlflow or both (comma list): TensorBoard "
                                "event files in RUN/tensorboard/; MLflow to $MLFLOW_TRACKING_URI, else the store "
                                "mlruns/ beside --out (optional extras: pip install 'featseq[tensorboard]', "
                                "'featseq[mlflow]').", metavar="none|tensorboard,mlflow")

    def __post_init__(self) -> None:
        """Unset options of the model take the catalog's defaults; options it does not use stay as given."""
        if self.model in catalog.MODELS:
            for k, v in catalog.model_options(self.model, **{k: getattr(self, k) for k in MODEL_OPTIONS}).items():
                setattr(self, k, v)

    def reader(self) -> ReaderConfig:
        return ReaderConfig(fps=self.fps, seconds=self.seconds, percent=self.percent, seq_len=self.seq_len,
                            offset=self.offset, min_coverage=self.min_coverage)

    def model_kwargs(self) -> dict:
        """The options of this config's model (None: the model's default)."""
        return catalog.model_options(self.model, **{k: getattr(self, k) for k in MODEL_OPTIONS})

    def validate(self) -> None:
        problems = []
        if self.model not in catalog.MODELS:
            problems.append(f"--model: unknown model {self.model!r}; known models: {', '.join(catalog.MODELS)}")
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
            parse_track(self.track)
        except ValueError as e:
            problems.append(str(e))
        try:
            self.reader().validate()
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))


# what --from RUN hands down to finetune when the option is left at None
INHERITED = ("model",) + MODEL_OPTIONS + ("fps", "seconds", "percent", "seq_len", "offset", "min_coverage", "split",
                                          "split_dir", "test_size", "val_size", "folds", "seed", "weight_decay",
                                          "class_weights", "label_smoothing", "standardize")


@dataclass
class FinetuneConfig(TrainConfig):
    """finetune's options. A field left at None is inherited from ``--from RUN`` (its config and split), or
    takes train's default without --from; finetune's own defaults (epochs, batch size) are its own."""
    model: str | None = None
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
    from_run: str | None = option(None, "Warm-start from a cached-feature run: its sequence model, options, split and "
                                        "featurize settings (a cross-validation folder, e.g. a cross-validated sweep "
                                        "variant: its best fold by validation accuracy).", flag="--from")
    # "0" (frozen CNN), N (last N stages), "all"
    unfreeze: str = option("0", "0: frozen CNN (the original CRNN); N: its last N stages; all.")
    backbone_lr: float = option(1e-4, "Learning rate of the CNN (--lr is the sequence model's).")
    freeze_bn: bool = option(True, "Keep BatchNorm statistics frozen (small batches); --train-bn on several GPUs: "
                                   "SyncBatchNorm.", flag="--freeze-bn/--train-bn")
    augment: bool = option(False, "Random resized crop + flip per clip (off: position can carry meaning).")
    accumulate: int = option(1, "Gradient accumulation steps.")
    checkpointing: bool = option(False, "Gradient checkpointing through the CNN (less memory, more compute).")
    compile: bool = option(False, "Run the CNN through torch.compile (its batch dimension dynamic: the real frames of "
                                  "a batch vary); a compiler failure falls back to eager.", flag="--compile")
    precision: str = option(AUTO_PRECISION, f"Autocast precision; {PRECISION_AUTO_HELP}.", choices=PRECISIONS)
    channels_last: bool = option(True, "NHWC memory format for the CNN on CUDA.")
    resume: bool = option(False, "Continue an interrupted run from its last.pt (without it, or --overwrite, such a "
                                 "folder is refused).")
    keep_frames: bool = option(False, "When SOURCE is a video source: featurize it with --keep-frames first.")
    # to featurize a video SOURCE without --from (with --from, the run's featurize spec is used)
    backbone: str | None = option(None, "Without --from, to featurize a video SOURCE: the backbone (then --weights, "
                                        "--size and --fps default to featurize's).")
    weights: str | None = option(None, "Without --from, to featurize a video SOURCE: the weights "
                                       f"[default: featurize's, {FeaturizeConfig.weights}].")
    size: int | None = option(None, "Without --from, to featurize a video SOURCE: the input size "
                                    "[default: featurize's, the backbone's own].")
    decode_timeout: float = option(FeaturizeConfig.decode_timeout, "Seconds without a frame before a decoder is "
                                   "declared hung (featurizing a video SOURCE, and frames decoded from video).")
    decode_workers: int | None = option(None, "Decoder processes preparing the frames of a cache without /frames "
                                              "[default: featurize's for a GPU's CNN (this rank's share of the CPUs "
                                              "minus one); 1 when the CNN runs on the CPU].",
                                        type=click.IntRange(1), metavar="N")
    # under torchrun: seconds a rank waits for the others in a collective
    dist_timeout: float = option(1800.0, "Under torchrun: seconds a rank waits for the others in a collective before "
                                         "it stops.")

    def __post_init__(self) -> None:
        """Nothing filled here: a None is inherited (:meth:`inherit`), the model's options with the model."""

    def inherit(self, run_config: dict | None, reader: dict | None) -> "FinetuneConfig":
        """Every None of :data:`INHERITED` filled from a run's config (or train's defaults without one, a model's
        options from the model's catalog entry). With none of --fps/--seconds/--percent/--seq-len given, the run's
        resolved fps and sequence length are kept."""
        model = self.model or (run_config or {}).get("model") or TrainConfig.model
        base = TrainConfig(cache=self.cache, out=self.out, model=model)
        window = ("fps", "seconds", "percent", "seq_len")
        keep_window = run_config is not None and reader is not None and all(getattr(self, k) is None for k in window)
        filled = {}
        for k in INHERITED:
            if getattr(self, k) is None:
                given = run_config.get(k) if run_config is not None else None
                filled[k] = given if given is not None else getattr(base, k)
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
        if self.compile and self.checkpointing:
            problems.append("--compile and --checkpointing: choose one (checkpointing re-runs the CNN in the backward "
                            "pass, outside the compiled graph)")
        if self.from_run is None and (why := cv_split_problem(self.split)):
            # (with --from, the run's own train/val/test ids are used: a cross-validation's best fold has its
            # split inherited; a cross-validation asked for with --from is refused before inherit, by finetune)
            problems.append(why)
        if problems:
            raise ValueError("; ".join(problems))


def cv_split_problem(split: str | None) -> str | None:
    """Why finetune refuses ``split`` (a cross-validation: finetune trains one model), else None."""
    if split is None or split == AUTO_SPLIT or not catalog.split_spec(split).cv:
        return None
    return (f"--split {split}: finetune trains one model; use random, seed-compat or group "
            f"(cross-validate with cached features: featseq train --split {split})")


# ---------------------------------------------------------------- predict and predict --stream

@dataclass
class PredictConfig:
    run: str
    videos: list
    window: float | None = option(None, "Sliding window length in seconds [default: the whole video is one window].")
    stride: float | None = option(None, "Seconds between window starts [default: --window].")
    threshold: float = option(0.5, "Probability the predicted class must reach (above_threshold column).")
    out: str | None = option(None, "Output folder [default: RUN_DIR/predict].", type=click.Path(file_okay=False))
    cache: str | None = option(None, "Keep the videos' per-frame features in this .h5 file (resumed on the next call) "
                                     "[default: a temporary file].", type=click.Path(dir_okay=False))
    device: str = option("auto", "auto, cpu or cuda.")
    precision: str | None = option(None, f"Autocast precision of the CNN; {PRECISION_AUTO_HELP} [default: the run's, "
                                         "as its features were made].", choices=PRECISIONS)
    batch_size: int = option(64, "Frames per backbone batch.")
    compile: bool = option(False, "Run the CNN through torch.compile (featurize --compile; also with --stream).",
                           flag="--compile")
    plots: bool = option(True, "No timeline plots.", flag="--no-plots")
    explain: bool = option(False, "Also explain every window: the importance of each of its frames for the predicted "
                                  "class (integrated gradients; attributions.csv, importance_<video>.png).")
    decode_timeout: float = option(FeaturizeConfig.decode_timeout, "Seconds without a frame before a decoder is "
                                   "declared hung, killed and its video skipped.")

    def validate(self) -> None:
        problems = []
        if not self.videos:
            problems.append("give at least one VIDEO")
        if self.window is not None and self.window <= 0:
            problems.append(f"--window must be > 0 seconds, got {self.window}")
        if self.stride is not None and self.stride <= 0:
            problems.append(f"--stride must be > 0 seconds, got {self.stride}")
        if self.stride is not None and self.window is None:
            problems.append("--stride needs --window")
        if not 0 <= self.threshold <= 1:
            problems.append(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.cache is not None and not str(self.cache).endswith((".h5", ".hdf5")):
            problems.append(f"--cache {self.cache}: give a .h5 file name")
        missing = [v for v in self.videos if not os.path.isfile(v)]
        if missing:
            problems.append(f"no such video file(s): {', '.join(map(str, missing))}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class StreamConfig:
    """predict --stream's options; stride, threshold, out, device, precision, batch size and compile are predict's
    flags."""
    run: str
    source: str = option(help="Classify a live stream instead of VIDEO files: /dev/videoN, rtsp://, http://, "
                              "udp://..., - (a container on standard input) or a file; one line per window on stdout.",
                         flag="--stream", metavar="SOURCE")
    stride: float | None = None       # seconds between windows [default: about 1 s, a whole number of frame periods]
    threshold: float = 0.5
    realtime: bool = option(False, "--stream FILE: play the file at its own rate (as a live source).")
    positive_windows: int = option(0, "--stream: print an alert when this many consecutive windows predict one class "
                                      "at p >= --threshold (0: off).", type=click.IntRange(0))
    stall_timeout: float = option(10.0, "--stream: stop (exit 1, predictions kept) when the source sends nothing for "
                                        "this many seconds.")
    out: str | None = None
    device: str = "auto"
    precision: str | None = None
    batch_size: int = 16
    compile: bool = False             # the CNN through torch.compile (featurize.compiled)
    max_queue: int = 32               # frames waiting for the CNN before the oldest are dropped (live sources)
    save_features: str | None = option(None, "--stream: also write every embedded frame's stream time and features to "
                                             "this .npz file.", type=click.Path(dir_okay=False))

    def validate(self) -> None:
        problems = []
        if self.stride is not None and self.stride <= 0:
            problems.append(f"--stride must be > 0 seconds, got {self.stride}")
        if not 0 <= self.threshold <= 1:
            problems.append(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.positive_windows < 0:
            problems.append(f"--positive-windows must be >= 0, got {self.positive_windows}")
        if self.stall_timeout <= 0:
            problems.append(f"--stall-timeout must be > 0 seconds, got {self.stall_timeout}")
        if self.batch_size < 1 or self.max_queue < 1:
            problems.append("--batch-size and the queue must hold at least one frame")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def live(self) -> bool:
        return self.realtime or not os.path.isfile(self.source)


# featseq explain (sequence/explain.py); the names of sequence/attribution.py, kept here free of torch
EXPLAIN_METHODS = ("integrated-gradients", "occlusion")
EXPLAIN_BASELINES = ("mean", "zeros")
EXPLAIN_PARTS = ("test", "val", "train", "all")


@dataclass
class ExplainConfig:
    """featseq explain's options (sequence/explain.py); methods and baselines are sequence/attribution.py's."""

    run: str
    cache: str | None = option(None, "Another cache with the same features [default: the run's own cache].",
                               type=click.Path(exists=True, dir_okay=False))
    ids: str | None = option(None, "Comma-separated segment ids to explain [default: every segment of --part].")
    part: str = option("test", "Which segments: the run's test part (on another cache: the ids it did not train or "
                               "validate on), val, train or all.", choices=EXPLAIN_PARTS)
    method: str = option("integrated-gradients", "Attribution over time.", choices=EXPLAIN_METHODS)
    baseline: str = option("mean", "What a step is compared with: the training frames' mean (no information after "
                                    "the model's standardisation) or zero features.", choices=EXPLAIN_BASELINES)
    steps: int = option(32, "Integrated gradients: steps of the path integral.")
    occlusion_window: int = option(3, "Occlusion: steps hidden at a time.")
    gradcam: int = option(3, "Grad-CAM overlays at this many most important frames per segment (decodes them; 0: none).")
    max_plots: int = option(50, "Importance and Grad-CAM figures for at most this many segments (the CSV has all).")
    out: str | None = option(None, "Output folder [default: RUN/explain].", type=click.Path(file_okay=False))
    device: str = option("auto", "auto, cpu or cuda.")
    decode_timeout: float = option(FeaturizeConfig.decode_timeout, "Seconds without a frame before the decoder is "
                                   "declared hung (--gradcam, a fine-tuned run's frames).")

    def validate(self) -> None:
        problems = []
        if self.steps < 2:
            problems.append(f"--steps must be >= 2, got {self.steps}")
        if self.occlusion_window < 1:
            problems.append(f"--occlusion-window must be >= 1, got {self.occlusion_window}")
        if self.gradcam < 0 or self.max_plots < 0:
            problems.append("--gradcam and --max-plots take a count >= 0")
        if problems:
            raise ValueError("; ".join(problems))
