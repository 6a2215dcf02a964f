"""featseq predict: sliding windows over a long synthetic video whose class changes halfway."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (torch before decord)
from click.testing import CliRunner

from featseq.cli import main


@pytest.fixture(scope="module")
def pr_data(small_trained, tmp_path_factory):
    from featseq.featurize.synth import render_long_video

    d = tmp_path_factory.mktemp("predict")
    src, cache, run, res = (small_trained[k] for k in ("src", "cache", "run", "res"))
    long = d / "long.mp4"
    render_long_video(long, parts=[("ascending", 20.0), ("descending", 20.0)], width=32, height=32, video_fps=30, seed=5)
    return {"d": d, "src": src, "cache": cache, "run": str(run), "res": res, "long": str(long)}


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_windows_follow_the_class_change(pr_data):
    out = pr_data["d"] / "pred"
    keep = pr_data["d"] / "kept.h5"
    r = CliRunner().invoke(main, ["predict", pr_data["run"], pr_data["long"], "--window", "4", "--stride", "2",
                                  "--out", str(out), "--cache", str(keep)])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == str(out)
    assert "windows/s" in r.output and "frames/s" in r.output
    rows = _rows(out / "predictions.csv")
    assert list(rows[0])[:3] == ["video", "window_start", "window_end"]
    assert {"p_ascending", "p_descending", "p_pingpong", "predicted", "above_threshold"} <= set(rows[0])
    starts = np.array([float(x["window_start"]) for x in rows])
    assert starts[0] == 0 and np.allclose(np.diff(starts), 2.0) and float(rows[-1]["window_end"]) <= 40.01
    first = [x["predicted"] for x in rows if float(x["window_end"]) <= 20.0]
    second = [x["predicted"] for x in rows if float(x["window_start"]) >= 20.0]
    assert len(first) >= 8 and len(second) >= 8
    assert np.mean([p == "ascending" for p in first]) >= 0.7, first
    assert np.mean([p == "descending" for p in second]) >= 0.7, second
    for x in rows:
        p = [float(x[f"p_{c}"]) for c in ("ascending", "descending", "pingpong")]
        assert abs(sum(p) - 1) < 1e-4
        assert x["above_threshold"] == str(int(max(p) >= 0.5))
    assert (out / "timeline_long.png").stat().st_size > 1000
    assert keep.is_file()
    # rerun with the kept cache: nothing featurized again, the same predictions
    r2 = CliRunner().invoke(main, ["predict", pr_data["run"], pr_data["long"], "--window", "4", "--stride", "2",
                                   "--out", str(out), "--cache", str(keep)])
    assert r2.exit_code == 0, r2.output
    assert "already cached" in r2.output
    assert [x["predicted"] for x in _rows(out / "predictions.csv")] == [x["predicted"] for x in rows]


def test_whole_clips_and_python_api(pr_data):
    from featseq.sequence.predict import PredictConfig, predict

    clips = sorted(Path(pr_data["src"]).rglob("*.mp4"))[:3]
    res = predict(PredictConfig(run=pr_data["run"], videos=[str(c) for c in clips], out=str(pr_data["d"] / "whole"),
                                device="cpu"))
    rows = _rows(pr_data["d"] / "whole" / "predictions.csv")
    assert len(rows) == 3 == res["windows"]
    assert all(float(x["window_start"]) == 0 for x in rows)
    assert res["frames_per_s"] > 0 and res["windows_per_s"] > 0
    assert len(res["plots"]) == 3


def test_finetune_run(pr_data):
    from featseq.featurize.backbones import create_backbone
    from featseq.featurize.cache import read_cache
    from featseq.sequence.finetune import FinetuneConfig, finetune

    ft = pr_data["d"] / "ft"
    finetune(FinetuneConfig(cache=pr_data["cache"], out=str(ft), from_run=pr_data["run"], epochs=1, plots=False,
                            device="cpu", unfreeze="0"))
    out = pr_data["d"] / "ftpred"
    r = CliRunner().invoke(main, ["predict", str(ft), pr_data["long"], "--window", "4", "--stride", "4", "--out", str(out),
                                  "--cache", str(pr_data["d"] / "ft_feats.h5")])
    assert r.exit_code == 0, r.output
    rows = _rows(out / "predictions.csv")
    assert len(rows) == 10
    assert {x["predicted"] for x in rows} <= {"ascending", "descending", "pingpong"}
    # the trunk is read from the run's checkpoint: no copy of it (13.7 MB for a ResNet-18) in the predict folder
    assert not list(out.glob("*.pt")) and json.loads((out / "predict.json").read_text())["featurize"]["finetuned"]
    # a frozen trunk (--unfreeze 0): the fine-tuned trunk equals the run's backbone (resnet18, random init seed 0,
    # the cache's), tensor by tensor, BatchNorm statistics included ...
    from featseq.sequence.run import Run

    trunk = Run(ft).trunk_state
    orig = create_backbone("resnet18", "none", 0).trunk.state_dict()
    assert sorted(trunk) == sorted(orig)
    for k, v in orig.items():
        assert torch.equal(trunk[k], v), k
    # ... so predict featurizes the video exactly as it does for the train run: the same features
    r = CliRunner().invoke(main, ["predict", pr_data["run"], pr_data["long"], "--window", "4", "--stride", "4",
                                  "--out", str(pr_data["d"] / "trpred"), "--cache", str(pr_data["d"] / "tr_feats.h5")])
    assert r.exit_code == 0, r.output
    a, b = read_cache(pr_data["d"] / "ft_feats.h5"), read_cache(pr_data["d"] / "tr_feats.h5")
    assert a.features.shape == b.features.shape and len(a.features) == 80  # 40 s at 2 fps
    assert np.array_equal(a.timestamps, b.timestamps) and np.array_equal(a.features, b.features)


def test_refuses_folder_without_checkpoint(pr_data, tmp_path):
    r = CliRunner().invoke(main, ["predict", str(tmp_path), pr_data["long"]])
    assert r.exit_code == 2
    assert "checkpoint.pt" in r.output


def test_refuses_inconsistent_run(pr_data, tmp_path):
    """Nothing is guessed: a checkpoint without its featurize spec whose cache is gone, or whose spec disagrees with
    its model, is refused with what to do."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pr_data["run"], run)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    old = {k: v for k, v in ck.items() if k != "features"}  # as an older featseq wrote it
    old["cache"] = {**ck["cache"], "path": str(tmp_path / "gone.h5")}
    torch.save(old, run / "checkpoint.pt")
    r = CliRunner().invoke(main, ["predict", str(run), pr_data["long"]])
    assert r.exit_code == 2
    assert "older featseq" in r.output and "gone.h5" in r.output and "retrain" in r.output
    ck["features"]["feature_dim"] = 999
    torch.save(ck, run / "checkpoint.pt")
    r = CliRunner().invoke(main, ["predict", str(run), pr_data["long"]])
    assert r.exit_code == 2
    assert "999-dim" in r.output and "inconsistent" in r.output


