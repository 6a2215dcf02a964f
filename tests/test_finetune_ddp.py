"""finetune on several ranks: real torchrun launches on the CPU (gloo), DistributedDataParallel, a real kill -9."""
import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CHILD_ENV, ROOT, featurize_cfg, torchrun_cmd
from featseq.featurize import backbones as bb
from featseq.featurize.pipeline import featurize
from featseq.sequence.config import FinetuneConfig
from featseq.sequence.finetune import finetune
from featseq.sequence.train import TrainConfig, train


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    """36 synthetic clips at 32 px, 2 fps, frames kept; a cached-feature GRU run on them (random split: 23 training
    clips, so global batches of 11 are 11, 11, 1: uneven shares on 2 ranks, and one rank without a share)."""
    from featseq.featurize.synth import render_dataset

    d = tmp_path_factory.mktemp("ddp")
    src = render_dataset(d / "v", clips_per_class_per_group=3, groups=4, width=32, height=32, duration=(5, 7),
                         long_videos=0, seed=5)["clips_root"]
    cache = featurize(featurize_cfg(src, d / "frames.h5", fps=2.0, keep_frames=True)).path
    res = train(TrainConfig(cache=cache, out=str(d / "run"), model="gru", hidden=16, dropout=0.0, split="random",
                            epochs=5, seq_len=8, seed=0, plots=False, device="cpu"))
    assert res["n_train"] == 23
    return {"cache": cache, "run": str(d / "run"), "clips": src}


# dropout 0 and frozen BatchNorm (the default): one process and two ranks compute the same updates
OPTS = {"unfreeze": "1", "batch_size": 11, "accumulate": 2, "class_weights": "balanced", "label_smoothing": 0.1,
        "dropout": 0.0, "patience": 10, "device": "cpu", "plots": False}


def _args(data, out, epochs, *extra, source=None) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in OPTS.items() if k != "plots"]
    return ["finetune", source or data["cache"], "--from", data["run"], "--out", out, "--epochs", epochs, "--no-plots",
            *flags, *extra]


def _torchrun(data, out, epochs, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(2, *_args(data, out, epochs, *extra)), cwd=ROOT, env=CHILD_ENV,
                          capture_output=True, text=True, timeout=300)


def _one(data, out, epochs, resume=False) -> dict:
    return finetune(FinetuneConfig(cache=data["cache"], out=str(out), from_run=data["run"], epochs=epochs, resume=resume,
                                   **OPTS))


