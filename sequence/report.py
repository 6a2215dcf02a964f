"""One self-contained HTML page for a run, a sweep, a comparison or a predict folder.

``featseq report DIR [--out FILE]`` (default ``DIR/report.html``). The kind of folder is recognised by
its files: ``compare.json`` (compare), ``sweep.json`` or ``leaderboard.csv`` (sweep), ``results.json``
(train/finetune run, also cross-validation), ``predict.json`` (predict). A run's ``predict/`` and a
sweep's best run are included as sections. PNG plots are embedded as base64 data URIs, so the page
is one file that can be mailed or archived.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import time
from pathlib import Path


class ReportError(ValueError):
    """The folder is not one featseq wrote."""


def _esc(x) -> str:
    return html.escape("" if x is None else str(x))


def _num(v, nd: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return _esc(v)


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}"><figcaption>{_esc(alt)}</figcaption></figure>'


def _table(header: list, rows: list[list], cls: str = "") -> str:
    h = "".join(f"<th>{_esc(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


class _Raw(str):
    """Cell content that is already HTML."""


def _kv(d: dict) -> str:
    return _table(["option", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in d.items()], "kv")


def _csv_table(path: Path, limit: int = 200) -> str:
    if not path.is_file():
        return ""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return ""
    more = f"<p>{len(rows) - 1 - limit} more rows in {_esc(path.name)}</p>" if len(rows) - 1 > limit else ""
    return _table(rows[0], rows[1:limit + 1]) + more


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read it ({e})") from e


# ---------------------------------------------------------------- sections

METRICS = ("test_accuracy", "test_accuracy_std", "oof_accuracy", "val_accuracy", "val_accuracy_std", "train_accuracy",
           "test_loss", "val_loss", "best_epoch", "epochs_run", "n_train", "n_val", "n_test", "folds", "fps", "seq_len",
           "seconds", "padded", "dropped", "params", "backbone", "unfreeze", "frames_from", "device")


def run_section(run: Path, title: str | None = None, level: int = 2) -> str:
    res = _load(run / "results.json")
    h = f"h{level}"
    parts = [f"<{h}>{_esc(title or ('Fine-tuned run' if res.get('mode') == 'finetune' else 'Run'))}: "
             f"{_esc(res.get('model'))} <small>{_esc(run)}</small></{h}>"]
    metrics = {k: res[k] for k in METRICS if res.get(k) is not None}
    for k, v in (res.get("timings") or {}).items():
        metrics[f"time {k}"] = v
    cards = "".join(f'<div class="card"><div class="v">{_num(res.get(k))}</div><div class="k">{k.replace("_", " ")}</div></div>'
                    for k in ("test_accuracy", "oof_accuracy", "val_accuracy") if res.get(k) is not None)
    parts.append(f'<div class="cards">{cards}</div>')
    parts.append("<h4>Metrics</h4>" + _table(["metric", "value"], [[k, _num(v, 4)] for k, v in metrics.items()], "kv"))
    cache = res.get("cache") or {}
    if cache:
        parts.append("<h4>Cache</h4>" + _kv(cache))
    if res.get("per_fold"):
        pf = res["per_fold"]
        cols = list(pf[0])
        parts.append("<h4>Folds</h4>" + _table(cols, [[_num(r.get(c), 4) for c in cols] for r in pf]))
    parts.append('<div class="figs">' + _img(run / "curves.png", "loss and accuracy per epoch")
                 + _img(run / "confusion.png", "confusion matrix (row-normalised)") + "</div>")
    per = res.get("per_class_accuracy") or {}
    if per:
        parts.append("<h4>Per-class accuracy</h4>" + (_csv_table(run / "per_class.csv") if (run / "per_class.csv").is_file()
                     else _table(["class", "accuracy"], [[c, _num(v)] for c, v in per.items()])))
    if (run / "classification_report.txt").is_file():
        parts.append("<h4>Classification report</h4><pre>" + _esc((run / "classification_report.txt").read_text()) + "</pre>")
    if res.get("config"):
        parts.append("<details><summary>Options</summary>" + _kv(res["config"]) + "</details>")
    if (run / "predict" / "predict.json").is_file():
        parts.append(predict_section(run / "predict", level + 1))
    return "\n".join(parts)


def sweep_section(d: Path) -> str:
    parts = [f"<h2>Sweep <small>{_esc(d)}</small></h2>"]
    info = _load(d / "sweep.json") if (d / "sweep.json").is_file() else {}
    if info:
        parts.append("<h4>Grid</h4>" + _kv({"cache": info.get("cache"), **{k: v for k, v in (info.get("grid") or {}).items()}}))
    parts.append("<h4>Leaderboard</h4><p>Sorted by validation accuracy (ties: lower validation loss).</p>"
                 + _csv_table(d / "leaderboard.csv"))
    parts.append('<div class="figs">' + _img(d / "summary.png", "sweep summary") + "</div>")
    best = None
    if (d / "leaderboard.csv").is_file():
        with open(d / "leaderboard.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and rows[0].get("variant") and (d / rows[0]["variant"] / "results.json").is_file():
            best = d / rows[0]["variant"]
    if best is not None:
        parts.append(run_section(best, f"Best variant ({best.name})", 3))
    for p in sorted(d.glob("*/predict/predict.json")):  # predictions made with any variant (the best one's are above)
        if best is None or p.parent.parent != best:
            parts.append(predict_section(p.parent, 3))
    return "\n".join(parts)


def compare_section(d: Path) -> str:
    res = _load(d / "compare.json")
    s = res.get("similarity", {})
    parts = [f"<h2>Comparison <small>{_esc(d)}</small></h2>"]
    for tag in ("a", "b"):
        c = res.get(f"cache_{tag}", {})
        parts.append(f"<p><b>{tag.upper()}</b>: {_esc(c.get('path'))} — {_esc(c.get('backbone'))} ({_esc(c.get('weights'))}), "
                     f"{_esc(c.get('size'))} px {_esc(c.get('resize'))}, {_esc(c.get('fps'))} fps, "
                     f"{_esc(c.get('feature_dim'))}-dim, {_esc(c.get('segments'))} segments</p>")
    parts.append(f"<p>{_esc(res.get('common_segments'))} common segments; seeds 0..{int(res.get('seeds', 1)) - 1} "
                 f"on identical splits.</p>")
    parts.append("<h4>Feature similarity</h4>" + _table(["measure", "value"], [
        ["matched frames", s.get("matched_frames")], ["linear CKA", _num(s.get("linear_cka"), 4)],
        ["mean cosine (per segment)", _num(s.get("mean_cosine"), 4)], ["lowest segment cosine", _num(s.get("min_cosine"), 4)]], "kv"))

    def ms(r, k):
        m, sd = r.get(k), r.get(k + "_std")
        return "—" if m is None else f"{m:.3f} ± {sd or 0:.3f}"

    rows = res.get("variants", [])
    parts.append("<h4>Test accuracy (mean ± std over seeds)</h4>" + _table(
        ["variant", "A", "B", "A → B", "B → A"],
        [[r["variant"], ms(r, "test_A"), ms(r, "test_B"), ms(r, "cross_A->B"), ms(r, "cross_B->A")] for r in rows]))
    for r in rows:
        parts.append(f"<h4>Per-class accuracy: {_esc(r['variant'])}</h4>" + _table(
            ["class", "A", "B"], [[c, _num(r["per_class_A"].get(c)), _num(r["per_class_B"].get(c))] for c in r["classes"]]))
    parts.append('<div class="figs">' + _img(d / "compare.png", "accuracy on A and B, cross-evaluation, similarity") + "</div>")
    return "\n".join(parts)


def predict_section(d: Path, level: int = 2) -> str:
    res = _load(d / "predict.json")
    h = f"h{level}"
    parts = [f"<{h}>Predictions <small>{_esc(d)}</small></{h}>",
             _table(["setting", "value"], [[k, _num(res.get(k), 2)] for k in (
                 "run", "kind", "window", "stride", "threshold", "fps", "seq_len", "windows", "frames", "frames_per_s",
                 "windows_per_s")], "kv")]
    figs = sorted(d.glob("timeline_*.png"))
    parts.append('<div class="figs">' + "".join(_img(p, p.stem[len("timeline_"):]) for p in figs) + "</div>")
    parts.append("<details><summary>predictions.csv</summary>" + _csv_table(d / "predictions.csv", 500) + "</details>")
    return "\n".join(parts)


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}small{color:#888;font-weight:normal;font-size:.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left}
th{background:#f4f4f4}.kv td:first-child{color:#555}figure{display:inline-block;margin:.5em}img{max-width:100%}
figcaption{font-size:.8em;color:#666}.cards{display:flex;gap:1em}.card{border:1px solid #ddd;border-radius:6px;padding:.5em 1em}
.card .v{font-size:1.6em;font-weight:600}.card .k{font-size:.8em;color:#666}pre{background:#f7f7f7;padding:.5em;font-size:.8em}"""


