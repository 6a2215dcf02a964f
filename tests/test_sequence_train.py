"""Training, run-folder outputs, evaluate, sweeps and the CLI, on a learnable synthetic cache."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread
from sklearn.model_selection import GroupShuffleSplit

from featseq.cli import main
from helpers import needs_gingerbread, study_trials, synthetic_cache, write_fake_cache
from featseq.sequence.splits import SplitError, make_folds
from featseq.sequence.grid import SweepConfig, load_grid, parse_list, variants
from featseq.sequence.sweep import sweep
from featseq.sequence.run import Run
from featseq.sequence.train import TrainConfig, evaluate, train

RUN_FILES = ["config.json", "results.json", "history.csv", "CRNN_epoch_training_loss.npy", "CRNN_epoch_training_accuracy.npy",
             "CRNN_epoch_test_loss.npy", "CRNN_epoch_test_accuracy.npy", "curves.png", "confusion.png", "per_class.csv",
             "classification_report.txt", "predictions.csv", "checkpoint.pt"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def conv_run(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "conv"
    cfg = TrainConfig(cache=synth, out=str(out), model="conv1d", fps=2, epochs=15, patience=8, split="random", seed=0)
    return cfg, train(cfg)


def test_training_learns_the_synthetic_task(conv_run):
    cfg, res = conv_run
    hist = list(csv.DictReader(open(Path(cfg.out) / "history.csv")))
    losses = [float(h["train_loss"]) for h in hist]
    assert losses[-1] < 0.5 * losses[0]
    assert res["test_accuracy"] >= 0.85 and res["val_accuracy"] >= 0.85
    assert res["n_test"] == 20 and res["n_train"] + res["n_val"] == 76


def test_no_score_train_leaves_the_training_rows_empty_and_the_rest_as_it_was(conv_run, tmp_path):
    """--no-score-train skips the forward pass over the training part after the last epoch: predictions.csv keeps a
    row per segment, the train rows without probabilities, and every validation and test row as the default run
    wrote it (the best epoch's own logits); the results are the same as before."""
    cfg, res = conv_run
    from dataclasses import replace

    quick = train(replace(cfg, out=str(tmp_path / "q"), score_train=False, plots=False))
    rows = {p["id"]: p for p in csv.DictReader(open(Path(cfg.out) / "predictions.csv"))}
    mine = list(csv.DictReader(open(tmp_path / "q" / "predictions.csv")))
    assert [p["id"] for p in mine] == list(rows)
    for p in mine:
        probs = [v for k, v in p.items() if k.startswith("p_")]
        if p["split"] == "train":
            assert p["predicted"] == p["correct"] == "" and probs == [""] * 3 and rows[p["id"]]["predicted"], p
        else:
            assert p == rows[p["id"]]
    assert (quick["test_accuracy"], quick["val_accuracy"], quick["best_epoch"]) == \
        (res["test_accuracy"], res["val_accuracy"], res["best_epoch"])


def test_every_output_exists_and_parses(conv_run, synth):
    cfg, res = conv_run
    run = Path(cfg.out)
    for f in RUN_FILES:
        assert (run / f).is_file(), f
    r = json.loads((run / "results.json").read_text())
    for k in ("test_accuracy", "val_accuracy", "seq_len", "params", "best_epoch", "timings", "padded", "dropped", "config",
              "per_class_accuracy", "model_config"):
        assert k in r, k
    assert r["config"]["model"] == "conv1d" and r["seq_len"] == 12 and r["fps"] == 2
    hist = list(csv.DictReader(open(run / "history.csv")))
    assert len(hist) == r["epochs_run"] and 1 <= r["best_epoch"] <= len(hist)
    for name, col in (("training_loss", "train_loss"), ("test_accuracy", "test_accuracy")):
        arr = np.load(run / f"CRNN_epoch_{name}.npy")
        assert arr.shape == (len(hist),) and np.allclose(arr, [float(h[col]) for h in hist])
    assert float(hist[r["best_epoch"] - 1]["val_accuracy"]) == pytest.approx(r["val_accuracy"])
    for png in ("curves.png", "confusion.png"):
        assert imread(run / png).ndim == 3
    preds = list(csv.DictReader(open(run / "predictions.csv")))
    assert len(preds) == 96 and {p["split"] for p in preds} == {"train", "val", "test"}
    assert list(preds[0])[:6] == ["id", "group", "split", "label", "predicted", "correct"]
    assert [k for k in preds[0] if k.startswith("p_")] == ["p_ascending", "p_descending", "p_pingpong"]
    test = [p for p in preds if p["split"] == "test"]
    assert np.mean([int(p["correct"]) for p in test]) == pytest.approx(r["test_accuracy"])
    assert all(abs(sum(float(p[k]) for k in p if k.startswith("p_")) - 1) < 1e-4 for p in preds)
    per = list(csv.DictReader(open(run / "per_class.csv")))
    assert [p["class"] for p in per] == r["classes"] and sum(int(p["support"]) for p in per) == 20
    assert "precision" in (run / "classification_report.txt").read_text()
    # the checkpoint rebuilds the model from its config alone; evaluate re-scores it identically
    saved = Run(run)
    assert saved.classes == r["classes"] and saved.reader.seq_len == 12 and saved.input_dim == 512
    ev = evaluate(str(run))
    assert ev["test_accuracy"] == pytest.approx(r["test_accuracy"]) and ev["n_scored"] == 20
    assert Path(ev["out"], "predictions.csv").is_file() and Path(ev["out"], "confusion.png").is_file()


def test_order_aware_models_beat_order_blind_baselines(synth, tmp_path):
    """The synthetic classes differ only in temporal order: mean-pooled / per-frame models sit near chance."""
    cfg = SweepConfig(cache=synth, out=str(tmp_path / "sw"), grid={
        "model": ["mlp", "frame", "lstm", "conv1d"], "fps": [2.0], "split": ["group"], "epochs": [40], "patience": [15],
        "pooling": [None], "seed": [0]})
    res = sweep(cfg)
    acc = {r["model"]: r["test_accuracy"] for r in res["rows"]}
    blind = max(acc["mlp"], acc["frame"])
    assert blind <= 0.55, acc
    assert min(acc["lstm"], acc["conv1d"]) >= blind + 0.25, acc
    assert res["rows"][0]["order_aware"]  # the leaderboard's winner (by validation) is order-aware
    # leaderboard files, resume
    lb = list(csv.DictReader(open(tmp_path / "sw" / "leaderboard.csv")))
    assert [r["variant"] for r in lb] == [r["variant"] for r in res["rows"]] and len(lb) == 4
    vals = [float(r["val_accuracy"]) for r in lb]
    assert vals == sorted(vals, reverse=True)
    assert "order-blind" in (tmp_path / "sw" / "leaderboard.md").read_text()
    assert imread(tmp_path / "sw" / "summary.png").ndim == 3
    again = sweep(cfg)
    assert again["trained"] == 0 and again["skipped"] == 4
    assert [r["test_accuracy"] for r in again["rows"]] == [r["test_accuracy"] for r in res["rows"]]


def test_a_cache_in_another_row_order_trains_the_same_model(tmp_path):
    """Two caches holding the same segments, written in different orders (as two decode workers complete them): a
    run on either has the same history, the same test accuracy and the same prediction for every segment."""
    labels, groups = ["a", "b", "c"] * 16, [f"g{i % 4}" for i in range(48)]
    order = np.random.default_rng(5).permutation(48)
    caches = [write_fake_cache(tmp_path / "in_order.h5", labels, groups, dim=16),
              write_fake_cache(tmp_path / "shuffled.h5", labels, groups, dim=16, order=order)]
    runs = [train(TrainConfig(cache=c, out=str(tmp_path / f"r{k}"), model="gru", hidden=16, epochs=3, seq_len=12,
                              split="random", plots=False, device="cpu")) for k, c in enumerate(caches)]
    assert runs[0]["test_accuracy"] == runs[1]["test_accuracy"]
    hist = [[{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(tmp_path / f"r{k}" / "history.csv"))]
            for k in (0, 1)]
    assert hist[0] == hist[1]
    preds = [{r["id"]: (r["split"], r["predicted"]) for r in csv.DictReader(open(tmp_path / f"r{k}" / "predictions.csv"))}
             for k in (0, 1)]
    assert preds[0] == preds[1] and len(preds[0]) == 48


def test_training_is_deterministic_and_cv(synth, tmp_path):
    # on the CPU: cuDNN's GRU is not deterministic, so on a GPU machine "auto" would not repeat bit for bit
    a = train(TrainConfig(cache=synth, out=str(tmp_path / "a"), model="gru", fps=1, epochs=3, hidden=16, plots=False,
                          device="cpu"))
    b = train(TrainConfig(cache=synth, out=str(tmp_path / "b"), model="gru", fps=1, epochs=3, hidden=16, plots=False,
                          device="cpu"))
    # same seed, same data: every column of history.csv is identical except the wall-clock seconds
    ha, hb = (list(csv.DictReader(open(tmp_path / x / "history.csv"))) for x in ("a", "b"))
    assert len(ha) == len(hb) == 3 and "seconds" in ha[0] and "train_loss" in ha[0]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in ha] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in hb]
    assert a["test_accuracy"] == b["test_accuracy"]
    cv = train(TrainConfig(cache=synth, out=str(tmp_path / "cv"), model="mlp", split="logo", fps=1, epochs=3,
                           class_weights="balanced", label_smoothing=0.1, offset="random"))
    assert cv["folds"] == 4 and cv["test_accuracy_std"] is not None and len(cv["per_fold"]) == 4
    preds = list(csv.DictReader(open(tmp_path / "cv" / "predictions.csv")))
    assert len(preds) == 96 and all(p["split"] == "test" and p["predicted"] for p in preds)  # out-of-fold
    assert len(list((tmp_path / "cv" / "folds").glob("*/checkpoint.pt"))) == 4
    gk = train(TrainConfig(cache=synth, out=str(tmp_path / "gk"), model="mlp", split="group-kfold", folds=2, fps=1,
                           epochs=2, plots=False))
    assert gk["folds"] == 2 and [f["epochs_run"] for f in gk["per_fold"]] == [2, 2]
    assert sum(f["n_test"] for f in gk["per_fold"]) == 96


