"""Sweeps on an Optuna study: workers sharing one study, a killed worker, random/TPE search with ranges, pruning."""
import csv
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from featseq.cli import main
from helpers import CHILD_ENV, ROOT, study_trials, synthetic_cache, write_fake_cache

ENV = CHILD_ENV
GRID12 = ["--model", "mlp,frame,gru", "--hidden", "8,16", "--lr", "0.001,0.01", "--split", "random", "--seq-len", "6",
          "--device", "cpu", "--plots", "false"]
GRID4 = ["--model", "mlp,gru", "--hidden", "8,16", "--split", "random", "--seq-len", "6", "--device", "cpu", "--plots",
         "false"]  # 4 variants: enough for a finished, a killed and not yet started ones


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return write_fake_cache(tmp_path_factory.mktemp("sw") / "f.h5", ["a", "b", "c"] * 12, dim=8, seed=1)


def _sweep_cmd(cache, out, *extra):
    return [sys.executable, "-c", "from featseq.cli import main; main()", "sweep", cache, "--out", str(out), *extra]


def _rows(out):
    with open(out / "leaderboard.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_two_processes_share_one_study_and_train_each_grid_point_once(fake, tmp_path):
    out = tmp_path / "s"
    cmd = _sweep_cmd(fake, out, *GRID12, "--epochs", "4", "--patience", "4")
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    trials = [t for t in study_trials(out) if not t.user_attrs.get("empty")]
    done = [t.user_attrs["variant"] for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 12 and len(set(done)) == 12  # every grid point exactly once ...
    assert len(trials) == 12  # ... and nothing else trained
    trained = [int(o[1].split("this run trained ")[1].split(",")[0]) for o in outs]
    assert sum(trained) == 12 and min(trained) >= 1, trained  # both processes worked
    rows = _rows(out)
    assert len(rows) == 12 and {r["status"] for r in rows} == {"complete"}
    assert all((out / r["variant"] / "results.json").is_file() for r in rows)


def test_a_killed_worker_leaves_a_failed_trial_and_the_rerun_completes(fake, tmp_path):
    out = tmp_path / "k"
    cmd = _sweep_cmd(fake, out, *GRID4, "--epochs", "400", "--patience", "400", "-q")
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    running = []
    while time.monotonic() < deadline and p.poll() is None:
        try:
            trials = study_trials(out)
        except Exception:  # the study is not created yet
            trials = []
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        running = [t for t in trials if t.state.name == "RUNNING" and "pid" in t.user_attrs]
        if complete and running:
            break
        time.sleep(0.2)
    assert p.poll() is None and running, "the worker finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    victim = running[0].user_attrs["variant"]
    r = subprocess.run(cmd[:-1], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)  # not quiet
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is gone; marked failed" in r.stderr
    trials = [t for t in study_trials(out) if not t.user_attrs.get("empty")]
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert [t.user_attrs["variant"] for t in failed] == [victim] and "died" in failed[0].user_attrs["error"]
    done = [t.user_attrs["variant"] for t in trials if t.state.name == "COMPLETE"]
    assert sorted(done) == sorted(set(done)) and len(done) == 4  # the victim was retried, the others not rerun
    assert {x["status"] for x in _rows(out)} == {"complete"} and len(_rows(out)) == 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic_cache(tmp_path_factory)


def test_tpe_search_over_ranges_with_median_pruning(synth, tmp_path):
    out = tmp_path / "tpe"
    r = CliRunner().invoke(main, ["sweep", synth, "--out", str(out), "--search", "tpe", "--trials", "20", "--prune",
                                  "median", "--model", "mlp,conv1d", "--lr", "1e-6..3e-2:log", "--hidden", "8..64:log:int",
                                  "--fps", "2", "--split", "group", "--epochs", "12", "--patience", "12", "--plots", "false",
                                  "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    rows = _rows(out)
    assert len(rows) == 20 and len({x["variant"] for x in rows}) == 20
    assert {x["status"] for x in rows} <= {"complete", "pruned"}
    for x in rows:
        assert 8 <= int(x["hidden"]) <= 64 and x["model"] in ("mlp", "conv1d")
        assert 1e-6 <= float(x["lr"]) <= 3e-2
    pruned = [x for x in rows if x["status"] == "pruned"]
    assert pruned, "median pruning stopped no trial, although tiny learning rates cannot learn in 12 epochs"
    assert all(1 <= int(x["epochs"]) < 12 for x in pruned)  # marked with the epochs they ran
    assert all(int(x["epochs"]) >= 1 for x in rows if x["status"] == "complete")
    # the study resumes: asking for 20 again trains nothing more
    r = CliRunner().invoke(main, ["sweep", synth, "--out", str(out), "--search", "tpe", "--trials", "20", "--prune",
                                  "median", "--model", "mlp,conv1d", "--lr", "1e-6..3e-2:log", "--hidden", "8..64:log:int",
                                  "--fps", "2", "--split", "group", "--epochs", "12", "--patience", "12", "--plots", "false",
                                  "--device", "cpu"])
    assert r.exit_code == 0 and "this run trained 0" in r.output, r.output


@pytest.mark.parametrize("args, needles", [
    (["--search", "random", "--trials", "3", "--lr", "0..1:log"], ["--lr", "log range needs LO > 0"]),
    (["--search", "random", "--trials", "3", "--hidden", "8..4"], ["--hidden", "LO must be below HI"]),
    (["--search", "random", "--trials", "3", "--bidirectional", "0..1"], ["--bidirectional", "needs a numeric option"]),
    (["--search", "random", "--trials", "3", "--model", "a..b"], ["--model", "needs a numeric option"]),
    (["--lr", "1e-4..1e-2:log"], ["--lr", "use --search random or tpe"]),
    (["--search", "tpe", "--lr", "1e-4..1e-2:log"], ["--search tpe needs --trials"]),
    (["--search", "random", "--trials", "3", "--hidden", "8..64:cube"], ["--hidden", "LO..HI[:log][:int]"]),
])
def test_bad_ranges_are_refused_before_any_training(fake, tmp_path, args, needles):
    out = tmp_path / "bad"
    r = CliRunner().invoke(main, ["sweep", fake, "--out", str(out), *args, "--epochs", "1"])
    assert r.exit_code == 2, r.output
    for n in needles:
        assert n in r.output, r.output
    assert not out.exists() or not any(out.glob("*/results.json"))


def test_parallel_workers_draw_different_parameters(fake, tmp_path):
    """Workers sharing a sampler seed (two --jobs here, or commands on other nodes) must not draw the same trials."""
    out = tmp_path / "rnd"
    r = CliRunner().invoke(main, ["sweep", fake, "--out", str(out), "--search", "random", "--trials", "8", "--jobs", "2",
                                  "--model", "mlp", "--hidden", "4..256:log:int", "--lr", "1e-4..1e-1:log", "--seq-len", "6",
                                  "--epochs", "2", "--plots", "false", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    rows = _rows(out)
    assert len(rows) == 8 and len({(x["hidden"], x["lr"]) for x in rows}) == 8


def test_a_trial_asked_by_another_worker_after_our_count_is_not_one_too_many(fake, tmp_path, monkeypatch):
    """The race behind the test above: another worker asks the last trial between this worker's count and its ask.
    This worker's trial is then one too many: it is marked empty and not trained (the study keeps --trials trials)."""
    import optuna
    from optuna.trial import TrialState

    from featseq.sequence.grid import SweepConfig, parse_range
    from featseq.sequence.study import open_study
    from featseq.sequence.sweep import sweep

    cfg = SweepConfig(cache=fake, out=str(tmp_path / "race"), search="random", trials=3,
                      grid={"model": ["mlp"], "hidden": [parse_range("hidden", "4..64:int")], "seq_len": [6],
                            "epochs": [1], "plots": [False]})
    real_ask, other = optuna.Study.ask, []

    def ask(study, *a, **k):
        if len(study.get_trials(deepcopy=False)) == 2 and not other:  # our count said 2 < 3; the other asks first
            other.append(None)
            o = real_ask(open_study(cfg)[0])
            for key, v in (("host", socket.gethostname()), ("pid", os.getpid())):  # alive: not reaped
                o.set_user_attr(key, v)
            other[0] = o.number
        return real_ask(study, *a, **k)

    monkeypatch.setattr(optuna.Study, "ask", ask)
    res = sweep(cfg)
    assert other == [2] and res["trained"] == 2
    trials = {t.number: t for t in study_trials(cfg.out)}
    assert [n for n, t in trials.items() if not t.user_attrs.get("empty")] == [0, 1, 2]
    assert trials[3].user_attrs.get("empty") and trials[3].state == TrialState.FAIL and not trials[3].params
    assert len(trials) == 4


def test_a_search_whose_trials_all_fail_stops_at_its_trial_count(fake, tmp_path, monkeypatch):
    import featseq.sequence.sweep_workers as W
    from featseq.sequence.grid import SweepConfig, parse_range
    from featseq.sequence.sweep import sweep

    def broken(*a, **k):
        raise RuntimeError("always fails")

    monkeypatch.setattr(W, "train", broken)
    res = sweep(SweepConfig(cache=fake, out=str(tmp_path / "f"), search="random", trials=3,
                            grid={"model": ["mlp"], "hidden": [parse_range("hidden", "4..64:int")],
                                  "seq_len": [6], "plots": [False]}))
    assert res["failed"] == 3 and len(res["rows"]) == 3
    assert {r["status"] for r in res["rows"]} == {"error"} and all("always fails" in r["error"] for r in res["rows"])


def test_a_grid_changed_between_runs_resumes_and_a_changed_search_space_is_refused(fake, tmp_path):
    out = str(tmp_path / "g")
    base = ["--seq-len", "6", "--epochs", "2", "--plots", "false", "--device", "cpu", "-q"]
    r = CliRunner().invoke(main, ["sweep", fake, "--out", out, "--model", "mlp,frame", *base])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["sweep", fake, "--out", out, "--model", "mlp,frame,gru", *base])
    assert r.exit_code == 0, r.output
    rows = _rows(tmp_path / "g")
    assert sorted(x["model"] for x in rows) == ["frame", "gru", "mlp"] and {x["status"] for x in rows} == {"complete"}
    done = [t.user_attrs["variant"] for t in study_trials(tmp_path / "g") if t.state.name == "COMPLETE"]
    assert sorted(done) == sorted(set(done)) and len(done) == 3  # mlp and frame were not trained again
    search = ["--search", "random", "--trials", "2", *base]
    r = CliRunner().invoke(main, ["sweep", fake, "--out", str(tmp_path / "r"), "--model", "mlp,frame", *search])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["sweep", fake, "--out", str(tmp_path / "r"), "--model", "mlp,gru", "--search", "random",
                                  "--trials", "3", *base])
    assert r.exit_code == 2 and "was started with other options" in r.output, r.output


def test_the_terminal_leaderboard_names_variants_and_trials_and_cv_rows_show_epochs(fake, tmp_path):
    base = ["--seq-len", "6", "--epochs", "2", "--patience", "5", "--plots", "false", "--device", "cpu", "-q"]
    out = tmp_path / "cvgrid"
    r = CliRunner().invoke(main, ["sweep", fake, "--out", str(out), "--model", "mlp,frame", "--split", "group-kfold",
                                  "--folds", "2", *base])
    assert r.exit_code == 0, r.output
    table = [line for line in r.output.splitlines() if line.startswith("|")]
    assert table[0].startswith("| rank | variant | model |")
    assert any("| model=mlp |" in line for line in table) and any("| model=frame |" in line for line in table)
    rows = _rows(out)
    assert all(x["epochs"] and float(x["epochs"]) == 2 for x in rows)  # blank for cross-validated rows before
    for line in table[2:]:
        assert line.split("|")[table[0].split("|").index(" epochs ")].strip() == "2"
    out = tmp_path / "cvtrials"
    r = CliRunner().invoke(main, ["sweep", fake, "--out", str(out), "--search", "tpe", "--trials", "2", "--model", "mlp",
                                  "--hidden", "4..32:log:int", "--split", "group-kfold", "--folds", "2", *base])
    assert r.exit_code == 0, r.output
    assert "| trial-0000 |" in r.output and "| trial-0001 |" in r.output
