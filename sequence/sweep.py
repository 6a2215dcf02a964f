"""Sweeps on an Optuna study: a grid, random or TPE search over option lists and ranges, with pruning, any
number of workers, and a leaderboard ranked by validation.

``featseq sweep CACHE --out DIR --model lstm,gru --hidden 128,256 ...`` or ``--grid FILE.toml``
(top-level keys are option names, each a value, a list of values or a range "LO..HI[:log][:int]";
options given on the command line win). The study lives in ``DIR/study.journal`` (or ``--storage URL``).
Grid search: every distinct combination (those that differ only in options a model or split does not
use are one variant) is queued once as a trial and trained by whichever worker takes it, into
``DIR/<variant>/``; a variant whose folder already holds a complete results.json with the same config is
not retrained. Random / TPE search: ``--trials N`` drawn trials, ``DIR/trial-NNNN/``. ``--jobs N`` workers
here (spawned processes, each reading the cache once) and any number of the same command elsewhere share
the study; a worker that dies mid-trial is detected by the next (its pid on the same host, its heartbeat
elsewhere) and its grid variant is queued again when a sweep command starts.

Outputs: run folders, ``leaderboard.csv``, ``leaderboard.md`` (sorted by validation accuracy, then
validation loss; pruned and failed trials marked), ``summary.png`` and ``sweep.json``.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import socket
import sys
import time
import typing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path


from featseq.featurize.cache import read_cache
from featseq.common.errors import UserError
from featseq.common.files import DiskFullError, replaced

from . import models as M
from . import plots
from .catalog import AUTO_SPLIT, MODEL_OPTIONS, SPLIT_OPTIONS
from .config import RUNTIME_OPTIONS
from .reader import build, load_features
from .run import write_json
from .splits import choose_split, folds_for, split_entry
from .train import TrainConfig, train

NOT_SWEPT = {"cache", "out", "overwrite"}  # a sweep manages its variant folders itself
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
        for k, vals in self.grid.items():
            if k not in SWEEPABLE:
                raise ValueError(f"--{k.replace('_', '-')}: not a sweepable option")
            if not vals:
                raise ValueError(f"--{k.replace('_', '-')}: empty list")
            if any(isinstance(v, Range) for v in vals) and (len(vals) > 1 or self.search == "grid"):
                raise ValueError(f"--{k.replace('_', '-')} {vals[0]}: a range is searched, not enumerated; use "
                                 f"--search random or tpe with --trials N (or give a comma list for a grid)")


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return "none" if v is None else str(v)


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


def resolve_split(grid: dict, cache, log=lambda s: None) -> dict:
    """``grid`` with --split auto (the default, or given in the list) replaced by the split it means for ``cache``
    (a Cache, features not needed): every variant is split the same way. The choice, and the warning for a split
    that lets groups leak, are logged once here (not once per variant)."""
    seg = cache.segments
    vals = [choose_split(TrainConfig(cache=str(cache.path), out="", split=v), seg["group"], log=log,
                         labels=seg["label"], ids=seg["id"]).split for v in dict.fromkeys(grid.get("split", [AUTO_SPLIT]))]
    return {**grid, "split": list(dict.fromkeys(vals))}


def variants(cfg: SweepConfig) -> list[tuple[str, TrainConfig]]:
    """(folder name, config) of each distinct combination, in grid order (--split auto resolved from the cache)."""
    grid = cfg.grid
    if AUTO_SPLIT in grid.get("split", [AUTO_SPLIT]):
        grid = resolve_split(grid, read_cache(cfg.cache, features=False))
    keys = list(grid)
    varying = [k for k in keys if len(grid[k]) > 1]
    seen, out = set(), []
    for combo in itertools.product(*(grid[k] for k in keys)):
        tc = TrainConfig(cache=cfg.cache, out="", **dict(zip(keys, combo)))
        ident = tuple((k, _fmt(getattr(tc, k))) for k in SWEEPABLE if relevant(tc, k))
        if ident in seen:
            continue
        seen.add(ident)
        parts = [f"{k}={_fmt(getattr(tc, k))}" for k in varying if relevant(tc, k)]
        name = re.sub(r"[^A-Za-z0-9=.,+_-]+", "-", "__".join(parts)) or "run"
        if len(name) > 120:
            name = name[:100] + "__" + hashlib.sha1(name.encode()).hexdigest()[:10]
        tc.out = str(Path(cfg.out) / name)
        out.append((name, tc))
    return out


def _comparable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("out", "threads", "plots", "cache", "overwrite")}


def finished(tc: TrainConfig) -> dict | None:
    """results.json of a complete earlier run with the same config, else None."""
    p = Path(tc.out) / "results.json"
    if not p.exists():
        return None
    try:
        r = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(r, dict) or not isinstance(r.get("config"), dict):
        return None
    if r.get("status") != "complete" or _comparable(r.get("config", {})) != _comparable(asdict(tc)):
        return None
    return r


def preflight(cfg: SweepConfig, todo: list[TrainConfig]) -> None:
    """Refuse impossible requests (fps above the cache's, a class missing from training...) before training anything."""
    cache = read_cache(cfg.cache, features=False)
    dim = int(cache.attrs.get("feature_dim", 1) or 1)
    checked = set()
    for tc in todo:
        tc.validate()
        key = (tc.fps, tc.seconds, tc.percent, tc.seq_len, tc.offset, tc.min_coverage, tc.split, tc.split_dir,
               tc.test_size, tc.val_size, tc.seed, tc.folds)
        if key in checked:
            continue
        checked.add(key)
        data = build(cache, tc.reader())
        folds_for(tc, data, cache)
        M.create_model(tc.model, dim, max(2, len(data.classes)), **tc.model_kwargs())


# ---------------------------------------------------------------- the Optuna study

def _storage(cfg: SweepConfig):
    import optuna

    if cfg.storage:
        return cfg.storage  # optuna opens an RDB URL itself
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(Path(cfg.out) / "study.journal")
    # an open(O_CREAT|O_EXCL) lock: also correct on NFS, where the symlink lock is not
    return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def _sampler(cfg: SweepConfig, seed: int | None = None):
    """The sampler, seeded by ``seed`` (default: --search-seed). Workers reseed it per trial with the trial's number:
    workers that share a seed (other processes, other nodes) would otherwise draw the same parameters."""
    import optuna

    seed = cfg.seed if seed is None else seed
    if cfg.search == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # random search; grid trials are enqueued, never sampled


def _pruner(cfg: SweepConfig):
    import optuna

    if cfg.prune == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=3)
    if cfg.prune == "hyperband":
        epochs = [v.hi if isinstance(v, Range) else v for v in cfg.grid.get("epochs", [TrainConfig.epochs])]
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=max(3, int(max(epochs))))
    return optuna.pruners.NopPruner()


