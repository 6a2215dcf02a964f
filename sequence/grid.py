"""A sweep's options: parsing option lists and ranges (``--hidden 64,128``, ``--lr 1e-4..1e-2:log``, a TOML grid),
the grid's variants and their identity, and the one way a trial (a grid variant or a sampled draw) becomes a
TrainConfig.

Used by sweep (and its workers and leaderboard), compare (the same variants on two caches) and the CLI; it knows
nothing of Optuna beyond the ``suggest_*`` calls of a trial handed to :func:`trial_config`.
"""
from __future__ import annotations

import hashlib
import itertools
import re
import sys
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from featseq.featurize.cache import read_cache

from . import models as M
from .catalog import AUTO_SPLIT, MODEL_OPTIONS, SPLIT_OPTIONS
from .config import RUNTIME_OPTIONS, TrainConfig
from .results import Results
from .splits import choose_split, split_entry
from .tracking import parse_track

NOT_SWEPT = {"cache", "out", "overwrite", "track"}  # a sweep manages its variant folders (and their tracking) itself
_BOOL = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _field_types() -> dict[str, tuple[type, bool]]:
    """field -> (base type, optional) from TrainConfig's annotations."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in fields(TrainConfig):
        t = hints[f.name]
        args = typing.get_args(t)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), t) if args else t
        out[f.name] = (base, optional)
    return out


FIELD_TYPES = _field_types()
SWEEPABLE = [f.name for f in fields(TrainConfig) if f.name not in NOT_SWEPT]


def parse_value(name: str, value):
    """A command-line string or a TOML value -> the TrainConfig field's type (``none`` for optional fields)."""
    flag = "--" + name.replace("_", "-")
    if name not in FIELD_TYPES or name in NOT_SWEPT:
        raise ValueError(f"{flag}: not a sweepable option; known: {', '.join('--' + s.replace('_', '-') for s in SWEEPABLE)}")
    base, optional = FIELD_TYPES[name]
    if isinstance(value, str):
        v = value.strip()
        if optional and v.lower() in ("none", "auto", "default", ""):
            return None
        if base is bool:
            if v.lower() not in _BOOL:
                raise ValueError(f"{flag}: expected true or false, got {v!r}")
            return _BOOL[v.lower()]
        try:
            if base is int:
                f = float(v)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            return base(v)
        except ValueError:
            raise ValueError(f"{flag}: expected {base.__name__}, got {v!r}") from None
    if value is None and optional:
        return None
    if base is bool and isinstance(value, bool):
        return value
    if base in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if base is int and not float(value).is_integer():
            _bad(flag, value, "an integer")
        return base(value)
    if base is str and isinstance(value, str):
        return value
    raise ValueError(f"{flag}: expected {base.__name__}, got {value!r}")


def _bad(flag, v, what):
    raise ValueError(f"{flag}: expected {what}, got {v!r}")


@dataclass(frozen=True)
class Range:
    """A range to search over (--search random / tpe): ``LO..HI[:log][:int]``."""
    name: str
    lo: float
    hi: float
    log: bool = False
    integer: bool = False

    def __str__(self) -> str:
        return f"{self.lo:g}..{self.hi:g}" + (":log" if self.log else "") + (":int" if self.integer else "")


def parse_range(name: str, text: str) -> Range:
    """'64..512:log:int' -> Range; refused (naming the flag) for options that take no range and for bad bounds."""
    flag = "--" + name.replace("_", "-")
    if name not in FIELD_TYPES or name in NOT_SWEPT:
        raise ValueError(f"{flag}: not a sweepable option")
    base, _ = FIELD_TYPES[name]
    if base not in (int, float) or base is bool:
        raise ValueError(f"{flag} {text}: a range needs a numeric option; give a comma list of values")
    bounds, *flags = str(text).strip().split(":")
    bad = [f for f in flags if f not in ("log", "int")]
    lo_hi = bounds.split("..")
    if bad or len(lo_hi) != 2:
        raise ValueError(f"{flag} {text}: expected LO..HI[:log][:int], e.g. 1e-4..1e-2:log or 64..512:log:int")
    try:
        lo, hi = float(lo_hi[0]), float(lo_hi[1])
    except ValueError:
        raise ValueError(f"{flag} {text}: LO and HI must be numbers") from None
    integer = "int" in flags or base is int
    if not lo < hi:
        raise ValueError(f"{flag} {text}: LO must be below HI")
    if "log" in flags and lo <= 0:
        raise ValueError(f"{flag} {text}: a log range needs LO > 0")
    if integer and (not float(lo).is_integer() or not float(hi).is_integer()):
        raise ValueError(f"{flag} {text}: an integer range needs integer bounds")
    for v in (lo, hi):  # the bounds must be values the option accepts
        parse_value(name, int(v) if integer else v)
    return Range(name, lo, hi, "log" in flags, integer)


