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

Jobs, one module each: option lists, ranges and the grid's variants (sequence.grid), the Optuna study
(sequence.study), the workers (sequence.sweep_workers), the leaderboard (sequence.leaderboard); this module runs
them in order.

Outputs: run folders, ``leaderboard.csv``, ``leaderboard.md`` (sorted by validation accuracy, then
validation loss; pruned and failed trials marked), ``summary.png`` and ``sweep.json``.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from featseq.featurize.cache import read_cache

from . import models as M
from . import tracking
from .config import TrainConfig
from .grid import Range, SweepConfig, fixed_config, load_grid, parse_list, parse_range, resolve_split, variants
from .leaderboard import leaderboard_rows, write_leaderboard
from .reader import build, load_features
from .results import write_json
from .splits import folds_for
from .study import drop_study, enqueue_grid, open_study, reap_stale, shown_storage
from .sweep_workers import run_workers, work

# the sweep's Python API, from the modules that define it
__all__ = ["SweepConfig", "Range", "load_grid", "parse_list", "parse_range", "variants", "sweep"]


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


def sweep(cfg: SweepConfig, log=lambda s: None) -> dict:
    """Run the sweep's study until done (this process's --jobs workers, and any other worker on the same study);
    write the leaderboard. Returns {"rows", "paths", "seconds", "trained", "skipped", ...}."""
    cfg.validate()
    tracking.require(cfg.track)  # a tracker that is not installed: refused before anything runs
    t0 = time.monotonic()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, grid=resolve_split(cfg.grid, read_cache(cfg.cache, features=False), log))
    vs = variants(cfg.grid, cfg.cache, cfg.out) if cfg.search == "grid" else []
    if cfg.search == "grid":
        preflight(cfg, [tc for _, tc in vs])
    else:
        preflight(cfg, [fixed_config(cfg)])
    if not cfg.resume:
        drop_study(cfg)
    study, storage = open_study(cfg)
    from optuna.trial import TrialState

    already = {t.user_attrs.get("variant") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    reap_stale(study, storage, cfg.stale_after, log)  # first: a dead worker's variant is queued again below
    if cfg.search == "grid":
        enqueue_grid(study, cfg, vs, log)
    cores = os.cpu_count() or 1
    threads = cfg.threads or max(1, cores // cfg.jobs)
    log(f"study {cfg.study!r} in {shown_storage(cfg) if cfg.storage else out / 'study.journal'}: {cfg.search} search, "
        f"{len(vs) if vs else cfg.trials} trial(s), prune {cfg.prune}, {cfg.jobs} worker(s) here")
    did = {"trained": 0, "skipped": len(already - {None}), "pruned": 0, "failed": 0}  # finished before this run
    options = {"cache": os.path.abspath(cfg.cache), "search": cfg.search, "trials": cfg.trials, "prune": cfg.prune,
               "study": cfg.study, "storage": shown_storage(cfg), "jobs": cfg.jobs, "threads": threads,
               **{f"grid.{k}": ",".join(str(x) for x in v) for k, v in cfg.grid.items()}}
    # the sweep's own run; each trial is a run nested in it, logged by the process that trains it
    with tracking.tracked(cfg.track, out, options, name=f"sweep {out.name}", resume=cfg.resume) as parent:
        nest = parent.child(**{"optuna.study": cfg.study})
        if cfg.jobs == 1:  # in this process: its threads are the caller's (the CLI sets --threads)
            parts = [work(cfg, vs, load_features(cfg.cache), nest)]
        else:
            parts = run_workers(cfg, vs, threads, log, nest)
        for p in parts:
            for k in did:
                did[k] += p[k]
        seconds = time.monotonic() - t0
        rows, varying = leaderboard_rows(cfg, study, vs)
        paths = write_leaderboard(out, rows, varying)
        n = len(rows)
        log(f"{n} trial(s) on the leaderboard: this run trained {did['trained']}, pruned {did['pruned']}, "
            f"skipped {did['skipped']} finished, {did['failed']} failed")
        write_json(out / "sweep.json", {"cache": os.path.abspath(cfg.cache),
                                         "grid": {k: [str(x) if isinstance(x, Range) else x for x in v]
                                                  for k, v in cfg.grid.items()},
                                         "search": cfg.search, "trials": cfg.trials, "prune": cfg.prune,
                                         "study": cfg.study, "storage": shown_storage(cfg), "jobs": cfg.jobs,
                                         "threads": threads, "variants": n, **did, "seconds": round(seconds, 2)})
        best = max((r["val_accuracy"] for r in rows if r["val_accuracy"] is not None), default=None)
        parent.finish({"variants": n, **did, "seconds": seconds, "best_val_accuracy": best},
                      [paths["csv"], paths["md"], paths["plot"], out / "sweep.json"])
    return {"rows": rows, "paths": paths, "seconds": seconds, "variants": n, "out": str(out), **did}