def _same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same model (within float tolerance) and the same metrics."""
    ca, cb = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (a, b))
    for part in ("model", "trunk"):
        for k, v in ca[part].items():
            assert torch.allclose(v.float(), cb[part][k].float(), rtol=1e-4, atol=1e-5), (part, k)
    la, lb = (torch.load(p / "last.pt", weights_only=True) for p in (a, b))
    for k, v in la["model"].items():  # the last epoch's weights, whichever epoch was selected
        assert torch.allclose(v.float(), lb["model"][k].float(), rtol=1e-4, atol=1e-5), k
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    for k in ("val_accuracy", "test_accuracy", "train_accuracy", "best_epoch", "epochs_run", "n_train", "n_val", "n_test"):
        assert ra[k] == rb[k], k
    for k in ("val_loss", "test_loss", "train_loss"):  # train_loss is None when the warm start stayed the best
        assert (ra[k] is None and rb[k] is None) or ra[k] == pytest.approx(rb[k], rel=1e-4), k
    ha, hb = la["history"], lb["history"]
    assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb]
    for x, y in zip(ha, hb):
        assert x["train_accuracy"] == y["train_accuracy"] and x["val_accuracy"] == y["val_accuracy"]
        assert x["test_accuracy"] == y["test_accuracy"]
        for k in ("train_loss", "val_loss", "test_loss"):
            assert x[k] == pytest.approx(y[k], rel=1e-4), k
    pa, pb = ((p / "predictions.csv").read_text().splitlines() for p in (a, b))
    assert [r.split(",")[:6] for r in pa] == [r.split(",")[:6] for r in pb]  # the same predicted class per segment


@pytest.mark.slow
def test_two_ranks_train_like_one_process_and_resume_on_the_other_world_size(ddp_data, tmp_path):
    """The same global batch on 2 ranks and in 1 process: the saved weights agree within float tolerance and the
    metrics are equal; then each run continues for one more epoch on the other number of ranks, and they agree
    again (last.pt holds nothing per rank)."""
    one, two = tmp_path / "one", tmp_path / "two"
    _one(ddp_data, one, 1)
    r = _torchrun(ddp_data, two, 1)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "2 ranks (gloo), global batch 11" in r.stderr
    assert r.stdout.splitlines() == [str(two)]  # rank 0 alone reports
    res = json.loads((two / "results.json").read_text())
    assert res["ranks"] == 2 and res["backend"] == "gloo" and res["batch_per_rank"] == 6
    _same_run(one, two)
    last = torch.load(two / "last.pt", weights_only=True)["model"]  # the trunk's last stage really trained
    init = bb.create_backbone("resnet18", "none").trunk.state_dict()
    assert not torch.equal(last["trunk.layer4.1.conv2.weight"], init["layer4.1.conv2.weight"])

    _one(ddp_data, two, 2, resume=True)                                    # 2 ranks, then 1 process
    r = _torchrun(ddp_data, one, 2, "--resume")                            # 1 process, then 2 ranks
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "resuming after epoch 1" in r.stderr
    _same_run(one, two)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (a child of the torchrun process ``parent``), from /proc."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0") if ppid == parent else []
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_kill_one_rank_stops_the_other_and_resume_completes(ddp_data, tmp_path):
    """From videos, as a final run reads them: the ranks featurize a shard each (rank 0 merges), then decode the frames
    of their shares. kill -9 rank 1 mid-run: rank 0 stops with a message that says how to go on, torchrun fails;
    --resume on 2 ranks finishes the run, every epoch once, and rank 0 alone writes and reports."""
    out = tmp_path / "k"
    cmd = torchrun_cmd(2, *_args(ddp_data, out, 3, source=ddp_data["clips"]))
    # cwd: the video source's cache goes to cache/ there
    p = subprocess.Popen(cmd, cwd=tmp_path, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def saved_epoch():
        try:
            return torch.load(out / "last.pt", weights_only=True)["epoch"]
        except Exception:
            return 0
    deadline = time.monotonic() + 240
    while p.poll() is None and saved_epoch() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    victim = _rank_pid(p.pid, 1)
    assert p.poll() is None and victim is not None, p.communicate()[1][-3000:]
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode != 0
    killed = torch.load(out / "last.pt", weights_only=True)
    assert 1 <= killed["epoch"] < 3 and not (out / "results.json").exists()
    assert "error: rank 0 of 2: " in stderr, stderr[-3000:]  # the survivor says why it stopped ...
    assert "lost another rank" in stderr or "SIGTERM" in stderr
    assert "with --resume, on any number of ranks" in stderr  # ... and how to go on
    assert stdout == ""

    made = sorted(f.name for f in (tmp_path / "cache").glob("*.h5"))  # a shard per rank, merged into one cache
    assert len(made) == 3 and [".part-0-of-2." in made[1], ".part-1-of-2." in made[2]] == [True, True]
    r = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "frames decoded from video; 2 ranks (gloo)" in r.stderr
    assert r.stderr.count(f"resuming after epoch {killed['epoch']}") == 1  # rank 0 alone logs ...
    assert r.stdout.splitlines() == [str(out)]                           # ... and reports
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(x["epoch"]) for x in rows] == [1, 2, 3]                   # every epoch written once
    for h, k in zip(rows, killed["history"]):  # epochs before the kill kept as they were
        assert float(h["train_loss"]) == pytest.approx(k["train_loss"])
    assert json.loads((out / "results.json").read_text())["epochs_run"] == 3
    assert not [f.name for f in out.iterdir() if ".tmp" in f.name]  # no temporary file left by a second writer


def test_distributed_options_are_checked_before_any_work(ddp_data, tmp_path, monkeypatch):
    """A global batch smaller than the world, and --train-bn on CPU ranks (SyncBatchNorm runs on GPUs only), are
    refused with the flag and the fix, on every rank alike, before the process group starts."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    base = {k: v for k, v in OPTS.items() if k != "batch_size"}
    with pytest.raises(ValueError, match=r"--batch-size 2 is the global batch of all 4 ranks.*>= 4"):
        finetune(FinetuneConfig(cache=ddp_data["cache"], out=str(tmp_path / "x"), from_run=ddp_data["run"],
                                batch_size=2, **base))
    with pytest.raises(ValueError, match="--train-bn on 4 ranks.*GPUs only"):
        finetune(FinetuneConfig(cache=ddp_data["cache"], out=str(tmp_path / "x"), from_run=ddp_data["run"],
                                batch_size=8, freeze_bn=False, **base))
    assert not (tmp_path / "x").exists()


def test_augmentation_of_a_clip_does_not_depend_on_its_batch_or_rank(ddp_data):
    """A clip's random crop and flip come from (seed, epoch, its index): the same whichever rank's share or batch
    holds it, and another epoch draws anew."""
    from featseq.featurize.cache import read_cache
    from featseq.featurize.spec import FeatureSpec
    from featseq.sequence.frames import FrameInputs, Frames
    from featseq.sequence.reader import ReaderConfig, build

    cache = read_cache(ddp_data["cache"], features=False)
    data = build(cache, ReaderConfig(fps=2, seq_len=8))
    inputs = FrameInputs(Frames(cache, data, FeatureSpec.from_attrs(cache.attrs), 60), 4, augment=True)

    def clips(batches, seed):
        return {int(i): x for b, xs, _ in inputs.batches([np.array(b) for b in batches], train=True, seed=seed)
                for i, x in zip(b, xs)}
    one = clips([[0, 1, 2, 3]], (0, 1))
    split = clips([[2], [3, 0, 1]], (0, 1))  # as two ranks would hold them
    assert all(torch.equal(one[i], split[i]) for i in range(4))
    assert not all(torch.equal(one[i], x) for i, x in clips([[0, 1, 2, 3]], (0, 2)).items())
