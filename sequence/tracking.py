"""Experiment tracking: ``--track tensorboard,mlflow`` (any subset, or ``none``) on train, sweep, finetune and compare.

Trackers observe a run; they never change what it computes, and the run folder stays the source of truth: a tracker
that fails (a full disk, a tracking server that went away) is reported once on stderr and dropped, and the run goes
on. What a run sends: its options as parameters, per-epoch ``train_loss``, ``train_accuracy``, ``val_loss``,
``val_accuracy``, ``test_loss``, ``test_accuracy`` and ``seconds`` (step: the epoch; a cross-validation prefixes them
with the fold, ``fold_00/train_loss``), the numbers of its results.json as ``final/<key>`` and its plots, results.json
and history.csv as artifacts.

- **TensorBoard**: event files in ``RUN/tensorboard/`` (the options as text and, with the final metrics, in the
  HParams dashboard; the plots as images). ``tensorboard --logdir RUN`` (or a sweep's DIR: one run per variant).
- **MLflow**: to ``$MLFLOW_TRACKING_URI``, else a local store ``mlruns/`` beside the ``--out`` folder
  (``mlruns/mlflow.db``, a SQLite database, and ``mlruns/artifacts/``); experiment ``$MLFLOW_EXPERIMENT_NAME``, else
  ``featseq``. A sweep's and a compare's runs are nested under one parent run of the sweep (compare); a sweep's trials
  carry their Optuna parameters (``optuna.<name>``), trial number and state (tag ``featseq.state``: complete, pruned,
  failed, stopped). Each trial logs from the process that trains it (sweep workers too), into the parent's run id.

``RUN/tracking.json`` records where a run went (its MLflow run id), so that a resumed run (finetune --resume, a
resumed sweep) goes on in the same MLflow run. A run killed outright stays RUNNING in MLflow: its folder says what it
finished. The trackers are optional extras (``pip install 'featseq[tensorboard]'``, ``'featseq[mlflow]'``), imported
only when asked for.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from featseq.common.errors import UserError

KINDS = ("tensorboard", "mlflow")
TB_DIR = "tensorboard"      # RUN/tensorboard/
STORE = "mlruns"            # the default MLflow store, beside --out
RECORD = "tracking.json"    # RUN/tracking.json: where the run's trackers went
EXPERIMENT = "featseq"
_MODULE = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow"}  # what each tracker needs


def parse_track(text) -> tuple[str, ...]:
    """``"tensorboard,mlflow"`` -> ("tensorboard", "mlflow"); ``none`` (or nothing) -> (); ValueError naming --track."""
    parts = [p.strip().lower() for p in str(text or "").split(",") if p.strip()]
    if parts in ([], ["none"]):
        return ()
    bad = [p for p in parts if p not in KINDS]
    if bad:
        raise ValueError(f"--track {text}: unknown tracker {', '.join(map(repr, bad))}; give none, or a comma list of "
                         f"{', '.join(KINDS)}")
    return tuple(dict.fromkeys(parts))


def require(track) -> tuple[str, ...]:
    """The trackers of ``track``, each importable; UserError naming the extra to install for one that is not."""
    kinds = parse_track(track)
    for kind in kinds:
        try:
            __import__(_MODULE[kind])
        except ImportError as e:
            raise UserError(f"--track {kind}: {kind} is not installed ({e}); install it with: pip install "
                            f"'featseq[{kind}]'") from None
    return kinds


@dataclass(frozen=True)
class Nest:
    """Where a run reports when it is part of a larger one (a sweep's trial, a compare's run): the MLflow store and
    parent run, and the tags and parameters it adds. ``pruned``: exception types that end a run as pruned."""
    mlflow_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    tags: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    pruned: tuple = ()


def store_uri(out) -> str:
    """``$MLFLOW_TRACKING_URI``, else the SQLite store ``mlruns/mlflow.db`` beside the folder ``out``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(out).resolve().parent / STORE / 'mlflow.db'}"


def read_record(run_dir) -> dict:
    try:
        d = json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _finite(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


# ---------------------------------------------------------------- the trackers

class TensorBoardTracker:
    """Event files in RUN/tensorboard/, flushed after every call (a kill keeps what was logged)."""

    close_dropped = True  # a tracker dropped after a failure is closed (its files), when that is cheap

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / TB_DIR))
        self.params, self.final = {}, {}
        self.info = TB_DIR

    def log_params(self, params: dict) -> None:
        self.params.update(params)
        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("options", f"| option | value |\n|---|---|\n{rows}")
        self.writer.flush()

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        if step is None:
            self.final.update(metrics)
        self.writer.flush()

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if path.suffix == ".png":
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                self.writer.add_image(f"{folder}/{path.stem}" if folder else path.stem,
                                      np.asarray(im.convert("RGB")), dataformats="HWC")
            self.writer.flush()

    def set_tags(self, tags: dict) -> None:
        self.writer.add_text("tags", "\n".join(f"- {k}: {v}" for k, v in tags.items()))

    def close(self, status: str) -> None:
        if self.final:  # the HParams dashboard: the options beside the final metrics
            from torch.utils.tensorboard.summary import hparams

            shown = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.params.items()}
            for s in hparams(shown, self.final):
                self.writer.file_writer.add_summary(s)
        self.writer.add_text("status", status)
        self.writer.close()