def shown_storage(cfg: SweepConfig) -> str:
    """The storage for logs and sweep.json: a database URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", cfg.storage) if cfg.storage else "study.journal"


def open_study(cfg: SweepConfig):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(study_name=cfg.study, storage=_storage(cfg), sampler=_sampler(cfg),
                                   pruner=_pruner(cfg), direction="maximize", load_if_exists=True)
    except ImportError:
        raise
    except Exception as e:  # sqlalchemy: a malformed URL, a database that cannot be reached
        raise UserError(f"--storage {shown_storage(cfg)}: cannot open the study ({type(e).__name__}: {e}); give an "
                        f"Optuna storage URL such as sqlite:///sweep.db or postgresql://user@host/db") from e


def _alive(host: str, pid: int) -> bool | None:
    """Whether a worker process is alive: known only on its own host (None elsewhere)."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def reap_stale(study, stale_after: float, log=lambda s: None) -> int:
    """Mark FAIL the RUNNING trials whose worker is gone: dead on this host, or silent for ``stale_after`` seconds
    (no epoch reported). Returns how many."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
        beat = t.user_attrs.get("beat") or (t.datetime_start.timestamp() if t.datetime_start else time.time())
        alive = _alive(host, int(pid)) if host and pid else None
        if alive is False or (alive is None and time.time() - float(beat) > stale_after):
            try:  # another worker may be marking it at the same moment
                study._storage.set_trial_user_attr(t._trial_id, "error", f"worker {host}:{pid} died during the trial")
                study.tell(t.number, state=TrialState.FAIL)
            except (RuntimeError, ValueError):
                continue
            log(f"trial {t.number} ({t.user_attrs.get('variant')}): its worker {host}:{pid} is gone; marked failed")
            n += 1
    return n


def enqueue_grid(study, cfg: SweepConfig, vs: list[tuple[str, TrainConfig]], log=lambda s: None) -> int:
    """Enqueue every grid variant that no trial holds, waits for, runs or finished (failed ones are retried), once:
    under a lock file next to the study, so workers started together enqueue each variant once."""
    from optuna.trial import TrialState

    from featseq.common.lock import FileLock, Locked

    with_lock = FileLock(str(Path(cfg.out) / "study"), "is running this sweep")
    for _ in range(600):  # another worker may be enqueueing: wait for it (at most a minute)
        try:
            with_lock.acquire()
            break
        except Locked:
            time.sleep(0.1)
    else:
        raise UserError(f"{cfg.out}: another sweep worker has held {with_lock.path} for over a minute; wait for it, or "
                        f"stop the sweep process that holds it")
    try:
        keep = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
        held = {t.user_attrs.get("variant") for t in study.get_trials(deepcopy=False, states=keep)}
        todo = [name for name, _ in vs if name not in held]
        for name in todo:
            study.enqueue_trial({"variant": name}, user_attrs={"variant": name}, skip_if_exists=False)
        if todo:
            log(f"{len(todo)} grid variant(s) queued in study {cfg.study!r}")
        return len(todo)
    finally:
        with_lock.release()


# The cache a sweep process trains on, loaded once per process by _init_worker (its entry point).
_WORKER: dict = {}


def _init_worker(threads: int, cache: str) -> None:
    import torch

    from featseq.common import signals

    signals.install()  # SIGTERM / SIGINT: the trial is marked failed, then the worker ends (see _pool_work)

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    _WORKER["data"] = load_features(cache, shared=True)  # one copy in the page cache for all the workers


def _pool_work(job: dict) -> dict:
    """:func:`_work` in a pool worker process: stopped by a signal, it ends the process (with 128 + the signal's
    number) rather than wait for another trial."""
    from featseq.common.signals import Interrupted

    try:
        return _work(job)
    except Interrupted as e:
        os._exit(e.exit_code)


def _stop_workers(pool: ProcessPoolExecutor, grace: float = 10.0) -> None:
    """SIGTERM to every worker of ``pool`` (each fails its running trial and ends), SIGKILL to any left after
    ``grace`` seconds."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    pool.shutdown(wait=False, cancel_futures=True)


