"""End-to-end fine-tuning on synthetic data: warm start, resume after a real kill, unfreeze, frames."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featseq.cli import main
from helpers import CHILD_ENV, ROOT, featurize_cfg
from featseq.featurize import backbones as bb
from featseq.featurize.cache import read_cache
from featseq.featurize.pipeline import featurize
from featseq.featurize.spec import FeatureSpec
from featseq.sequence import models as M
from featseq.sequence.finetune import CNNSequence, FinetuneConfig, Frames, finetune, set_trainable
from featseq.sequence.reader import ReaderConfig, build
from featseq.sequence.train import TrainConfig, train


@pytest.fixture(scope="module")
def ft_data(tmp_path_factory):
    """24 synthetic clips at 32 px, 2 fps, with frames kept; a cached-feature GRU run on them. Features in float32, so
    the CNN that fine-tuning runs on the frames computes the run's own inputs (float16 would round them)."""
    from featseq.featurize.synth import render_dataset

    d = tmp_path_factory.mktemp("ft")
    src = render_dataset(d / "v", clips_per_class_per_group=2, groups=4, width=32, height=32, duration=(5, 7),
                         long_videos=0, seed=3)["clips_root"]
    frames = featurize(featurize_cfg(src, d / "frames.h5", fps=2.0, keep_frames=True, dtype="float32")).path
    plain = featurize(featurize_cfg(src, d / "plain.h5", fps=2.0, dtype="float32")).path
    run = d / "run"
    res = train(TrainConfig(cache=frames, out=str(run), model="gru", hidden=32, split="group", epochs=15, seq_len=8,
                            seed=0, plots=False, device="cpu"))
    return {"src": src, "frames": frames, "plain": plain, "run": str(run), "res": res, "dir": d}


N_CLIPS = 2 * 4 * 3  # ft_data's clips: per class and group, groups, classes


def _cfg(data, out, **kw):
    kw.setdefault("epochs", 2)
    kw.setdefault("batch_size", 8)
    kw.setdefault("device", "cpu")
    kw.setdefault("plots", False)
    return FinetuneConfig(cache=data["frames"], out=str(out), from_run=data["run"], **kw)


def test_frames_from_cache_equal_frames_decoded_afresh(ft_data):
    cache = read_cache(ft_data["frames"], features=False)
    data = build(cache, ReaderConfig(fps=2, seq_len=8))
    assert data.features is None  # the selection alone: no features were read
    kept = Frames(cache, data, FeatureSpec.from_attrs(cache.attrs), 60)
    assert kept.kept
    plain_cache = read_cache(ft_data["plain"], features=False)
    plain = build(plain_cache, ReaderConfig(fps=2, seq_len=8))
    decoded = Frames(plain_cache, plain, FeatureSpec.from_attrs(plain_cache.attrs), 60)
    assert not decoded.kept
    idx = np.arange(6)
    same = np.array([list(plain.ids).index(data.ids[i]) for i in idx])  # the caches' rows follow completion order
    a, ma = kept.batch(idx, data.rows)
    b, mb = decoded.batch(same, plain.rows)
    decoded.close()
    assert torch.equal(ma, mb) and ma.any()
    assert torch.equal(a, b)  # the same decoder and resize produced both


