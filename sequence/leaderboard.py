"""A sweep's leaderboard: one row per grid variant or search trial, from the study and the run folders, ranked by
validation accuracy (ties: lower validation loss; the test part never ranks); written as leaderboard.csv,
leaderboard.md and summary.png, atomically (several workers of one study may write it at the same time).
"""
from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

from featseq.common.files import replaced

from . import models as M
from . import plots
from .config import TrainConfig
from .grid import Range, SweepConfig, finished, fmt, relevant, trial_config
from .results import Results


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _config_of(cfg: SweepConfig, trial, grid_cfgs: dict) -> TrainConfig | None:
    """The TrainConfig a trial of the study trained (None: not one of this sweep's)."""
    try:
        with warnings.catch_warnings():  # a range narrowed since: the row shows what the trial trained
            warnings.simplefilter("ignore")
            return trial_config(trial, cfg, grid_cfgs)[1]
    except ValueError:  # a parameter the trial never drew
        return None


STATUS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "error", "RUNNING": "running", "WAITING": "waiting"}


def leaderboard_rows(cfg: SweepConfig, study, vs: list[tuple[str, TrainConfig]]) -> tuple[list[dict], list[str]]:
    """One row per variant (grid) or trial (search), from the study and the run folders; the varying options."""
    grid_cfgs = dict(vs)
    order = {"complete": 0, "pruned": 1, "running": 2, "waiting": 3, "error": 4}
    latest: dict[str, object] = {}
    for t in study.get_trials(deepcopy=True):  # copies: rebuilding a config records its parameters' distributions
        name = t.user_attrs.get("variant")
        if not name or t.user_attrs.get("empty"):
            continue
        st = STATUS[t.state.name]
        if name not in latest or order[st] <= order[STATUS[latest[name].state.name]]:
            latest[name] = t
    names = [n for n, _ in vs] if cfg.search == "grid" else sorted(latest)
    varying = [k for k, v in cfg.grid.items() if len(v) > 1 or (len(v) == 1 and isinstance(v[0], Range))]
    rows = []
    for name in names:
        t = latest.get(name)
        tc = _config_of(cfg, t, grid_cfgs) if t is not None else grid_cfgs.get(name)
        if tc is None:
            continue
        status = STATUS[t.state.name] if t is not None else "missing"
        done = finished(tc) if status == "complete" else None
        ok = done is not None
        r = done or Results({})
        iv = list(t.intermediate_values.values()) if t is not None else []
        row = {"variant": name, "model": tc.model,
               **{k: fmt(getattr(tc, k)) if relevant(tc, k) else "" for k in varying if k != "model"},
               "order_aware": M.MODELS[tc.model].order_aware,
               "params": r.get("params"), "fps": r.get("fps"), "seq_len": r.get("seq_len"), "best_epoch": r.get("best_epoch"),
               "epochs": r.get("epochs_run") if ok else (t.user_attrs.get("epochs") if t is not None else None),
               "val_accuracy": _num(r.get("val_accuracy")) if ok else (max(iv) if iv else None),
               "val_loss": _num(r.get("val_loss")), "test_accuracy": _num(r.get("test_accuracy")),
               "test_accuracy_std": _num(r.get("test_accuracy_std")),
               "seconds": r.total_s if ok else (t.user_attrs.get("seconds") if t else None),
               "status": status, "error": t.user_attrs.get("error", "") if t is not None else ""}
        rows.append(row)

    def key(row):
        va, vl = row["val_accuracy"], row["val_loss"]
        return (order.get(row["status"], 5), -(va if va is not None else -1), vl if vl is not None else float("inf"))
    rows.sort(key=key)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows, varying


def write_leaderboard(out: Path, rows: list[dict], varying: list[str]) -> dict:
    """leaderboard.csv, leaderboard.md and summary.png in ``out``; their paths and the markdown table."""
    cols = ["rank", "variant", "model"] + [k for k in varying if k != "model"] + [
        "order_aware", "params", "fps", "seq_len", "best_epoch", "epochs", "val_accuracy", "val_loss", "test_accuracy",
        "test_accuracy_std", "seconds", "status", "error"]
    # atomic writes: several workers of one study may write the leaderboard at the same time
    with replaced(out / "leaderboard.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    md_cols = ["rank", "variant", "model"] + [k for k in varying if k != "model"] + ["params", "seq_len", "best_epoch", "epochs",
                                                                         "val_accuracy", "val_loss", "test_accuracy",
                                                                         "seconds", "status"]

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
        if k in ("best_epoch", "epochs") and isinstance(v, float):  # a cross-validation: the mean over its folds
            return f"{v:.1f}" if not v.is_integer() else f"{v:.0f}"
        if k == "model" and not r["order_aware"]:
            return f"{v} (order-blind)"
        return str(v)

    lines = ["| " + " | ".join(md_cols) + " |", "|" + "|".join("---" for _ in md_cols) + "|"]
    lines += ["| " + " | ".join(cell(r, k) for k in md_cols) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    with replaced(out / "leaderboard.md") as tmp:
        tmp.write_text("Sorted by validation accuracy (ties: lower validation loss). "
                       "Test accuracy is never used for ranking.\n\n" + md)
    with replaced(out / "summary.png") as tmp:
        plots.sweep_summary(tmp, rows)
    return {"csv": str(out / "leaderboard.csv"), "md": str(out / "leaderboard.md"), "plot": str(out / "summary.png"),
            "table": md}