def _trial_config(trial, cfg: SweepConfig, grid_cfgs: dict[str, TrainConfig]) -> tuple[str, TrainConfig]:
    """The variant a trial trains: an enqueued grid variant, or the sampler's draw over the lists and ranges."""
    if cfg.search == "grid":
        name = trial.user_attrs["variant"]  # queued with the trial (not a parameter: grids may change between runs)
        return name, grid_cfgs[name]
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


def _tell(study, trial, state, value: float | None = None) -> None:
    """study.tell, tolerating a trial another worker already finished (it took this worker for dead)."""
    try:
        study.tell(trial, value if state.name == "COMPLETE" else None, state=state)
    except (RuntimeError, ValueError):
        pass


def _work(cfg_dict: dict) -> dict:
    """One sweep worker: take trials from the study until it is done; returns what this worker did."""
    import optuna
    from optuna.trial import TrialState

    grid_raw = cfg_dict.pop("_grid_names")
    cfg = SweepConfig(**cfg_dict)
    study = open_study(cfg)
    grid_cfgs = dict(grid_raw)
    did = {"trained": 0, "skipped": 0, "pruned": 0, "failed": 0}
    prune = cfg.prune != "none"
    host, pid = socket.gethostname(), os.getpid()
    while True:
        reap_stale(study, cfg.stale_after)
        if cfg.search == "grid":
            if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                break
        else:
            # failed trials count too: a variant that always fails must not make the search go on forever
            if len([t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("empty")]) >= cfg.trials:
                break
        trial = study.ask()
        for k, v in (("host", host), ("pid", pid), ("beat", time.time())):  # who runs it, for reap_stale
            trial.set_user_attr(k, v)
        if cfg.search == "grid" and trial.user_attrs.get("variant") not in grid_cfgs:
            # another worker took the last queued variant between our look and our ask (an empty trial), or a
            # variant queued by a sweep with another grid on this study: not ours to train
            trial.set_user_attr("empty", True)
            _tell(study, trial, TrialState.FAIL)
            if "variant" not in trial.user_attrs:
                break
            continue
        if cfg.search != "grid":
            study.sampler = _sampler(cfg, cfg.seed * 100_003 + trial.number)  # unique per trial, reproducible
        try:
            name, tc = _trial_config(trial, cfg, grid_cfgs)
        except ValueError as e:  # e.g. a list changed since the study began: Optuna refuses another value space
            _tell(study, trial, TrialState.FAIL)
            raise UserError(f"study {cfg.study!r} in {shown_storage(cfg)} was started with "
                            f"other options ({e}); use another --study or --out, or --no-resume") from None
        trial.set_user_attr("variant", name)
        t0 = time.monotonic()
        done = finished(tc) if cfg.resume else None
        if done is not None:  # the run folder already holds this variant, complete
            trial.set_user_attr("seconds", (done.get("timings") or {}).get("total_s"))
            _tell(study, trial, TrialState.COMPLETE, float(done.get("val_accuracy") or 0.0))
            did["skipped"] += 1
            continue
        last_beat = [time.time()]

        def on_epoch(state, trial=trial, last_beat=last_beat):
            rec = state["history"][-1]
            if time.time() - last_beat[0] > 10:
                trial.set_user_attr("beat", time.time())
                last_beat[0] = time.time()
            if prune and not cv and rec["val_accuracy"] == rec["val_accuracy"]:  # not NaN (no validation part)
                trial.report(rec["val_accuracy"], rec["epoch"])
                if trial.should_prune():
                    trial.set_user_attr("epochs", rec["epoch"])
                    raise optuna.TrialPruned()

        cv = split_entry(tc.split).cv  # cross-validation: the epochs of every fold beat, none is pruned
        try:
            # the variant's folder is the sweep's: an older run in it (another config, --no-resume) is replaced
            res = train(replace(tc, overwrite=True), data=_WORKER["data"], on_epoch=on_epoch)
        except optuna.TrialPruned:
            trial.set_user_attr("seconds", round(time.monotonic() - t0, 3))
            _tell(study, trial, TrialState.PRUNED)
            did["pruned"] += 1
            continue
        except (KeyboardInterrupt, DiskFullError) as e:  # the sweep stops: the next sweep command retrains this one
            try:
                trial.set_user_attr("error", f"{type(e).__name__}: {e}")
                _tell(study, trial, TrialState.FAIL)
            except Exception:  # the study's journal may be on the full disk too
                pass
            raise
        except Exception as e:  # one failing variant must not stop the sweep (KeyboardInterrupt still does)
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            trial.set_user_attr("seconds", round(time.monotonic() - t0, 3))
            _tell(study, trial, TrialState.FAIL)
            did["failed"] += 1
            continue
        trial.set_user_attr("seconds", res["timings"]["total_s"])
        _tell(study, trial, TrialState.COMPLETE, float(res["val_accuracy"] if res["val_accuracy"] is not None else 0.0))
        did["trained"] += 1
    return did