def test_a_cross_validation_predicts_and_finetunes_from_its_best_fold(pr_data):
    """A cross-validated run (a cross-validated sweep variant) is used as it is: its best fold by validation
    accuracy, never by test accuracy."""
    from featseq.sequence.finetune import FinetuneConfig, finetune
    from featseq.sequence.run import resolve_run_folder
    from featseq.sequence.train import TrainConfig, train

    cv = pr_data["d"] / "cv"
    res = train(TrainConfig(cache=pr_data["cache"], out=str(cv), model="conv1d", fps=2, seq_len=8, split="group-kfold",
                            folds=2, epochs=4, plots=False, device="cpu"))
    best = max(res["per_fold"], key=lambda f: (f["val_accuracy"], -f["val_loss"]))
    assert resolve_run_folder(cv) == cv / "folds" / best["fold"]
    out = pr_data["d"] / "cvpred"
    r = CliRunner().invoke(main, ["predict", str(cv), pr_data["long"], "--window", "4", "--stride", "4", "--out",
                                  str(out), "--device", "cpu", "--no-plots"])
    assert r.exit_code == 0, r.output
    assert f"using its best fold {best['fold']}" in r.output and len(_rows(out / "predictions.csv")) == 10
    ft = finetune(FinetuneConfig(cache=pr_data["cache"], out=str(pr_data["d"] / "cvft"), from_run=str(cv), epochs=1,
                                 plots=False, device="cpu", unfreeze="0"))
    assert ft["warm_start"] == str(cv / "folds" / best["fold"]) and ft["n_test"] == best["n_test"]


def test_realtime_without_stream_is_refused(pr_data):
    clip = sorted(Path(pr_data["src"]).rglob("*.mp4"))[0]
    r = CliRunner().invoke(main, ["predict", pr_data["run"], str(clip), "--realtime"])
    assert r.exit_code == 2 and "--realtime" in r.output and "--stream FILE" in r.output, r.output


def test_the_cross_validation_policy_is_in_the_help():
    for cmd in (["predict", "--help"], ["finetune", "--help"]):
        out = " ".join(CliRunner().invoke(main, cmd).output.split())
        assert "cross-validat" in out and "best fold" in out and "validation accuracy" in out, cmd