_CLIENTS: dict = {}  # one MLflow client per store and process: opening one (its schema checked) takes seconds


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri not in _CLIENTS:
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        _CLIENTS[uri] = MlflowClient(uri)
    return _CLIENTS[uri]


def _experiment(client, uri: str) -> str:
    """The id of the experiment ($MLFLOW_EXPERIMENT_NAME, else featseq), made when missing; in a SQLite store its
    artifacts go beside the database (mlruns/artifacts/ for the default store), not into MLflow's ./mlruns of
    whatever folder the command ran in."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    where = None
    if uri.startswith("sqlite:///"):
        where = (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=where)
    except Exception:  # another process made it meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _key(name: str) -> str:
    """A metric or parameter name as MLflow takes it (letters, digits, _ - . / and spaces): compare's
    ``cross_A->B`` becomes ``cross_A_to_B``."""
    return re.sub(r"[^\w\-. /]", "_", name.replace("->", "_to_"))


class MLflowTracker:
    """One MLflow run, through MlflowClient (no global active run: a process may hold several)."""

    close_dropped = False  # a server that went away answers after MLflow's retries: not asked once more

    def __init__(self, run_dir: Path, name: str, nest: Nest, resume: bool):
        uri = nest.mlflow_uri or store_uri(run_dir)
        self.client = client = _client(uri)
        exp = nest.experiment_id or _experiment(client, uri)
        prev = read_record(run_dir).get("mlflow") or {} if resume else {}
        self.run_id, self.logged = None, {}
        if prev.get("tracking_uri") == uri and prev.get("run_id"):  # a resumed run goes on in its MLflow run
            try:
                self.logged = dict(client.get_run(prev["run_id"]).data.params)
                client.update_run(prev["run_id"], "RUNNING")
                self.run_id = prev["run_id"]
            except Exception:
                self.logged = {}
        if self.run_id is None:
            tags = {"featseq.run_dir": str(Path(run_dir).resolve()), **{k: str(v) for k, v in nest.tags.items()}}
            if nest.parent_run_id:
                tags["mlflow.parentRunId"] = nest.parent_run_id
            self.run_id = client.create_run(exp, tags=tags, run_name=name).info.run_id
        self.info = {"tracking_uri": uri, "experiment_id": exp, "run_id": self.run_id}

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        # a resumed run keeps the parameters it has (MLflow refuses to change one; finetune --resume may add epochs)
        items = [Param(_key(k), str(v)[:6000]) for k, v in params.items() if _key(k) not in self.logged]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.logged.update({p.key: p.value for p in items})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_key(k), v, now, step or 0) for k, v in metrics.items()])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


# ---------------------------------------------------------------- a run's trackers together

class Tracking:
    """The trackers of one run (none: every call does nothing). Each call goes to every tracker; one that fails is
    reported once and dropped, and the run goes on."""

    def __init__(self, trackers: dict, run_dir: Path, nest: Nest):
        self.trackers, self.run_dir, self.nest = trackers, Path(run_dir), nest

    def _each(self, method: str, *args) -> None:
        for kind, t in list(self.trackers.items()):
            try:
                getattr(t, method)(*args)
            except Exception as e:
                self.trackers.pop(kind)
                _warn(f"--track {kind}: {method} failed for {self.run_dir} ({type(e).__name__}: {str(e)[:300]}); "
                      f"{kind} stops tracking this run, whose folder keeps every result")
                if method != "close" and t.close_dropped:
                    try:
                        t.close("FAILED")
                    except Exception:
                        pass

    def log_params(self, params: dict) -> None:
        self._each("log_params", {k: "none" if v is None else v for k, v in params.items()})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if m := _finite(metrics):
            self._each("log_metrics", m, step)

    def log_artifact(self, path, folder: str | None = None) -> None:
        if Path(path).is_file():
            self._each("log_artifact", Path(path), folder)

    def set_tags(self, tags: dict) -> None:
        self._each("set_tags", tags)

    def close(self, status: str) -> None:
        self._each("close", status)
        self.trackers = {}

    def end(self, error: BaseException | None = None) -> None:
        """Close with the run's state: complete, pruned (``error`` is one of ``nest.pruned``), stopped (a signal,
        Ctrl-C) or failed; tag ``featseq.state`` says which (MLflow: FINISHED, KILLED, KILLED, FAILED)."""
        if not self.trackers:
            return
        if error is None:
            self.set_tags({"featseq.state": "complete"})
            self.close("FINISHED")
            return
        pruned = isinstance(error, self.nest.pruned)
        stopped = not isinstance(error, Exception)  # Ctrl-C, a signal (featseq.common.signals.Interrupted)
        state = "pruned" if pruned else "stopped" if stopped else "failed"
        self.set_tags({"featseq.state": state,
                       **({} if pruned else {"featseq.error": f"{type(error).__name__}: {error}"[:500]})})
        self.close("KILLED" if pruned or stopped else "FAILED")

    def __enter__(self) -> "Tracking":
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.end(error)

    def epoch(self, prefix: str = "") -> Callable[[dict], None]:
        """An ``on_epoch`` for the training loop (sequence.loop.fit): the epoch's record, at step = the epoch."""
        def on_epoch(state: dict) -> None:
            rec = state["history"][-1]
            self.log_metrics({prefix + k: v for k, v in rec.items() if k != "epoch"}, rec["epoch"])
        return on_epoch

    def finish(self, results: dict, files=()) -> None:
        """The run's final numbers (results.json's, and its timings) as ``final/<key>``, and ``files`` as artifacts
        (paths inside the run folder keep their sub-folder)."""
        numbers = {**results, **{f"timings.{k}": v for k, v in (results.get("timings") or {}).items()}}
        self.log_metrics({f"final/{k}": v for k, v in numbers.items()})
        run = self.run_dir.resolve()
        for f in map(lambda f: Path(f).resolve(), files):
            folder = f.parent.relative_to(run).as_posix() if f.is_relative_to(run) else "."
            self.log_artifact(f, None if folder == "." else folder)

    def child(self, **tags) -> Nest:
        """The :class:`Nest` of a run inside this one (a sweep's trial, a compare's run): same store, this run as
        parent, ``tags`` added."""
        info = getattr(self.trackers.get("mlflow"), "info", None) or {}
        return replace(self.nest, mlflow_uri=info.get("tracking_uri") or store_uri(self.run_dir),
                       experiment_id=info.get("experiment_id"), parent_run_id=info.get("run_id"),
                       tags={**self.nest.tags, **tags})


