"""Files other people made are data: loading a run, a cache, a weights file or rendering a report never runs code
from them (README, Security). The hostile checkpoints carry a real payload (``os.system("touch MARKER")`` in their
pickle); each test asserts the command refused (exit 2, naming the file) and that the marker was never made."""
import csv
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featseq.cli import main
from helpers import featurize_cfg


class Payload:
    """Unpickled, it runs ``touch MARKER`` (what an attacker's checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def sec(small_trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("sec")
    src, cache, run = (small_trained[k] for k in ("src", "cache", "run"))
    return {"d": d, "src": Path(src), "cache": cache, "run": Path(run),
            "video": str(sorted(Path(src).rglob("*.mp4"))[0])}


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _hostile_copy(sec, tmp_path, name="checkpoint.pt") -> tuple[Path, Path]:
    """A copy of the run whose checkpoint (or ``name``) carries the payload; (run folder, marker path)."""
    run, marker = tmp_path / "run", tmp_path / "MARKER"
    shutil.copytree(sec["run"], run)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    ck["config"]["note"] = Payload(marker)
    torch.save(ck, run / name)
    return run, marker


def test_fresh_checkpoints_are_tensors_and_plain_data(sec):
    from featseq.sequence.checkpoint import plain_problem

    ck = torch.load(sec["run"] / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert plain_problem(ck) is None
    assert {"model", "model_config", "classes", "reader", "config", "features", "split_ids"} <= set(ck)


def test_saving_anything_else_is_refused_before_the_file_is_written(tmp_path):
    from featseq.sequence.checkpoint import save

    for bad in ({"config": {"out": tmp_path}}, {"lr": np.float64(1e-3)}, {"x": {1, 2}}):
        with pytest.raises(TypeError, match="tensors and plain data only"):
            save(bad, tmp_path / "c.pt")
        assert not (tmp_path / "c.pt").exists()
    save({"w": torch.ones(2), "t": (1, "a", None, True, 2.5)}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["t"] == (1, "a", None, True, 2.5)


@pytest.mark.parametrize("command", ["evaluate", "predict", "stream", "finetune-from"])
def test_a_hostile_checkpoint_is_refused_by_every_command_that_opens_a_run(sec, tmp_path, command):
    run, marker = _hostile_copy(sec, tmp_path)
    args = {"evaluate": ["evaluate", run],
            "predict": ["predict", run, sec["video"], "--out", tmp_path / "p"],
            "stream": ["predict", run, "--stream", sec["video"], "--out", tmp_path / "s"],
            "finetune-from": ["finetune", sec["cache"], "--from", run, "--out", tmp_path / "ft", "--epochs", "1"]}[command]
    r = _cli(*args)
    assert r.exit_code == 2, r.output
    assert f"{run / 'checkpoint.pt'}: refused" in r.output and "posix.system" in r.output
    assert "not made by featseq" in r.output  # os.system is no object featseq ever wrote: no upgrade offered
    assert not marker.exists()


def test_a_hostile_last_pt_is_refused_by_finetune_resume(sec, tmp_path):
    """An interrupted finetune folder (its config.json, a last.pt) whose last.pt carries the payload: --resume refuses
    it before any of it runs. (finetune's own last.pt loads weights-only: tests/test_finetune.py reads it so.)"""
    out, marker = tmp_path / "ft", tmp_path / "MARKER"
    out.mkdir()
    shutil.copy(sec["run"] / "config.json", out / "config.json")
    torch.save({"epoch": 1, "best": {}, "config": {}, "note": Payload(marker)}, out / "last.pt")
    r = _cli("finetune", sec["cache"], "--from", sec["run"], "--out", out, "--epochs", "2", "--resume")
    assert r.exit_code == 2, r.output
    assert f"{out / 'last.pt'}: refused" in r.output
    assert not marker.exists()


def test_report_never_opens_a_checkpoint(sec, tmp_path):
    run, marker = _hostile_copy(sec, tmp_path)
    r = _cli("report", run, "--out", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    assert not marker.exists() and (tmp_path / "r.html").stat().st_size > 1000


def test_a_hostile_weights_file_is_refused(sec, tmp_path):
    marker, weights = tmp_path / "MARKER", tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload(marker)}, weights)
    r = _cli("featurize", sec["src"], "--weights", weights, "--size", "32", "--fps", "1", "--out", tmp_path / "c.h5")
    assert r.exit_code == 2, r.output
    assert f"--weights {weights}" in r.output and "Weights only load failed" in r.output
    assert not marker.exists() and not (tmp_path / "c.h5").exists()