def test_unfreeze_selects_exactly_which_parameters_get_gradients():
    x = torch.randint(0, 255, (2, 3, 32, 32, 3), dtype=torch.uint8)
    m = torch.tensor([[True, True, True], [True, True, False]])
    for unfreeze, expect in (("0", []), ("1", ["layer4"]), ("2", ["layer3", "layer4"]), ("all", None)):
        backbone = bb.create_backbone("resnet18", "none")
        model = CNNSequence(backbone, M.create_model("lstm", 512, 3, hidden=8), channels_last=False)
        trainable = set_trainable(model, backbone, unfreeze)
        model.train()
        model(x, m).sum().backward()
        got = {n.split(".")[0] for n, p in model.trunk.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        want = {n.split(".")[0] for n, _ in model.trunk.named_parameters()} if expect is None else set(expect)
        assert got == want, unfreeze
        assert {id(p) for p in trainable} == {id(p) for n, p in model.trunk.named_parameters() if n.split(".")[0] in want}
        assert all(p.grad is not None for p in model.head.parameters())


def test_finetune_writes_every_output_and_improves_or_holds(ft_data, tmp_path):
    out = tmp_path / "ft"
    finetune(_cfg(ft_data, out, unfreeze="1", epochs=3, plots=True))
    for f in ("results.json", "history.csv", "curves.png", "confusion.png", "predictions.csv", "per_class.csv",
              "classification_report.txt", "checkpoint.pt", "last.pt", "CRNN_epoch_training_loss.npy",
              "CRNN_epoch_test_accuracy.npy"):
        assert (out / f).exists(), f
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "complete" and r["mode"] == "finetune" and r["trainable_trunk_params"] > 0
    assert r["seq_len"] == ft_data["res"]["seq_len"] and r["n_test"] == ft_data["res"]["n_test"]
    ckpt = torch.load(ft_data["run"] + "/checkpoint.pt", weights_only=True)
    ft_ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ft_ckpt["split_ids"] == ckpt["split_ids"]  # the warm start's exact split, no test leakage
    # the warm start is scored first and is the model to beat: the result never falls below it on validation
    warm = r["warm_start_scores"]
    assert warm["val_accuracy"] == pytest.approx(ft_data["res"]["val_accuracy"])
    assert r["val_accuracy"] >= warm["val_accuracy"] - 1e-9
    # and fine-tuning really trained the last stage: layer4 moved, layer1 did not
    last = torch.load(out / "last.pt", weights_only=True)["model"]
    init = bb.create_backbone("resnet18", "none").trunk.state_dict()
    assert not torch.equal(last["trunk.layer4.1.conv2.weight"], init["layer4.1.conv2.weight"])
    assert torch.equal(last["trunk.layer1.0.conv1.weight"], init["layer1.0.conv1.weight"])
    lines = (out / "predictions.csv").read_text().splitlines()
    assert len(lines) == 1 + N_CLIPS


def _probabilities(run) -> dict:
    """id -> (split, predicted class, probabilities) from a run's predictions.csv."""
    import csv

    with open(Path(run) / "predictions.csv", newline="") as fh:
        return {r["id"]: (r["split"], r["predicted"], np.array([float(v) for k, v in r.items() if k.startswith("p_")]))
                for r in csv.DictReader(fh)}


def test_frozen_finetune_reproduces_the_warm_start(ft_data, tmp_path):
    """--unfreeze 0 with lr ~ 0: the CNN + head pipeline scores exactly like the cached-feature model: for every
    segment the same split, the same predicted class and the same class probabilities (predictions.csv)."""
    res = finetune(_cfg(ft_data, tmp_path / "f0", unfreeze="0", epochs=1, lr=1e-12))
    assert res["trainable_trunk_params"] == 0
    warm, tuned = _probabilities(ft_data["run"]), _probabilities(tmp_path / "f0")
    assert warm.keys() == tuned.keys() and len(warm) == N_CLIPS
    for sid, (split, pred, p) in warm.items():
        assert tuned[sid][:2] == (split, pred), sid
        assert np.allclose(tuned[sid][2], p, atol=2e-6), (sid, p, tuned[sid][2])  # predictions.csv keeps 6 decimals
    assert res["test_accuracy"] == ft_data["res"]["test_accuracy"]


def test_resume_after_kill_continues_from_saved_epoch(ft_data, tmp_path):
    out = tmp_path / "k"
    cmd = [sys.executable, "-c", "from featseq.cli import main; main()", "finetune", ft_data["plain"], "--from", ft_data["run"],
           "--out", str(out), "--unfreeze", "1", "--epochs", "2", "--patience", "10", "--device", "cpu", "--no-plots"]
    env = CHILD_ENV
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300

    def saved_epoch():
        try:
            return torch.load(out / "last.pt", weights_only=True)["epoch"]
        except Exception:
            return 0
    while p.poll() is None and saved_epoch() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read().decode()[-2000:]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed = torch.load(out / "last.pt", weights_only=True)
    assert killed["epoch"] == 1 and not (out / "results.json").exists()
    r = CliRunner().invoke(main, cmd[cmd.index("finetune"):] + ["--resume"])  # the resume, in this process
    assert r.exit_code == 0, r.output[-3000:] + repr(r.exception)
    assert f"resuming after epoch {killed['epoch']}" in r.stderr
    hist = json.loads((out / "results.json").read_text())
    import csv
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(x["epoch"]) for x in rows] == [1, 2]
    for h, k in zip(rows, killed["history"]):  # epochs before the kill kept as they were
        assert float(h["train_loss"]) == pytest.approx(k["train_loss"])
    assert hist["epochs_run"] == 2


