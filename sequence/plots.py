"""Every PNG featseq writes. Figures are drawn with matplotlib's object API (``Figure`` + its Agg canvas), so no
pyplot state and no process-wide backend choice is involved: plotting works the same headless, in a notebook
or inside a GUI program."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _colors() -> list[str]:
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def curves(path: Path, history: list[dict]) -> None:
    """Loss and accuracy per epoch, train vs validation."""
    ep = [h["epoch"] for h in history]
    fig = _figure((9, 3.4))
    ax = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.9, wspace=0.2)
    marker = "o" if len(ep) < 20 else None  # one or a few epochs: points that show, not a line too short to see
    for a, what in zip(ax, ("loss", "accuracy")):
        a.plot(ep, [h[f"train_{what}"] for h in history], label="train", marker=marker)
        a.plot(ep, [h[f"val_{what}"] for h in history], label="validation", marker=marker)
        a.set_xlabel("epoch")
        a.set_title(what)
        a.grid(alpha=0.3)
        a.legend()
    fig.savefig(path, dpi=80)


ANNOTATED_CLASSES = 20  # up to this many classes each cell shows its share and count; beyond, the colours alone


def most_confused(cm: np.ndarray, classes: list[str], k: int = 5) -> list[tuple[str, str, int]]:
    """The ``k`` largest off-diagonal counts as (true, predicted, count), largest first (ties in class order)."""
    off = cm.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    return [(classes[i], classes[j], int(off[i, j])) for i, j in zip(*np.unravel_index(order, off.shape)) if off[i, j]]


def confusion(path: Path, cm: np.ndarray, classes: list[str], title: str) -> None:
    """Row-normalised confusion matrix: with each cell's share and count up to ANNOTATED_CLASSES classes; beyond,
    a heatmap of bounded size (annotating 10,000 cells took most of a run's tail at 101 classes) captioned with the
    most confused pairs."""
    n = len(classes)
    norm = cm / np.maximum(1, cm.sum(1, keepdims=True))
    small = n <= ANNOTATED_CLASSES
    side = 1.2 * n + 2.5 if small else min(16.0, 0.14 * n + 4)
    fig = _figure((side, side - 0.5 if small else side))
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = max(3.0, 8 - n / 20) if not small else None
    ax.set_xticks(range(n), classes, rotation=30 if small else 90, ha="right" if small else "center", fontsize=ticks)
    ax.set_yticks(range(n), classes, fontsize=ticks)
    if small:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{norm[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    else:
        pairs = most_confused(cm, classes)
        if pairs:
            ax.set_title("most confused: " + "; ".join(f"{t} -> {p} ({c})" for t, p, c in pairs), fontsize=7, loc="left")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def sweep_summary(path: Path, rows: list[dict]) -> None:
    """Validation and test accuracy of every finished variant, in leaderboard order."""
    ok = [r for r in rows if r["status"] == "complete"]
    fig = _figure((8, max(2.5, 0.32 * len(ok) + 1.2)))
    ax = fig.subplots()
    y = np.arange(len(ok))[::-1]
    ax.barh(y + 0.2, [r["val_accuracy"] or 0 for r in ok], height=0.4, label="validation", color="tab:blue")
    ax.barh(y - 0.2, [r["test_accuracy"] or 0 for r in ok], height=0.4, label="test", color="tab:orange")
    ax.set_yticks(y, [r["variant"] + ("" if r["order_aware"] else "  [order-blind]") for r in ok], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("sweep: sorted by validation accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def compare(path: Path, res: dict, cosines: list) -> None:
    """Accuracy on A and B and cross-evaluated, mean +- std over seeds; histogram of per-segment cosines."""
    rows = res["variants"]
    n = 2 if cosines else 1
    fig = _figure((5 + 2.5 * n, 3.6))
    axes = fig.subplots(1, n, squeeze=False)
    ax = axes[0, 0]
    x = np.arange(len(rows))
    w = 0.2
    bars = [("A", "test_A"), ("B", "test_B"), ("A → B", "cross_A->B"), ("B → A", "cross_B->A")]
    for k, (lab, key) in enumerate(bars):
        if all(r[key] is None for r in rows):
            continue
        vals = [r[key] if r[key] is not None else 0 for r in rows]
        errs = [r.get(key + "_std") or 0 for r in rows]
        ax.bar(x + (k - 1.5) * w, vals, w, yerr=errs, capsize=2, label=lab)
    ax.set_xticks(x, [r["variant"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"mean ± std over {res['seeds']} seed(s)", fontsize=10)
    ax.legend(fontsize=8)
    if cosines:
        ax2 = axes[0, 1]
        ax2.hist(cosines, bins=20, color="gray")
        ax2.set_xlabel("per-segment mean cosine (A vs B)")
        ax2.set_title(f"linear CKA {res['similarity']['linear_cka']:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def timeline(path: Path, video: str, starts, ends, probs: np.ndarray, pred: np.ndarray, classes: list[str],
             threshold: float) -> None:
    """Probability of each class over window start; the predicted class shaded behind."""
    colors = _colors()
    starts, ends = np.asarray(starts, float), np.asarray(ends, float)
    fig = _figure((9, 3.2))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.07, right=0.8, bottom=0.16, top=0.88)
    step = np.diff(starts).min() if len(starts) > 1 else max(ends[0] - starts[0], 1e-3)
    for r in range(len(starts)):
        if pred[r] >= 0:
            ax.axvspan(starts[r], starts[r] + step, color=colors[pred[r] % len(colors)], alpha=0.15, lw=0)
    for c, name in enumerate(classes):
        if len(starts) > 1:
            ax.plot(starts, probs[:, c], marker=".", color=colors[c % len(colors)], label=name)
        else:
            ax.bar([c], [probs[0, c]], color=colors[c % len(colors)], label=name)
    if len(starts) > 1:
        ax.axhline(threshold, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("window start (s)")
    else:
        ax.set_xticks(range(len(classes)), classes)
        ax.set_xlabel(f"whole clip [{starts[0]:.1f}, {ends[0]:.1f}) s")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("probability")
    ax.set_title(Path(video).name, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="class (shaded: predicted)",
              title_fontsize=8)
    fig.savefig(path, dpi=80)


# ---------------------------------------------------------------- explanations (sequence/explain.py)

def importance(path: Path, title: str, times, imp, imp_label=None, prob_times=None, probs=None,
               prob_name: str = "predicted class") -> None:
    """Importance of each time step (bars; the true class's as a line when it differs) under the predicted class's
    probability over the same time axis (one level for a clip, one point per window along a video)."""
    times, imp = np.asarray(times, float), np.asarray(imp, float)
    fig = _figure((9, 3.6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 2.2]})
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.88, hspace=0.08)
    if probs is not None and len(probs):
        pt = np.asarray(prob_times, float)
        top.plot(pt, probs, marker="." if len(pt) > 1 else None, drawstyle="steps-post" if len(pt) > 1 else "default",
                 color=_colors()[0])
        if len(pt) == 1:
            top.hlines(probs[0], times.min() if len(times) else 0, times.max() if len(times) else 1, color=_colors()[0])
    top.set_ylim(0, 1.02)
    top.set_ylabel("p", rotation=0, labelpad=8)
    top.set_title(title, fontsize=9)
    top.text(0.005, 0.9, f"probability of the {prob_name}", transform=top.transAxes, fontsize=7, va="top", color="#555")
    width = float(np.median(np.diff(times))) * 0.85 if len(times) > 1 else 0.1
    bottom.bar(times, imp, width=width, color=_colors()[1], label="importance for the prediction")
    if imp_label is not None and np.isfinite(imp_label).all() and not np.allclose(imp_label, imp):
        bottom.plot(times, imp_label, color=_colors()[2], marker=".", lw=1, label="importance for the true class")
    bottom.set_xlabel("time in the video (s)")
    bottom.set_ylabel("importance (sums to 1)", fontsize=8)
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=7, loc="upper right")
    fig.savefig(path, dpi=80)


def class_importance(path: Path, profiles: dict, bins: int, title: str) -> None:
    """Mean share of the importance per 1/bins of the clip (time normalised to the clip), one line per class, with
    the number of segments averaged; a flat line at 1/bins is "everywhere alike"."""
    x = (np.arange(bins) + 0.5) / bins
    fig = _figure((7.5, 3.6))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.1, right=0.74, bottom=0.14, top=0.9)
    colors = _colors()
    for c, (name, rows) in enumerate(profiles.items()):
        ax.plot(x, np.mean(rows, 0), marker=".", color=colors[c % len(colors)], label=f"{name} (n={len(rows)})")
    ax.axhline(1 / bins, color="gray", ls="--", lw=0.8, label="uniform")
    ax.set_xlim(0, 1)
    ax.set_xlabel("time in the clip (0 = start, 1 = end)")
    ax.set_ylabel(f"share of importance per 1/{bins} clip", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, title="class", title_fontsize=8)
    fig.savefig(path, dpi=80)


def gradcam(path: Path, frames: list, heat: list, captions: list, title: str) -> None:
    """Frames side by side with their Grad-CAM heat map (0..1) laid over them."""
    n = max(1, len(frames))
    fig = _figure((2.6 * n, 3.0))
    axes = np.atleast_1d(fig.subplots(1, n))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.8, wspace=0.05)
    for a, f, h, cap in zip(axes, frames, heat, captions):
        a.imshow(f)
        a.imshow(h, cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=(-0.5, f.shape[1] - 0.5, f.shape[0] - 0.5, -0.5))
        a.set_title(cap, fontsize=7)
        a.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=80)
