"""A run's results (``results.json``): the one record of what a finished run, a cross-validation or an evaluation
reports, read and written only here.

The file is the run's "complete" mark: it is written once, last and atomically, after every other file of the run,
so a folder holding one is a finished run (sequence.run). Its keys are a contract (users' scripts and the report
read them; README lists them): :class:`Results` keeps them exactly, in the order they were built, and gives typed
access to the ones featseq itself reads.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from featseq.common.files import replaced

RESULTS = "results.json"  # the file's name in every run folder (and in folds/<fold>/, eval_<cache>/)


def write_json(path: Path, obj) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    with replaced(path) as tmp, open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=_default)


def _default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def nan_to_none(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and std of the values that are numbers (None and NaN left out); (None, None) when none are."""
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    return (float(v.mean()), float(v.std())) if len(v) else (None, None)


def cache_info(cache) -> dict:
    """What a run records of the cache it read (a featurize.cache.Cache)."""
    a = cache.attrs
    return {"path": os.path.abspath(cache.path), "fps": a.get("fps"), "feature_dim": a.get("feature_dim"),
            "backbone": a.get("backbone"), "weights": a.get("weights"), "size": a.get("size"), "resize": a.get("resize"),
            "source": a.get("source"), "segments": len(cache)}


def _number(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


@dataclass
class Results:
    """The content of a results.json: ``content`` (its keys, in order); the properties name what featseq reads."""
    content: dict

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "Results | None":
        """FOLDER/results.json when it is one featseq wrote (a JSON object with ``status`` and a ``config`` object),
        else None: missing, unreadable, or of another shape (a file from elsewhere is data, never trusted)."""
        try:
            d = json.loads((Path(folder) / RESULTS).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(d, dict) or "status" not in d or not isinstance(d.get("config"), dict):
            return None
        return cls(d)

    def write(self, folder: str | os.PathLike) -> None:
        """Write FOLDER/results.json (atomically); once per run, after its other files."""
        write_json(Path(folder) / RESULTS, self.content)

    def get(self, key: str, default=None):
        return self.content.get(key, default)

    @property
    def status(self) -> str | None:
        return self.content.get("status")

    @property
    def config(self) -> dict:
        return self.content.get("config") or {}

    @property
    def model(self) -> str | None:
        return self.content.get("model")

    @property
    def test_accuracy(self) -> float | None:
        return _number(self.content.get("test_accuracy"))

    @property
    def val_accuracy(self) -> float | None:
        return _number(self.content.get("val_accuracy"))

    @property
    def val_loss(self) -> float | None:
        return _number(self.content.get("val_loss"))

    @property
    def total_s(self) -> float | None:
        """The run's wall-clock seconds, load included."""
        return (self.content.get("timings") or {}).get("total_s")


# ---------------------------------------------------------------- the builders: every results.json's keys are here

def fit_results(*, cfg, data, fold, head, fit, scores: dict, spec, cache, device, timings: dict | None = None,
                extra: dict | None = None) -> Results:
    """A trained model's results (a run, one fold of a cross-validation, a finetune run): ``scores`` from
    sequence.run.write_scores on its test part, ``timings`` added after train_s and per_epoch_s (load_s, total_s),
    ``extra`` after the rest (finetune's keys; one named like a key above replaces its value)."""
    import torch

    from . import models as M

    history, best = fit.history, fit.best_epoch
    b = history[best - 1] if best else fit.start_scores
    reader = data.summary()
    return Results(nan_to_none({
        "status": "complete", "config": asdict(cfg), "model": head.config["name"], "model_config": head.config,
        "order_aware": M.MODELS[head.config["name"]].order_aware, "params": M.n_params(head), "classes": data.classes,
        "fold": fold.name, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
        "fps": data.fps, "seq_len": data.seq_len, "seconds": data.seconds, "padded": reader["padded"],
        "dropped": reader["dropped"], "reader": reader, "best_epoch": best, "epochs_run": len(history),
        "test_accuracy": scores["accuracy"], "test_loss": b["test_loss"], "val_accuracy": b["val_accuracy"],
        "val_loss": b["val_loss"], "train_accuracy": b["train_accuracy"], "train_loss": b["train_loss"],
        "per_class_accuracy": scores["per_class_accuracy"], "confusion": scores["confusion"],
        **({"split_report": fold.report} if fold.report else {}),
        "timings": {"train_s": round(fit.train_s, 3),
                    "per_epoch_s": round(float(np.median([h["seconds"] for h in history])), 4) if history else None,
                    **(timings or {})},
        "features": spec.to_dict(), "cache": cache_info(cache), "device": str(device), "torch": torch.__version__,
        **(extra or {}),
    }))


FOLD_KEYS = ("fold", "n_train", "n_val", "n_test", "best_epoch", "epochs_run", "test_accuracy", "val_accuracy",
             "test_loss", "val_loss")  # per_fold's entries
SPREAD = ("test_accuracy", "val_accuracy", "test_loss", "val_loss", "train_accuracy", "best_epoch", "epochs_run")


def cv_results(*, cfg, data, per_fold: list[dict], scores: dict, cache, device, timings: dict) -> Results:
    """A cross-validation's results: ``per_fold`` the folds' results, ``scores`` the out-of-fold ones; the mean and
    std over folds of :data:`SPREAD`; ``timings`` added after train_s (the folds' sum)."""
    import torch

    first = per_fold[0]
    res = {"status": "complete", "config": asdict(cfg), "model": cfg.model,
           **{k: first[k] for k in ("model_config", "order_aware", "params", "padded", "dropped", "reader", "features")},
           "classes": data.classes, "folds": len(per_fold), "fps": data.fps, "seq_len": data.seq_len,
           "seconds": data.seconds, "oof_accuracy": scores["accuracy"], "per_class_accuracy": scores["per_class_accuracy"],
           "confusion": scores["confusion"], "per_fold": [{k: r[k] for k in FOLD_KEYS} for r in per_fold],
           "cache": cache_info(cache), "device": str(device), "torch": torch.__version__}
    for key in SPREAD:
        res[key], res[key + "_std"] = mean_std([r[key] for r in per_fold])
    res["timings"] = {"train_s": round(sum(r["timings"]["train_s"] for r in per_fold), 3), **timings}
    return Results(nan_to_none(res))


def eval_results(*, run: str, cache, same_cache: bool, data, scores: dict, counts: dict, score_all: bool,
                 seconds: float, out: str) -> Results:
    """featseq evaluate's results (RUN/eval_<cache>/results.json): ``counts`` holds unknown_label, n_train_ids_seen
    and n_skipped; ``seconds`` is how long the scoring took."""
    res = nan_to_none({
        "status": "complete", "run": run, "cache": cache_info(cache), "same_cache": same_cache,
        "test_accuracy": scores["accuracy"], "n_scored": scores["n_scored"], **counts, "score_all": score_all,
        "per_class_accuracy": scores["per_class_accuracy"], "confusion": scores["confusion"], "classes": data.classes,
        "fps": data.fps, "seq_len": data.seq_len, "reader": data.summary(), "seconds": round(seconds, 3),
    })
    res["out"] = out
    return Results(res)