def test_finetune_errors(ft_data, tmp_path):
    r = CliRunner().invoke(main, ["finetune", ft_data["frames"], "--from", ft_data["run"], "--out", str(tmp_path / "x"),
                                  "--unfreeze", "lots"])
    assert r.exit_code == 2 and "--unfreeze" in r.output
    r = CliRunner().invoke(main, ["finetune", ft_data["frames"], "--from", ft_data["run"], "--out", str(tmp_path / "x"),
                                  "--split", "logo"])
    assert r.exit_code == 2 and "finetune trains one model" in r.output


def test_augment_applies_one_crop_and_flip_to_every_frame_of_a_clip():
    from featseq.sequence.frames import augment_clip

    clip = torch.randint(0, 255, (5, 32, 32, 3), dtype=torch.uint8)
    changed = 0
    for seed in range(4):
        out = augment_clip(clip, torch.Generator().manual_seed(seed))
        assert out.shape == clip.shape and out.dtype == torch.uint8
        for t in range(len(clip)):  # frame t alone, with the same draws, gets the same transform
            alone = augment_clip(clip[t:t + 1], torch.Generator().manual_seed(seed))
            assert torch.equal(out[t], alone[0])
        changed += not torch.equal(out, clip)
    assert changed == 4  # a crop of scale < 1 or a flip every time


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 255, (2, 3, 32, 32, 3), dtype=torch.uint8)
    m = torch.tensor([[True, True, True], [True, True, False]])
    grads = []
    for checkpointing in (False, True):
        backbone = bb.create_backbone("resnet18", "none", 0)
        torch.manual_seed(0)
        model = CNNSequence(backbone, M.create_model("lstm", 512, 3, hidden=8, dropout=0.0), channels_last=False,
                            checkpointing=checkpointing)
        set_trainable(model, backbone, "1")
        model.train()
        for mod in model.trunk.modules():  # frozen BatchNorm, as finetune runs it by default
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eval()
        model(x, m).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("trunk.layer4") for k in grads[0])
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5), k


