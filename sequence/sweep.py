"""Sweeps: every combination of option lists is one run folder; a leaderboard ranks them by validation.

``featseq sweep CACHE --out DIR --model lstm,gru --hidden 128,256 ...`` or ``--grid FILE.toml``
(top-level keys are option names, each a value or a list of values; options given on the command
line win). Combinations that differ only in options a model does not use (e.g. ``--kernel`` for an
LSTM) are one variant. A variant whose folder already holds a complete results.json with the same
config is skipped on rerun. ``--jobs N`` trains N variants at a time in spawned processes; each
process opens and reads the cache itself (never an h5py object across processes), once.

Outputs: ``DIR/<variant>/`` run folders, ``leaderboard.csv``, ``leaderboard.md`` (sorted by
validation accuracy, then validation loss), ``summary.png`` and ``sweep.json``.
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
import sys
import time
import typing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


from featurize.cache import read_cache

from . import models as M
from . import plots
from .config import MODEL_OPTIONS, RUNTIME_OPTIONS
from .reader import build, load_features
from .run import write_json
from .splits import SPLIT_OPTIONS, SPLITS, make_folds
from .train import TrainConfig, train

NOT_SWEPT = {"cache", "out"}
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


def parse_list(name: str, text: str) -> list:
    """'lstm,gru' -> ['lstm', 'gru'] typed by the option."""
    return [parse_value(name, part) for part in str(text).split(",")]


def load_grid(path: str) -> dict[str, list]:
    """A TOML grid file: top-level ``option = value`` or ``option = [values]`` (a [grid] table also works)."""
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
        vals = v if isinstance(v, list) else [v]
        out[name] = [parse_value(name, x) for x in vals]
    return out


@dataclass
class SweepConfig:
    cache: str
    out: str
    grid: dict[str, list] = field(default_factory=dict)   # option -> values (one value: fixed)
    jobs: int = 1
    threads: int | None = None   # per job; default: cores // jobs
    resume: bool = True

    def validate(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {self.jobs}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        for k, vals in self.grid.items():
            if k not in SWEEPABLE:
                raise ValueError(f"--{k.replace('_', '-')}: not a sweepable option")
            if not vals:
                raise ValueError(f"--{k.replace('_', '-')}: empty list")


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
        return name in SPLITS[cfg.split].uses
    if name in ("seconds", "percent") and cfg.seq_len is not None:
        return False
    return name not in RUNTIME_OPTIONS


def variants(cfg: SweepConfig) -> list[tuple[str, TrainConfig]]:
    """(folder name, config) of each distinct combination, in grid order."""
    keys = list(cfg.grid)
    varying = [k for k in keys if len(cfg.grid[k]) > 1]
    seen, out = set(), []
    for combo in itertools.product(*(cfg.grid[k] for k in keys)):
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
    return {k: v for k, v in d.items() if k not in ("out", "threads", "plots", "cache")}


def finished(tc: TrainConfig) -> dict | None:
    """results.json of a complete earlier run with the same config, else None."""
    p = Path(tc.out) / "results.json"
    if not p.exists():
        return None
    try:
        r = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
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
        key = (tc.fps, tc.seconds, tc.percent, tc.seq_len, tc.offset, tc.min_coverage, tc.split, tc.test_size,
               tc.val_size, tc.seed, tc.folds)
        if key in checked:
            continue
        checked.add(key)
        data = build(cache, tc.reader())
        make_folds(tc.split, data.label_names, data.groups, data.keep, test_size=tc.test_size, val_size=tc.val_size,
                   seed=tc.seed, folds=tc.folds, classes=data.classes)
        M.create_model(tc.model, dim, max(2, len(data.classes)), **tc.model_kwargs())


# The cache a sweep process trains on, loaded once per process by _init_worker (its entry point).
_WORKER: dict = {}


def _init_worker(threads: int, cache: str) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    _WORKER["data"] = load_features(cache)


def _run_one(cfg_dict: dict) -> dict:
    """Train one variant (in this process or a worker); errors become a result with status 'error'."""
    tc = TrainConfig(**cfg_dict)
    t0 = time.monotonic()
    try:
        return train(tc, data=_WORKER["data"])
    except Exception as e:  # one failing variant must not stop the sweep (KeyboardInterrupt still does)
        return {"status": "error", "error": f"{type(e).__name__}: {e}", "config": cfg_dict,
                "timings": {"total_s": round(time.monotonic() - t0, 3)}}


def sweep(cfg: SweepConfig, log=lambda s: None) -> dict:
    """Run every variant not finished yet; write the leaderboard. Returns {"rows", "paths", "seconds", ...}."""
    cfg.validate()
    t0 = time.monotonic()
    out = Path(cfg.out)
    vs = variants(cfg)
    todo, done = [], {}
    for name, tc in vs:
        r = finished(tc) if cfg.resume else None
        if r is not None:
            done[name] = r
        else:
            todo.append((name, tc))
    preflight(cfg, [tc for _, tc in todo])
    out.mkdir(parents=True, exist_ok=True)
    log(f"{len(vs)} variant(s): {len(done)} already finished, {len(todo)} to train with {cfg.jobs} job(s)")
    cores = os.cpu_count() or 1
    threads = cfg.threads or max(1, cores // cfg.jobs)
    results = dict(done)
    n = 0
    if len(todo) == 1 or (todo and cfg.jobs == 1):
        _init_worker(threads, cfg.cache)
        for name, tc in todo:
            results[name] = _run_one(asdict(tc))
            n += 1
            log(_line(n, len(todo), name, results[name]))
    elif todo:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(cfg.jobs, len(todo)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads, cfg.cache)) as pool:
            futs = {pool.submit(_run_one, asdict(tc)): name for name, tc in todo}
            for fut in as_completed(futs):
                name = futs[fut]
                results[name] = fut.result()
                n += 1
                log(_line(n, len(todo), name, results[name]))
    seconds = time.monotonic() - t0
    varying = [k for k in cfg.grid if len(cfg.grid[k]) > 1]
    rows = leaderboard_rows(vs, results, varying)
    paths = write_leaderboard(out, rows, varying)
    write_json(out / "sweep.json", {"cache": os.path.abspath(cfg.cache), "grid": cfg.grid, "jobs": cfg.jobs,
                                      "threads": threads, "variants": len(vs), "trained": len(todo),
                                      "skipped": len(done), "seconds": round(seconds, 2)})
    return {"rows": rows, "paths": paths, "seconds": seconds, "trained": len(todo), "skipped": len(done),
            "variants": len(vs), "out": str(out)}


def _line(n, total, name, r) -> str:
    if r.get("status") != "complete":
        return f"[{n}/{total}] {name}: FAILED {r.get('error')}"
    return (f"[{n}/{total}] {name}: val {r.get('val_accuracy') or float('nan'):.3f} test {r.get('test_accuracy') or float('nan'):.3f} "
            f"({r['timings']['total_s']:.1f} s)")


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def leaderboard_rows(vs, results: dict, varying: list[str]) -> list[dict]:
    rows = []
    for name, tc in vs:
        r = results.get(name, {})
        ok = r.get("status") == "complete"
        row = {"variant": name, "model": tc.model, **{k: _fmt(getattr(tc, k)) if relevant(tc, k) else "" for k in varying if k != "model"},
               "order_aware": M.MODELS[tc.model].order_aware,
               "params": r.get("params") if ok else None, "fps": r.get("fps") if ok else None,
               "seq_len": r.get("seq_len") if ok else None, "best_epoch": r.get("best_epoch") if ok else None,
               "val_accuracy": _num(r.get("val_accuracy")), "val_loss": _num(r.get("val_loss")),
               "test_accuracy": _num(r.get("test_accuracy")), "test_accuracy_std": _num(r.get("test_accuracy_std")),
               "seconds": (r.get("timings") or {}).get("total_s"), "status": r.get("status", "missing"),
               "error": r.get("error", "")}
        rows.append(row)

    def key(row):
        va, vl = row["val_accuracy"], row["val_loss"]
        return (row["status"] != "complete", -(va if va is not None else -1), vl if vl is not None else float("inf"))
    rows.sort(key=key)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def write_leaderboard(out: Path, rows: list[dict], varying: list[str]) -> dict:
    cols = ["rank", "variant", "model"] + [k for k in varying if k != "model"] + [
        "order_aware", "params", "fps", "seq_len", "best_epoch", "val_accuracy", "val_loss", "test_accuracy",
        "test_accuracy_std", "seconds", "status", "error"]
    with open(out / "leaderboard.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    md_cols = ["rank", "model"] + [k for k in varying if k != "model"] + ["params", "seq_len", "best_epoch", "val_accuracy",
                                                                         "val_loss", "test_accuracy", "seconds", "status"]

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
        if k == "model" and not r["order_aware"]:
            return f"{v} (order-blind)"
        return str(v)

    lines = ["| " + " | ".join(md_cols) + " |", "|" + "|".join("---" for _ in md_cols) + "|"]
    lines += ["| " + " | ".join(cell(r, k) for k in md_cols) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    (out / "leaderboard.md").write_text("Sorted by validation accuracy (ties: lower validation loss). "
                                        "Test accuracy is never used for ranking.\n\n" + md)
    plots.sweep_summary(out / "summary.png", rows)
    return {"csv": str(out / "leaderboard.csv"), "md": str(out / "leaderboard.md"), "plot": str(out / "summary.png"),
            "table": md}