def sweep(cfg: SweepConfig, log=lambda s: None) -> dict:
    """Run the sweep's study until done (this process's --jobs workers, and any other worker on the same study);
    write the leaderboard. Returns {"rows", "paths", "seconds", "trained", "skipped", ...}."""
    cfg.validate()
    t0 = time.monotonic()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, grid=resolve_split(cfg.grid, read_cache(cfg.cache, features=False), log))
    vs = variants(cfg) if cfg.search == "grid" else []
    if cfg.search == "grid":
        preflight(cfg, [tc for _, tc in vs])
    else:
        preflight(cfg, [_fixed_config(cfg)])
    if not cfg.resume:
        _drop_study(cfg)
    study = open_study(cfg)
    from optuna.trial import TrialState

    already = {t.user_attrs.get("variant") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    reap_stale(study, cfg.stale_after, log)  # first: a dead worker's variant is queued again below
    if cfg.search == "grid":
        enqueue_grid(study, cfg, vs, log)
    cores = os.cpu_count() or 1
    threads = cfg.threads or max(1, cores // cfg.jobs)
    job = {**{f.name: getattr(cfg, f.name) for f in fields(SweepConfig)}, "_grid_names": list(vs)}
    log(f"study {cfg.study!r} in {shown_storage(cfg) if cfg.storage else out / 'study.journal'}: {cfg.search} search, "
        f"{len(vs) if vs else cfg.trials} trial(s), prune {cfg.prune}, {cfg.jobs} worker(s) here")
    did = {"trained": 0, "skipped": len(already - {None}), "pruned": 0, "failed": 0}  # finished before this run
    if cfg.jobs == 1:  # in this process: its threads are the caller's (the CLI sets --threads)
        _WORKER["data"] = load_features(cfg.cache)
        try:
            parts = [_work(dict(job))]
        finally:
            _WORKER.clear()
    else:
        ctx = mp.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=ctx, initializer=_init_worker,
                                   initargs=(threads, cfg.cache))
        try:
            futures = [pool.submit(_pool_work, dict(job)) for _ in range(cfg.jobs)]
            parts = []
            for f in futures:  # a worker that died (OOM killer...) must not cost the others' leaderboard
                try:
                    parts.append(f.result())
                except DiskFullError:
                    raise
                except Exception as e:
                    log(f"a worker stopped: {type(e).__name__}: {e}; its running trial is failed by the next sweep")
        except BaseException:  # a signal, a full disk: stop the workers (each fails its trial), then go
            _stop_workers(pool)
            raise
        pool.shutdown()
    for p in parts:
        for k in did:
            did[k] += p[k]
    seconds = time.monotonic() - t0
    rows, varying = leaderboard_rows(cfg, study, vs)
    paths = write_leaderboard(out, rows, varying)
    n = len(rows)
    log(f"{n} trial(s) on the leaderboard: this run trained {did['trained']}, pruned {did['pruned']}, "
        f"skipped {did['skipped']} finished, {did['failed']} failed")
    write_json(out / "sweep.json", {"cache": os.path.abspath(cfg.cache), "grid": {k: [str(x) if isinstance(x, Range) else x
                                                                                    for x in v] for k, v in cfg.grid.items()},
                                     "search": cfg.search, "trials": cfg.trials, "prune": cfg.prune, "study": cfg.study,
                                     "storage": shown_storage(cfg), "jobs": cfg.jobs, "threads": threads,
                                     "variants": n, **did, "seconds": round(seconds, 2)})
    return {"rows": rows, "paths": paths, "seconds": seconds, "variants": n, "out": str(out), **did}


def _fixed_config(cfg: SweepConfig) -> TrainConfig:
    """A TrainConfig of the first values, with every range at its low end: checks the fixed options before searching."""
    values = {k: (parse_value(k, int(v[0].lo) if v[0].integer else v[0].lo) if isinstance(v[0], Range) else v[0])
              for k, v in cfg.grid.items()}
    return TrainConfig(cache=cfg.cache, out=cfg.out, **values)


def _drop_study(cfg: SweepConfig) -> None:
    """--no-resume: start the study afresh (and retrain variants whose folders are complete)."""
    import optuna

    try:
        optuna.delete_study(study_name=cfg.study, storage=_storage(cfg))
    except KeyError:
        pass


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _config_of(cfg: SweepConfig, trial, grid_cfgs: dict) -> TrainConfig | None:
    """The TrainConfig a finished trial trained (rebuilt from its parameters)."""
    name = trial.user_attrs.get("variant")
    if cfg.search == "grid":
        return grid_cfgs.get(name)
    values = {}
    for k, vals in cfg.grid.items():
        if len(vals) == 1 and isinstance(vals[0], Range):
            if k not in trial.params:
                return None
            values[k] = parse_value(k, trial.params[k])
        elif len(vals) > 1:
            if k not in trial.params:
                return None
            values[k] = trial.params[k]
        else:
            values[k] = vals[0]
    return TrainConfig(cache=cfg.cache, out=str(Path(cfg.out) / name), **values)


STATUS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "error", "RUNNING": "running", "WAITING": "waiting"}