def kind_of(d: Path) -> str:
    if (d / "compare.json").is_file():
        return "compare"
    if (d / "sweep.json").is_file() or (d / "leaderboard.csv").is_file():
        return "sweep"
    if (d / "results.json").is_file():
        return "run"
    if (d / "predict.json").is_file():
        return "predict"
    raise ReportError(f"{d}: no results.json, leaderboard.csv, compare.json or predict.json; not a folder written by "
                      f"featseq train/finetune, sweep, compare or predict")


def report(folders: str | list[str], out: str | None = None) -> str:
    """Write one HTML page for one or several run/sweep/compare/predict folders; returns its path."""
    dirs = [Path(f) for f in ([folders] if isinstance(folders, (str, Path)) else folders)]
    if not dirs:
        raise ReportError("report: give at least one folder")
    sections, kinds = [], []
    sectioners = {"compare": compare_section, "sweep": sweep_section, "run": run_section, "predict": predict_section}
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"{d}: no such folder")
        kind = kind_of(d)
        kinds.append(kind)
        body = sectioners[kind](d)
        sections.append(body if len(dirs) == 1 else f"<section><h1>{_esc(kind)}: {_esc(d)}</h1>\n{body}</section>")
    title = f"{kinds[0]}: {dirs[0].name}" if len(dirs) == 1 else f"{len(dirs)} folders"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>featseq {_esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>featseq {_esc(kinds[0] if len(dirs) == 1 else '')} report</h1>"
            f"<p><small>{_esc(', '.join(str(d.resolve()) for d in dirs))} — generated {time.strftime('%Y-%m-%d %H:%M:%S')}"
            f"</small></p>\n{''.join(sections)}</body></html>\n")
    dest = Path(out) if out else dirs[0] / "report.html"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(dest)
    return str(dest)
