"""One self-contained HTML page for a run, a sweep, a comparison or a predict folder.

``featseq report DIR [--out FILE]`` (default ``DIR/report.html``). The kind of folder is recognised by
its files: ``compare.json`` (compare), ``sweep.json`` or ``leaderboard.csv`` (sweep), ``results.json``
(train/finetune run, also cross-validation), ``predict.json`` (predict, also ``--stream``); a parent folder of
such folders (e.g. ``runs/``) gives one section per folder found in it. A run's predict folders
(``predict/``, ``predict_stream/``, ...) and a sweep's best run are included as sections. PNG plots are embedded as base64 data URIs, so the page
is one file that can be mailed or archived.

The page is rendered from ``templates/report.html.j2`` with autoescaping on. This module only gathers
plain data; every value shown goes through the template's ``fmt`` filter (:func:`fmt`), which formats
numbers (also numeric CSV cells) and shows absolute paths relative to the folder the page is written
into.
"""
from __future__ import annotations

import base64
import csv
import json
import math
import os
import re
import time
from pathlib import Path

import jinja2

from featseq.common.errors import UserError
from featseq.common.files import replaced

from .results import RESULTS


class ReportError(UserError):
    """The folder is not one featseq wrote."""


# ---------------------------------------------------------------- formatting (the template's fmt filter)

_INT = re.compile(r"[+-]?(0|[1-9]\d*)\Z")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?\Z")
SECONDS_KEYS = {"seconds", "window", "stride", "window_start", "window_end", "start", "end"}


def _kind(key: str | None) -> str:
    """How a float under this column/metric name is shown: acc (3 decimals), loss (4), sec, rate (1), plain."""
    k = (key or "").lower()
    if "per_s" in k:
        return "rate"
    if "accuracy" in k or k.startswith("p_") or k.endswith("_acc"):
        return "acc"
    if "loss" in k or "cka" in k or "cosine" in k:
        return "loss"
    if k in SECONDS_KEYS or k.endswith("_s") or k.startswith("time "):
        return "sec"
    return "plain"


def _float(v: float, key: str | None, nd: int | None) -> str:
    if not math.isfinite(v):
        return str(v)
    kind = _kind(key)
    if kind == "sec" and nd is None and abs(v) < 10:
        # 3 significant digits below 10 s: 0.0507, 0.05, 0.559, 2.35 (one rule, so neighbours read alike)
        s = f"{v:.3g}"
        return s if "e" not in s else f"{v:.2e}"
    if nd is None:
        nd = {"acc": 3, "loss": 4, "rate": 1, "sec": 1}.get(kind)
    if nd is not None:
        return f"{v:.{nd}f}"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if abs(v) >= 1e-3:  # 4 significant digits, at most 4 decimals: 0.2, 0.0003, 0.6937, 109.5, 12346
        s = f"{v:.{max(0, 4 - len(str(int(abs(v)))) if abs(v) >= 1 else 4)}f}"
        return s.rstrip("0").rstrip(".") if "." in s else s
    s = f"{v:.4g}"
    if "e" in s or len(s.split(".")[1]) > 4:
        s = re.sub(r"\.?0+e", "e", f"{v:.3e}")  # 2.5e-04, 1e-05
    return s


