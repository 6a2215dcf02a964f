"""Cached training vs the original pipeline (JPEG frames on disk, frozen CNN re-run every epoch).

The original study saved each clip's frames as JPEG files and, in every epoch, loaded them with PIL,
ran a frozen ResNet over them and trained an LSTM on the result (the common "ResNetCRNN" recipe).
This benchmark rebuilds that pipeline faithfully on the same clips and sequence settings as a
`featseq train` run and times one epoch of each (every clip passes once per epoch: the training
part with a backward pass through the LSTM, the held-out part forward only, as both do), and the
total for 25 epochs including the one-time work (JPEG extraction / featurize).

    .venv/bin/python bench/train_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import GINGERBREAD, median, save  # noqa: E402
from featseq.featurize import backbones as bb  # noqa: E402
from featseq.featurize.allocator import tune_cpu_allocator  # noqa: E402
from featseq.featurize.decoder import open_decoder  # noqa: E402
from featseq.featurize.pipeline import FeaturizeConfig, featurize  # noqa: E402
from featseq.featurize.sampling import plan_segment  # noqa: E402

FPS, SEQ_LEN, BATCH, HIDDEN, EPOCHS, BACKBONE = 1.0, 25, 8, 256, 25, "resnet18"


def clip_list(tmp: Path, n: int) -> list[tuple[str, str]]:
    if GINGERBREAD.is_dir():
        from featseq.featurize.sources import load_segments

        segs = [s for s in load_segments(GINGERBREAD)[1] if s.id != "P09_music02"][:n]
        return [(s.path, s.label) for s in segs]
    from featseq.featurize.synth import render_dataset

    r = render_dataset(tmp / "synth", clips_per_class_per_group=2, groups=4, width=224, height=224, duration=(26, 30), long_videos=0)
    return [(c["path"], c["label"]) for c in r["clips"]][:n]


def extract_jpegs(clips, root: Path) -> float:
    """The original pipeline's preprocessing: SEQ_LEN frames per clip at FPS as JPEG files."""
    from PIL import Image

    t = time.perf_counter()
    for i, (path, _) in enumerate(clips):
        d = open_decoder(path)
        plan = plan_segment(d.frame_starts, d.info.duration, 0.0, None, FPS)
        out = root / f"clip{i:03d}"
        out.mkdir(parents=True, exist_ok=True)
        k = 0
        for chunk in d.read(plan.indices[:SEQ_LEN], 32):
            for fr in chunk:
                Image.fromarray(fr).save(out / f"frame{k:06d}.jpg", quality=95)
                k += 1
    return time.perf_counter() - t


class OriginalCRNN(nn.Module):
    """Frozen ResNet encoder (re-run on every batch) + LSTM decoder, as in the ResNetCRNN recipe."""

    def __init__(self, n_classes: int):
        super().__init__()
        tune_cpu_allocator()  # as featurize and finetune do on the CPU
        self.cnn = bb.create_backbone(BACKBONE, "none").trunk.eval()
        for p in self.cnn.parameters():
            p.requires_grad_(False)
        self.lstm = nn.LSTM(512, HIDDEN, batch_first=True)
        self.fc = nn.Sequential(nn.Linear(HIDDEN, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, n_classes))

    def forward(self, x):  # x (B, T, 3, 224, 224)
        b, t = x.shape[:2]
        with torch.no_grad():
            f = self.cnn(x.flatten(0, 1)).view(b, t, -1)
        h, _ = self.lstm(f)
        return self.fc(h[:, -1])


