"""The names a user picks from, and their facts, in one place: every sequence model (its options and their
defaults, whether it sees frame order) and every split (the options it reads, whether it cross-validates, holds
out whole groups or takes given parts). Free of torch and sklearn, so that the configs and the command line read
it without loading either. sequence/models.py builds each model named here and sequence/splits.py makes each
split; each refuses at import a name it does not implement, or one missing here.
"""
from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------- sequence models

POOLINGS = ("last", "mean", "max", "attention")
# the options of a sequence model; each model uses those its entry lists (train's flags of the same names)
MODEL_OPTIONS = ("hidden", "layers", "bidirectional", "dropout", "pooling", "kernel", "heads")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    options: dict          # option name -> default (a model option left unset takes this)
    order_aware: bool
    description: str


_RNN = {"hidden": 128, "layers": 1, "bidirectional": False, "dropout": 0.2, "pooling": "last"}
_RNN_TEXT = "1-3 stacked layers, optionally bidirectional; pooling last/mean/max/attention"
# One layer for conv1d and transformer as for the recurrent models: it already sees frame order (a kernel of 3
# frames, attention with positions), and every result the command line has produced used one.
MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("lstm", _RNN, True, f"LSTM, {_RNN_TEXT}"),
    ModelSpec("gru", _RNN, True, f"GRU, {_RNN_TEXT}"),
    ModelSpec("rnn", _RNN, True, f"Elman RNN (tanh), {_RNN_TEXT}"),
    ModelSpec("conv1d", {"hidden": 128, "layers": 1, "kernel": 3, "dropout": 0.2, "pooling": "max"}, True,
              "temporal convolutions (kernel size), masked pooling"),
    ModelSpec("transformer", {"hidden": 128, "layers": 1, "heads": 4, "dropout": 0.2, "pooling": "mean"}, True,
              "small transformer encoder (sinusoidal positions), masked pooling"),
    ModelSpec("mlp", {"hidden": 128, "layers": 1, "dropout": 0.2}, False,
              "order-blind baseline: MLP on the mean of the frame features"),
    ModelSpec("frame", {"hidden": 128, "layers": 1, "dropout": 0.2}, False,
              "order-blind baseline: a per-frame classifier, logits averaged over frames"),
)}


ORDER_BLIND = tuple(n for n, s in MODELS.items() if not s.order_aware)  # baselines that see a bag of frames


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def model_options(name: str, **kw) -> dict:
    """The options model ``name`` uses: its defaults updated by those of ``kw`` it knows and are not None (others
    ignored: a sweep may vary them for other models)."""
    return {k: (kw[k] if kw.get(k) is not None else v) for k, v in model_spec(name).options.items()}


def option_default(option: str) -> str:
    """A model option's default as help text: one value when every model that uses it agrees, else per model."""
    by_value: dict[str, list[str]] = {}
    for s in MODELS.values():
        if option in s.options:
            v = s.options[option]
            by_value.setdefault(str(v).lower() if isinstance(v, bool) else str(v), []).append(s.name)
    if len(by_value) == 1:
        return next(iter(by_value))
    return ", ".join(f"{v} for {'/'.join(names)}" for v, names in by_value.items())


def model_option_problems(opts: dict) -> list[str]:
    """What is wrong with sequence-model options (None: the model's default), each naming its flag. The one check,
    used by TrainConfig.validate and by sequence.models.create_model."""
    checks = {"hidden": (lambda v: v >= 1, "must be >= 1"), "layers": (lambda v: 1 <= v <= 8, "must be in 1..8"),
              "dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"), "kernel": (lambda v: v >= 1, "must be >= 1"),
              "heads": (lambda v: v >= 1, "must be >= 1"),
              "pooling": (lambda v: v in POOLINGS, f"must be one of {', '.join(POOLINGS)}")}
    return [f"--{k} {text}, got {opts[k]!r}" for k, (ok, text) in checks.items()
            if opts.get(k) is not None and not ok(opts[k])]


# ---------------------------------------------------------------- splits

AUTO_SPLIT = "auto"  # the default --split: group when the cache's groups hold several segments, else random
                    # (sequence.splits.choose_split resolves it from the cache before anything is split)
SPLIT_OPTIONS = ("test_size", "folds", "split_dir")  # the options a split may use (SplitSpec.uses)


@dataclass(frozen=True)
class SplitSpec:
    name: str
    uses: tuple[str, ...] = ()      # the options it reads among SPLIT_OPTIONS (seed always)
    cv: bool = False                # several folds: cross-validation
    by_group: bool = False          # whole groups per part (validation is then carved by group too)
    predefined: bool = False        # the parts are given per segment (sequence.split_lists)
    lists: int = 0                  # read from a dataset's official lists: --split NAME:K, K in 1..lists


SPLITS: dict[str, SplitSpec] = {s.name: s for s in (
    SplitSpec("random", uses=("test_size",)),
    SplitSpec("seed-compat"),
    SplitSpec("group", uses=("test_size",), by_group=True),
    SplitSpec("kfold", uses=("folds",), cv=True),
    SplitSpec("group-kfold", uses=("folds",), cv=True, by_group=True),
    SplitSpec("logo", cv=True, by_group=True),
    SplitSpec("predefined", by_group=True, predefined=True),
    SplitSpec("ucf101", uses=("split_dir",), by_group=True, predefined=True, lists=3),
    SplitSpec("hmdb51", uses=("split_dir",), by_group=True, predefined=True, lists=3),
)}


def parse_split(split: str) -> tuple[str, int | None]:
    """--split -> (name, K): 'ucf101:1' -> ('ucf101', 1), 'group' -> ('group', None). ValueError naming --split."""
    if split == AUTO_SPLIT:
        return AUTO_SPLIT, None
    name, sep, k = str(split).partition(":")
    if name not in SPLITS:
        raise ValueError(f"unknown --split {split!r}; known splits: {AUTO_SPLIT}, "
                         f"{', '.join(n + ':K' if s.lists else n for n, s in SPLITS.items())}")
    n = SPLITS[name].lists
    if not n:
        if sep:
            raise ValueError(f"--split {split}: {name} takes no :K (only "
                             f"{', '.join(m for m, s in SPLITS.items() if s.lists)} do)")
        return name, None
    if not (k.isdigit() and 1 <= int(k) <= n):
        raise ValueError(f"--split {split}: give {name}:K with K in 1..{n}, the official split number "
                         f"(e.g. --split {name}:1)")
    return name, int(k)


def split_spec(split: str) -> SplitSpec:
    """The entry of a --split value other than auto ('ucf101:1' -> ucf101's); ValueError naming --split."""
    return SPLITS[parse_split(split)[0]]
