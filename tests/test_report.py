"""featseq report: one self-contained HTML page for a run, a sweep and a comparison."""
import json
import re

import pytest
import torch  # noqa: F401  (torch before decord)
from click.testing import CliRunner

from cli import main
from conftest import featurize_cfg
from featurize.pipeline import featurize


@pytest.fixture(scope="module")
def rp_data(tmp_path_factory):
    from featurize.synth import render_dataset

    d = tmp_path_factory.mktemp("report")
    src = render_dataset(d / "v", clips_per_class_per_group=2, groups=4, width=32, height=32, duration=(4, 5),
                         long_videos=0, seed=4)["clips_root"]
    cache = featurize(featurize_cfg(src, d / "c.h5", fps=2.0)).path
    return {"d": d, "cache": cache}


def _images(page: str) -> int:
    return len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page))


def test_run_report(rp_data):
    run = rp_data["d"] / "run"
    r = CliRunner().invoke(main, ["train", rp_data["cache"], "--out", str(run), "--model", "conv1d", "--epochs", "3",
                                  "--seq-len", "6", "--split", "group", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["report", str(run)])
    assert r.exit_code == 0, r.output
    page_path = r.output.strip().splitlines()[-1]
    assert page_path == str(run / "report.html")
    page = open(page_path).read()
    res = json.loads((run / "results.json").read_text())
    assert _images(page) == 2  # curves + confusion, embedded
    assert f"{res['test_accuracy']:.3f}" in page and "test accuracy" in page and "val accuracy" in page
    assert "Per-class accuracy" in page and "ascending" in page and "Options" in page
    assert "<img" in page and 'src="run' not in page and "file://" not in page  # nothing linked from outside


def test_sweep_and_compare_report(rp_data):
    sw = rp_data["d"] / "sweep"
    r = CliRunner().invoke(main, ["sweep", rp_data["cache"], "--out", str(sw), "--model", "mlp,conv1d", "--epochs", "3",
                                  "--seq-len", "6", "--split", "group", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    out = rp_data["d"] / "sweep.html"
    r = CliRunner().invoke(main, ["report", str(sw), "--out", str(out)])
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert "Leaderboard" in page and "mlp" in page and "conv1d" in page and "Best variant" in page
    assert _images(page) >= 3  # summary + best run's curves and confusion

    cmp = rp_data["d"] / "cmp"
    r = CliRunner().invoke(main, ["compare", rp_data["cache"], rp_data["cache"], "--out", str(cmp), "--model", "mlp",
                                  "--seeds", "1", "--epochs", "2", "--seq-len", "6", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["report", str(cmp)])
    assert r.exit_code == 0, r.output
    page = (cmp / "report.html").read_text()
    assert "linear CKA" in page and "1.0000" in page and "A → B" in page and _images(page) == 1


def test_report_refuses_other_folders(tmp_path):
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "not a folder written by featseq" in r.output
