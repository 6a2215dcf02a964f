"""The sweep's Optuna study, through Optuna's public API: its storage (a journal file next to the sweep, or a database
URL), sampler and pruner, failing the trials of dead workers, and queueing a grid's variants once.

Workers on any host share the study; each trial records who runs it (``host``, ``pid``) and a heartbeat (``beat``),
which :func:`reap_stale` reads to fail a dead worker's trial so that its grid variant is queued again.
"""
from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

from featseq.common.errors import UserError
from featseq.common.lock import FileLock, Locked

from .config import TrainConfig
from .grid import Range, SweepConfig


def open_storage(cfg: SweepConfig):
    """The study's storage object: ``--storage URL`` as an RDBStorage, else the journal file OUT/study.journal."""
    import optuna

    if cfg.storage:
        return optuna.storages.RDBStorage(cfg.storage)
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(Path(cfg.out) / "study.journal")
    # an open(O_CREAT|O_EXCL) lock: also correct on NFS, where the symlink lock is not
    return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def sampler(cfg: SweepConfig, seed: int | None = None):
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
    """(study, its storage): the study created or loaded, UserError when its storage cannot be opened."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = open_storage(cfg)
        study = optuna.create_study(study_name=cfg.study, storage=storage, sampler=sampler(cfg), pruner=_pruner(cfg),
                                    direction="maximize", load_if_exists=True)
    except ImportError:
        raise
    except Exception as e:  # sqlalchemy: a malformed URL, a database that cannot be reached
        raise UserError(f"--storage {shown_storage(cfg)}: cannot open the study ({type(e).__name__}: {e}); give an "
                        f"Optuna storage URL such as sqlite:///sweep.db or postgresql://user@host/db") from e
    return study, storage


def drop_study(cfg: SweepConfig) -> None:
    """--no-resume: start the study afresh (and retrain variants whose folders are complete)."""
    import optuna

    try:
        optuna.delete_study(study_name=cfg.study, storage=open_storage(cfg))
    except KeyError:
        pass


def tell(study, trial, state, value: float | None = None) -> None:
    """study.tell, tolerating a trial another worker already finished (it took this worker for dead)."""
    try:
        study.tell(trial, value if state.name == "COMPLETE" else None, state=state)
    except (RuntimeError, ValueError):
        pass


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


def reap_stale(study, storage, stale_after: float, log=lambda s: None) -> int:
    """Mark FAIL the RUNNING trials whose worker is gone: dead on this host, or silent for ``stale_after`` seconds
    (no epoch reported). Returns how many."""
    from optuna.trial import TrialState

    n = 0
    study_id = None
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
        beat = t.user_attrs.get("beat") or (t.datetime_start.timestamp() if t.datetime_start else time.time())
        alive = _alive(host, int(pid)) if host and pid else None
        if alive is False or (alive is None and time.time() - float(beat) > stale_after):
            try:  # another worker may be marking it at the same moment
                study_id = study_id if study_id is not None else storage.get_study_id_from_name(study.study_name)
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
                storage.set_trial_user_attr(trial_id, "error", f"worker {host}:{pid} died during the trial")
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
