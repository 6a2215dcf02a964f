"""A sweep's workers: :func:`work` takes trials from the study and trains them until the study is done; with
``--jobs N`` it runs in N spawned processes (:func:`run_workers`), each reading the cache once.

A worker process is an ordinary ``multiprocessing`` Process whose handle the sweep keeps, so that a signal or a
full disk can stop every worker (each fails its running trial) and a worker that dies (OOM killer...) costs only
its own trial: the others go on, and the next sweep command fails and requeues that trial.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from dataclasses import dataclass, replace

from featseq.common.errors import UserError
from featseq.common.files import DiskFullError

from .config import TrainConfig
from .grid import SweepConfig, finished, trial_config
from .reader import load_features
from .splits import split_entry
from .study import open_study, reap_stale, sampler, shown_storage, tell
from .tracking import Nest
from .train import train

def _did() -> dict:
    return {"trained": 0, "skipped": 0, "pruned": 0, "failed": 0}


def _counted(study, before: int | None = None) -> int:
    """The study's trials that count towards --trials (all but empty ones; failed ones count too, so that a variant
    that always fails cannot make the search go on forever), or those numbered below ``before``. Numbers are handed
    out in order by the storage, so every worker counts the same below a number. An earlier trial whose worker has
    not yet marked it empty is counted: it is empty only if --trials came before it, and so before ``before`` too."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if not t.user_attrs.get("empty") and (before is None or t.number < before))


def work(cfg: SweepConfig, vs: list[tuple[str, TrainConfig]], data, nest: Nest | None = None) -> dict:
    """One sweep worker: take trials from the study until it is done, training each on ``data`` (the cache and its
    features, :func:`sequence.reader.load_features`); returns what this worker did. ``nest``: the sweep's run, which
    each trial's trackers (``cfg.track``) report under, with the trial's Optuna parameters and state."""
    import optuna
    from optuna.trial import TrialState

    study, storage = open_study(cfg)
    grid_cfgs = dict(vs)
    did = _did()
    prune = cfg.prune != "none"
    host, pid = socket.gethostname(), os.getpid()
    while True:
        reap_stale(study, storage, cfg.stale_after)
        if cfg.search == "grid":
            if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                break
        else:
            if _counted(study) >= cfg.trials:
                break
        trial = study.ask()
        for k, v in (("host", host), ("pid", pid), ("beat", time.time())):  # who runs it, for reap_stale
            trial.set_user_attr(k, v)
        if cfg.search != "grid" and _counted(study, before=trial.number) >= cfg.trials:
            # another worker asked between our count and our ask: the study already has its trials
            trial.set_user_attr("empty", True)
            tell(study, trial, TrialState.FAIL)
            break
        if cfg.search == "grid" and trial.user_attrs.get("variant") not in grid_cfgs:
            # another worker took the last queued variant between our look and our ask (an empty trial), or a
            # variant queued by a sweep with another grid on this study: not ours to train
            trial.set_user_attr("empty", True)
            tell(study, trial, TrialState.FAIL)
            if "variant" not in trial.user_attrs:
                break
            continue
        if cfg.search != "grid":
            study.sampler = sampler(cfg, cfg.seed * 100_003 + trial.number)  # unique per trial, reproducible
        try:
            name, tc = trial_config(trial, cfg, grid_cfgs)
        except ValueError as e:  # e.g. a list changed since the study began: Optuna refuses another value space
            tell(study, trial, TrialState.FAIL)
            raise UserError(f"study {cfg.study!r} in {shown_storage(cfg)} was started with "
                            f"other options ({e}); use another --study or --out, or --no-resume") from None
        trial.set_user_attr("variant", name)
        t0 = time.monotonic()
        done = finished(tc) if cfg.resume else None
        if done is not None:  # the run folder already holds this variant, complete
            trial.set_user_attr("seconds", done.total_s)
            tell(study, trial, TrialState.COMPLETE, float(done.val_accuracy or 0.0))
            did["skipped"] += 1
            continue
        last_beat = [time.time()]
        cv = split_entry(tc.split).cv  # cross-validation: the epochs of every fold beat, none is pruned

        def on_epoch(state, trial=trial, last_beat=last_beat, cv=cv):
            rec = state["history"][-1]
            if time.time() - last_beat[0] > 10:
                trial.set_user_attr("beat", time.time())
                last_beat[0] = time.time()
            if prune and not cv and rec["val_accuracy"] == rec["val_accuracy"]:  # not NaN (no validation part)
                trial.report(rec["val_accuracy"], rec["epoch"])
                if trial.should_prune():
                    trial.set_user_attr("epochs", rec["epoch"])
                    raise optuna.TrialPruned()

        trial_nest = replace(nest or Nest(), pruned=(optuna.TrialPruned,),
                             tags={**(nest or Nest()).tags, "optuna.trial": trial.number, "variant": name},
                             params={f"optuna.{k}": v for k, v in {"variant": name, **trial.params}.items()})
        try:
            # the variant's folder is the sweep's: an older run in it (another config, --no-resume) is replaced
            res = train(replace(tc, overwrite=True, track=cfg.track), data=data, on_epoch=on_epoch, nest=trial_nest)
        except optuna.TrialPruned:
            trial.set_user_attr("seconds", round(time.monotonic() - t0, 3))
            tell(study, trial, TrialState.PRUNED)
            did["pruned"] += 1
            continue
        except (KeyboardInterrupt, DiskFullError) as e:  # the sweep stops: the next sweep command retrains this one
            try:
                trial.set_user_attr("error", f"{type(e).__name__}: {e}")
                tell(study, trial, TrialState.FAIL)
            except Exception:  # the study's journal may be on the full disk too
                pass
            raise
        except Exception as e:  # one failing variant must not stop the sweep (KeyboardInterrupt still does)
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            trial.set_user_attr("seconds", round(time.monotonic() - t0, 3))
            tell(study, trial, TrialState.FAIL)
            did["failed"] += 1
            continue
        trial.set_user_attr("seconds", res["timings"]["total_s"])
        tell(study, trial, TrialState.COMPLETE, float(res["val_accuracy"] if res["val_accuracy"] is not None else 0.0))
        did["trained"] += 1
    return did