def test_cli_finetune_with_augment_accumulate_and_checkpointing(ft_data, tmp_path, monkeypatch):
    """The three flags act: every training clip is augmented, the CNN runs under gradient checkpointing in every
    training batch, and the optimizer steps once per 2 batches (AdamW's step count in last.pt)."""
    import torch.utils.checkpoint

    import featseq.sequence.frames as F

    calls = {"augment": 0, "checkpoint": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper
    monkeypatch.setattr(F, "augment_clip", counted("augment", F.augment_clip))
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted("checkpoint", torch.utils.checkpoint.checkpoint))
    out = tmp_path / "aug"
    r = CliRunner().invoke(main, ["finetune", ft_data["frames"], "--from", ft_data["run"], "--out", str(out),
                                  "--unfreeze", "1", "--epochs", "1", "--batch-size", "4", "--augment", "--accumulate", "2",
                                  "--checkpointing", "--device", "cpu", "--no-plots", "-q"])
    assert r.exit_code == 0, r.output
    n_train = json.loads((out / "results.json").read_text())["n_train"]
    batches = -(-n_train // 4)
    assert calls["augment"] == n_train  # one crop and flip per training clip; evaluation clips are not augmented
    assert calls["checkpoint"] == batches  # the trunk's forward of each training batch, and of no evaluation batch
    steps = {int(st["step"]) for st in torch.load(out / "last.pt", weights_only=True)["optimizer"]["state"].values()}
    assert batches >= 3 and steps == {-(-batches // 2)}, (batches, steps)  # not one step per batch
    cfg = json.loads((out / "config.json").read_text())
    # inherited from --from: the run's model and options, not train's defaults
    assert cfg["model"] == "gru" and cfg["hidden"] == 32 and cfg["seq_len"] == 8 and cfg["split"] == "group"
    assert json.loads((out / "results.json").read_text())["epochs_run"] == 1


def test_finetune_config_defaults_agree_with_the_cli(ft_data, tmp_path):
    """finetune's own defaults live in FinetuneConfig: the Python API and the command line get the same."""
    from featseq.sequence.config import FinetuneConfig as F

    assert (F(cache="c", out="o").epochs, F(cache="c", out="o").batch_size) == (5, 8)
    r = CliRunner().invoke(main, ["finetune", "--help"], terminal_width=100)
    assert r.exit_code == 0, r.output
    blocks, name = {}, None  # each option's help text, with its wrapped lines
    for line in r.output.splitlines():
        if line.startswith("  -"):
            name = line.split()[0]
        if name:
            blocks[name] = blocks.get(name, "") + " " + line.strip()
    assert "--epochs INTEGER" in blocks["--epochs"] and "[default: 5]" in blocks["--epochs"], blocks["--epochs"]
    assert "[default: 8]" in blocks["--batch-size"], blocks["--batch-size"]


def test_a_video_source_without_from_is_featurized_with_featurize_defaults(monkeypatch, tmp_path):
    """issue 25: finetune's video source without --from takes featurize's own defaults (weights, size, fps, decode
    timeout: FeaturizeConfig's fields), not fallbacks of its own."""
    from featseq.featurize import pipeline
    from featseq.featurize.config import FeaturizeConfig
    from featseq.sequence import finetune as ft
    from featseq.sequence.config import FinetuneConfig

    seen = {}

    def fake(cfg, *a, **k):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "featurize", fake)
    cfg = FinetuneConfig(cache=str(tmp_path / "videos"), out=str(tmp_path / "o"), backbone="resnet18").inherit(None, None)
    with pytest.raises(SystemExit):
        ft._source_cache(cfg, None, lambda s: None)
    got, want = seen["cfg"], FeaturizeConfig(source="videos")
    assert (got.backbone, got.shard) == ("resnet18", None)
    assert [getattr(got, k) for k in ("weights", "size", "fps", "decode_timeout")] == \
        [getattr(want, k) for k in ("weights", "size", "fps", "decode_timeout")]
    assert FinetuneConfig(cache="c", out="o").decode_timeout == want.decode_timeout


def test_finetune_compile_runs_the_trunk_through_the_compiled_path_and_survives_a_failing_compiler(ft_data, tmp_path,
                                                                                                 monkeypatch):
    """--compile: the trunk's calls go through featurize.compiled (torch.compile faked: it records its calls and
    fails the first time, as a compiler without its toolchain does), training completes eagerly after one note, and
    --compile with --checkpointing is refused."""
    calls = []

    def failing_compile(module, **options):
        assert options.get("dynamic") is None  # a batch's real frames vary: dynamic batch dimension

        def run(x):
            calls.append(tuple(x.shape))
            raise RuntimeError("no working C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    out = tmp_path / "comp"
    r = CliRunner().invoke(main, ["finetune", ft_data["frames"], "--from", ft_data["run"], "--out", str(out),
                                  "--unfreeze", "1", "--epochs", "1", "--batch-size", "4", "--compile", "--device",
                                  "cpu", "--no-plots"])
    assert r.exit_code == 0, r.output
    assert len(calls) == 1 and (out / "results.json").is_file()
    assert r.output.count("--compile: torch.compile failed (RuntimeError: no working C++ compiler)") == 1
    r = CliRunner().invoke(main, ["finetune", ft_data["frames"], "--from", ft_data["run"], "--out", str(tmp_path / "x"),
                                  "--compile", "--checkpointing", "--device", "cpu"])
    assert r.exit_code != 0 and "--compile and --checkpointing" in r.output