def parse_list(name: str, text: str) -> list:
    """'lstm,gru' -> ['lstm', 'gru'] typed by the option; 'LO..HI[:log][:int]' -> [Range]."""
    if ".." in str(text):
        return [parse_range(name, text)]
    return [parse_value(name, part) for part in str(text).split(",")]


def load_grid(path: str) -> dict[str, list]:
    """A TOML grid file: top-level ``option = value``, ``option = [values]`` or ``option = "LO..HI[:log][:int]"``
    (a [grid] table also works)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the same parser, from PyPI
        import tomli as tomllib
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--grid {path}: not valid TOML ({e})") from None
    if isinstance(data.get("grid"), dict):
        data = data["grid"]
    out = {}
    for k, v in data.items():
        name = k.replace("-", "_")
        if isinstance(v, str) and ".." in v:
            out[name] = [parse_range(name, v)]
            continue
        vals = v if isinstance(v, list) else [v]
        out[name] = [parse_value(name, x) for x in vals]
    return out


SEARCHES = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")


@dataclass
class SweepConfig:
    """A sweep's request: the option lists and ranges, and how its Optuna study runs them."""
    cache: str
    out: str
    grid: dict[str, list] = field(default_factory=dict)   # option -> values (one value: fixed) or [Range]
    jobs: int = 1
    threads: int | None = None   # per job; default: cores // jobs
    resume: bool = True
    search: str = "grid"         # grid (every combination), random, tpe
    trials: int | None = None    # random / tpe: trials in the study (all workers together)
    prune: str = "none"          # none, median, hyperband: stop unpromising trials early
    storage: str | None = None   # an Optuna storage URL (sqlite:///..., postgresql://...); default: OUT/study.journal
    study: str = "featseq-sweep"
    seed: int = 0                # of the sampler (random, tpe)
    stale_after: float = 600.0   # seconds without a heartbeat after which a RUNNING trial of a dead worker is failed
    track: str = "none"          # trackers of the sweep and its trials (sequence.tracking)

    def ranges(self) -> dict[str, Range]:
        return {k: v[0] for k, v in self.grid.items() if len(v) == 1 and isinstance(v[0], Range)}

    def validate(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {self.jobs}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.search not in SEARCHES:
            raise ValueError(f"--search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if self.prune not in PRUNERS:
            raise ValueError(f"--prune must be one of {', '.join(PRUNERS)}, got {self.prune!r}")
        if self.search == "grid" and self.trials is not None:
            raise ValueError("--trials: a grid search runs every combination; use --search random or tpe with --trials")
        if self.search != "grid" and (self.trials is None or self.trials < 1):
            raise ValueError(f"--search {self.search} needs --trials N (N >= 1)")
        if self.stale_after <= 0:
            raise ValueError(f"--stale-after must be > 0 seconds, got {self.stale_after}")
        parse_track(self.track)
        for k, vals in self.grid.items():
            if k not in SWEEPABLE:
                raise ValueError(f"--{k.replace('_', '-')}: not a sweepable option")
            if not vals:
                raise ValueError(f"--{k.replace('_', '-')}: empty list")
            if any(isinstance(v, Range) for v in vals) and (len(vals) > 1 or self.search == "grid"):
                raise ValueError(f"--{k.replace('_', '-')} {vals[0]}: a range is searched, not enumerated; use "
                                 f"--search random or tpe with --trials N (or give a comma list for a grid)")


def refuse_ranges(grid: dict, why: str) -> None:
    """ValueError naming the first option of ``grid`` given as a range (for commands that enumerate lists only)."""
    for k, vals in grid.items():
        if any(isinstance(v, Range) for v in vals):
            raise ValueError(f"--{k.replace('_', '-')} {vals[0]}: {why}")


def fmt(v) -> str:
    """An option's value as variant names and the leaderboard show it."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return "none" if v is None else str(v)


# ---------------------------------------------------------------- identity: what makes two configs the same result

def relevant(cfg: TrainConfig, name: str) -> bool:
    """Does option ``name`` change what this config trains? Model options matter only to the models whose registry
    entry lists them, split options only to the splits whose entry uses them, and runtime options never."""
    if name in MODEL_OPTIONS:
        return name in M.get_entry(cfg.model).options
    if name in SPLIT_OPTIONS:
        return name in split_entry(cfg.split).uses
    if name in ("seconds", "percent") and cfg.seq_len is not None:
        return False
    return name not in RUNTIME_OPTIONS


def identity(cfg: TrainConfig) -> tuple:
    """The options that make a variant what it is: two configs with the same identity train the same model."""
    return tuple((k, fmt(getattr(cfg, k))) for k in SWEEPABLE if relevant(cfg, k))


def comparable(config: dict, tc: TrainConfig) -> dict:
    """A run's config reduced to the options that change what ``tc`` trains (:func:`relevant`: not where it lives,
    not :data:`RUNTIME_OPTIONS`, not the options its model or split does not use): what must equal for an earlier
    run to stand for ``tc``. An option its model ignores may be recorded as anything (earlier versions wrote the
    option's default, this one None)."""
    return {k: v for k, v in config.items() if k not in NOT_SWEPT and relevant(tc, k)}


def finished(tc: TrainConfig) -> Results | None:
    """The results of a complete earlier run with the same config in ``tc.out``, else None (a folder whose
    results.json is not this config's own is trained again)."""
    res = Results.read(tc.out)
    if res is None or res.status != "complete" or comparable(res.config, tc) != comparable(asdict(tc), tc):
        return None
    return res


# ---------------------------------------------------------------- grid expansion

def resolve_split(grid: dict, cache, log=lambda s: None) -> dict:
    """``grid`` with --split auto (the default, or given in the list) replaced by the split it means for ``cache``
    (a Cache, features not needed): every variant is split the same way. The choice, and the warning for a split
    that lets groups leak, are logged once here (not once per variant)."""
    seg = cache.segments
    vals = [choose_split(TrainConfig(cache=str(cache.path), out="", split=v), seg["group"], log=log,
                         labels=seg["label"], ids=seg["id"]).split for v in dict.fromkeys(grid.get("split", [AUTO_SPLIT]))]
    return {**grid, "split": list(dict.fromkeys(vals))}


def variants(grid: dict[str, list], cache: str, out: str) -> list[tuple[str, TrainConfig]]:
    """(folder name, config) of each distinct combination of ``grid``'s lists, in grid order, each config's ``out``
    the folder ``out/<name>``; --split auto is resolved from ``cache`` unless ``grid`` already is."""
    if AUTO_SPLIT in grid.get("split", [AUTO_SPLIT]):
        grid = resolve_split(grid, read_cache(cache, features=False))
    keys = list(grid)
    varying = [k for k in keys if len(grid[k]) > 1]
    seen, found = set(), []
    for combo in itertools.product(*(grid[k] for k in keys)):
        tc = TrainConfig(cache=cache, out="", **dict(zip(keys, combo)))
        ident = identity(tc)
        if ident in seen:
            continue
        seen.add(ident)
        parts = [f"{k}={fmt(getattr(tc, k))}" for k in varying if relevant(tc, k)]
        name = re.sub(r"[^A-Za-z0-9=.,+_-]+", "-", "__".join(parts)) or "run"
        if len(name) > 120:
            name = name[:100] + "__" + hashlib.sha1(name.encode()).hexdigest()[:10]
        tc.out = str(Path(out) / name)
        found.append((name, tc))
    return found


# ---------------------------------------------------------------- a trial -> a TrainConfig

def trial_config(trial, cfg: SweepConfig, grid_cfgs: dict[str, TrainConfig]) -> tuple[str, TrainConfig | None]:
    """(folder name, config) of a trial: the one place a trial becomes a TrainConfig.

    A grid search's trial carries its variant's name (queued with it, not a parameter: grids may change between
    runs); its config is that variant's in ``grid_cfgs`` (None: not in this grid). A search's trial draws every
    list and range with ``trial.suggest_*``: a running ``optuna.Trial`` asks its sampler, a finished
    ``optuna.trial.FrozenTrial`` answers with the values it recorded, so both give the same config. ValueError: the
    trial's values do not fit this grid (another search space, or a parameter it never drew)."""
    if cfg.search == "grid":
        name = trial.user_attrs.get("variant")
        return name, grid_cfgs.get(name)
    values = {}
    for k, vals in cfg.grid.items():
        if len(vals) == 1 and isinstance(vals[0], Range):
            r = vals[0]
            v = (trial.suggest_int(k, int(r.lo), int(r.hi), log=r.log) if r.integer
                 else trial.suggest_float(k, r.lo, r.hi, log=r.log))
            values[k] = parse_value(k, v)
        elif len(vals) > 1:
            values[k] = trial.suggest_categorical(k, vals)  # option values are None, bool, int, float or str
        else:
            values[k] = vals[0]
    name = f"trial-{trial.number:04d}"
    return name, TrainConfig(cache=cfg.cache, out=str(Path(cfg.out) / name), **values)


def fixed_config(cfg: SweepConfig) -> TrainConfig:
    """A TrainConfig of the first values, with every range at its low end: checks the fixed options before searching."""
    values = {k: (parse_value(k, int(v[0].lo) if v[0].integer else v[0].lo) if isinstance(v[0], Range) else v[0])
              for k, v in cfg.grid.items()}
    return TrainConfig(cache=cfg.cache, out=cfg.out, **values)