@dataclass
class WorkerResult:
    """What a worker process sends back: what it did, or why it stopped."""
    did: dict | None = None
    error: str | None = None                  # an exception that ended the worker, as text
    disk_full: DiskFullError | None = None    # a full disk stops the whole sweep


def _worker_main(threads: int, cfg: SweepConfig, vs: list, conn, nest: Nest | None = None) -> None:
    """A worker process: set its threads, read the cache once, :func:`work`, send a :class:`WorkerResult`. Stopped by
    a signal, it fails its trial and ends (with 128 + the signal's number) without sending."""
    import torch

    from featseq.common import signals

    signals.install()  # SIGTERM / SIGINT: the running trial is marked failed, then the worker ends
    try:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        data = load_features(cfg.cache, shared=True)  # one copy in the page cache for all the workers
        result = WorkerResult(did=work(cfg, vs, data, nest))
    except signals.Interrupted as e:
        os._exit(e.exit_code)
    except DiskFullError as e:
        result = WorkerResult(disk_full=e)
    except Exception as e:
        result = WorkerResult(error=f"{type(e).__name__}: {e}"[:2000])
    conn.send(result)
    conn.close()


def run_workers(cfg: SweepConfig, vs: list[tuple[str, TrainConfig]], threads: int, log=lambda s: None,
                nest: Nest | None = None) -> list[dict]:
    """:func:`work` in ``cfg.jobs`` spawned processes of ``threads`` threads each (their trials tracked under ``nest``);
    what each worker that finished did.
    A worker that died is logged (its trial is failed by the next sweep); a full disk in any, a signal or any other
    exception here stops them all and is raised."""
    ctx = mp.get_context("spawn")
    workers = []
    try:
        for _ in range(cfg.jobs):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker_main, args=(threads, cfg, vs, send, nest), name="featseq-sweep-worker")
            p.start()
            send.close()  # the worker holds the only writing end: its death reads as EOF here
            workers.append((p, recv))
        parts = []
        for p, recv in workers:
            try:
                msg = recv.recv()
            except EOFError:  # it died without a word (killed, out of memory)
                msg = None
            p.join()
            msg = msg or WorkerResult(error=f"its process ended with exit code {p.exitcode}")
            if msg.disk_full is not None:
                raise msg.disk_full
            if msg.error is not None:
                log(f"a worker stopped: {msg.error}; its running trial is failed by the next sweep")
            else:
                parts.append(msg.did)
        return parts
    except BaseException:  # a signal, a full disk: stop the workers (each fails its trial), then go
        stop_workers([p for p, _ in workers])
        raise


def stop_workers(procs: list, grace: float = 10.0) -> None:
    """SIGTERM to every live worker (each fails its running trial and ends), SIGKILL to any left after ``grace``
    seconds."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
