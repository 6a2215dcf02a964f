"""featseq explain and predict --explain: importance over time (Captum) on the model's own inputs, and Grad-CAM.

The sanity test of the method: caches written with featseq's writer whose class signal lies in frames 10-14 of 30
(noise elsewhere), and a control whose five signal frames are shuffled in time per segment."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (torch before decord)
from click.testing import CliRunner

from featseq.cli import main
from featseq.featurize.cache import read_cache
from helpers import featurize_cfg, write_fake_cache

L, D, SIGNAL = 30, 8, range(10, 15)


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _signal_cache(path, shuffled: bool, n: int = 90, seed: int = 0):
    """n segments of 5 s at 6 fps (30 frames), 3 classes; class c adds 4 to dimension c of five frames: frames 10-14,
    or (shuffled) five frames drawn per segment. Returns (cache, {id: the signal frames})."""
    rng = np.random.default_rng(seed)
    feats, where = [], {}
    for i in range(n):
        f = rng.standard_normal((L, D))
        pos = np.sort(rng.permutation(L)[:5]) if shuffled else np.array(SIGNAL)
        f[pos, i % 3] += 4.0
        feats.append(f)
        where[f"s{i:03d}"] = set(pos.tolist())
    cache = write_fake_cache(path, [f"c{i % 3}" for i in range(n)], groups=[f"g{i % 4}" for i in range(n)],
                             durations=[5.0] * n, fps=6.0, dim=D, features=feats)
    return cache, where


def _train(cache, out, model, *extra):
    r = CliRunner().invoke(main, ["train", cache, "--out", str(out), "--model", model, "--epochs", "25", "--seq-len",
                                  str(L), "--split", "random", "--hidden", "16", "--lr", "0.01", "--device", "cpu",
                                  "-q", "--no-plots", *extra])
    assert r.exit_code == 0, r.output
    return str(out)


def _mass(rows, frames_of) -> tuple[list, int]:
    """Per correctly predicted segment, the share of its importance on frames_of(id); and how many were wrong."""
    mass, wrong = {}, set()
    for x in rows:
        if x["correct"] != "1":
            wrong.add(x["id"])
            continue
        mass[x["id"]] = mass.get(x["id"], 0.0) + float(x["importance"]) * (int(x["step"]) in frames_of(x["id"]))
    return list(mass.values()), len(wrong)


@pytest.fixture(scope="module")
def signal_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain")
    cache, _ = _signal_cache(d / "signal.h5", shuffled=False)
    return {"d": d, "cache": cache, "conv1d": _train(cache, d / "conv1d", "conv1d")}


@pytest.mark.slow
def test_importance_falls_on_the_signal_frames_and_follows_them_when_shuffled(signal_runs, tmp_path):
    d = signal_runs["d"]
    control, where = _signal_cache(tmp_path / "shuffled.h5", shuffled=True)
    # the LSTM pools with max: with "last" its integrated gradients spread over the frames after the signal too
    runs = {"conv1d": (signal_runs["conv1d"], _train(control, tmp_path / "c_conv1d", "conv1d")),
            "lstm": (_train(signal_runs["cache"], d / "lstm", "lstm", "--pooling", "max"),
                     _train(control, tmp_path / "c_lstm", "lstm", "--pooling", "max"))}
    for name, (run, ctrl) in runs.items():
        for r in (run, ctrl):
            res = CliRunner().invoke(main, ["explain", r, "--gradcam", "0", "--max-plots", "0", "--device", "cpu"])
            assert res.exit_code == 0, res.output
        mass, wrong = _mass(_rows(Path(run) / "explain" / "attributions.csv"), lambda i: SIGNAL)
        assert len(mass) >= 12 and wrong <= 6, (name, len(mass), wrong)  # the model learned the task
        assert np.mean(mass) >= 0.6, (name, np.mean(mass))
        rows = _rows(Path(ctrl) / "explain" / "attributions.csv")
        fixed, _ = _mass(rows, lambda i: SIGNAL)
        moved, _ = _mass(rows, lambda i: where[i])
        assert len(fixed) >= 10, name
        assert np.mean(fixed) < 0.4, (name, np.mean(fixed))    # no longer concentrated on frames 10-14 ...
        assert np.mean(moved) >= 0.5, (name, np.mean(moved))   # ... but on wherever each segment's signal is


def test_explain_writes_the_csv_and_figures_the_report_shows(signal_runs, tmp_path):
    run, cache = signal_runs["conv1d"], read_cache(signal_runs["cache"])
    out = tmp_path / "ex"
    r = CliRunner().invoke(main, ["explain", run, "--ids", "s001,s005", "--method", "occlusion", "--gradcam", "0",
                                  "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == str(out)
    rows = _rows(out / "attributions.csv")
    assert list(rows[0]) == ["id", "group", "label", "predicted", "correct", "p_predicted", "step", "time",
                             "importance", "importance_label", "attribution"]
    assert [x["id"] for x in rows] == ["s001"] * L + ["s005"] * L
    pos = {s: k for k, s in enumerate(cache.segments["id"])}
    for sid in ("s001", "s005"):
        mine = [x for x in rows if x["id"] == sid]
        imp = np.array([float(x["importance"]) for x in mine])
        assert (imp >= 0).all() and abs(imp.sum() - 1) < 1e-4
        lab = np.array([float(x["importance_label"]) for x in mine])
        assert abs(lab.sum() - 1) < 1e-4
        a = int(cache.segments["offset"][pos[sid]])  # the cache's own timestamps: seconds into the video
        assert np.allclose([float(x["time"]) for x in mine], cache.timestamps[a:a + L], atol=1e-4)
        assert mine[0]["label"] == f"c{int(sid[1:]) % 3}"
        assert (out / f"importance_{sid}.png").stat().st_size > 1000
    assert (out / "class_importance.png").stat().st_size > 1000
    info = json.loads((out / "explain.json").read_text())
    assert info["status"] == "complete" and info["segments"] == 2 and info["settings"]["method"] == "occlusion"
    assert len(info["class_profile"]["c1"]) == 20 and abs(sum(info["class_profile"]["c1"]) - 1) < 1e-3
    # featseq report shows the explanation: the class figure, each segment's figure and the table
    r = CliRunner().invoke(main, ["report", str(out)])
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text()
    assert "Explanation over time" in page and "attributions.csv" in page
    assert page.count("data:image/png;base64") == 3 and "s005: importance over time" in page


def test_explain_refuses_unknown_ids_and_bad_options(signal_runs):
    r = CliRunner().invoke(main, ["explain", signal_runs["conv1d"], "--ids", "s001,nope", "--gradcam", "0"])
    assert r.exit_code == 2 and "--ids: 1 id(s) not in the cache, e.g. nope" in r.output
    r = CliRunner().invoke(main, ["explain", signal_runs["conv1d"], "--steps", "1"])
    assert r.exit_code == 2 and "--steps must be >= 2" in r.output


def test_a_missing_captum_names_the_extra(signal_runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "captum", None)  # import captum now raises ImportError
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    r = CliRunner().invoke(main, ["explain", signal_runs["conv1d"], "--ids", "s001", "--gradcam", "0"])
    assert r.exit_code == 2 and "pip install 'featseq[explain]'" in r.output


def test_predict_explain_gives_every_frame_of_every_window(small_trained, tmp_path):
    clip = sorted(Path(small_trained["src"]).rglob("*.mp4"))[0]
    out = tmp_path / "p"
    r = CliRunner().invoke(main, ["predict", small_trained["run"], str(clip), "--window", "4", "--stride", "2",
                                  "--explain", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    preds, rows = _rows(out / "predictions.csv"), _rows(out / "attributions.csv")
    assert list(rows[0])[:3] == ["video", "window_start", "window_end"]
    windows = [(x["video"], x["window_start"], x["window_end"]) for x in preds]
    got = list(dict.fromkeys((x["video"], x["window_start"], x["window_end"]) for x in rows))
    assert got == windows  # predictions.csv's windows, in its order
    for w in windows:
        mine = [x for x in rows if (x["video"], x["window_start"], x["window_end"]) == w]
        imp = np.array([float(x["importance"]) for x in mine])
        assert len(mine) == 8 and (imp >= 0).all() and abs(imp.sum() - 1) < 1e-4  # the run's seq_len 8 at 2 fps
        assert all(float(w[1]) - 1e-3 <= float(x["time"]) < float(w[2]) + 1e-3 for x in mine)
        assert {x["predicted"] for x in mine} == {next(p["predicted"] for p in preds if
                                                      (p["video"], p["window_start"], p["window_end"]) == w)}
    assert (out / f"importance_{clip.stem}.png").stat().st_size > 1000
    assert json.loads((out / "predict.json").read_text())["explain"]["attributions"] == str(out / "attributions.csv")


@pytest.mark.slow
def test_gradcam_overlays_for_a_fine_tuned_and_a_frozen_run(tmp_path):
    from featseq.featurize.pipeline import featurize
    from featseq.featurize.synth import render_dataset

    src = render_dataset(tmp_path / "v", clips_per_class_per_group=2, groups=2, width=32, height=32, duration=(3, 4),
                         long_videos=0, seed=3)["clips_root"]
    cache = featurize(featurize_cfg(src, tmp_path / "f.h5", fps=2.0, keep_frames=True, dtype="float32")).path
    plain = featurize(featurize_cfg(src, tmp_path / "plain.h5", fps=2.0, dtype="float32")).path  # frames decoded
    run, ft = str(tmp_path / "run"), str(tmp_path / "ft")
    for args in (["train", cache, "--out", run, "--model", "gru", "--hidden", "16", "--epochs", "2", "--seq-len", "6"],
                 ["finetune", cache, "--from", run, "--out", ft, "--epochs", "1", "--batch-size", "8", "--unfreeze", "1"],
                 ["explain", ft, "--part", "all", "--gradcam", "2", "--max-plots", "2"],
                 ["explain", run, "--cache", plain, "--part", "all", "--gradcam", "3", "--max-plots", "4"]):
        r = CliRunner().invoke(main, args + ["--device", "cpu"] + (["-q", "--no-plots"] if args[0] == "train" else
                                                                   ["-q"] if args[0] == "finetune" else []))
        assert r.exit_code == 0, r.output
    # the fine-tuned run's frames come from the cache's /frames, the frozen run's are decoded at the cached timestamps
    for folder, n, through in ((ft, 2, "fine-tuned CNN"), (run, 4, "frozen backbone")):
        info = json.loads((Path(folder) / "explain" / "explain.json").read_text())
        assert info["gradcam_through"] == through and len(info["files"]["gradcam"]) == n
        assert all(Path(p).stat().st_size > 1000 for p in info["files"]["gradcam"].values())
        rows = _rows(Path(folder) / "explain" / "attributions.csv")
        assert len({x["id"] for x in rows}) == 12
        # explained on what the model read (a fine-tuned run: its own CNN's embeddings of the frames, not the cached
        # features of the original CNN): the probabilities its run folder's predictions.csv holds
        scored = {x["id"]: x for x in _rows(Path(folder) / "predictions.csv")}
        for x in rows:
            assert abs(float(x["p_predicted"]) - float(scored[x["id"]][f"p_{x['predicted']}"])) < 1e-4, folder


def test_gradcam_is_skipped_with_the_reason_where_no_frame_cnn_made_the_features():
    """explain draws Grad-CAM only through a frame CNN featseq has: imported features, clip backbones and multi-crop
    features are explained over time only, with the reason (sequence.explain._no_gradcam), not a failure after the
    attribution."""
    import types

    from featseq.sequence.explain import _no_gradcam

    spec = lambda **kw: types.SimpleNamespace(**{"imported": "", "clip_stride": 0, "crops": 1, "backbone": "r3d_18", **kw})
    assert _no_gradcam(spec()) is None
    assert "imported from npy" in _no_gradcam(spec(imported="npy"))
    assert "3D convolutions" in _no_gradcam(spec(clip_stride=8))
    assert "5 crops" in _no_gradcam(spec(crops=5))
