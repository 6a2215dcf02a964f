"""A run knows how its features were made: predict rebuilds them from the checkpoint, without the training cache."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch  # noqa: F401  (torch before decord)
from click.testing import CliRunner

from featseq.cli import main
from helpers import featurize_cfg
from featseq.featurize.cache import read_cache, read_segment
from featseq.featurize.pipeline import featurize
from featseq.sequence.run import Run
from featseq.sequence.train import TrainConfig, train


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """12 clips twice as wide as high, featurized with --resize crop and with --resize squash (32 px, 2 fps)."""
    from featseq.featurize.synth import render_dataset

    d = tmp_path_factory.mktemp("spec")
    src = render_dataset(d / "v", clips_per_class_per_group=2, groups=2, width=64, height=32, duration=(3, 4),
                         long_videos=0, seed=2)["clips_root"]
    crop = featurize(featurize_cfg(src, d / "crop.h5", fps=2.0, resize="crop")).path
    squash = featurize(featurize_cfg(src, d / "squash.h5", fps=2.0, resize="squash")).path
    return {"d": d, "src": src, "crop": crop, "squash": squash}


def test_crop_run_predicts_with_crop_features_after_its_cache_is_gone(wide):
    d = wide["d"]
    run = d / "run"
    train(TrainConfig(cache=wide["crop"], out=str(run), model="mlp", fps=2, seq_len=4, split="random", epochs=2,
                      plots=False, device="cpu"))
    spec = Run(run).spec
    assert (spec.resize, spec.size, spec.fps, spec.backbone) == ("crop", 32, 2.0, "resnet18")
    moved = d / "elsewhere" / "crop.h5"
    moved.parent.mkdir()
    shutil.move(wide["crop"], moved)  # the training cache is gone from where the run recorded it
    seg_id = read_cache(moved, features=False).ids[0]
    video = read_segment(moved, seg_id)["path"]
    kept = d / "predict.h5"
    r = CliRunner().invoke(main, ["predict", str(run), video, "--out", str(d / "pred"), "--cache", str(kept),
                                  "--no-plots"])
    assert r.exit_code == 0, r.output
    assert "crop" in r.output  # it says which settings it featurized with
    res = json.loads((d / "pred" / "predict.json").read_text())
    assert res["featurize"]["resize"] == "crop" and res["featurize"]["size"] == 32
    # the new video's features are exactly the training cache's crop features, not the squash ones
    got = read_cache(kept).features
    want = read_segment(moved, seg_id)["features"]
    other = read_segment(wide["squash"], seg_id)["features"]
    assert got.shape == want.shape
    assert np.array_equal(got, want)
    assert not np.allclose(got, other, atol=1e-2)
    # so the whole-clip prediction equals the run's own prediction for that segment
    row = next(x for x in csv.DictReader(open(run / "predictions.csv")) if x["id"] == seg_id)
    pred = next(csv.DictReader(open(d / "pred" / "predictions.csv")))
    for c in Run(run).classes:
        assert float(pred[f"p_{c}"]) == pytest.approx(float(row[f"p_{c}"]), abs=2e-6)


def test_a_run_whose_weights_file_is_gone_is_refused(wide, tmp_path):
    from featseq.featurize.backbones import create_backbone

    weights = tmp_path / "mine.pth"
    torch.save(create_backbone("resnet18", "none", 7).trunk.state_dict(), weights)
    cache = featurize(featurize_cfg(wide["src"], tmp_path / "w.h5", fps=2.0, weights=str(weights))).path
    run = tmp_path / "run"
    train(TrainConfig(cache=cache, out=str(run), model="mlp", fps=2, seq_len=4, epochs=1, plots=False, device="cpu"))
    assert Run(run).spec.weights_path == str(weights)
    weights.unlink()
    video = read_segment(cache, read_cache(cache, features=False).ids[0])["path"]
    r = CliRunner().invoke(main, ["predict", str(run), video, "--out", str(tmp_path / "p")])
    assert r.exit_code == 2, r.output
    assert str(weights) in r.output and "put that file back" in r.output


def test_a_runs_spec_saved_before_resize_size_and_interpolation_matches_its_caches():
    """A checkpoint written before resize_size and interpolation were recorded reads back as the cache it came from
    does (resized to its size, bilinear), so predict / finetune --from / explain find no difference between them;
    a multi-crop one reads as size / 0.875."""
    from featseq.featurize.spec import FeatureSpec

    attrs = {"backbone": "resnet18", "weights": "none-seed0", "size": 32, "resize": "squash", "fps": 2.0,
             "precision": "fp32", "feature_dim": 512}
    from_cache = FeatureSpec.from_attrs(attrs)
    old = {k: v for k, v in from_cache.to_dict().items() if k not in ("resize_size", "interpolation")}
    from_run = FeatureSpec.from_dict(old)
    assert from_run.resize_size == from_cache.resize_size == "32x32" and from_run.interpolation == "bilinear"
    assert from_run.same_features(from_cache) == []
    crops = FeatureSpec.from_dict({**old, "crops": 5})
    assert crops.resize_size == FeatureSpec.from_attrs({**attrs, "crops": 5}).resize_size != "32x32"