def test_sweep_grid_file_dedup_and_parallel_jobs(synth, tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text('model = ["mlp", "gru"]\nkernel = [3, 5]  # conv1d only: no extra variants\nepochs = 2\nhidden = 8\nfps = 1.0\n')
    g = load_grid(str(grid))
    assert g["model"] == ["mlp", "gru"] and g["epochs"] == [2] and g["kernel"] == [3, 5]
    cfg = SweepConfig(cache=synth, out=str(tmp_path / "sw"), grid=g, jobs=2)
    assert [n for n, _ in variants(cfg.grid, cfg.cache, cfg.out)] == ["model=mlp", "model=gru"]
    res = sweep(cfg)
    assert res["trained"] == 2 and all(r["status"] == "complete" for r in res["rows"])
    # --jobs 2: two worker processes (not this one) trained a variant each; the study records who ran each trial
    done = [t for t in study_trials(tmp_path / "sw") if t.state.name == "COMPLETE"]
    pids = {t.user_attrs["variant"]: t.user_attrs["pid"] for t in done}
    assert sorted(pids) == ["model=gru", "model=mlp"] and len(set(pids.values())) == 2, pids
    assert os.getpid() not in pids.values()
    assert parse_list("bidirectional", "false,true") == [False, True] and parse_list("seq_len", "none,25") == [None, 25]
    with pytest.raises(ValueError, match="--hidden"):
        parse_list("hidden", "128,big")


def test_cli_train_sweep_evaluate_and_errors(synth, tmp_path):
    r = CliRunner().invoke(main, ["train", synth, "--out", str(tmp_path / "r"), "--model", "mlp", "--fps", "1",
                                  "--epochs", "2", "-q"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == str(tmp_path / "r")
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].endswith("eval_synth32"), r.output
    r = CliRunner().invoke(main, ["sweep", synth, "--out", str(tmp_path / "s"), "--model", "mlp,frame", "--epochs", "2",
                                  "--fps", "1", "-q"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == str(tmp_path / "s") and "| rank |" in r.output

    def fails(args, *needles):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, res.output
        for n in needles:
            assert n in res.output, res.output

    fails(["train", synth, "--out", str(tmp_path / "x"), "--fps", "12"], "--fps 12", "6 fps", "featseq featurize")
    fails(["sweep", synth, "--out", str(tmp_path / "y"), "--fps", "1,12"], "6 fps")
    fails(["train", synth, "--out", str(tmp_path / "x"), "--model", "lsmt"], "unknown model", "conv1d")
    fails(["train", synth, "--out", str(tmp_path / "x"), "--layers", "0"], "--layers")
    empty = write_fake_cache(tmp_path / "empty.h5", [])
    fails(["train", empty, "--out", str(tmp_path / "x")], "no segments")
    # a class whose only segments all land in the test part: class c lives in group g3 only (a and b in g1 and
    # g2); pick (with sklearn's GroupShuffleSplit, which --split group is) a seed that puts g3 in the test part
    labels, groups = ["a", "b"] * 6 + ["c"] * 2, ["g1"] * 6 + ["g2"] * 6 + ["g3"] * 2
    lonely = write_fake_cache(tmp_path / "lonely.h5", labels, groups=groups)
    g = np.array(groups)
    test_groups = {s: set(g[next(GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=s).split(g, groups=g))[1]])
                   for s in range(10)}
    bad = next(s for s, t in test_groups.items() if t == {"g3"})
    good = next(s for s, t in test_groups.items() if "g3" not in t)
    with pytest.raises(SplitError, match="class.es. c have no sample"):
        make_folds("group", labels, groups, seed=bad, val_size=0)
    assert "g3" not in set(g[make_folds("group", labels, groups, seed=good, val_size=0)[0].test])
    fails(["train", lonely, "--out", str(tmp_path / "x"), "--split", "group", "--val-size", "0", "--seed", str(bad)],
          "class(es) c have no sample in the training part")
    other = write_fake_cache(tmp_path / "dim8.h5", ["ascending", "pingpong"])
    fails(["evaluate", str(tmp_path / "r"), "--cache", other], "feature dimension 8")


@needs_gingerbread
@pytest.mark.slow
def test_gingerbread_seed_compat(gingerbread_cache, tmp_path):
    """The original study's split on the real clips (their 1 fps cache, shared with test_gingerbread): 37 test clips;
    every output written."""
    res = train(TrainConfig(cache=gingerbread_cache["cache"], out=str(tmp_path / "R"), split="seed-compat", fps=1, seq_len=25, model="lstm",
                            epochs=3))
    assert res["n_test"] == 37 and res["seq_len"] == 25 and len(res["classes"]) == 3
    for f in RUN_FILES:
        assert (tmp_path / "R" / f).is_file(), f
    assert sum(1 for _ in open(tmp_path / "R" / "predictions.csv")) == 185


def _grouped_fake(path, n_groups=4, per=6):
    """A fake cache of 3 classes whose groups (participants) hold several segments each."""
    n = n_groups * per
    return write_fake_cache(path, [("a", "b", "c")[i % 3] for i in range(n)], [f"P{i // per:02d}" for i in range(n)],
                            dim=8)


def _cli_train(cache, out, *more):
    return CliRunner().invoke(main, ["train", cache, "--out", str(out), "--model", "mlp", "--hidden", "8", "--epochs", "1",
                                     "--seq-len", "6", "--device", "cpu", "--no-plots", *more])


def test_a_finished_run_is_not_replaced_without_overwrite(tmp_path):
    cache = _grouped_fake(tmp_path / "c.h5")
    run = tmp_path / "R"
    r = CliRunner().invoke(main, ["train", cache, "--out", str(run), "--model", "lstm", "--hidden", "8", "--epochs", "1",
                                  "--seq-len", "6", "--device", "cpu", "--no-plots", "-q"])
    assert r.exit_code == 0, r.output
    r = _cli_train(cache, run)
    assert r.exit_code == 2 and "already holds a finished run (lstm" in r.output and "--overwrite" in r.output, r.output
    assert json.loads((run / "results.json").read_text())["model"] == "lstm"  # untouched
    r = _cli_train(cache, run, "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((run / "results.json").read_text())["model"] == "mlp"
    # a cross-validation replaced by a single split: none of its folds/ stays behind
    cv = tmp_path / "CV"
    assert _cli_train(cache, cv, "--split", "group-kfold", "--folds", "2").exit_code == 0
    assert (cv / "folds").is_dir()
    r = _cli_train(cache, cv, "--split", "group", "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (cv / "folds").exists() and (cv / "checkpoint.pt").is_file()
    # an interrupted run (no results.json) is started afresh, its old files gone
    (cv / "results.json").unlink()
    (cv / "folds" / "fold_00").mkdir(parents=True)
    assert _cli_train(cache, cv).exit_code == 0 and not (cv / "folds").exists()
    # a folder featseq did not write is refused, even with --overwrite, even when some of its files have a run's names
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    for name in ("thesis.tex", "config.json", "results.json", "history.csv"):
        (mine / name).write_text('{"theme": "dark"}')
        for more in ((), ("--overwrite",)):
            r = _cli_train(cache, mine, *more)
            assert r.exit_code == 2 and "not a featseq run" in r.output and (mine / "thesis.tex").is_file(), r.output


def test_finetune_refuses_a_finished_run_and_resumes_an_interrupted_one(tmp_path):
    from featseq.sequence.run import RunError, check_run_folder, prepare_run_folder

    cache = _grouped_fake(tmp_path / "c.h5")
    run = tmp_path / "R"
    assert _cli_train(cache, run).exit_code == 0
    # refused before anything is loaded (the fake cache could not even be fine-tuned)
    r = CliRunner().invoke(main, ["finetune", cache, "--from", str(run), "--out", str(run), "--device", "cpu"])
    assert r.exit_code == 2 and "already holds a finished run" in r.output and "--overwrite" in r.output, r.output
    ft = tmp_path / "FT"  # interrupted: config.json and last.pt, no results.json
    ft.mkdir()
    (ft / "config.json").write_text(json.dumps({"cache": cache, "out": str(ft), "model": "mlp", "split": "group"}))
    (ft / "last.pt").write_bytes(b"state")
    with pytest.raises(RunError, match="--resume to continue"):
        check_run_folder(ft, overwrite=False)
    assert check_run_folder(ft, overwrite=False, resume=True) == "incomplete"
    prepare_run_folder(ft, overwrite=False, resume=True)
    assert (ft / "last.pt").read_bytes() == b"state"  # kept for --resume
    prepare_run_folder(ft, overwrite=True)
    assert not any(ft.iterdir())


def test_the_default_split_holds_groups_out_and_says_so(tmp_path):
    grouped = _grouped_fake(tmp_path / "g.h5")
    r = _cli_train(grouped, tmp_path / "g")
    assert r.exit_code == 0 and "--split group (the default for this cache: its 4 groups hold 24 segments" in r.output, \
        r.output
    res = json.loads((tmp_path / "g" / "results.json").read_text())
    assert res["config"]["split"] == "group"
    rows = list(csv.DictReader(open(tmp_path / "g" / "predictions.csv")))
    parts = {p: {r["group"] for r in rows if r["split"] == p} for p in ("train", "val", "test")}
    assert parts["test"] and not parts["test"] & (parts["train"] | parts["val"])
    # every segment its own group: nothing to hold out by group
    n = 24
    single = write_fake_cache(tmp_path / "s.h5", [("a", "b", "c")[i % 3] for i in range(n)], [f"v{i}" for i in range(n)])
    r = _cli_train(single, tmp_path / "s")
    assert r.exit_code == 0 and "--split random (the default for this cache: every segment is its own group" in r.output
    assert json.loads((tmp_path / "s" / "results.json").read_text())["config"]["split"] == "random"
    # asked for explicitly on a grouped cache: a warning that groups leak
    r = _cli_train(grouped, tmp_path / "r", "--split", "random")
    assert r.exit_code == 0 and "warning: --split random" in r.output and "leak across train and test" in r.output
    # sweep and CacheDataset choose the same default
    from featseq.sequence.dataset import CacheDataset

    res = sweep(SweepConfig(cache=grouped, out=str(tmp_path / "sw"), grid={"model": ["mlp"], "hidden": [8], "epochs": [1],
                                                                          "seq_len": [6], "device": ["cpu"], "plots": [False]}))
    assert json.loads((tmp_path / "sw" / res["rows"][0]["variant"] / "results.json").read_text())["config"]["split"] == "group"
    assert CacheDataset(grouped, part="test", seq_len=6).split == "group, test"
    assert "--split" in CliRunner().invoke(main, ["train", "--help"]).output and "auto (the default)" in \
        CliRunner().invoke(main, ["train", "--help"]).output


def test_evaluate_on_another_cache_says_what_it_skipped_and_scores_it_on_request(tmp_path):
    cache = _grouped_fake(tmp_path / "c.h5")
    assert _cli_train(cache, tmp_path / "R").exit_code == 0
    ck = Run(tmp_path / "R").split_ids
    seen = ck["train"] + ck["val"]
    labels = {r["id"]: r["label"] for r in csv.DictReader(open(tmp_path / "R" / "predictions.csv"))}
    # another cache (other features) whose ids are exactly the run's training and validation ids
    other = write_fake_cache(tmp_path / "o.h5", [labels[i] for i in seen], ids=seen, seed=7)
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "R"), "--cache", other, "--out", str(tmp_path / "e")])
    assert r.exit_code == 1, r.output
    assert "no segment scored" in r.output and f"skipped {len(seen)} segment(s)" in r.output, r.output
    assert f"({len(ck['train'])}, train)" in r.output and f"({len(ck['val'])}, val)" in r.output
    assert "--score-all" in r.output and "nan" not in r.output
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert res["n_scored"] == 0 and res["n_skipped"] == {"train": len(ck["train"]), "val": len(ck["val"])}
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "R"), "--cache", other, "--out", str(tmp_path / "e2"),
                                  "--score-all"])
    assert r.exit_code == 0 and f"on {len(seen)} scored segments" in r.output and "skipped" not in r.output, r.output
    res = json.loads((tmp_path / "e2" / "results.json").read_text())
    assert res["n_scored"] == len(seen) and res["test_accuracy"] is not None and res["score_all"]
    help_ = CliRunner().invoke(main, ["evaluate", "--help"]).output
    assert "--score-all" in help_ and "validated on" in help_