def run_files(run_dir) -> list[Path]:
    """What a train or finetune run sends as artifacts: its plots (and its folds'), results.json, history.csv."""
    run = Path(run_dir)
    return sorted(p for p in run.rglob("*.png") if TB_DIR not in p.relative_to(run).parts) + \
        [run / "results.json", run / "history.csv"]


def chain(*hooks) -> Callable[[dict], None]:
    """One ``on_epoch`` calling each of ``hooks`` (None skipped) in order."""
    hooks = [h for h in hooks if h is not None]

    def on_epoch(state: dict) -> None:
        for h in hooks:
            h(state)
    return on_epoch


def open_run(track, run_dir, params: dict, *, name: str | None = None, nest: Nest | None = None,
             resume: bool = False) -> Tracking:
    """The trackers of ``track`` for the run folder ``run_dir`` (made first, so call it once the folder is ready),
    ``params`` (and the nest's) logged. A tracker that cannot start is reported and left out."""
    nest, run_dir = nest or Nest(), Path(run_dir)
    trackers = {}
    for kind in require(track):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            trackers[kind] = (TensorBoardTracker(run_dir) if kind == "tensorboard"
                              else MLflowTracker(run_dir, name or run_dir.name, nest, resume))
        except Exception as e:
            _warn(f"--track {kind}: cannot start for {run_dir} ({type(e).__name__}: {str(e)[:300]}); the run goes on "
                  f"untracked there, its folder keeps every result")
    t = Tracking(trackers, run_dir, nest)
    if trackers:
        from .results import write_json

        write_json(run_dir / RECORD, {k: v.info for k, v in trackers.items()})
        t.log_params({**params, **nest.params})
    return t


@contextmanager
def tracked(track, run_dir, params: dict, *, name: str | None = None, nest: Nest | None = None,
            resume: bool = False) -> Iterator[Tracking]:
    """:func:`open_run` for the block, ended with it (:meth:`Tracking.end`)."""
    with open_run(track, run_dir, params, name=name, nest=nest, resume=resume) as t:
        yield t
