"""Run folders: the one preamble (:func:`begin_run`), the one writer (:func:`write_run`) and the one reader
(:class:`Run`); results.json's keys are built in sequence.results.

A run folder (``featseq train`` / ``finetune``)::

    config.json                  the resolved config
    results.json                 every option, metrics (test_accuracy, val_accuracy, ...), seq_len, params,
                                 best_epoch, padded/dropped counts, timings; "status": "complete" written last
    history.csv                  epoch, train/val/test loss and accuracy, seconds
    CRNN_epoch_training_loss.npy, CRNN_epoch_training_accuracy.npy,
    CRNN_epoch_test_loss.npy, CRNN_epoch_test_accuracy.npy
                                 per-epoch arrays named like the original study's; "test" is the held-out
                                 test part scored after every epoch for monitoring only (model selection and
                                 early stopping use the validation part, never the test part)
    curves.png                   loss and accuracy per epoch, train vs validation
    confusion.png                row-normalized confusion matrix on the test part
    per_class.csv, classification_report.txt
    predictions.csv              one row per segment: id,group,split,label,predicted,correct,p_<class>...
                                 (split: train/val/test, or dropped for segments --min-coverage left out)
    checkpoint.pt                the best epoch's weights, model_config, classes, reader settings, config,
                                 split ids and ``features``: the featurize spec of its input features
                                 (featurize.spec.FeatureSpec), so predict and finetune make the same features
                                 without the training cache; a finetune run adds its trunk's weights

Cross-validation splits (kfold, group-kfold, logo) write one such folder per fold under ``folds/`` and, at the
top, results.json (mean and std over folds), out-of-fold predictions.csv, confusion.png, per_class.csv and the
classification report.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from featseq.featurize.cache import Cache, CacheError, summary
from featseq.common.errors import UserError
from featseq.common.files import writing
from featseq.featurize.spec import FeatureSpec

from . import checkpoint
from . import models as M
from . import plots
from .loop import FeatureInputs, FitResult, probabilities
from .reader import ReaderConfig, Sequences, build
from .results import RESULTS, Results, cache_info, fit_results, write_json
from .splits import Fold

CHECKPOINT = "checkpoint.pt"


# ---------------------------------------------------------------- small writers

def split_column(n: int, fold: Fold, keep: np.ndarray) -> np.ndarray:
    split = np.array(["dropped"] * n, dtype=object)
    split[keep] = "unused"
    for name, idx in (("train", fold.train), ("val", fold.val), ("test", fold.test)):
        split[idx] = name
    return split


def write_history(run: Path, history: list[dict], plot: bool = True) -> None:
    with open(run / "history.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    for name, col in (("training_loss", "train_loss"), ("training_accuracy", "train_accuracy"),
                      ("test_loss", "test_loss"), ("test_accuracy", "test_accuracy")):
        np.save(run / f"CRNN_epoch_{name}.npy", np.array([h[col] for h in history], dtype=np.float64))
    if plot:
        plots.curves(run / "curves.png", history)


def _probability_cells(probs: np.ndarray):
    """Each row of ``probs`` as strings with 6 decimals ('' for NaN: not predicted). One %-format per row, not one
    f-string per value: 13,320 segments x 101 classes take 0.65 s instead of 3.4 s."""
    fmt = "\x00".join(["%.6f"] * probs.shape[1])
    for row, nan in zip(probs.tolist(), np.isnan(probs).any(1).tolist()):
        if nan:
            yield ["" if v != v else f"{v:.6f}" for v in row]
        else:
            yield (fmt % tuple(row)).split("\x00")


def write_scores(run: Path, data: Sequences, split: np.ndarray, probs: np.ndarray, scored: np.ndarray,
                 plot: bool = True, title: str = "test") -> dict:
    """predictions.csv (every segment), per-class accuracy, classification report and confusion on ``scored``.

    split: (N,) str per segment; probs: (N, C) (NaN where not predicted); scored: (N,) bool.
    """
    from sklearn.metrics import classification_report, confusion_matrix

    classes = data.classes
    pred = np.where(np.isnan(probs).any(1), -1, np.nan_to_num(probs).argmax(1))
    y = data.labels.numpy()
    with open(run / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "group", "split", "label", "predicted", "correct"] + [f"p_{c}" for c in classes])
        for i, cells in enumerate(_probability_cells(probs)):
            p = classes[pred[i]] if pred[i] >= 0 else ""
            w.writerow([data.ids[i], data.groups[i], split[i], data.label_names[i], p,
                        int(p == data.label_names[i]) if p else ""] + cells)
    s = scored & (pred >= 0) & (y >= 0)
    out = {"n_scored": int(s.sum()), "accuracy": float((pred[s] == y[s]).mean()) if s.any() else float("nan")}
    labels = list(range(len(classes)))
    cm = confusion_matrix(y[s], pred[s], labels=labels) if s.any() else np.zeros((len(classes),) * 2, int)
    per = {c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(classes)}
    with open(run / "per_class.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "support", "correct", "accuracy"])
        for i, c in enumerate(classes):
            w.writerow([c, int(cm[i].sum()), int(cm[i, i]), "" if per[c] is None else f"{per[c]:.4f}"])
    report = (classification_report(y[s], pred[s], labels=labels, target_names=classes, zero_division=0, digits=3)
              if s.any() else "no scored segments\n")
    (run / "classification_report.txt").write_text(report)
    if plot:
        plots.confusion(run / "confusion.png", cm, classes, f"{title} ({int(s.sum())} segments)")
    out["per_class_accuracy"] = per
    out["confusion"] = cm.tolist()
    return out


# ---------------------------------------------------------------- the writer

def write_run(run: Path, *, cfg, data: Sequences, fold: Fold, head: M.SequenceClassifier, fit: FitResult,
              probs: np.ndarray, spec: FeatureSpec, cache: Cache, device: torch.device, kind: str = "train",
              started: float | None = None, load_s: float | None = None, setup_s: float | None = None,
              score_s: float | None = None, extra_checkpoint: dict | None = None,
              extra_results: dict | None = None) -> tuple[dict, dict]:
    """Write a finished run's history, scores, checkpoint and (last, once) results.json; returns (results, checkpoint).

    ``head``: the sequence model (its best weights loaded); ``probs``: (N, C) probabilities of every segment;
    ``spec``: how the features the head takes were made; ``started`` (time.monotonic() when the run began) and
    ``load_s`` give results' total_s and load_s (a fold of a cross-validation has neither); ``setup_s``: seconds
    between loading and the first epoch (the model, its input standardisation, moving features to the device);
    ``score_s``: seconds spent scoring the segments the best epoch had not scored (the training part). results'
    timings also get ``write_s``, this function's own time up to results.json (predictions, plots, checkpoint).
    """
    t_write = time.monotonic()
    with writing(run, kept=f"{run} has no {RESULTS}, so it is not a complete run"):
        run.mkdir(parents=True, exist_ok=True)
        write_history(run, fit.history, cfg.plots)
        scored = np.zeros(len(data), bool)
        scored[fold.test] = True
        scores = write_scores(run, data, split_column(len(data), fold, data.keep), probs, scored, cfg.plots)
        ckpt = {"kind": kind, "model": {k: v.cpu() for k, v in head.state_dict().items()}, "model_config": head.config,
                "classes": data.classes, "config": asdict(cfg),
                "reader": {"fps": data.fps, "seq_len": data.seq_len, "offset": cfg.offset,
                           "min_coverage": cfg.min_coverage},
                "features": spec.to_dict(), "cache": cache_info(cache),
                "split_ids": {k: [data.ids[i] for i in getattr(fold, k)] for k in ("train", "val", "test")},
                **(extra_checkpoint or {})}
        checkpoint.save(ckpt, run / CHECKPOINT)
        timings = {**({"load_s": round(load_s, 3)} if load_s is not None else {}),
                   **({"setup_s": round(setup_s, 3)} if setup_s is not None else {}),
                   **({"score_train_s": round(score_s, 3)} if score_s is not None else {}),
                   "write_s": round(time.monotonic() - t_write, 3),
                   **({"total_s": round(time.monotonic() - started, 3)} if started is not None else {})}
        res = fit_results(cfg=cfg, data=data, fold=fold, head=head, fit=fit, scores=scores, spec=spec, cache=cache,
                          device=device, timings=timings, extra=extra_results)
        res.write(run)
        return res.content, ckpt


# ---------------------------------------------------------------- an existing run folder

def _written_by_featseq(path: Path, keys: tuple[str, ...]) -> bool:
    """Is ``path`` a JSON object with these keys (a featseq config.json / results.json, not any file so named)?"""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and all(k in d for k in keys)


def run_folder_state(out: str | os.PathLike) -> str:
    """What ``out`` holds: "new" (nothing, or an empty folder), "complete" (a finished run: its results.json),
    "incomplete" (a run stopped before its results.json: its config.json only), "other" (files featseq did not
    write: such a folder is never cleared)."""
    out = Path(out)
    if not out.exists():
        return "new"
    if not out.is_dir():
        return "other"
    if not any(out.iterdir()):
        return "new"
    if _written_by_featseq(out / RESULTS, ("status", "config")):
        return "complete"
    return "incomplete" if _written_by_featseq(out / "config.json", ("cache", "out", "model", "split")) else "other"


def check_run_folder(out: str | os.PathLike, overwrite: bool, resume: bool = False) -> str:
    """Refuse to write a run into ``out`` when that would replace a finished run without ``--overwrite``, or mix it
    with files featseq did not write; returns :func:`run_folder_state`. An incomplete run (stopped before its
    results.json) is started afresh, or with ``resume`` continued from its last.pt (finetune); a folder holding
    last.pt is not started afresh without --resume or --overwrite. A finished finetune run with ``resume`` (and not
    ``overwrite``) is continued from its last.pt too: more epochs for a run that ended."""
    state = run_folder_state(out)
    continuing = resume and not overwrite and (Path(out) / "last.pt").is_file()
    if state == "other":
        raise RunError(f"--out {out}: {'not a folder' if Path(out).exists() and not Path(out).is_dir() else 'the folder holds files that are not a featseq run'}; "
                       f"write the run into a new or empty folder")
    if state == "complete" and not overwrite and not continuing:
        r = Results.read(out)
        try:
            what = f" ({r.model}, test accuracy {r.test_accuracy:.3f})" if r and r.test_accuracy is not None else ""
        except (ValueError, TypeError):  # not a number: a results.json from elsewhere
            what = ""
        raise RunError(f"--out {out} already holds a finished run{what}; pass --overwrite to replace it (its files are "
                       f"deleted first), or choose another --out")
    if state == "incomplete" and not (overwrite or resume) and (Path(out) / "last.pt").is_file():
        raise RunError(f"--out {out} holds an interrupted finetune run (last.pt); pass --resume to continue it, or "
                       f"--overwrite to start it afresh")
    return state


def prepare_run_folder(out: str | os.PathLike, overwrite: bool, resume: bool = False, log=lambda s: None) -> Path:
    """:func:`check_run_folder`, then make ``out`` ready for a new run: a finished run replaced (``overwrite``) or an
    incomplete one started afresh has its files deleted first, so nothing of the old run (a cross-validation's
    folds/, predictions, plots) is left beside the new one; with ``resume`` an incomplete run is kept as it is."""
    import shutil

    out = Path(out)
    state = check_run_folder(out, overwrite, resume)
    continuing = resume and not overwrite and (out / "last.pt").is_file()
    if (state == "complete" and not continuing) or (state == "incomplete" and not resume):
        log(f"{out}: {'replacing the finished run (--overwrite)' if state == 'complete' else 'starting the interrupted run afresh'}")
        for p in out.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def begin_run(out: str | os.PathLike, config: dict, overwrite: bool, resume: bool = False, log=lambda s: None,
              check=None):
    """The one preamble of a run folder (train, finetune): :func:`prepare_run_folder`, then ``check(run)`` (finetune's
    --resume state: it may refuse before anything of the folder changes), then the folder is marked as not complete
    (its results.json removed: one is written last, by :func:`write_run`) and ``config`` written to config.json.
    Returns (the folder, what ``check`` returned)."""
    run = prepare_run_folder(out, overwrite, resume, log)
    checked = check(run) if check is not None else None
    (run / RESULTS).unlink(missing_ok=True)
    write_json(run / "config.json", config)
    return run, checked


# ---------------------------------------------------------------- the reader

def checkpoint_path(run_dir: str | os.PathLike, what: str = "RUN") -> Path:
    """RUN/checkpoint.pt, or FileNotFoundError saying what the folder is instead."""
    run = Path(run_dir)
    ck = run / CHECKPOINT
    if not ck.is_file():
        hint = (" (a cross-validation run keeps one checkpoint per fold under folds/: pass one of those)"
                if (run / "folds").is_dir() else "")
        raise FileNotFoundError(f"{what} {run}: no {CHECKPOINT}; not a featseq train or finetune run folder{hint}")
    return ck


def resolve_run_folder(run_dir: str | os.PathLike, what: str = "RUN", log=lambda s: None) -> Path:
    """The folder whose checkpoint stands for ``run_dir``: the run itself, or for a cross-validation (a checkpoint per
    fold under folds/, e.g. a cross-validated sweep variant) its best fold: the highest validation accuracy, ties
    broken by the lower validation loss, then the fold's name (the test part is never used to choose). Other
    folders are returned as given, for :class:`Run` to say what they are."""
    run = Path(run_dir)
    folds = sorted(p.parent for p in run.glob(f"folds/*/{CHECKPOINT}"))
    if (run / CHECKPOINT).is_file() or not folds:
        return run

    def key(fold: Path):
        r = Results.read(fold)
        va, vl = (r.val_accuracy, r.val_loss) if r is not None else (None, None)
        return (-(va if va is not None else -1.0), vl if vl is not None else math.inf, fold.name), va

    best = min(folds, key=lambda f: key(f)[0])
    va = key(best)[1]
    log(f"{what} {run}: a cross-validation of {len(folds)} folds; using its best fold {best.name}"
        + (f" (validation accuracy {va:.3f})" if va is not None else ""))
    return best


class RunError(UserError):
    """A run folder that cannot be used as asked; the message says why and what to do."""


class Run:
    """A saved run: its sequence model, classes, reader settings, split and the featurize spec of its features.

    ``Run(path)`` loads RUN/checkpoint.pt; :meth:`sequences` reads a cache the way the run reads it,
    :meth:`probabilities` classifies sequences. A finetune run also carries its trunk (:attr:`trunk_state`).
    """

    def __init__(self, run_dir: str | os.PathLike, what: str = "RUN"):
        self.path = Path(run_dir)
        ck = checkpoint_path(run_dir, what)
        self.ckpt = checkpoint.load(ck)  # weights-only: never runs code from the file
        for key in ("model", "model_config", "classes", "reader", "config"):
            if key not in self.ckpt:
                raise RunError(f"{ck}: the checkpoint has no {key!r} entry; it was not written by featseq train/finetune")
        try:  # a file from elsewhere is data: anything but what train/finetune write is a clear error
            mc = dict(self.ckpt["model_config"])
            self.model = M.create_model(mc.pop("name"), mc.pop("input_dim"), mc.pop("n_classes"), **mc)
            self.model.load_state_dict(self.ckpt["model"])
            self.kind: str = str(self.ckpt.get("kind", "train"))
            self.classes: list[str] = [str(c) for c in self.ckpt["classes"]]
            self.config: dict = dict(self.ckpt["config"])
            self.split_ids: dict = self.ckpt.get("split_ids", {"train": [], "val": [], "test": []})
            rd = self.ckpt["reader"]
            self.reader = ReaderConfig(fps=float(rd["fps"]), seq_len=int(rd["seq_len"]), offset=rd["offset"],
                                       min_coverage=float(rd["min_coverage"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise RunError(f"{ck}: not what featseq train/finetune write ({type(e).__name__}: {e}); use a run folder "
                           f"made by featseq") from e
        self.model.eval()
        self.cache_path: str | None = (self.ckpt.get("cache") or {}).get("path")

    @property
    def input_dim(self) -> int:
        return int(self.ckpt["model_config"]["input_dim"])

    @property
    def trunk_state(self) -> dict | None:
        """A finetune run's trained CNN trunk (state dict), else None."""
        return self.ckpt.get("trunk")

    @property
    def spec(self) -> FeatureSpec:
        """How the run's input features were made. Runs written before checkpoints carried it fall back to the
        attributes of their training cache when it still exists; otherwise RunError (nothing is guessed)."""
        if "features" in self.ckpt:
            return FeatureSpec.from_dict(self.ckpt["features"])
        if self.cache_path and os.path.isfile(self.cache_path):
            try:
                return FeatureSpec.from_attrs(summary(self.cache_path)["attrs"])
            except (CacheError, KeyError) as e:
                raise RunError(f"{self.path}: written by an older featseq without its featurize settings, and its "
                               f"cache {self.cache_path} is unreadable ({e}); retrain it with this version") from e
        raise RunError(f"{self.path}: written by an older featseq, its checkpoint does not record how its features were "
                       f"made and its training cache {self.cache_path} is gone; restore that cache or retrain the run "
                       f"(featseq train) with this version")

    def sequences(self, cache: Cache, features: torch.Tensor | None = None) -> Sequences:
        """A cache's sequences as the run reads them (its fps, length, offset, classes); the feature dims must agree."""
        dim = int(cache.attrs.get("feature_dim", 0) or 0)
        if dim != self.input_dim:
            raise RunError(f"{cache.path}: feature dimension {dim} differs from the model's {self.input_dim} "
                           f"({self.path}); use a cache made with the same backbone")
        return build(cache, self.reader, classes=self.classes, features=features)

    def probabilities(self, data: Sequences, device: torch.device) -> np.ndarray:
        """(N, C) softmax of each sequence (NaN rows for sequences with no frame)."""
        self.model.to(device)
        return probabilities(self.model, FeatureInputs.of(data), data.mask, len(self.classes), device)

    def describe(self) -> str:
        mc = self.ckpt["model_config"]
        return (f"{self.kind} run {self.path}: {mc['name']} on {self.input_dim}-dim features, {len(self.classes)} classes, "
                f"seq_len {self.reader.seq_len} at {self.reader.fps:g} fps")