def fmt(v, key: str | None = None, nd: int | None = None, base: str | None = None) -> str:
    """One value as text for the page: None as a dash, ints as ints, floats (also numeric strings, as in CSV
    cells) by what ``key`` names (accuracies 3 decimals, losses and similarities 4, seconds and rates 1, others
    at most 4), absolute paths relative to ``base``, lists and dicts item by item. Other text is unchanged."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _float(v, key, nd)
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, key, nd, base) for x in v) if v else "[]"
    if isinstance(v, dict):
        return "; ".join(f"{k}: {fmt(x, k, nd, base)}" for k, x in v.items()) if v else "{}"
    s = str(v)
    t = s.strip()
    if _INT.match(t):
        return str(int(t))
    if _FLOAT.match(t):
        return _float(float(t), key, nd)
    if base and os.path.isabs(t) and "\n" not in t:
        return _rel(t, base)
    return s


def _rel(path, base: str) -> str:
    try:
        return os.path.relpath(os.path.abspath(path), base)
    except ValueError:  # another drive (Windows): no relative path
        return os.path.abspath(path)


def _numeric(v) -> bool:
    """A number or a numeric-looking string (a CSV cell): right-aligned, never wrapped."""
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    return isinstance(v, str) and bool(_FLOAT.match(v.strip()))


@jinja2.pass_context
def _fmt_filter(ctx, v, key=None, nd=None):
    return fmt(v, key, nd, ctx.get("base"))


@jinja2.pass_context
def _where_filter(ctx, d):
    """A report folder as a path relative to the page's folder."""
    rel = _rel(d, ctx["base"])
    return "(this folder)" if rel == "." else rel


_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True,
                          trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
_ENV.filters["fmt"] = _fmt_filter
_ENV.filters["where"] = _where_filter
_ENV.tests["numeric"] = _numeric


# ---------------------------------------------------------------- reading the folders

def _img(path: Path, alt: str) -> dict | None:
    if not path.is_file():
        return None
    return {"alt": alt, "data": base64.b64encode(path.read_bytes()).decode("ascii")}


def _imgs(*pairs) -> list[dict]:
    return [f for f in (_img(p, alt) for p, alt in pairs) if f]


def _blank(x) -> bool:
    return x is None or (isinstance(x, str) and not x.strip())


def _table(header: list, rows: list[list], cls: str = "", common: bool = False, more: str = "") -> dict:
    """A table without its empty columns; with ``common`` (and 2+ rows), setting columns (not accuracies, losses,
    times) holding one value in every row are moved to a line under the table instead."""
    keep = [i for i in range(len(header)) if any(i < len(r) and not _blank(r[i]) for r in rows)] if rows else \
        list(range(len(header)))
    same = []
    if common and len(rows) > 1:
        for i in list(keep):
            vals = {r[i] if i < len(r) else None for r in rows}
            if len(vals) == 1 and _kind(header[i]) == "plain":
                same.append((header[i], rows[0][i]))
                keep.remove(i)
    return {"header": [header[i] for i in keep], "rows": [[r[i] if i < len(r) else None for i in keep] for r in rows],
            "cls": cls, "same": same, "more": more}


def _csv_table(path: Path, limit: int = 200, cls: str = "", common: bool = False) -> dict | None:
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return None
    n = len(rows) - 1
    more = f"{n - limit} more rows in {path.name}" if n > limit else ""
    return _table(rows[0], rows[1:limit + 1], cls, common, more)


