"""--track tensorboard,mlflow on train, sweep, compare and finetune: what the trackers received, read back with
TensorBoard's event reader and MLflow's client (a SQLite store in tmp_path)."""
import csv
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from featseq.cli import main
from helpers import write_fake_cache

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed: pip install 'featseq[tensorboard]'")
pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install 'featseq[mlflow]'")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy")
TRAIN = ["--model", "gru", "--hidden", "8", "--seq-len", "6", "--split", "random", "--device", "cpu", "--patience", "9"]


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return write_fake_cache(tmp_path_factory.mktemp("trk") / "f.h5", ["a", "b", "c"] * 8, dim=8, seed=1)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """An MLflow client on one SQLite store for the module (making a store's schema costs seconds): the tests tell
    their runs apart by their run folders, each in the test's own tmp_path."""
    d = tmp_path_factory.mktemp("mlflow")
    client = MlflowClient(f"sqlite:///{d / 'ml.db'}")
    client.search_experiments()  # the schema, made once
    client.folder = d
    return client


@pytest.fixture
def store(shared_store, monkeypatch):
    """The module's MLflow client, which the commands use through MLFLOW_TRACKING_URI."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_store.tracking_uri)
    return shared_store


def _invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def _runs(client, **tags):
    exp = client.get_experiment_by_name("featseq")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if all(r.data.tags.get(k) == str(v) for k, v in tags.items())]


def _one(client, run_dir):
    (r,) = _runs(client, **{"featseq.run_dir": str(Path(run_dir).resolve())})
    return r


def _history(run_dir):
    with open(Path(run_dir) / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _events(run_dir):
    ea = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    return ea


def test_train_sends_every_epoch_its_options_results_and_plots_to_both_trackers(fake, tmp_path, store):
    out = tmp_path / "r"
    _invoke("train", fake, "--out", out, *TRAIN, "--epochs", "3", "--track", "tensorboard,mlflow")
    hist, res = _history(out), json.loads((out / "results.json").read_text())
    assert len(hist) == 3 and res["status"] == "complete"

    ea = _events(out)
    for k in EPOCH_KEYS:  # one point per epoch, at step = the epoch, the values of history.csv
        pts = ea.Scalars(k)
        assert [p.step for p in pts] == [1, 2, 3]
        assert [p.value for p in pts] == pytest.approx([float(h[k]) for h in hist], rel=1e-5)
    assert ea.Scalars("final/test_accuracy")[0].value == pytest.approx(res["test_accuracy"])
    assert {"curves", "confusion"} <= set(ea.Tags()["images"])
    assert "options/text_summary" in ea.Tags()["tensors"]

    run = _one(store, out)
    assert run.info.status == "FINISHED" and run.data.tags["featseq.state"] == "complete"
    assert run.data.params["model"] == "gru" and run.data.params["hidden"] == "8" and run.data.params["epochs"] == "3"
    assert run.data.params["lr"] == str(res["config"]["lr"])
    for k in EPOCH_KEYS:
        got = store.get_metric_history(run.info.run_id, k)
        assert sorted(m.step for m in got) == [1, 2, 3]
        assert [m.value for m in sorted(got, key=lambda m: m.step)] == pytest.approx([float(h[k]) for h in hist])
    assert run.data.metrics["final/test_accuracy"] == pytest.approx(res["test_accuracy"])
    assert run.data.metrics["final/best_epoch"] == res["best_epoch"]
    arts = {a.path for a in store.list_artifacts(run.info.run_id)}
    assert {"curves.png", "confusion.png", "results.json", "history.csv"} <= arts
    assert run.info.artifact_uri.startswith(store.folder.as_uri())  # beside the database, not in the working folder
    assert json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"] == run.info.run_id


def test_cross_validation_goes_by_default_to_the_mlruns_store_beside_out_with_each_folds_epochs(fake, tmp_path,
                                                                                                  monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out = tmp_path / "runs" / "cv"
    _invoke("train", fake, "--out", out, *TRAIN[:-4], "--split", "kfold", "--folds", "2", "--epochs", "2",
            "--device", "cpu", "--track", "mlflow")
    db = tmp_path / "runs" / "mlruns" / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(f"sqlite:///{db}")
    run = _one(client, out)
    for fold in ("fold_00", "fold_01"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, f"{fold}/val_loss")) == [1, 2]
    res = json.loads((out / "results.json").read_text())
    assert run.data.metrics["final/test_accuracy"] == pytest.approx(res["test_accuracy"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "folds/fold_00")}
    assert "folds/fold_00/curves.png" in arts
    assert run.info.artifact_uri.startswith((tmp_path / "runs" / "mlruns" / "artifacts").as_uri())
    assert not (out / "tensorboard").exists()  # only what was asked for


def test_track_none_and_bad_values(fake, tmp_path):
    from featseq.sequence.tracking import parse_track

    assert parse_track("none") == () and parse_track("") == ()
    assert parse_track("MLflow, tensorboard,mlflow") == ("mlflow", "tensorboard")
    out = tmp_path / "n"
    _invoke("train", fake, "--out", out, *TRAIN, "--epochs", "1", "--track", "none")
    assert not (out / "tensorboard").exists() and not (out / "tracking.json").exists()
    assert not (tmp_path / "mlruns").exists()
    r = CliRunner().invoke(main, ["train", fake, "--out", str(tmp_path / "w"), "--track", "wandb"])
    assert r.exit_code == 2 and "--track wandb: unknown tracker 'wandb'" in r.output
    assert not (tmp_path / "w").exists()
    from featseq.sequence.grid import parse_list

    with pytest.raises(ValueError, match="--track: not a sweepable option"):  # one value for a whole sweep
        parse_list("track", "none,mlflow")


def test_a_missing_extra_is_refused_before_training_naming_it(fake, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    r = CliRunner().invoke(main, ["train", fake, "--out", str(tmp_path / "m"), *TRAIN, "--track", "tensorboard,mlflow"])
    assert r.exit_code == 2, r.output
    assert "--track mlflow: mlflow is not installed" in r.output and "pip install 'featseq[mlflow]'" in r.output
    assert not (tmp_path / "m").exists()


def test_a_tracker_failing_mid_run_is_dropped_and_the_run_completes(fake, tmp_path, store, monkeypatch):
    from featseq.sequence import tracking

    calls = []

    def broken(self, metrics, step=None):
        calls.append(step)
        raise ConnectionError("tracking server went away")
    monkeypatch.setattr(tracking.MLflowTracker, "log_metrics", broken)
    out = tmp_path / "f"
    r = _invoke("train", fake, "--out", out, *TRAIN, "--epochs", "3", "--track", "mlflow,tensorboard")
    assert calls == [1]  # dropped after its first failure
    assert "--track mlflow: log_metrics failed" in r.output and "ConnectionError" in r.output
    assert json.loads((out / "results.json").read_text())["status"] == "complete"
    assert [p.step for p in _events(out).Scalars("val_loss")] == [1, 2, 3]  # the other tracker went on


def test_sweep_trials_are_nested_runs_with_their_optuna_parameters_and_pruned_state(fake, tmp_path, store,
                                                                                    monkeypatch):
    import optuna

    from featseq.sequence import study

    class OddTrialsAtEpoch2(optuna.pruners.BasePruner):  # deterministic: prunes trials 1 and 3 after epoch 2
        def prune(self, study, trial):
            return trial.number % 2 == 1 and trial.last_step is not None and trial.last_step >= 2

    monkeypatch.setattr(study, "_pruner", lambda cfg: OddTrialsAtEpoch2())
    out = tmp_path / "s"
    _invoke("sweep", fake, "--out", out, "--search", "random", "--trials", "4", "--prune", "median", "--model", "gru",
            "--hidden", "4..16:int", "--seq-len", "6", "--split", "random", "--epochs", "3", "--patience", "9",
            "--device", "cpu", "--plots", "false", "--track", "mlflow,tensorboard", "-q")
    (parent,) = _runs(store, **{"featseq.run_dir": str(out.resolve())})
    assert parent.info.status == "FINISHED" and parent.data.metrics["final/pruned"] == 2
    assert "leaderboard.csv" in {a.path for a in store.list_artifacts(parent.info.run_id)}
    trials = _runs(store, **{"mlflow.parentRunId": parent.info.run_id})
    assert len(trials) == 4
    rows = {r["variant"]: r for r in csv.DictReader(open(out / "leaderboard.csv", newline=""))}
    for t in trials:
        n = int(t.data.tags["optuna.trial"])
        name = f"trial-{n:04d}"
        assert t.info.run_name == name and t.data.params["optuna.hidden"] == rows[name]["hidden"]
        assert t.data.params["hidden"] == rows[name]["hidden"]  # the run's own options too
        steps = sorted(m.step for m in store.get_metric_history(t.info.run_id, "val_accuracy"))
        if n % 2:
            assert rows[name]["status"] == "pruned"
            assert t.data.tags["featseq.state"] == "pruned" and t.info.status == "KILLED" and steps == [1, 2]
        else:
            assert t.data.tags["featseq.state"] == "complete" and t.info.status == "FINISHED" and steps == [1, 2, 3]
            assert "final/val_accuracy" in t.data.metrics
        assert [p.step for p in _events(out / name).Scalars("val_accuracy")] == steps


def test_compare_runs_are_nested_under_the_comparison(tmp_path, store):
    labels = ["a", "b"] * 6
    a = write_fake_cache(tmp_path / "a.h5", labels, dim=8, seed=1)
    b = write_fake_cache(tmp_path / "b.h5", labels, dim=8, seed=2)
    out = tmp_path / "c"
    _invoke("compare", a, b, "--out", out, "--model", "mlp", "--seeds", "1", "--epochs", "2", "--seq-len", "6",
            "--split", "random", "--device", "cpu", "--track", "mlflow", "-q")
    (parent,) = _runs(store, **{"featseq.run_dir": str(out.resolve())})
    res = json.loads((out / "compare.json").read_text())
    assert parent.data.metrics["final/linear_cka"] == pytest.approx(res["similarity"]["linear_cka"])
    assert parent.data.metrics["final/mlp.test_A"] == pytest.approx(res["variants"][0]["test_A"])
    assert parent.data.metrics["final/mlp.cross_A_to_B"] == pytest.approx(res["variants"][0]["cross_A->B"])
    assert {"compare.json", "summary.md", "compare.png"} <= {a.path for a in store.list_artifacts(parent.info.run_id)}
    kids = _runs(store, **{"mlflow.parentRunId": parent.info.run_id})
    assert sorted(k.data.tags["compare.side"] for k in kids) == ["A", "B"]
    for k in kids:
        assert sorted(m.step for m in store.get_metric_history(k.info.run_id, "train_loss")) == [1, 2]


@pytest.mark.slow
def test_sweep_workers_log_their_trials_from_their_own_processes(fake, tmp_path, store):
    out = tmp_path / "j"
    _invoke("sweep", fake, "--out", out, "--model", "gru,mlp", "--hidden", "8", "--seq-len", "6", "--split", "random",
            "--epochs", "2", "--device", "cpu", "--plots", "false", "--jobs", "2", "--track", "mlflow", "-q")
    (parent,) = _runs(store, **{"featseq.run_dir": str(out.resolve())})
    trials = _runs(store, **{"mlflow.parentRunId": parent.info.run_id})
    assert sorted(t.info.run_name for t in trials) == ["model=gru", "model=mlp"]
    for t in trials:
        assert t.info.status == "FINISHED" and t.data.params["optuna.variant"] == t.info.run_name
        assert sorted(m.step for m in store.get_metric_history(t.info.run_id, "val_loss")) == [1, 2]


@pytest.mark.slow
def test_finetune_is_tracked_and_resume_goes_on_in_the_same_mlflow_run(tmp_path, store):
    from featseq.featurize.pipeline import featurize
    from featseq.featurize.synth import render_dataset
    from helpers import featurize_cfg

    src = render_dataset(tmp_path / "v", clips_per_class_per_group=2, groups=2, width=32, height=32, duration=(3, 4),
                         long_videos=0, seed=0)["clips_root"]
    cache = featurize(featurize_cfg(src, tmp_path / "c.h5", fps=2.0, keep_frames=True)).path
    out = tmp_path / "ft"
    args = ["finetune", cache, "--out", out, "--model", "gru", "--hidden", "8", "--seq-len", "4", "--split", "random",
            "--batch-size", "4", "--device", "cpu", "--track", "tensorboard,mlflow", "-q"]
    _invoke(*args, "--epochs", "2")
    first = _one(store, out)
    assert first.info.status == "FINISHED" and first.data.params["unfreeze"] == "0"
    _invoke(*args, "--epochs", "3", "--resume")  # a finished finetune with --resume and more epochs goes on
    run = _one(store, out)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert sorted(m.step for m in store.get_metric_history(run.info.run_id, "train_loss")) == [1, 2, 3]
    res = json.loads((out / "results.json").read_text())
    assert res["epochs_run"] == 3 and run.data.metrics["final/epochs_run"] == 3
    assert "curves.png" in {a.path for a in store.list_artifacts(run.info.run_id)}
    assert [p.step for p in _events(out).Scalars("train_loss")] == [1, 2, 3]