def test_an_older_runs_checkpoint_is_converted_only_on_request(sec, tmp_path):
    """A checkpoint with numpy values and a path (what an older featseq could have written) is refused with the
    upgrade command; `run upgrade` without --trust changes nothing; with --trust it converts, keeps the original,
    and the run then scores exactly as before."""
    run = tmp_path / "old"
    shutil.copytree(sec["run"], run)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    ck["config"]["out"], ck["config"]["lr"] = Path(run), np.float64(ck["config"]["lr"])
    ck["reader"]["seq_len"] = np.int64(ck["reader"]["seq_len"])
    ck["mean"] = np.arange(4, dtype=np.float32)
    torch.save(ck, run / "checkpoint.pt")
    before = (run / "checkpoint.pt").read_bytes()

    r = _cli("evaluate", run)
    assert r.exit_code == 2 and f"featseq run upgrade {run} --trust" in r.output, r.output
    r = _cli("run", "upgrade", run)
    assert r.exit_code == 2 and "rerun with --trust" in r.output and "pathlib.PosixPath" in r.output, r.output
    assert (run / "checkpoint.pt").read_bytes() == before and not (run / "checkpoint.pt.pre-upgrade").exists()

    r = _cli("run", "upgrade", run, "--trust")
    assert r.exit_code == 0, r.output
    assert (run / "checkpoint.pt.pre-upgrade").read_bytes() == before
    new = torch.load(run / "checkpoint.pt", weights_only=True)
    assert new["config"]["out"] == str(run) and type(new["reader"]["seq_len"]) is int
    assert torch.equal(new["mean"], torch.arange(4, dtype=torch.float32))
    a, b = _cli("evaluate", run, "--out", tmp_path / "e1"), _cli("evaluate", sec["run"], "--out", tmp_path / "e2")
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    assert (tmp_path / "e1" / "predictions.csv").read_text() == (tmp_path / "e2" / "predictions.csv").read_text()
    assert "0 checkpoint(s) converted, 1 already plain data" in _cli("run", "upgrade", run, "--trust").output


def test_upgrade_never_converts_a_hostile_checkpoint_even_with_trust(sec, tmp_path):
    run, marker = _hostile_copy(sec, tmp_path)
    r = _cli("run", "upgrade", run, "--trust")
    assert r.exit_code == 2 and "not made by featseq" in r.output and "posix.system" in r.output, r.output
    assert not marker.exists() and not (run / "checkpoint.pt.pre-upgrade").exists()


# ---------------------------------------------------------------- caches from elsewhere

def _tampered(sec, tmp_path, edit) -> Path:
    path = tmp_path / "t.h5"
    shutil.copy(sec["cache"], path)
    with h5py.File(path, "a") as f:
        edit(f)
    return path


