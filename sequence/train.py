"""Train one sequence model on a feature cache and write a run folder; re-score a saved run.

Run folder (``featseq train CACHE --out RUN``)::

    config.json                  the resolved TrainConfig
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
    checkpoint.pt                best epoch's weights + model_config, classes, reader settings, config

Cross-validation splits (kfold, group-kfold, logo) write one such folder per fold under ``folds/`` and, at the top,
results.json (mean and std over folds), out-of-fold predictions.csv, confusion.png, per_class.csv and
the classification report.
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
from torch import nn

from featurize.cache import Cache, CacheError, read_cache

from . import models as M
from .config import TrainConfig, config_from_dict  # noqa: F401  (re-exported)
from .reader import ReaderConfig, Sequences, build
from .splits import CV_SPLITS, Fold, make_folds

CHECKPOINT = "checkpoint.pt"


# ---------------------------------------------------------------- data in memory

_CACHES: dict[str, tuple[float, Cache, torch.Tensor]] = {}


def ram_budget_bytes() -> int:
    """Features larger than this (as float32) are memory-mapped instead of read into RAM.

    ``FEATSEQ_RAM_BUDGET_GB`` sets it; by default half of the memory available now.
    """
    if os.environ.get("FEATSEQ_RAM_BUDGET_GB"):
        return int(float(os.environ["FEATSEQ_RAM_BUDGET_GB"]) * 2**30)
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 * 2**30


def _memmap_features(path: str, n: int) -> np.ndarray:
    """A float32 copy of the first ``n`` rows of the cache's features in a .npy file (made once per cache
    version), memory-mapped."""
    import hashlib
    import tempfile

    import h5py

    st = os.stat(path)
    tag = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}".encode()).hexdigest()[:16]
    folder = Path(os.environ.get("FEATSEQ_MMAP_DIR", tempfile.gettempdir())) / "featseq-mmap"
    folder.mkdir(parents=True, exist_ok=True)
    npy = folder / f"{Path(path).stem}-{tag}.npy"
    if not npy.exists():
        tmp = npy.with_suffix(f".{os.getpid()}.tmp")
        with h5py.File(path, "r", swmr=True, locking=False) as f:
            d = f["features"]
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, d.shape[1]))
            step = max(1, (256 << 20) // (4 * d.shape[1]))
            for a in range(0, n, step):
                out[a:a + step] = d[a:min(n, a + step)]
            out.flush()
            del out
        os.replace(tmp, npy)  # atomic: parallel sweep workers may race to make it
    return np.load(npy, mmap_mode="r")


def load_cache(path: str) -> tuple[Cache, torch.Tensor]:
    """A cache and its float32 features tensor, read once per process (a sweep's variants share them).

    Features larger than :func:`ram_budget_bytes` are memory-mapped from a float32 copy on disk (the
    page cache is then shared by the processes of a sweep) instead of read into RAM.
    """
    key = os.path.abspath(path)
    mtime = os.path.getmtime(key) if os.path.exists(key) else 0.0
    hit = _CACHES.get(key)
    if hit is None or hit[0] != mtime:
        _CACHES.clear()
        cache = read_cache(path, features=False)
        dim = int(cache.attrs.get("feature_dim", 0) or 0)
        if len(cache.timestamps) * dim * 4 > ram_budget_bytes():
            import warnings

            with warnings.catch_warnings():  # a read-only memory map: the trainer only gathers rows from it
                warnings.simplefilter("ignore", UserWarning)
                cache.features = _memmap_features(path, len(cache.timestamps))
                feats = torch.from_numpy(cache.features)
        else:
            cache = read_cache(path, dtype=np.float32)
            feats = torch.from_numpy(np.ascontiguousarray(cache.features)) if cache.features is not None else torch.zeros(0)
        _CACHES[key] = hit = (mtime, cache, feats)
    return hit[1], hit[2]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------- training

@torch.no_grad()
def predict(model: nn.Module, data: Sequences, idx: np.ndarray, device: torch.device, rows: torch.Tensor | None = None,
            chunk: int = 1024) -> torch.Tensor:
    """Logits (len(idx), C) in eval mode."""
    model.eval()
    out = []
    for a in range(0, len(idx), chunk):
        x, m = data.batch(torch.as_tensor(idx[a:a + chunk]), rows)
        out.append(model(x.to(device), m.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, len(data.classes))


def _score(logits: torch.Tensor, y: torch.Tensor, loss_fn) -> tuple[float, float]:
    if len(y) == 0:
        return float("nan"), float("nan")
    return float(loss_fn(logits, y)), float((logits.argmax(1) == y).float().mean())


def fit(cfg: TrainConfig, data: Sequences, fold: Fold, device: torch.device, log=lambda s: None) -> dict:
    """Train on fold.train, select on fold.val, monitor fold.test. Returns model, history, best epoch."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_classes = len(data.classes)
    model = M.create_model(cfg.model, data.features.shape[1], n_classes, **cfg.model_kwargs())
    if cfg.standardize and len(fold.train):
        m = data.mask[fold.train]
        model.norm.fit(data.features[data.rows[fold.train][m]])
    model.to(device)
    y = data.labels
    weight = None
    if cfg.class_weights == "balanced":
        counts = torch.bincount(y[fold.train], minlength=n_classes).float()
        weight = (counts.sum() / (n_classes * counts.clamp(min=1))).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()  # plain loss for comparable curves
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_idx = torch.as_tensor(fold.train)
    y_val, y_test = y[fold.val], y[fold.test]
    history = []
    best, best_key, best_state, stale = 0, None, None, 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.monotonic()
        rows = data.resample("random", rng) if cfg.offset == "random" else None
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        tot_loss, tot_correct = 0.0, 0
        for a in range(0, len(perm), cfg.batch_size):
            b = perm[a:a + cfg.batch_size]
            x, m = data.batch(b, rows)
            x, m, yb = x.to(device), m.to(device), y[b].to(device)
            logits = model(x, m)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += loss.item() * len(b)
            tot_correct += int((logits.argmax(1) == yb).sum())
        val_loss, val_acc = _score(predict(model, data, fold.val, device), y_val, eval_loss)
        test_loss, test_acc = _score(predict(model, data, fold.test, device), y_test, eval_loss)
        rec = {"epoch": epoch, "train_loss": tot_loss / max(1, len(perm)), "train_accuracy": tot_correct / max(1, len(perm)),
               "val_loss": val_loss, "val_accuracy": val_acc, "test_loss": test_loss, "test_accuracy": test_acc,
               "seconds": time.monotonic() - t0}
        history.append(rec)
        # selection: best validation accuracy, ties to lower validation loss; no validation part: the last epoch
        key = (val_acc, -val_loss) if len(fold.val) else (epoch, 0.0)
        if best_key is None or key > best_key:
            best, best_key, stale = epoch, key, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        log(f"epoch {epoch:3d}  train loss {rec['train_loss']:.4f} acc {rec['train_accuracy']:.3f}  "
            f"val loss {val_loss:.4f} acc {val_acc:.3f}{'  *' if best == epoch else ''}")
        if len(fold.val) and stale >= cfg.patience:
            log(f"early stop: no validation improvement for {cfg.patience} epochs; best epoch {best}")
            break
    model.load_state_dict(best_state)
    return {"model": model, "history": history, "best_epoch": best}


# ---------------------------------------------------------------- outputs

def _json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=_default)
    os.replace(tmp, path)


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _nan_to_none(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def write_history(run: Path, history: list[dict], plots: bool = True) -> None:
    cols = list(history[0])
    with open(run / "history.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(history)
    for name, col in (("training_loss", "train_loss"), ("training_accuracy", "train_accuracy"),
                      ("test_loss", "test_loss"), ("test_accuracy", "test_accuracy")):
        np.save(run / f"CRNN_epoch_{name}.npy", np.array([h[col] for h in history], dtype=np.float64))
    if plots:
        plot_curves(run / "curves.png", history)


def plot_curves(path: Path, history: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.9, wspace=0.2)
    for a, what in zip(ax, ("loss", "accuracy")):
        a.plot(ep, [h[f"train_{what}"] for h in history], label="train")
        a.plot(ep, [h[f"val_{what}"] for h in history], label="validation")
        a.set_xlabel("epoch")
        a.set_title(what)
        a.grid(alpha=0.3)
        a.legend()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_confusion(path: Path, cm: np.ndarray, classes: list[str], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(1, cm.sum(1, keepdims=True))
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.0 * len(classes) + 2))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_scores(run: Path, data: Sequences, split: np.ndarray, probs: np.ndarray, scored: np.ndarray,
                 plots: bool = True, title: str = "test") -> dict:
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
        for i in range(len(data)):
            p = classes[pred[i]] if pred[i] >= 0 else ""
            w.writerow([data.ids[i], data.groups[i], split[i], data.label_names[i], p,
                        int(p == data.label_names[i]) if p else ""] +
                       [("" if np.isnan(v) else f"{v:.6f}") for v in probs[i]])
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
    if plots:
        plot_confusion(run / "confusion.png", cm, classes, f"{title} ({int(s.sum())} segments)")
    out["per_class_accuracy"] = per
    out["confusion"] = cm.tolist()
    return out


def _softmax_all(model, data, device, rows=None) -> np.ndarray:
    probs = np.full((len(data), len(data.classes)), np.nan)
    have = np.nonzero(data.mask[:, 0].numpy())[0]
    if len(have):
        probs[have] = torch.softmax(predict(model, data, have, device, rows), 1).numpy()
    return probs


def _split_column(n: int, fold: Fold, keep: np.ndarray) -> np.ndarray:
    split = np.array(["dropped"] * n, dtype=object)
    split[keep] = "unused"
    for name, idx in (("train", fold.train), ("val", fold.val), ("test", fold.test)):
        split[idx] = name
    return split


def _cache_info(cache: Cache) -> dict:
    a = cache.attrs
    return {"path": os.path.abspath(cache.path), "fps": a.get("fps"), "feature_dim": a.get("feature_dim"),
            "backbone": a.get("backbone"), "weights": a.get("weights"), "size": a.get("size"), "source": a.get("source"),
            "segments": len(cache)}


def run_fold(cfg: TrainConfig, data: Sequences, fold: Fold, run: Path, cache: Cache, device, log) -> dict:
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    fit_out = fit(cfg, data, fold, device, log)
    model, history, best = fit_out["model"], fit_out["history"], fit_out["best_epoch"]
    t_train = time.monotonic() - t0
    write_history(run, history, cfg.plots)
    probs = _softmax_all(model, data, device)
    split = _split_column(len(data), fold, data.keep)
    scored = np.zeros(len(data), bool)
    scored[fold.test] = True
    scores = write_scores(run, data, split, probs, scored, cfg.plots)
    b = history[best - 1]
    reader = data.summary()
    ckpt = {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "model_config": model.config,
            "classes": data.classes, "config": asdict(cfg),
            "reader": {"fps": data.fps, "seq_len": data.seq_len, "offset": cfg.offset, "min_coverage": cfg.min_coverage},
            "cache": _cache_info(cache),
            "split_ids": {k: [data.ids[i] for i in getattr(fold, k)] for k in ("train", "val", "test")}}
    torch.save(ckpt, run / CHECKPOINT)
    res = {
        "status": "complete", "config": asdict(cfg), "model": cfg.model, "model_config": model.config,
        "order_aware": M.MODELS[cfg.model].order_aware, "params": M.n_params(model), "classes": data.classes,
        "fold": fold.name, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
        "fps": data.fps, "seq_len": data.seq_len, "seconds": data.seconds, "padded": reader["padded"],
        "dropped": reader["dropped"], "reader": reader,
        "best_epoch": best, "epochs_run": len(history),
        "test_accuracy": scores["accuracy"], "test_loss": b["test_loss"], "val_accuracy": b["val_accuracy"],
        "val_loss": b["val_loss"], "train_accuracy": b["train_accuracy"], "train_loss": b["train_loss"],
        "per_class_accuracy": scores["per_class_accuracy"], "confusion": scores["confusion"],
        "timings": {"train_s": round(t_train, 3), "per_epoch_s": round(t_train / max(1, len(history)), 4)},
        "cache": _cache_info(cache), "device": str(device), "torch": torch.__version__,
    }
    return _nan_to_none(res), probs


def train(cfg: TrainConfig, log=lambda s: None, cache: Cache | None = None) -> dict:
    """Train as configured and write the run folder ``cfg.out``; returns results.json's content.

    Raises ValueError for invalid options, CacheError/ReaderError for caches that cannot serve the
    request, SplitError for impossible splits -- all before any training.
    """
    cfg.validate()
    t0 = time.monotonic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cache is None:
        cache, feats = load_cache(cfg.cache)
    else:
        feats = torch.from_numpy(np.ascontiguousarray(cache.features, dtype=np.float32))
    data = build(cache, cfg.reader(), features=feats)
    M.create_model(cfg.model, data.features.shape[1], max(2, len(data.classes)), **cfg.model_kwargs())  # option errors now
    folds = make_folds(cfg.split, data.label_names, data.groups, data.keep, test_size=cfg.test_size, val_size=cfg.val_size,
                       seed=cfg.seed, folds=cfg.folds, classes=data.classes)
    if len(data.classes) < 2:
        raise CacheError(f"{cfg.cache}: only one class ({', '.join(data.classes)}) among the usable segments; "
                         f"classification needs at least 2")
    device = resolve_device(cfg.device)
    t_load = time.monotonic() - t0
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    if (run / "results.json").exists():
        (run / "results.json").unlink()  # a rerun: results.json is written last, so its presence means "complete"
    _json(run / "config.json", asdict(cfg))
    if cfg.split not in CV_SPLITS:
        log(f"{cfg.model}: {len(folds[0].train)} train / {len(folds[0].val)} val / {len(folds[0].test)} test segments, "
            f"seq_len {data.seq_len} at {data.fps:g} fps")
        res, _ = run_fold(cfg, data, folds[0], run, cache, device, log)
    else:
        res = _cross_validate(cfg, data, folds, run, cache, device, log)
    res["timings"]["load_s"] = round(t_load, 3)
    res["timings"]["total_s"] = round(time.monotonic() - t0, 3)
    _json(run / "results.json", res)
    return res


def _cross_validate(cfg, data, folds, run, cache, device, log) -> dict:
    per_fold = []
    probs_oof = np.full((len(data), len(data.classes)), np.nan)
    for fold in folds:
        log(f"{fold.name}: {len(fold.train)} train / {len(fold.val)} val / {len(fold.test)} test")
        r, probs = run_fold(cfg, data, fold, run / "folds" / fold.name, cache, device, lambda s: None)
        _json(run / "folds" / fold.name / "results.json", r)
        probs_oof[fold.test] = probs[fold.test]
        per_fold.append(r)
        log(f"{fold.name}: test accuracy {r['test_accuracy']:.3f}")
    split = np.where(data.keep, "test", "dropped").astype(object)
    scored = np.zeros(len(data), bool)
    for f in folds:
        scored[f.test] = True
    scores = write_scores(run, data, split, probs_oof, scored, cfg.plots, title="out-of-fold")

    def ms(key):
        v = np.array([r[key] for r in per_fold if r.get(key) is not None], dtype=float)
        return (float(v.mean()) if len(v) else None), (float(v.std()) if len(v) else None)

    res = {"status": "complete", "config": asdict(cfg), "model": cfg.model, "model_config": per_fold[0]["model_config"],
           "order_aware": per_fold[0]["order_aware"], "params": per_fold[0]["params"], "classes": data.classes,
           "folds": len(folds), "fps": data.fps, "seq_len": data.seq_len, "seconds": data.seconds,
           "padded": per_fold[0]["padded"], "dropped": per_fold[0]["dropped"], "reader": per_fold[0]["reader"],
           "oof_accuracy": scores["accuracy"], "per_class_accuracy": scores["per_class_accuracy"],
           "confusion": scores["confusion"],
           "per_fold": [{k: r[k] for k in ("fold", "n_train", "n_val", "n_test", "best_epoch", "epochs_run", "test_accuracy",
                                            "val_accuracy", "test_loss", "val_loss")} for r in per_fold],
           "cache": _cache_info(cache), "device": str(device), "torch": torch.__version__}
    for key in ("test_accuracy", "val_accuracy", "test_loss", "val_loss", "train_accuracy", "best_epoch"):
        res[key], res[key + "_std"] = ms(key)
    res["timings"] = {"train_s": round(sum(r["timings"]["train_s"] for r in per_fold), 3)}
    return _nan_to_none(res)


# ---------------------------------------------------------------- evaluate

def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[M.SequenceClassifier, dict]:
    """(model in eval mode, checkpoint dict) from a run's checkpoint.pt: rebuilt from its config alone."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    mc = dict(ckpt["model_config"])
    model = M.create_model(mc.pop("name"), mc.pop("input_dim"), mc.pop("n_classes"), **mc)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def evaluate(run_dir: str, cache_path: str | None = None, out: str | None = None, device: str = "auto",
             plots: bool = True) -> dict:
    """Re-score a saved run on its own cache or on another one with the same feature dimension.

    Segments whose id the run trained or validated on keep that split and are not scored; every
    other segment with a label the model knows is scored. Writes ``out`` (default
    ``RUN_DIR/eval_<cache name>``): results.json, predictions.csv, per-class files, confusion.png.
    """
    run = Path(run_dir)
    ck = run / CHECKPOINT
    if not ck.exists():
        hint = " (a cross-validation run keeps one checkpoint per fold under folds/)" if (run / "folds").is_dir() else ""
        raise FileNotFoundError(f"{run}: no {CHECKPOINT}; not a featseq run folder{hint}")
    model, ckpt = load_checkpoint(ck)
    path = cache_path or ckpt["cache"]["path"]
    cache, feats = load_cache(path)
    dim = int(feats.shape[1]) if feats.ndim == 2 else 0
    if dim != ckpt["model_config"]["input_dim"]:
        raise CacheError(f"{path}: feature dimension {dim} differs from the model's {ckpt['model_config']['input_dim']} "
                         f"({ckpt['cache'].get('backbone')}); evaluate on a cache made with the same backbone")
    rd = ckpt["reader"]
    rc = ReaderConfig(fps=rd["fps"], seq_len=rd["seq_len"], offset=rd["offset"], min_coverage=rd["min_coverage"])
    data = build(cache, rc, classes=ckpt["classes"], features=feats)
    dev = resolve_device(device)
    model.to(dev)
    t0 = time.monotonic()
    probs = _softmax_all(model, data, dev)
    split = np.where(data.keep, "test", "dropped").astype(object)
    for name in ("train", "val"):
        ids = set(ckpt["split_ids"][name])
        split[[i for i, s in enumerate(data.ids) if s in ids]] = name
    y = data.labels.numpy()
    scored = (split == "test") & (y >= 0)
    dest = Path(out) if out else run / f"eval_{Path(path).stem}"
    dest.mkdir(parents=True, exist_ok=True)
    scores = write_scores(dest, data, split, probs, scored, plots, title=f"evaluate: {Path(path).name}")
    res = _nan_to_none({
        "status": "complete", "run": str(run), "cache": _cache_info(cache), "same_cache": os.path.abspath(path) == ckpt["cache"]["path"],
        "test_accuracy": scores["accuracy"], "n_scored": scores["n_scored"],
        "unknown_label": int(((split == "test") & (y < 0)).sum()), "n_train_ids_seen": int((split == "train").sum()),
        "per_class_accuracy": scores["per_class_accuracy"], "confusion": scores["confusion"], "classes": data.classes,
        "fps": data.fps, "seq_len": data.seq_len, "reader": data.summary(), "seconds": round(time.monotonic() - t0, 3),
    })
    res["out"] = str(dest)
    _json(dest / "results.json", res)
    return res