def _load(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read it ({e})") from e
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: holds a JSON {type(obj).__name__}, not the object featseq writes")
    return obj


METRICS = ("test_accuracy", "test_accuracy_std", "oof_accuracy", "val_accuracy", "val_accuracy_std", "train_accuracy",
           "test_loss", "val_loss", "best_epoch", "epochs_run", "n_train", "n_val", "n_test", "folds", "fps", "seq_len",
           "seconds", "padded", "dropped", "params", "backbone", "unfreeze", "frames_from", "device")
# predict.json's figures, files (predict) and streams (predict --stream) alike: those a folder's file holds are shown
PREDICT_SETTINGS = ("run", "kind", "source", "live", "realtime", "status", "stop", "window", "window_s", "stride",
                    "threshold", "positive_windows", "fps", "seq_len", "windows", "frames", "frames_featurized",
                    "frames_sampled", "frames_embedded", "frames_dropped", "frames_repeated_in_windows", "featurize_s",
                    "classify_s", "frames_per_s", "windows_per_s", "latency_p50_s", "latency_p95_s", "latency_max_s",
                    "seconds", "total_s")


def run_data(run: Path, title: str | None = None, level: int = 2) -> dict:
    res = _load(run / RESULTS)
    metrics = {k: res[k] for k in METRICS if res.get(k) is not None}
    for k, v in (res.get("timings") or {}).items():
        metrics[f"time {k}"] = v
    per = res.get("per_class_accuracy") or {}
    per_class = None
    if per:
        per_class = _csv_table(run / "per_class.csv") or _table(["class", "accuracy"], [[c, v] for c, v in per.items()])
    pf = res.get("per_fold") or []
    report_txt = run / "classification_report.txt"
    return {
        "kind": "run", "dir": run, "level": level, "model": res.get("model"),
        "title": title or ("Fine-tuned run" if res.get("mode") == "finetune" else "Run"),
        "cards": [(k, res[k]) for k in ("test_accuracy", "oof_accuracy", "val_accuracy") if res.get(k) is not None],
        "metrics": metrics, "cache": res.get("cache") or {},
        "folds": _table(list(pf[0]), [[r.get(c) for c in pf[0]] for r in pf]) if pf else None,
        # curves need two epochs at least (one epoch is a point, not a curve)
        "figs": _imgs(*([(run / "curves.png", "loss and accuracy per epoch")] if (res.get("epochs_run") or 0) >= 2 else []),
                      (run / "confusion.png", "confusion matrix (row-normalised)")),
        "per_class": per_class,
        "class_report": report_txt.read_text() if report_txt.is_file() else None,
        "config": res.get("config") or {},
        # every predict folder inside the run: predict/, predict_stream/ and any --out given there
        "predicts": [predict_data(p.parent, level + 1) for p in sorted(run.glob("*/predict.json"))],
        "explains": [explain_data(p.parent, level + 1) for p in sorted(run.glob("*/explain.json"))],
    }


def sweep_data(d: Path) -> dict:
    info = _load(d / "sweep.json") if (d / "sweep.json").is_file() else {}
    best = None
    if (d / "leaderboard.csv").is_file():
        with open(d / "leaderboard.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and rows[0].get("variant") and (d / rows[0]["variant"] / RESULTS).is_file():
            best = d / rows[0]["variant"]
    return {
        "kind": "sweep", "dir": d,
        "grid": {"cache": info.get("cache"), **(info.get("grid") or {})} if info else None,
        "leaderboard": _csv_table(d / "leaderboard.csv", cls="leaderboard", common=True),
        "figs": _imgs((d / "summary.png", "sweep summary")),
        "best": run_data(best, f"Best variant ({best.name})", 3) if best is not None else None,
        # predictions made with any variant (the best one's are in its section)
        "predicts": [predict_data(p.parent, 3) for p in sorted(d.glob("*/*/predict.json"))
                     if best is None or p.parent.parent != best],
    }


def compare_data(d: Path) -> dict:
    res = _load(d / "compare.json")
    s = res.get("similarity", {})
    variants = res.get("variants", [])
    return {
        "kind": "compare", "dir": d,
        "caches": [(tag.upper(), res.get(f"cache_{tag}", {})) for tag in ("a", "b")],
        "common_segments": res.get("common_segments"), "last_seed": int(res.get("seeds", 1)) - 1,
        "similarity": [("matched frames", s.get("matched_frames")), ("linear CKA", s.get("linear_cka")),
                       ("mean cosine (per segment)", s.get("mean_cosine")),
                       ("lowest segment cosine", s.get("min_cosine"))],
        "variants": [{"name": r["variant"],
                      "cells": [(r.get(k), r.get(k + "_std"))
                                for k in ("test_A", "test_B", "cross_A->B", "cross_B->A")],
                      "per_class": [(c, r["per_class_A"].get(c), r["per_class_B"].get(c)) for c in r["classes"]]}
                     for r in variants],
        "figs": _imgs((d / "compare.png", "accuracy on A and B, cross-evaluation, similarity")),
    }


def predict_data(d: Path, level: int = 2) -> dict:
    res = _load(d / "predict.json")
    res = {**res, **{f"latency_{k}_s": v for k, v in (res.get("latency_s") or {}).items()}}
    if "window" in res and res["window"] is None:
        res["window"] = "whole video"
    return {
        "kind": "predict", "dir": d, "level": level, "stream": "source" in res,
        "settings": [(k, res[k]) for k in PREDICT_SETTINGS if k in res],
        "figs": _imgs(*((p, p.stem[len("timeline_"):]) for p in sorted(d.glob("timeline_*.png")))),
        "predictions": _csv_table(d / "predictions.csv", 500, common=True),
        # predict --explain: importance along each video
        "explain": _imgs(*((p, f"importance over time: {p.stem[len('importance_'):]}")
                           for p in sorted(d.glob("importance_*.png")))),
    }


def explain_data(d: Path, level: int = 2) -> dict:
    """An explain folder (explain.json): its settings, the class-average figure, the per-segment figures."""
    res = _load(d / "explain.json")
    files = res.get("files") or {}
    settings = {"run": res.get("run"), "kind": res.get("kind"), "cache": res.get("cache"),
                "segments": res.get("segments"), "correct": res.get("correct"), **(res.get("settings") or {}),
                "gradcam_through": res.get("gradcam_through"), "total_s": res.get("total_s")}
    return {
        "kind": "explain", "dir": d, "level": level,
        "settings": [(k, v) for k, v in settings.items() if v is not None],
        "figs": _imgs((d / "class_importance.png", "importance for the true class along the clip, per class")),
        "segments": _imgs(*((d / Path(p).name, f"{i}: importance over time")
                            for i, p in (files.get("importance") or {}).items())),
        "gradcam": _imgs(*((d / Path(p).name, f"{i}: Grad-CAM") for i, p in (files.get("gradcam") or {}).items())),
        "attributions": _csv_table(d / "attributions.csv", 300, common=True),
    }


def kind_of(d: Path) -> str:
    d = Path(d)
    if (d / "compare.json").is_file():
        return "compare"
    if (d / "sweep.json").is_file() or (d / "leaderboard.csv").is_file():
        return "sweep"
    if (d / RESULTS).is_file():
        return "run"
    if (d / "predict.json").is_file():
        return "predict"
    if (d / "explain.json").is_file():
        return "explain"
    raise ReportError(f"{d}: no {RESULTS}, leaderboard.csv, compare.json, predict.json or explain.json; not a folder "
                      f"written by featseq train/finetune, sweep, compare, predict or explain")


def folders_in(d: Path, depth: int = 3) -> list[Path]:
    """The featseq folders (run, sweep, compare, predict) under a parent folder ``d``: the highest ones on each
    branch, at most ``depth`` levels down, in name order."""
    found = []
    for child in sorted(p for p in Path(d).iterdir() if p.is_dir()):
        try:
            kind_of(child)
            found.append(child)
        except ReportError:
            if depth > 1:
                found += folders_in(child, depth - 1)
    return found


def report(folders: str | list[str], out: str | None = None) -> str:
    """Write one HTML page for one or several run/sweep/compare/predict folders, or parent folders of such folders
    (one section each); returns its path."""
    dirs = [Path(f) for f in ([folders] if isinstance(folders, (str, Path)) else folders)]
    if not dirs:
        raise ReportError("report: give at least one folder")
    readers = {"compare": compare_data, "sweep": sweep_data, "run": run_data, "predict": predict_data,
               "explain": explain_data}
    sections = []
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"{d}: no such folder")
        try:
            inner = [d] if kind_of(d) else []
        except ReportError:
            inner = folders_in(d)  # a parent folder of runs (runs/, a compare's runs/A)
            if not inner:
                raise
        for f in inner:
            try:
                sections.append(readers[kind_of(f)](f))
            except (KeyError, TypeError, AttributeError, ValueError) as e:  # files from elsewhere are data; say which
                if isinstance(e, ReportError):
                    raise
                raise ReportError(f"{f}: its files are not what featseq writes ({type(e).__name__}: {e})") from e
    dest = Path(out) if out else dirs[0] / "report.html"
    page = _ENV.get_template("report.html.j2").render(
        sections=sections, dirs=dirs, base=os.path.abspath(dest.parent),
        generated=time.strftime("%Y-%m-%d %H:%M:%S"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with replaced(dest) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return str(dest)
