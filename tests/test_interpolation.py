"""Each model's own preprocessing (issue 28): the interpolation of its pretrained configuration, timm's crop_pct and a
clip backbone's weights' transforms, applied by every decoder backend and recorded in the cache's identity."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from helpers import featurize_cfg

from featseq.featurize import clip_embed
from featseq.featurize.cache import CacheError, read_cache
from featseq.featurize.decoder import open_decoder, unavailable
from featseq.featurize.decoders import BACKENDS
from featseq.featurize.pipeline import featurize
from featseq.featurize.spec import FeatureSpec, featurize_command

INSTALLED = [b for b in BACKENDS if unavailable(b) is None]
BICUBIC_TIMM = "timm:resnet10t"  # bicubic, crop_pct 0.875 in its pretrained configuration; a small random-init CNN


def write_video(path, frames, fps=30):
    """An H.264 file (qp 0: the pixels survive but for YUV rounding) of uint8 RGB ``frames`` (n, H, W, 3)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt, st.options = frames.shape[2], frames.shape[1], "yuv420p", {"qp": "0"}
        for f in frames:
            out.mux(st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(st.encode())
    return path


def grey_blocks(side=96, n=6, seed=0):
    """Grey (R = G = B: no chroma to subsample) 4 px blocks of random levels: a resize filter shows in every pixel."""
    rng = np.random.default_rng(seed)
    img = np.kron(rng.integers(30, 220, (side // 4, side // 4)), np.ones((4, 4))).astype(np.uint8)
    return np.repeat(np.stack([img] * 3, -1)[None], n, 0)


def native(path) -> np.ndarray:
    dec = open_decoder(str(path), size=None)
    frame = next(dec.read(np.array([0])))[0]
    dec.close()
    return frame


def pil(frame, w, h, how="BICUBIC") -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize((w, h), getattr(Image, how))).astype(int)


def centre(x, size):
    t, l = (x.shape[0] - size) // 2, (x.shape[1] - size) // 2
    return x[t:t + size, l:l + size]


def mad(a, b) -> float:
    return float(np.abs(np.asarray(a, int) - np.asarray(b, int)).mean())


@pytest.fixture(scope="module")
def grey_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("grey")
    write_video(root / "a" / "blocks.mp4", grey_blocks())
    return root


@pytest.mark.parametrize("backend", INSTALLED)
def test_every_backend_resizes_with_the_interpolation_asked(backend, grey_source):
    path = grey_source / "a" / "blocks.mp4"
    want = pil(native(path), 48, 48)  # PIL's bicubic, as timm's eval transform
    got = {}
    for how in ("bicubic", "bilinear"):
        dec = open_decoder(str(path), size=48, backend=backend, interpolation=how)
        got[how] = next(dec.read(np.array([0])))[0]
        dec.close()
    assert got["bicubic"].shape == (48, 48, 3)
    assert mad(got["bicubic"], want) < 2.0, backend  # measured 1.3 (pyav: swscale, YUV rounding), 0.0 (decord: PIL)
    assert mad(got["bilinear"], want) > 3.5, backend  # measured 6.8 and 6.4: bilinear is another picture
    assert mad(got["bicubic"], got["bilinear"]) > 3.5


def test_a_bicubic_model_is_fed_bicubic_frames_and_old_caches_resume_as_bilinear(grey_source, tmp_path):
    out = tmp_path / "bicubic.h5"
    # --resize-size 48: nothing cropped, so the stored frames are the resize itself
    featurize(featurize_cfg(grey_source, out, backbone=BICUBIC_TIMM, size=48, resize_size="48", keep_frames=True,
                            fps=2.0))
    c = read_cache(out)
    assert (c.attrs["interpolation"], c.attrs["resize_size"], c.attrs["model_interpolation"]) == \
        ("bicubic", "48x48", "bicubic")
    with h5py.File(out) as f:
        frame = f["frames"][0]
    want = pil(native(grey_source / "a" / "blocks.mp4"), 48, 48)
    assert mad(frame, want) < 2.0
    spec = FeatureSpec.from_attrs(c.attrs)
    opts = spec.featurize_options()  # predict, stream and finetune decode new videos the same way
    assert (opts["interpolation"], opts["resize_size"], spec.decode_args()["interpolation"]) == \
        ("bicubic", "48x48", "bicubic")
    assert "--interpolation bicubic" in featurize_command(c.attrs, str(out))

    bil = tmp_path / "bilinear.h5"
    featurize(featurize_cfg(grey_source, bil, backbone=BICUBIC_TIMM, size=48, resize_size="48", keep_frames=True,
                            fps=2.0, interpolation="bilinear"))
    with h5py.File(bil) as f:
        assert f.attrs["interpolation"] == "bilinear" and mad(f["frames"][0], want) > 3.5
    with pytest.raises(CacheError, match="interpolation: cache has 'bicubic', request has 'bilinear'") as e:
        featurize(featurize_cfg(grey_source, out, backbone=BICUBIC_TIMM, size=48, resize_size="48",
                                keep_frames=True, fps=2.0, interpolation="bilinear"))
    assert "ask for what made it: featseq featurize" in str(e.value) and "--interpolation bicubic" in str(e.value)

    with h5py.File(bil, "a") as f:  # a cache from before interpolation and resize_size were recorded
        del f.attrs["interpolation"], f.attrs["resize_size"]
    res = featurize(featurize_cfg(grey_source, bil, backbone=BICUBIC_TIMM, size=48, keep_frames=True, fps=2.0,
                                  interpolation="bilinear", resize_size="48"))
    assert res.skipped_done == 1 and res.written == 0  # read as bilinear, resized to its size: it resumes
    assert FeatureSpec.from_attrs(read_cache(bil).attrs).decode_args()["resize_size"] == "48x48"
    with pytest.raises(CacheError, match="interpolation: cache has 'bilinear', request has 'bicubic'"):
        featurize(featurize_cfg(grey_source, bil, backbone=BICUBIC_TIMM, size=48, keep_frames=True, fps=2.0,
                                resize_size="48"))


def test_crop_pct_of_a_timm_model_cuts_the_border(tmp_path):
    frames = np.full((4, 64, 64, 3), 120, np.uint8)
    frames[:, :4], frames[:, -4:], frames[:, :, :4], frames[:, :, -4:] = 250, 250, 250, 250  # a white 4 px border
    write_video(tmp_path / "src" / "a" / "border.mp4", frames)
    out = tmp_path / "timm.h5"
    # crop_pct 0.875 at --size 56: resized to floor(56 / 0.875) = 64 (the video itself), the centre 56 kept
    featurize(featurize_cfg(tmp_path / "src", out, backbone=BICUBIC_TIMM, size=56, keep_frames=True, fps=2.0))
    with h5py.File(out) as f:
        assert (f.attrs["resize_size"], f.attrs["crop_pct"]) == ("64x64", 0.875)
        kept = f["frames"][0].astype(int)
    assert kept.shape == (56, 56, 3) and kept.max() < 140  # the border is gone
    whole = tmp_path / "whole.h5"
    featurize(featurize_cfg(tmp_path / "src", whole, backbone=BICUBIC_TIMM, size=56, keep_frames=True, fps=2.0,
                            resize_size="56"))
    with h5py.File(whole) as f:
        assert f["frames"][0].astype(int)[0].mean() > 200  # without the crop the border is in the frame
    tv = tmp_path / "resnet.h5"  # torchvision CNNs keep the whole frame, resized bilinearly, as before
    featurize(featurize_cfg(tmp_path / "src", tv, backbone="resnet18", size=56, keep_frames=True, fps=2.0))
    with h5py.File(tv) as f:
        assert (f.attrs["resize_size"], f.attrs["interpolation"]) == ("56x56", "bilinear")
        assert f["frames"][0].astype(int)[0].mean() > 200


def test_a_clip_model_sees_112_px_centre_crops_of_a_128_by_171_resize(tmp_path, monkeypatch):
    write_video(tmp_path / "src" / "a" / "v.mp4", grey_blocks(side=160, n=8, seed=1))  # 160 x 160, eight equal frames
    seen = []
    real = clip_embed.ClipEmbedder.__call__
    monkeypatch.setattr(clip_embed.ClipEmbedder, "__call__", lambda self, clips: seen.append(clips) or real(self, clips))
    out = tmp_path / "r3d.h5"
    featurize(featurize_cfg(tmp_path / "src", out, backbone="r3d_18", size=None, fps=15.0, clip_frames=2))
    a = read_cache(out).attrs
    assert (a["size"], a["resize"], a["resize_size"], a["interpolation"]) == (112, "squash", "128x171", "bilinear")
    clip = seen[0][0, 0]
    assert clip.shape == (112, 112, 3)
    src = native(tmp_path / "src" / "a" / "v.mp4")
    assert mad(clip, centre(pil(src, 171, 128, "BILINEAR"), 112)) < 2.5  # swscale's bilinear vs PIL's
    assert mad(clip, pil(src, 112, 112, "BILINEAR")) > 15  # not the whole frame squashed to 112, as before
    own = tmp_path / "own.h5"  # an explicit --size replaces the weights' recipe by featseq's own
    featurize(featurize_cfg(tmp_path / "src", own, backbone="r3d_18", size=112, fps=15.0, clip_frames=2))
    assert read_cache(own).attrs["resize_size"] == "112x112"


def test_predict_decodes_new_videos_with_the_runs_interpolation_and_resize(synth_data, tmp_path):
    from click.testing import CliRunner

    from featseq.cli import main

    cache = tmp_path / "timm.h5"  # bicubic, resized to floor(32 / 0.875) = 36 then the centre 32 kept
    featurize(featurize_cfg(synth_data["clips_root"], cache, backbone=BICUBIC_TIMM, fps=2.0))
    assert (read_cache(cache).attrs["interpolation"], read_cache(cache).attrs["resize_size"]) == ("bicubic", "36x36")
    r = CliRunner().invoke(main, ["train", str(cache), "--out", str(tmp_path / "run"), "--model", "mlp", "--fps", "2",
                                  "--epochs", "1", "-q"])
    assert r.exit_code == 0, r.output
    video = str(read_cache(cache).segments["path"][0])
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "run"), video, "--out", str(tmp_path / "pred"),
                                  "--device", "cpu", "--no-plots", "--cache", str(tmp_path / "pred.h5")])
    assert r.exit_code == 0, r.output
    made, new = read_cache(cache), read_cache(tmp_path / "pred.h5")
    assert (new.attrs["interpolation"], new.attrs["resize_size"]) == ("bicubic", "36x36")
    feats, _ = made.segment(0)  # the video of segment 0, whole, made again: the same features
    np.testing.assert_allclose(new.features[:len(feats)], feats, atol=1e-2)