@pytest.mark.parametrize("case, expect", [
    ("config-not-json", "attribute 'config' is not valid JSON"),
    ("code-in-config", "attribute 'config' is not valid JSON"),
    ("fps-a-string", "attribute 'fps' is 'two'"),
    ("huge", "attribute 'note' holds"),
    ("version-a-string", "format_version attribute is not a number"),
    ("table-not-records", "segments table is not a one-dimensional table of records"),
])
def test_a_cache_with_hostile_attributes_is_a_clear_error(sec, tmp_path, case, expect):
    marker = tmp_path / "MARKER"

    def edit(f):
        if case == "config-not-json":
            f.attrs["config"] = "{not json"
        elif case == "code-in-config":  # parsed as JSON, never evaluated
            f.attrs["config"] = f"__import__('os').system('touch {marker}')"
        elif case == "fps-a-string":
            f.attrs["fps"] = "two"
        elif case == "huge":
            f.attrs["note"] = np.zeros(2**19, dtype=np.float32)  # 2 MiB
        elif case == "version-a-string":
            f.attrs["format_version"] = "2; rm -rf /"
        else:
            del f["segments"]
            f["segments"] = np.zeros(3)

    path = _tampered(sec, tmp_path, edit)
    for args in (["cache", "info", path], ["train", path, "--out", tmp_path / "r", "--epochs", "1"]):
        r = _cli(*args)
        assert r.exit_code == 2, r.output
        assert r.output.startswith(f"error: {path}") and expect in r.output, r.output
    assert not marker.exists() and not (tmp_path / "r").exists()


# ---------------------------------------------------------------- the report

class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.handlers, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.handlers += [(tag, k) for k, _ in attrs if k.lower().startswith("on")]

    def handle_data(self, data):
        self.text.append(data)


def test_html_in_a_manifest_reaches_the_report_as_text(tmp_path):
    """Labels and ids of a manifest, and a video's file name, that are HTML: the report (a run with its predictions)
    holds no script element and no event-handler attribute from them, and shows them as text."""
    from featseq.featurize.pipeline import featurize
    from featseq.featurize.synth import render_dataset
    from featseq.sequence.train import TrainConfig, train

    src = Path(render_dataset(tmp_path / "v", clips_per_class_per_group=2, groups=2, width=32, height=32,
                              duration=(3, 4), long_videos=0, seed=0)["clips_root"])
    evil = {"ascending": "<script>alert(1)</script>", "descending": "<img src=x onerror=alert(2)>",
            "pingpong": 'pp"><svg onload=alert(3)>'}
    rows = [{"path": str(p), "label": evil[p.parent.name], "group": f"g{i % 2}",
             "id": f"<b onmouseover=alert({i})>{i}</b>"} for i, p in enumerate(sorted(src.rglob("*.mp4")))]
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cache = featurize(featurize_cfg(manifest, tmp_path / "c.h5", fps=2.0)).path
    run = tmp_path / "run"
    train(TrainConfig(cache=cache, out=str(run), model="mlp", fps=2, seq_len=4, split="random", epochs=2,
                      plots=False, device="cpu"))
    video = tmp_path / "<img src=x onerror=alert(5)>.mp4"
    shutil.copy(rows[0]["path"], video)
    r = _cli("predict", run, video, "--window", "2", "--stride", "1", "--out", run / "predict")
    assert r.exit_code == 0, r.output
    r = _cli("report", run, "--out", tmp_path / "report.html")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "report.html").read_text()
    parsed = _Tags()
    parsed.feed(page)
    assert "script" not in parsed.tags and "svg" not in parsed.tags
    assert all(src.startswith("data:image/png;base64,") for src in _img_sources(page))  # only the report's own plots
    assert parsed.handlers == []
    text = "".join(parsed.text)
    assert evil["ascending"] in text and evil["descending"] in text and evil["pingpong"] in text
    assert "onerror=alert(5)" in text  # the video's name, as text


def _img_sources(page: str) -> list[str]:
    class Imgs(HTMLParser):
        def __init__(self):
            super().__init__()
            self.src = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.src.append(dict(attrs).get("src", ""))

    p = Imgs()
    p.feed(page)
    return p.src


# ---------------------------------------------------------------- JSON from elsewhere

def test_run_json_of_the_wrong_shape_is_a_clear_error(sec, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sec["run"], run)
    for content in ("[1, 2, 3]", json.dumps({"config": "x", "per_class_accuracy": [1], "timings": 5})):
        (run / "results.json").write_text(content)
        r = _cli("report", run, "--out", tmp_path / "r.html")
        assert r.exit_code == 2 and r.output.startswith(f"error: {run}"), r.output
