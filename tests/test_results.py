"""results.json (sequence.results): written once per run folder, last, by the one writer; its keys as documented."""
import json
from pathlib import Path

import pytest

import featseq.sequence.results as R
from featseq.sequence.config import TrainConfig
from featseq.sequence.train import evaluate, train
from helpers import write_fake_cache

RUN_KEYS = ["status", "config", "model", "model_config", "order_aware", "params", "classes", "fold", "n_train", "n_val",
            "n_test", "fps", "seq_len", "seconds", "padded", "dropped", "reader", "best_epoch", "epochs_run",
            "test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_accuracy", "train_loss",
            "per_class_accuracy", "confusion", "timings", "features", "cache", "device", "torch"]


@pytest.fixture()
def writes(monkeypatch):
    """The paths results.json was written to, in order."""
    seen = []
    write = R.write_json

    def counting(path, obj):
        if Path(path).name == R.RESULTS:
            seen.append(Path(path))
        write(path, obj)

    monkeypatch.setattr(R, "write_json", counting)
    return seen


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_fake_cache(tmp_path_factory.mktemp("res") / "c.h5", ["a", "b", "c"] * 8,
                            groups=[f"g{i % 4}" for i in range(24)], dim=8)


def _cfg(cache, out, **kw):
    return TrainConfig(cache=cache, out=str(out), model="mlp", hidden=8, epochs=2, seq_len=6, plots=False, device="cpu",
                       **kw)


def test_a_run_writes_its_results_once_with_the_documented_keys(cache, tmp_path, writes):
    res = train(_cfg(cache, tmp_path / "r", split="random"))
    assert writes == [tmp_path / "r" / R.RESULTS]
    on_disk = json.loads((tmp_path / "r" / R.RESULTS).read_text())
    assert on_disk == res and list(on_disk) == RUN_KEYS
    assert list(on_disk["timings"]) == ["train_s", "per_epoch_s", "load_s", "setup_s", "score_train_s", "write_s",
                                        "total_s"]
    t = on_disk["timings"]  # the tail's parts lie within the run
    assert 0 <= t["score_train_s"] and 0 < t["write_s"] and t["load_s"] + t["setup_s"] + t["train_s"] + \
        t["score_train_s"] + t["write_s"] <= t["total_s"] + 0.01  # each rounded to 1 ms
    assert R.Results.read(tmp_path / "r").total_s == on_disk["timings"]["total_s"]
    writes.clear()
    ev = evaluate(str(tmp_path / "r"), out=str(tmp_path / "e"), plots=False)
    assert writes == [tmp_path / "e" / R.RESULTS] and ev["out"] == str(tmp_path / "e") and ev["status"] == "complete"


def test_a_cross_validation_writes_each_folds_results_and_its_own_once(cache, tmp_path, writes):
    res = train(_cfg(cache, tmp_path / "cv", split="group-kfold", folds=2))
    folds = sorted(p.parent.name for p in (tmp_path / "cv" / "folds").glob(f"*/{R.RESULTS}"))
    assert len(folds) == 2 and sorted(writes[:2]) == [tmp_path / "cv" / "folds" / f / R.RESULTS for f in folds]
    assert writes[2:] == [tmp_path / "cv" / R.RESULTS]
    assert res["folds"] == 2 and list(res["timings"]) == ["train_s", "load_s", "total_s"]
    assert {k + "_std" for k in R.SPREAD} <= set(res) and [list(f) for f in res["per_fold"]] == [list(R.FOLD_KEYS)] * 2


def test_results_of_another_shape_are_not_read_as_a_run(tmp_path):
    for content in ("[1, 2]", '{"status": "complete"}', '{"status": "complete", "config": "x"}', "not json"):
        (tmp_path / R.RESULTS).write_text(content)
        assert R.Results.read(tmp_path) is None
    assert R.Results.read(tmp_path / "missing") is None


def test_probability_cells_keep_six_decimals_and_leave_unpredicted_rows_empty():
    """predictions.csv's p_<class> cells (sequence.run._probability_cells, one %-format per row): the same strings as
    formatting each value with 6 decimals, and '' in a row that was not predicted (NaN, e.g. a dropped segment)."""
    import numpy as np
    from featseq.sequence.run import _probability_cells

    probs = np.random.default_rng(0).random((5, 7))
    probs[2] = np.nan
    probs[4, 3] = np.nan
    got = list(_probability_cells(probs))
    want = [["" if np.isnan(v) else f"{v:.6f}" for v in row] for row in probs]
    assert got == want
    assert got[2] == [""] * 7 and got[4][3] == "" and got[4][2] != ""
