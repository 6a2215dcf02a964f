"""The confusion plot at the class counts users have: annotated cells for a few classes; at 101 (UCF-101) a heatmap
of bounded size captioned with the most confused pairs, instead of 10,201 annotated cells (most of a run's tail)."""
import numpy as np
from matplotlib.figure import Figure

from featseq.sequence import plots


def _drawn(monkeypatch, n, tmp_path):
    """Plot an n-class matrix; returns (the figure drawn, the PNG's size in bytes)."""
    made = []
    real = plots._figure

    def spy(size):
        made.append(real(size))
        return made[-1]

    monkeypatch.setattr(plots, "_figure", spy)
    cm = np.diag(np.full(n, 30))
    cm[1, 0] = 9  # the most confused pair
    cm[2, 0] = 7
    cm[0, 2] = 1
    out = tmp_path / f"cm{n}.png"
    plots.confusion(out, cm, [f"class_{i}" for i in range(n)], "test")
    return made[0], out.stat().st_size


def test_most_confused_pairs_are_the_largest_off_diagonal_counts():
    cm = np.array([[5, 1, 0], [4, 2, 3], [0, 4, 7]])
    assert plots.most_confused(cm, ["a", "b", "c"], k=3) == [("b", "a", 4), ("c", "b", 4), ("b", "c", 3)]
    assert plots.most_confused(np.diag([3, 3]), ["a", "b"]) == []  # nothing confused: nothing listed


def test_a_few_classes_get_annotated_cells(monkeypatch, tmp_path):
    fig, _ = _drawn(monkeypatch, 3, tmp_path)
    (ax,) = fig.axes
    assert isinstance(fig, Figure) and len(ax.texts) == 9
    assert ax.texts[0].get_text() == "0.97\n(30)" and ax.texts[3].get_text() == "0.23\n(9)"


def test_101_classes_get_a_bounded_heatmap_and_the_most_confused_pairs(monkeypatch, tmp_path):
    fig, size = _drawn(monkeypatch, 101, tmp_path)
    (ax,) = fig.axes
    assert len(ax.texts) == 0 and max(fig.get_size_inches()) <= 16
    caption = ax.get_title(loc="left")
    assert caption == "most confused: class_1 -> class_0 (9); class_2 -> class_0 (7); class_0 -> class_2 (1)"
    assert size < 1_000_000  # a page can hold it (the annotated one was 5 MB)