def leaderboard_rows(cfg: SweepConfig, study, vs: list[tuple[str, TrainConfig]]) -> tuple[list[dict], list[str]]:
    """One row per variant (grid) or trial (search), from the study and the run folders; the varying options."""
    grid_cfgs = dict(vs)
    order = {"complete": 0, "pruned": 1, "running": 2, "waiting": 3, "error": 4}
    latest: dict[str, object] = {}
    for t in study.get_trials(deepcopy=False):
        name = t.user_attrs.get("variant")
        if not name or t.user_attrs.get("empty"):
            continue
        st = STATUS[t.state.name]
        if name not in latest or order[st] <= order[STATUS[latest[name].state.name]]:
            latest[name] = t
    names = [n for n, _ in vs] if cfg.search == "grid" else sorted(latest)
    varying = [k for k, v in cfg.grid.items() if len(v) > 1 or (len(v) == 1 and isinstance(v[0], Range))]
    rows = []
    for name in names:
        t = latest.get(name)
        tc = _config_of(cfg, t, grid_cfgs) if t is not None else grid_cfgs.get(name)
        if tc is None:
            continue
        status = STATUS[t.state.name] if t is not None else "missing"
        r = finished(tc) if status == "complete" else None
        r = r or {}
        ok = bool(r)
        iv = list(t.intermediate_values.values()) if t is not None else []
        row = {"variant": name, "model": tc.model,
               **{k: _fmt(getattr(tc, k)) if relevant(tc, k) else "" for k in varying if k != "model"},
               "order_aware": M.MODELS[tc.model].order_aware,
               "params": r.get("params"), "fps": r.get("fps"), "seq_len": r.get("seq_len"), "best_epoch": r.get("best_epoch"),
               "epochs": r.get("epochs_run") if ok else (t.user_attrs.get("epochs") if t is not None else None),
               "val_accuracy": _num(r.get("val_accuracy")) if ok else (max(iv) if iv else None),
               "val_loss": _num(r.get("val_loss")), "test_accuracy": _num(r.get("test_accuracy")),
               "test_accuracy_std": _num(r.get("test_accuracy_std")),
               "seconds": (r.get("timings") or {}).get("total_s") if ok else (t.user_attrs.get("seconds") if t else None),
               "status": status, "error": t.user_attrs.get("error", "") if t is not None else ""}
        rows.append(row)

    def key(row):
        va, vl = row["val_accuracy"], row["val_loss"]
        return (order.get(row["status"], 5), -(va if va is not None else -1), vl if vl is not None else float("inf"))
    rows.sort(key=key)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows, varying