def test_a_default_named_cache_from_before_the_models_own_preprocessing_is_named_with_the_flags_that_resume_it(
        synth_data, tmp_path):
    """A timm model's default cache path changed when its bicubic interpolation and crop_pct were applied; featurize
    with the default path finds the older default-named cache and says how to resume it instead of only starting
    anew beside it silently."""
    from featseq.featurize.pipeline import FeaturizeConfig, default_cache_path, featurize
    from featseq.featurize.preprocessing import resolve

    cfg = FeaturizeConfig(source=str(synth_data["clips_root"]), backbone="timm:resnet10t", weights="none", size=32, fps=1.0,
                          device="cpu", cache_dir=str(tmp_path))
    resolved = resolve(cfg)
    assert resolved.interpolation == "bicubic"
    old = default_cache_path(type(cfg)(**{**vars(resolved), "interpolation": "bilinear", "resize_size": "32x32"}),
                             "fp32", "none-seed0")
    (tmp_path / old.rsplit("/", 1)[1]).write_bytes(b"")  # stands in for a cache made by an older featseq
    notes = []
    featurize(cfg, log=notes.append)
    said = [n for n in notes if n.startswith(f"note: {old}")]
    assert len(said) == 1 and "--interpolation bilinear --resize-size 32x32" in said[0]