def load_clip(folder: Path, tf) -> torch.Tensor:
    from PIL import Image

    return torch.stack([tf(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.jpg"))])


def original_epoch(model, opt, root: Path, labels: np.ndarray, train_idx, test_idx, tf) -> float:
    t = time.perf_counter()
    model.lstm.train()
    model.fc.train()
    loss_fn = nn.CrossEntropyLoss()
    for a in range(0, len(train_idx), BATCH):
        b = train_idx[a:a + BATCH]
        x = torch.stack([load_clip(root / f"clip{i:03d}", tf) for i in b])
        loss = loss_fn(model(x), torch.as_tensor(labels[b]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        for a in range(0, len(test_idx), BATCH):
            b = test_idx[a:a + BATCH]
            model(torch.stack([load_clip(root / f"clip{i:03d}", tf) for i in b]))
    return time.perf_counter() - t


def main(quick: bool = False) -> dict:
    import torchvision.transforms as T
    from featseq.sequence.train import TrainConfig, train

    tmp = Path(tempfile.mkdtemp(prefix="featseq-train-"))
    n = 8 if quick else 24
    clips = clip_list(tmp, n)
    classes = sorted({c[1] for c in clips})
    labels = np.array([classes.index(c[1]) for c in clips])
    rng = np.random.default_rng(0)
    perm = rng.permutation(n)
    train_idx, test_idx = perm[: int(0.8 * n)], perm[int(0.8 * n):]

    # original pipeline
    jpeg_s = extract_jpegs(clips, tmp / "jpeg")
    tf = T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize(bb.IMAGENET_MEAN, bb.IMAGENET_STD)])
    torch.manual_seed(0)
    model = OriginalCRNN(len(classes))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    reps = 1 if quick else 3
    orig = [original_epoch(model, opt, tmp / "jpeg", labels, train_idx, test_idx, tf) for _ in range(reps)]
    orig_epoch = median(orig)
    print(f"original pipeline: {orig_epoch:.2f} s/epoch ({orig})", flush=True)

    # featseq: featurize once, then train from the cache
    m = tmp / "clips.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "id"])
        for i, (p, lab) in enumerate(clips):
            w.writerow([p, lab, Path(p).parent.name, f"c{i:03d}"])
    t = time.perf_counter()
    res = featurize(FeaturizeConfig(source=str(m), backbone=BACKBONE, weights="none", fps=FPS, out=str(tmp / "c.h5")))
    featurize_s = time.perf_counter() - t
    epochs = 5 if quick else EPOCHS
    runs = []
    for r in range(reps):
        out = train(TrainConfig(cache=res.path, out=str(tmp / f"run{r}"), model="lstm", hidden=HIDDEN, fps=FPS,
                                seq_len=SEQ_LEN, batch_size=BATCH, epochs=epochs, patience=epochs, split="random",
                                test_size=0.2, seed=r, plots=False))
        hist = list(csv.DictReader(open(tmp / f"run{r}" / "history.csv")))
        runs.append({"per_epoch_s": median([float(h["seconds"]) for h in hist]), "total_s": out["timings"]["total_s"]})
    fs_epoch = median([r["per_epoch_s"] for r in runs])
    fs_total_train = median([r["total_s"] for r in runs]) * (EPOCHS / epochs)
    print(f"featseq: featurize {featurize_s:.1f} s once, {fs_epoch * 1000:.1f} ms/epoch", flush=True)
    orig_total = jpeg_s + EPOCHS * orig_epoch
    fs_total = featurize_s + fs_total_train
    data = {
        "clips": n, "seq_len": SEQ_LEN,
        "description": (f"{n} {'Gingerbread' if GINGERBREAD.is_dir() else 'synthetic 224x224'} clips, {FPS:g} fps, "
                        f"{SEQ_LEN} frames per clip, {BACKBONE} (random weights) + LSTM(hidden {HIDDEN}), batch {BATCH}, "
                        f"80/20 split; an epoch passes every clip once. Totals are for {EPOCHS} epochs including the "
                        f"one-time work (JPEG extraction for the original, featurize for featseq). ResNet-18 is the "
                        f"cheapest CNN: with ResNet-50/152, as in many CRNN recipes, the original's epochs cost more "
                        f"and the ratios grow."),
        "times": {"original: JPEG extraction (once)": round(jpeg_s, 2), "original: one epoch": round(orig_epoch, 2),
                  f"original: {EPOCHS} epochs incl. extraction": round(orig_total, 1),
                  "featseq: featurize (once)": round(featurize_s, 2), "featseq: one epoch": round(fs_epoch, 4),
                  f"featseq: {EPOCHS} epochs incl. featurize": round(fs_total, 1)},
        "ratios": {"per-epoch speedup (original / featseq)": round(orig_epoch / fs_epoch),
                   f"{EPOCHS}-epoch total speedup": round(orig_total / fs_total, 1)},
    }
    print(data["ratios"], flush=True)
    save("train", data)
    return data


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
