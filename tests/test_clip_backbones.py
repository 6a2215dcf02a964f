"""Clip backbones (issue 28 item 1): r3d_18 at a small size and few frames, random init. Each clip sees the frames it
claims (read from burned-in frame numbers), its row's timestamp is the clip's centre, and the cache verifies, trains
through the CLI, records clip length and stride in its identity and refuses what does not apply."""
import numpy as np
import pytest
from click.testing import CliRunner

from helpers import expected_indices, featurize_cfg
from featseq.cli import main
from featseq.common.errors import UserError
from featseq.featurize import clip_embed
from featseq.featurize.cache import CacheError, read_cache
from featseq.featurize.clips import clip_preprocessing, windows
from featseq.featurize.pipeline import featurize
from featseq.featurize.spec import FeatureSpec, featurize_command
from featseq.featurize.synth import read_frame_number

T, STRIDE, FPS = 4, 2, 6.0


def test_windows_cover_the_frames_at_the_stride():
    assert windows(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert windows(9, 4, 4) == [(0, 4), (4, 8)]  # a tail shorter than a clip is left out
    assert windows(3, 4, 4) == [(0, 3)] and windows(0, 4, 4) == []  # a short segment: one clip


def test_preprocessing_comes_from_the_kinetics_weights_transforms():
    r3d = clip_preprocessing("r3d_18")
    assert (r3d["size"], r3d["frames"]) == (112, 16)
    np.testing.assert_allclose(r3d["mean"], (0.43216, 0.394666, 0.37645))
    assert clip_preprocessing("mvit_v2_s")["size"] == 224 and clip_preprocessing("swin3d_t")["frames"] == 32


def test_clip_cache_sees_its_frames_has_centre_timestamps_verifies_and_trains(synth_data, tmp_path, monkeypatch):
    seen = []  # the burned-in frame numbers of every clip the model was given
    real = clip_embed.ClipEmbedder.__call__

    def spy(self, clips):
        seen.extend([read_frame_number(f) for f in clip] for clip in clips)
        return real(self, clips)

    monkeypatch.setattr(clip_embed.ClipEmbedder, "__call__", spy)
    out = tmp_path / "r3d.h5"
    res = featurize(featurize_cfg(synth_data["clips_root"], out, backbone="r3d_18", size=64, fps=FPS,
                                  clip_frames=T, clip_stride=STRIDE))
    assert not res.failures
    c = read_cache(out)
    a = c.attrs
    assert (a["clip_frames"], a["clip_stride"], a["fps"], a["frame_fps"], a["feature_dim"]) == (T, STRIDE, 3.0, 6.0, 512)
    want_seen = []
    for i, sid in enumerate(c.ids):
        nf = int(c.segments["video_frames"][i])
        idx = expected_indices(0.0, nf / 30, FPS, 30, nf)  # the frames sampled at 6 fps, as for a frame backbone
        clips = [idx[s:e] for s, e in windows(len(idx), T, STRIDE)]
        want_seen += clips
        o, n = c.segments["offset"][i], c.segments["length"][i]
        assert n == len(clips), sid
        np.testing.assert_allclose(c.timestamps[o:o + n], [(k[0] + k[-1]) / 2 / 30 for k in clips], atol=1e-4)
    assert sorted(seen) == sorted(want_seen)

    r = CliRunner().invoke(main, ["cache", "verify", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["train", str(out), "--out", str(tmp_path / "run"), "--model", "mlp", "--fps", "3",
                                  "--epochs", "2", "-q"])
    assert r.exit_code == 0, r.output

    run, video = tmp_path / "run", str(c.segments["path"][0])
    r = CliRunner().invoke(main, ["predict", str(run), video, "--out", str(tmp_path / "pred"), "--device", "cpu",
                                  "--no-plots", "--cache", str(tmp_path / "pred.h5")])
    assert r.exit_code == 0, r.output  # the videos are featurized as clips, as the run's cache was
    pred = read_cache(tmp_path / "pred.h5")
    assert (pred.attrs["clip_frames"], pred.attrs["clip_stride"], pred.attrs["fps"]) == (T, STRIDE, 3.0)
    r = CliRunner().invoke(main, ["finetune", str(out), "--out", str(tmp_path / "ft"), "--device", "cpu"])
    assert r.exit_code != 0 and "cannot train a clip backbone" in str(r.output) + str(r.exception)
    r = CliRunner().invoke(main, ["predict", str(run), "--stream", video, "--device", "cpu"])
    assert r.exit_code != 0 and "stream embeds frame by frame" in str(r.output) + str(r.exception)

    spec = FeatureSpec.from_attrs(a)
    assert spec.featurize_options()["fps"] == FPS  # predict samples frames as featurize did
    cmd = featurize_command(a, str(out))
    assert "--fps 6 " in cmd and f"--clip-frames {T} --clip-stride {STRIDE}" in cmd
    assert "--fps 3 " in featurize_command(a, str(out), fps=1.5)  # 1.5 clips/s: frames at 3 fps, a clip every 2
    with pytest.raises(CacheError, match="clip_stride: cache has 2, request has 4"):
        featurize(featurize_cfg(synth_data["clips_root"], out, backbone="r3d_18", size=64, fps=FPS, clip_frames=T))


def test_what_does_not_apply_to_a_clip_backbone_is_refused(synth_data, tmp_path):
    src = synth_data["clips_root"]
    with pytest.raises(UserError, match="--keep-frames keeps the frames finetune trains"):
        featurize(featurize_cfg(src, tmp_path / "a.h5", backbone="r3d_18", keep_frames=True))
    with pytest.raises(UserError, match="mvit_v2_s takes clips of exactly 16 frames"):
        featurize(featurize_cfg(src, tmp_path / "b.h5", backbone="mvit_v2_s", clip_frames=8))
    with pytest.raises(UserError, match="apply to clip backbones .* not resnet18"):
        featurize(featurize_cfg(src, tmp_path / "c.h5", clip_frames=8))
    assert not any(tmp_path.iterdir())
