"""The sweep's one-place facts (sequence.grid): a trial becomes a TrainConfig one way, for a grid variant, a running
search trial and the same trial read back from the study; the options a sweep's identity ignores are
config.RUNTIME_OPTIONS, in variant names and in reusing a finished run alike."""
from dataclasses import asdict, fields, replace

import pytest

from featseq.sequence.catalog import MODELS
from featseq.sequence.config import RUNTIME_OPTIONS, TrainConfig
from featseq.sequence.grid import (SweepConfig, comparable, finished, identity, parse_list, relevant, trial_config,
                                   variants)
from featseq.sequence.results import Results
from helpers import write_fake_cache


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return write_fake_cache(tmp_path_factory.mktemp("grid") / "f.h5", ["a", "b", "c"] * 4, dim=8)


def _without_out(tc: TrainConfig) -> dict:
    return {k: v for k, v in asdict(tc).items() if k != "out"}


def test_a_grid_variant_a_search_trial_and_its_record_give_one_config(fake, tmp_path):
    import optuna

    grid = {"model": parse_list("model", "mlp,gru"), "hidden": parse_list("hidden", "8..64:log:int"),
            "lr": parse_list("lr", "1e-4..1e-2:log"), "seq_len": [6], "split": ["random"]}
    search = SweepConfig(cache=fake, out=str(tmp_path / "s"), grid=grid, search="random", trials=1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"model": "gru", "hidden": 16, "lr": 1e-3})
    live = study.ask()
    name, tc = trial_config(live, search, {})
    study.tell(live, 0.5)
    frozen = study.get_trials()[0]
    assert (name, tc) == trial_config(frozen, search, {}) and name == "trial-0000"
    assert (tc.model, tc.hidden, tc.lr, tc.seq_len) == ("gru", 16, 1e-3, 6) and tc.out == str(tmp_path / "s" / name)
    # the grid of those values: the same config, in the variant's folder
    lists = {**grid, "hidden": [16, 32], "lr": [1e-3]}
    vs = dict(variants(lists, fake, str(tmp_path / "g")))
    variant = vs["model=gru__hidden=16"]
    assert _without_out(variant) == _without_out(tc) and variant.out == str(tmp_path / "g" / "model=gru__hidden=16")
    grid_cfg = SweepConfig(cache=fake, out=str(tmp_path / "g"), grid=lists)
    queued = optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.5,
                                       user_attrs={"variant": "model=gru__hidden=16"})
    assert trial_config(queued, grid_cfg, vs) == ("model=gru__hidden=16", variant)
    # a trial that never drew a parameter of this search space is not one of its trials
    with pytest.raises(ValueError):
        trial_config(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.1), search, {})


def test_runtime_options_are_what_a_sweep_identity_ignores(fake, tmp_path):
    base = TrainConfig(cache=fake, out=str(tmp_path / "v"), model="mlp", seq_len=6, split="random")
    configs = [replace(base, model=m, split=s, seq_len=q) for m in MODELS for q in (None, 6)
               for s in ("random", "group", "kfold", "predefined", "ucf101:1")]
    swept = {f.name for f in fields(TrainConfig)} - {"cache", "out"}
    ignored = {k for k in swept if not any(relevant(c, k) for c in configs)}
    assert ignored == set(RUNTIME_OPTIONS)
    other = replace(base, device="cuda", threads=3, plots=False, overwrite=True)
    assert identity(other) == identity(base) and comparable(asdict(other), base) == comparable(asdict(base), base)
    assert len(variants({"model": ["mlp"], "device": ["cpu", "cuda"], "split": ["random"]}, fake, str(tmp_path))) == 1
    # a finished run stands for a config that differs from it only in runtime options ...
    (tmp_path / "v").mkdir()
    Results({"status": "complete", "config": asdict(base), "val_accuracy": 0.5}).write(tmp_path / "v")
    assert finished(other).val_accuracy == 0.5
    # ... and for one recorded by an earlier version with values for the options its model does not use
    Results({"status": "complete", "config": {**asdict(base), "kernel": 3, "heads": 4}, "val_accuracy": 0.5}).write(tmp_path / "v")
    assert finished(other).val_accuracy == 0.5
    # ... never for one that trains something else, nor when its results.json is not featseq's own
    assert finished(replace(other, lr=0.1)) is None
    (tmp_path / "v" / "results.json").write_text('{"status": "complete", "config": "x"}')
    assert finished(base) is None


def test_a_dead_workers_trial_is_failed_with_the_reason_through_the_public_storage(fake, tmp_path):
    import subprocess
    import socket
    import sys

    from featseq.sequence.study import open_study, reap_stale

    cfg = SweepConfig(cache=fake, out=str(tmp_path), grid={"model": ["mlp"]})
    study, storage = open_study(cfg)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no process holds now
    for pid in (gone.pid, None):
        t = study.ask()
        t.set_user_attr("variant", f"v{pid}")
        if pid:
            t.set_user_attr("host", socket.gethostname())
            t.set_user_attr("pid", pid)
    logged = []
    assert reap_stale(study, storage, stale_after=3600, log=logged.append) == 1
    states = {t.user_attrs["variant"]: (t.state.name, t.user_attrs.get("error")) for t in study.get_trials()}
    assert states[f"v{gone.pid}"] == ("FAIL", f"worker {socket.gethostname()}:{gone.pid} died during the trial")
    assert states["vNone"] == ("RUNNING", None) and "is gone; marked failed" in logged[0]
