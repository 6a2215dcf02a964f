"""featseq compare: a cache against itself, two resolutions, and the refusals."""
import json

import numpy as np
import pytest
import torch  # noqa: F401  (torch before decord)
from click.testing import CliRunner

from featseq.cli import main
from helpers import featurize_cfg
from featseq.featurize.pipeline import featurize


@pytest.fixture(scope="module")
def cmp_data(tmp_path_factory):
    from featseq.featurize.synth import render_dataset

    d = tmp_path_factory.mktemp("compare")
    src = render_dataset(d / "v", clips_per_class_per_group=2, groups=4, width=32, height=32, duration=(4, 5),
                         long_videos=0, seed=2)["clips_root"]
    a = featurize(featurize_cfg(src, d / "a.h5", fps=2.0, size=32)).path
    b = featurize(featurize_cfg(src, d / "b.h5", fps=2.0, size=48)).path
    return {"d": d, "src": src, "a": a, "b": b}


def _args(a, b, out, *more):
    return ["compare", a, b, "--out", str(out), "--model", "conv1d,mlp", "--seeds", "2", "--epochs", "4",
            "--seq-len", "6", "--split", "group", "--device", "cpu", *more]


def test_cache_against_itself(cmp_data):
    out = cmp_data["d"] / "self"
    r = CliRunner().invoke(main, _args(cmp_data["a"], cmp_data["a"], out))
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == str(out)
    res = json.loads((out / "compare.json").read_text())
    sim = res["similarity"]
    assert sim["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert sim["linear_cka"] == pytest.approx(1.0, abs=1e-6)
    assert len(res["variants"]) == 2
    for v in res["variants"]:
        assert v["test_A"] == v["test_B"] and v["test_A_std"] == v["test_B_std"]
        assert v["per_class_A"] == v["per_class_B"]
        assert v["cross_A->B"] == pytest.approx(v["test_A"]) and v["cross_B->A"] == pytest.approx(v["test_B"])
    md = (out / "summary.md").read_text()
    assert "linear CKA | 1.0000" in md and "conv1d" in md and "mlp" in md
    assert (out / "compare.png").stat().st_size > 1000
    assert (out / "similarity.csv").is_file()


def test_two_resolutions_dims_match(cmp_data):
    from featseq.sequence.compare import CompareConfig, compare

    res = compare(CompareConfig(cmp_data["a"], cmp_data["b"], str(cmp_data["d"] / "res"),
                                grid={"model": ["mlp"], "epochs": [3], "seq_len": [6], "device": ["cpu"]},
                                seeds=1, plots=False))
    s = res["similarity"]
    assert s["same_dim"] and 0 < s["linear_cka"] < 1 and s["mean_cosine"] < 1
    assert res["common_segments"] == 24
    v = res["variants"][0]
    assert v["cross_A->B"] is not None and v["cross_B->A"] is not None


def test_linear_cka_and_matching():
    from featseq.sequence.compare import linear_cka
    from featseq.sequence.windows import match_frames

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x, 3 * x @ q) == pytest.approx(1.0)              # invariant to rotation and scale
    assert linear_cka(x, rng.normal(size=(200, 5))) < 0.2               # different dims allowed
    i, j = match_frames(np.arange(0, 5, 1 / 6), np.arange(0, 5, 0.5), 1 / 12)
    assert np.allclose(np.arange(0, 5, 1 / 6)[i], np.arange(0, 5, 0.5)[j]) and len(i) == 10


def test_refusals(cmp_data, tmp_path):
    from pathlib import Path

    from featseq.featurize.synth import render_dataset

    # same ids (<label>/<clip name>) but other clips: different time ranges
    other = render_dataset(tmp_path / "o", clips_per_class_per_group=1, groups=1, width=32, height=32, duration=(3, 3.5),
                           long_videos=0, seed=9)["clips_root"]
    c = featurize(featurize_cfg(other, tmp_path / "o.h5", fps=2.0)).path
    r = CliRunner().invoke(main, _args(cmp_data["a"], c, tmp_path / "x"))
    assert r.exit_code == 2 and "different time ranges" in r.output, r.output
    # no common id
    clips = sorted(Path(cmp_data["src"]).rglob("*.mp4"))[:3]
    man = tmp_path / "m.csv"
    man.write_text("path,label,id\n" + "".join(f"{p},{p.parent.name},other{i}\n" for i, p in enumerate(clips)))
    m = featurize(featurize_cfg(man, tmp_path / "m.h5", fps=2.0)).path
    r = CliRunner().invoke(main, _args(cmp_data["a"], m, tmp_path / "z"))
    assert r.exit_code == 2 and "share no segment id" in r.output, r.output
    # a rate one cache never sampled
    f3 = featurize(featurize_cfg(cmp_data["src"], tmp_path / "f3.h5", fps=3.0)).path
    r = CliRunner().invoke(main, _args(cmp_data["a"], f3, tmp_path / "y", "--fps", "3"))
    assert r.exit_code == 2 and "above the cache" in r.output, r.output
    # 2 and 3 fps without --fps: grids do not line up
    r = CliRunner().invoke(main, _args(cmp_data["a"], f3, tmp_path / "y"))
    assert r.exit_code == 2 and "sub-grid" in r.output, r.output


@pytest.mark.parametrize("split", ["group-kfold", "kfold"])
def test_cross_validated_compare_scores_and_cross_evaluates_every_fold(cmp_data, split):
    """A cross-validation split: each fold's run scored, and cross-evaluated on the other cache's features of its
    own fold's test ids (it crashed after all the training: "no checkpoint.pt")."""
    out = cmp_data["d"] / f"cv_{split}"
    r = CliRunner().invoke(main, ["compare", cmp_data["a"], cmp_data["b"], "--out", str(out), "--model", "mlp",
                                  "--seeds", "1", "--epochs", "2", "--seq-len", "6", "--split", split, "--folds", "2",
                                  "--device", "cpu", "--plots", "false", "-q"])
    assert r.exit_code == 0, r.output
    v = json.loads((out / "compare.json").read_text())["variants"][0]
    assert v["split"] == split and v["test_A"] is not None and v["test_B"] is not None
    assert v["cross_A->B"] is not None and v["cross_B->A"] is not None
    from featseq.sequence.compare import _cross
    from featseq.featurize.cache import read_cache

    run = out / "runs" / "A" / "mlp" / "seed0"
    folds = sorted((run / "folds").iterdir())
    assert len(folds) == 2
    b = read_cache(cmp_data["b"], dtype=np.float32)
    per_fold = [_cross(f, b, torch.device("cpu")) for f in folds]
    assert v["cross_A->B"] == pytest.approx(float(np.mean(per_fold)))


def test_a_rerun_of_compare_leaves_no_stale_fold_folders(cmp_data):
    out = cmp_data["d"] / "rerun"
    base = ["compare", cmp_data["a"], cmp_data["a"], "--out", str(out), "--model", "mlp", "--seeds", "1", "--epochs",
            "2", "--seq-len", "6", "--device", "cpu", "--plots", "false", "-q"]
    r = CliRunner().invoke(main, base + ["--split", "group-kfold", "--folds", "2"])
    assert r.exit_code == 0, r.output
    run = out / "runs" / "A" / "mlp" / "seed0"
    assert (run / "folds").is_dir()
    r = CliRunner().invoke(main, base + ["--split", "group"])  # into the same OUT: its run folders are replaced
    assert r.exit_code == 0, r.output
    assert not (run / "folds").exists() and (run / "checkpoint.pt").is_file()
    assert json.loads((run / "results.json").read_text())["config"]["split"] == "group"