def write_leaderboard(out: Path, rows: list[dict], varying: list[str]) -> dict:
    cols = ["rank", "variant", "model"] + [k for k in varying if k != "model"] + [
        "order_aware", "params", "fps", "seq_len", "best_epoch", "epochs", "val_accuracy", "val_loss", "test_accuracy",
        "test_accuracy_std", "seconds", "status", "error"]
    # atomic writes: several workers of one study may write the leaderboard at the same time
    with replaced(out / "leaderboard.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    md_cols = ["rank", "variant", "model"] + [k for k in varying if k != "model"] + ["params", "seq_len", "best_epoch", "epochs",
                                                                         "val_accuracy", "val_loss", "test_accuracy",
                                                                         "seconds", "status"]

    def cell(r, k):
        v = r.get(k)
        if v is None:
            return ""
        if k in ("val_accuracy", "test_accuracy"):
            s = f"{v:.3f}"
            if k == "test_accuracy" and r.get("test_accuracy_std") is not None:
                s += f" ± {r['test_accuracy_std']:.3f}"
            return s
        if k == "val_loss":
            return f"{v:.4f}"
        if k == "seconds":
            return f"{v:.1f}"
        if k in ("best_epoch", "epochs") and isinstance(v, float):  # a cross-validation: the mean over its folds
            return f"{v:.1f}" if not v.is_integer() else f"{v:.0f}"
        if k == "model" and not r["order_aware"]:
            return f"{v} (order-blind)"
        return str(v)

    lines = ["| " + " | ".join(md_cols) + " |", "|" + "|".join("---" for _ in md_cols) + "|"]
    lines += ["| " + " | ".join(cell(r, k) for k in md_cols) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    with replaced(out / "leaderboard.md") as tmp:
        tmp.write_text("Sorted by validation accuracy (ties: lower validation loss). "
                       "Test accuracy is never used for ranking.\n\n" + md)
    with replaced(out / "summary.png") as tmp:
        plots.sweep_summary(tmp, rows)
    return {"csv": str(out / "leaderboard.csv"), "md": str(out / "leaderboard.md"), "plot": str(out / "summary.png"),
            "table": md}
