"""featseq report: one self-contained HTML page for a run, a sweep and a comparison."""
import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch  # noqa: F401  (torch before decord)
from click.testing import CliRunner

from featseq.cli import main
from helpers import featurize_cfg
from featseq.featurize.pipeline import featurize
from featseq.sequence.report import fmt


@pytest.fixture(scope="module")
def rp_data(tmp_path_factory):
    from featseq.featurize.synth import render_dataset

    d = tmp_path_factory.mktemp("report")
    src = render_dataset(d / "v", clips_per_class_per_group=2, groups=4, width=32, height=32, duration=(4, 5),
                         long_videos=0, seed=4)["clips_root"]
    cache = featurize(featurize_cfg(src, d / "c.h5", fps=2.0)).path
    return {"d": d, "cache": cache, "src": src}


@pytest.fixture(scope="module")
def rp_run(rp_data):
    """A train run with a predict/ folder (windows over one clip) inside it."""
    run = rp_data["d"] / "run"
    r = CliRunner().invoke(main, ["train", rp_data["cache"], "--out", str(run), "--model", "conv1d", "--epochs", "3",
                                  "--seq-len", "6", "--split", "group", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    clip = sorted(Path(rp_data["src"]).rglob("*.mp4"))[0]
    r = CliRunner().invoke(main, ["predict", str(run), str(clip), "--window", "2", "--stride", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture(scope="module")
def rp_sweep(rp_data):
    sw = rp_data["d"] / "sweep"
    r = CliRunner().invoke(main, ["sweep", rp_data["cache"], "--out", str(sw), "--model", "mlp,conv1d", "--epochs", "3",
                                  "--seq-len", "6", "--split", "group", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    return sw


def _images(page: str) -> int:
    return len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page))


def _text(page: str) -> str:
    """The page without its embedded images and tags (cells separated by spaces)."""
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page).replace("<wbr>", "")
    return re.sub(r"<[^>]+>", " ", page)


def _report(folders, out=None) -> str:
    args = ["report", *map(str, folders if isinstance(folders, list) else [folders])]
    args += ["--out", str(out)] if out else []
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return Path(r.output.strip().splitlines()[-1]).read_text()


def test_run_report(rp_run):
    run = rp_run
    r = CliRunner().invoke(main, ["report", str(run)])
    assert r.exit_code == 0, r.output
    page_path = r.output.strip().splitlines()[-1]
    assert page_path == str(run / "report.html")
    page = open(page_path).read()
    res = json.loads((run / "results.json").read_text())
    assert _images(page) == 3  # curves + confusion + the predict timeline, embedded
    assert f"{res['test_accuracy']:.3f}" in page and "test accuracy" in page and "val accuracy" in page
    assert "Per-class accuracy" in page and "ascending" in page and "Options" in page
    assert "Classification report" in page and "Predictions" in page and "predictions.csv" in page
    assert "<img" in page and 'src="run' not in page and "file://" not in page  # nothing linked from outside


def test_sweep_and_compare_report(rp_data, rp_sweep):
    sw = rp_sweep
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


def test_report_escapes_what_the_folders_hold(rp_data, rp_run, tmp_path):
    run = tmp_path / "evil"
    shutil.copytree(rp_run, run, ignore=shutil.ignore_patterns("report.html"))
    res = json.loads((run / "results.json").read_text())
    res["config"]["note"] = "<script>alert('x')</script>"
    res["model"] = "conv1d<img src=x onerror=alert(1)>"
    res["per_class_accuracy"] = {'"><b>cls</b>': 0.5}
    (run / "results.json").write_text(json.dumps(res))
    (run / "per_class.csv").unlink()  # the per-class table comes from results.json
    page = _report(run)
    assert "<script" not in page and "<img src=x" not in page and "<b>cls</b>" not in page
    assert "&lt;script&gt;alert(" in page and "conv1d&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;b&gt;cls&lt;" in page


def test_report_numbers_are_formatted(rp_data, rp_run, rp_sweep):
    lb = (rp_sweep / "leaderboard.csv").read_text()
    preds = (rp_run / "predict" / "predictions.csv").read_text()
    assert re.search(r"\d\.\d{5,}", lb) and re.search(r"\d\.\d{5,}", preds)  # raw floats in the CSVs the pages show
    res = json.loads((rp_run / "results.json").read_text())
    for page in (_report(rp_run), _report(rp_sweep, rp_data["d"] / "sweep_n.html"),
                 _report([rp_sweep, rp_run, rp_run / "predict"], rp_data["d"] / "all_n.html")):
        text = _text(page)
        assert not re.findall(r"\d\.\d{5,}", text)
        assert f"{res['val_loss']:.4f}" in text
    with open(rp_sweep / "leaderboard.csv", newline="") as fh:
        best = next(csv.DictReader(fh))
    text = _text(_report(rp_sweep, rp_data["d"] / "sweep_n.html"))
    assert f"{float(best['val_accuracy']):.3f}" in text and f"{float(best['val_loss']):.4f}" in text


def test_report_format_filter():
    assert fmt("0.6937362551689148", "val_loss") == "0.6937" and fmt(0.6937362551689148, "test_accuracy") == "0.694"
    assert fmt("2.0", "fps") == "2" and fmt("197123", "params") == "197123" and fmt(3) == "3"
    assert fmt(12.3456, "seconds") == "12.3" and fmt("0.559", "seconds") == "0.559" and fmt(1.0, "linear_cka") == "1.0000"
    assert fmt(0.30000000000000004, "dropout") == "0.3" and fmt(1e-5, "lr") == "1e-05"
    assert fmt("0.0003", "lr") == "0.0003"
    assert fmt(2.5e-4, "lr") == "2.5e-04" and fmt(109.48) == "109.5" and fmt(12345.678) == "12346"
    assert fmt(None) == "—" and fmt("complete") == "complete" and fmt("model=lstm,lr=0.001") == "model=lstm,lr=0.001"
    assert fmt("/a/b/c.h5", base="/a/x") == "../b/c.h5" and fmt(["/a/v.mp4"], base="/a") == "v.mp4"


def test_report_shows_no_absolute_paths(rp_data, rp_run, rp_sweep):
    d = rp_data["d"]
    res = json.loads((rp_run / "results.json").read_text())
    assert res["cache"]["path"].startswith(str(d.resolve()))  # the folders hold absolute paths
    pages = {"run": _report(rp_run), "sweep": _report(rp_sweep, d / "sweep_p.html"),
             "all": _report([rp_sweep, rp_run, rp_run / "predict"], d / "out" / "all.html")}
    for name, page in pages.items():
        text = _text(page)
        for absolute in {str(d), str(d.resolve())}:
            assert absolute not in text, name
    assert "../c.h5" in _text(pages["run"])  # the cache, relative to run/report.html
    assert "c.h5" in _text(pages["sweep"]) and "sweep/model=" in _text(pages["sweep"])
    assert "../run/predict" in _text(pages["all"])


def test_leaderboard_fits_the_page(rp_data, rp_sweep):
    page = _report(rp_sweep, rp_data["d"] / "sweep_w.html")
    assert re.search(r'<div class="scroll"><table class="leaderboard">.*?</table></div>', page, re.DOTALL)
    assert re.search(r"\.scroll\{[^}]*overflow-x:auto", page)
    with open(rp_sweep / "leaderboard.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert "error" in rows[0] and not any(r["error"] for r in rows)
    table = re.search(r'<table class="leaderboard">.*?</table>', page, re.DOTALL).group(0)
    assert ">error<" not in table and "test_accuracy_std" not in _text(table)  # empty columns omitted
    assert ">val_<wbr>accuracy<" in table and "Same in every row" in page  # constant settings listed under it


def test_report_refuses_other_folders(tmp_path):
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "not a folder written by featseq" in r.output


def test_report_shows_every_stream_figure_with_one_rule_for_seconds(rp_run, tmp_path):
    """A run's predict_stream/ folder: window, frames, frames/s and latency percentiles shown as predict.json has
    them (they were dashes), seconds to 3 significant digits (0.0507 was 0.1 next to 0.05)."""
    run = tmp_path / "run"
    shutil.copytree(rp_run, run, ignore=shutil.ignore_patterns("report.html"))
    (run / "predict_stream").mkdir()
    (run / "predict_stream" / "predict.json").write_text(json.dumps({
        "status": "complete", "stop": "end", "run": str(run), "source": "rec.mp4", "live": True, "realtime": True,
        "fps": 2.0, "seq_len": 54, "window_s": 27.0, "stride": 1.0, "threshold": 0.5, "windows": 12,
        "frames_sampled": 48, "frames_embedded": 48, "frames_dropped": 0, "frames_per_s": 3.41,
        "latency_s": {"p50": 0.0507, "p95": 0.05, "max": 0.0912}, "windows_per_s": 0.85, "seconds": 14.07}))
    page = _report(run)
    text = _text(page)
    assert "Stream predictions" in text and "Predictions" in text  # the run's predict/ too
    for k, v in (("window_s", "27.0"), ("frames_sampled", "48"), ("frames_per_s", "3.4"), ("latency_p50_s", "0.0507"),
                 ("latency_p95_s", "0.05"), ("latency_max_s", "0.0912"), ("seconds", "14.1")):
        assert re.search(rf"{k}\s+{re.escape(v)}\s", text), (k, v)
    assert fmt(0.0507, "latency_p50_s") == "0.0507" and fmt(0.05, "seconds") == "0.05"
    assert fmt(2.3456, "featurize_s") == "2.35" and fmt(0.00012, "classify_s") == "0.00012"


def test_report_on_a_parent_folder_one_heading_per_section_and_no_empty_curves(rp_data, tmp_path):
    parent = tmp_path / "runs"
    for name, epochs in (("one_epoch", "1"), ("three", "3")):
        r = CliRunner().invoke(main, ["train", rp_data["cache"], "--out", str(parent / name), "--model", "mlp",
                                      "--epochs", epochs, "--seq-len", "6", "--device", "cpu", "-q"])
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["report", str(parent)])  # a parent folder of runs: refused before
    assert r.exit_code == 0, r.output
    page = (parent / "report.html").read_text()
    headings = re.findall(r"<h[1-3]>(.*?)</h[1-3]>", page, re.DOTALL)
    assert len([h for h in headings if "Run" in h or "run:" in h]) == 2, headings  # one heading per run section
    assert not [h for h in headings if re.match(r"\s*run:", h)]  # no second "run: DIR" heading over "Run: mlp"
    assert "one_epoch" in _text(page) and "three" in _text(page)
    # the 1-epoch run shows no curves (a point is not a curve), the 3-epoch run does
    assert page.count("loss and accuracy per epoch") == 2 * 1 and page.count("confusion matrix") == 2 * 2
    r = CliRunner().invoke(main, ["report", str(tmp_path / "runs" / "one_epoch" / "..")])
    assert r.exit_code == 0, r.output
