"""End-to-end fine-tuning: the CNN trunk and the sequence model trained together, for final runs.

``featseq finetune SOURCE --from RUN --out RUN2`` warm-starts from a cached-feature run: its sequence
model and options, its exact train/val/test ids, and the backbone and weights recorded in its cache
(a seeded random init is rebuilt identically). SOURCE is a feature cache (the run's own or another
made with the same settings; with ``--keep-frames`` it holds the frames too) or a video source, which
is featurized first with the run's settings. The sequences are selected by the same reader as
``train``; their frames come from the cache's ``/frames`` or from the same decoder as featurize
(featurize.worker, decoding exactly the selected timestamps), prepared in a background thread while
the current batch trains. The run folder has the same files as ``train`` plus ``last.pt`` (written
atomically every epoch; ``--resume`` continues after a crash).
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featurize import backbones as bb
from featurize.cache import Cache, CacheError, read_cache
from featurize.pipeline import weights_arg

from . import models as M
from .config import TrainConfig
from .reader import Sequences, build
from .splits import CV_SPLITS, Fold, make_folds
from .train import CHECKPOINT, _cache_info, _json, _nan_to_none, _split_column, load_checkpoint, resolve_device, \
    write_history, write_scores

LAST = "last.pt"


@dataclass
class FinetuneConfig(TrainConfig):
    from_run: str | None = None
    unfreeze: str = "0"              # "0" (frozen CNN), N (last N stages), "all"
    backbone_lr: float = 1e-4
    freeze_bn: bool = True           # keep BatchNorm statistics (small batches)
    augment: bool = False            # random resized crop + flip, the same for every frame of a clip
    accumulate: int = 1              # gradient accumulation steps
    checkpointing: bool = False      # gradient checkpointing through the trunk
    precision: str = "auto"          # auto: bf16/fp16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True
    resume: bool = False
    keep_frames: bool = False        # when SOURCE is a video source: featurize with --keep-frames
    # backbone (taken from the run's cache with --from; needed only to featurize a video source without --from)
    backbone: str | None = None
    weights: str | None = None
    size: int | None = None
    decode_timeout: float = 120.0

    def validate(self) -> None:
        super().validate()
        problems = []
        if self.unfreeze != "all" and not (str(self.unfreeze).isdigit()):
            problems.append(f"--unfreeze must be 0, a number of stages or 'all', got {self.unfreeze!r}")
        if self.backbone_lr <= 0:
            problems.append(f"--backbone-lr must be > 0, got {self.backbone_lr}")
        if self.accumulate < 1:
            problems.append(f"--accumulate must be >= 1, got {self.accumulate}")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            problems.append(f"--precision must be auto, fp32, fp16 or bf16, got {self.precision!r}")
        if self.split in CV_SPLITS:
            problems.append(f"--split {self.split}: finetune trains one model; use random, seed-compat or group "
                            f"(cross-validate with cached features: featseq train --split {self.split})")
        if problems:
            raise ValueError("; ".join(problems))


# ---------------------------------------------------------------- the joint model

class CNNSequence(nn.Module):
    """uint8 frames (B, T, S, S, 3) + mask (B, T) -> logits: trunk on the real frames, then the sequence model."""

    def __init__(self, backbone: bb.Backbone, head: M.SequenceClassifier, channels_last: bool = True,
                 checkpointing: bool = False):
        super().__init__()
        self.entry = backbone.entry
        self.trunk = backbone.trunk
        self.head = head
        self.channels_last = channels_last
        self.checkpointing = checkpointing
        self.trunk_trainable = True

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        x = bb.preprocess(frames, self.entry, frames.device, self.channels_last)
        if not self.trunk_trainable:
            with torch.no_grad():
                return self.trunk(x).flatten(1)
        if self.checkpointing and self.training:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.trunk, x, use_reentrant=False).flatten(1)
        return self.trunk(x).flatten(1)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        emb = self.embed(frames[mask])
        feats = emb.new_zeros(mask.shape + (emb.shape[1],))
        feats[mask] = emb
        return self.head(feats.float(), mask)


def set_trainable(model: CNNSequence, backbone: bb.Backbone, unfreeze: str) -> list[nn.Parameter]:
    """Freeze the trunk but its last ``unfreeze`` stages ('all': everything); return the trunk's trainable params."""
    for p in model.trunk.parameters():
        p.requires_grad_(unfreeze == "all")
    n = len(backbone.entry.stages) if unfreeze == "all" else int(unfreeze)
    if unfreeze != "all" and n:
        for stage in backbone.stage_modules()[-n:]:
            for p in stage.parameters():
                p.requires_grad_(True)
    params = [p for p in model.trunk.parameters() if p.requires_grad]
    model.trunk_trainable = bool(params)
    return params


def train_mode(model: CNNSequence, freeze_bn: bool) -> None:
    """model.train(), keeping a frozen trunk in eval mode and, with freeze_bn, every BatchNorm too."""
    model.train()
    if not model.trunk_trainable:
        model.trunk.eval()
    elif freeze_bn:
        for m in model.trunk.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def augment_clip(frames: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (scale 0.6-1) and horizontal flip, the same for every frame of one clip (T, S, S, 3)."""
    import torchvision.transforms.v2.functional as TF

    s = frames.shape[1]
    scale = 0.6 + 0.4 * float(torch.rand(1, generator=gen))
    h = w = max(8, int(round(s * scale ** 0.5)))
    top = int(torch.randint(0, s - h + 1, (1,), generator=gen))
    left = int(torch.randint(0, s - w + 1, (1,), generator=gen))
    x = frames.permute(0, 3, 1, 2)
    x = TF.resized_crop(x, top, left, h, w, [s, s], antialias=True)
    if float(torch.rand(1, generator=gen)) < 0.5:
        x = x.flip(-1)
    return x.permute(0, 2, 3, 1).contiguous()


# ---------------------------------------------------------------- frames for sequences

class Frames:
    """uint8 frames of selected sequences, from the cache's /frames or decoded from the videos."""

    def __init__(self, cache: Cache, data: Sequences, size: int, resize: str, timeout: float):
        self.cache, self.data, self.size, self.resize = cache, data, size, resize
        self.timeout = timeout
        import h5py

        with h5py.File(cache.path, "r", swmr=True, locking=False) as f:
            self.kept = "frames" in f
        self._pool = None

    def batch(self, idx: np.ndarray, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(frames (B, L, S, S, 3) uint8 with zeros at padding, mask (B, L))."""
        r = rows[idx].numpy()
        m = self.data.mask[idx].numpy()
        out = np.zeros(r.shape + (self.size, self.size, 3), np.uint8)
        if self.kept:
            import h5py

            want = np.unique(r[m])
            with h5py.File(self.cache.path, "r", swmr=True, locking=False) as f:
                got = f["frames"][want]
            out[m] = got[np.searchsorted(want, r[m])]
        else:
            from featurize.worker import DecodePool, times_job

            if self._pool is None:
                self._pool = DecodePool(timeout=self.timeout).start()
            paths = self.cache.segments["path"]
            jobs = [times_job(j, paths[i], self.cache.timestamps[r[j][m[j]]], self.size, self.resize, 64)
                    for j, i in enumerate(idx) if m[j].any()]
            filled = {j: 0 for j in range(len(idx))}
            for msg in self._pool.run(jobs):
                if msg[0] == "error":
                    raise CacheError(f"finetune needs every selected frame: {msg[2]}")
                if msg[0] == "chunk":
                    j, k = msg[1], len(msg[2])
                    pos = np.nonzero(m[j])[0][filled[j]:filled[j] + k]
                    out[j, pos] = msg[2]
                    filled[j] += k
        return torch.from_numpy(out), torch.from_numpy(m)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


def prefetch(batches: list, load, depth: int = 2):
    """Yield load(b) for each b, computed one or two batches ahead in a background thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for b in batches:
                if stop.is_set():
                    return
                q.put((b, load(b)))
        except BaseException as e:  # handed to the consumer
            q.put(e)
        q.put(None)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass


# ---------------------------------------------------------------- setup

def _resolve(cfg: FinetuneConfig, explicit: set[str]) -> tuple[FinetuneConfig, dict | None]:
    """Fill options from --from RUN (explicit options win); returns (config, run checkpoint)."""
    if not cfg.from_run:
        return cfg, None
    ck = Path(cfg.from_run) / CHECKPOINT
    if not ck.exists():
        raise FileNotFoundError(f"--from {cfg.from_run}: no {CHECKPOINT} (a cross-validation run keeps one per fold "
                                f"under folds/; pass one of those)")
    ckpt = torch.load(ck, map_location="cpu", weights_only=False)
    if ckpt.get("kind") == "finetune":
        raise ValueError(f"--from {cfg.from_run}: that is a finetune run; warm-start from a cached-feature run")
    run_cfg = ckpt["config"]
    inherit = {f.name: run_cfg[f.name] for f in dataclasses.fields(TrainConfig)
               if f.name in run_cfg and f.name not in explicit and f.name not in ("cache", "out", "epochs", "batch_size",
                                                                               "lr", "patience", "device", "threads",
                                                                               "plots")}
    inherit.update({"fps": ckpt["reader"]["fps"], "seq_len": ckpt["reader"]["seq_len"]} if not explicit & {"fps", "seq_len", "seconds", "percent"} else {})
    return dataclasses.replace(cfg, **inherit), ckpt


def _source_cache(cfg: FinetuneConfig, ckpt: dict | None, log) -> str:
    """The feature cache to read sequences from; a video source is featurized first with the run's settings."""
    if str(cfg.cache).endswith((".h5", ".hdf5")):
        return cfg.cache
    from featurize.pipeline import FeaturizeConfig, featurize

    attrs = {}
    if ckpt is not None:
        from featurize.cache import published_ids

        attrs, _ = published_ids(ckpt["cache"]["path"])
    backbone = cfg.backbone or attrs.get("backbone")
    if not backbone:
        raise ValueError("SOURCE is a video source: pass --from RUN or --backbone/--weights/--size/--fps to featurize it")
    fcfg = FeaturizeConfig(source=cfg.cache, backbone=backbone, weights=cfg.weights or weights_arg(attrs),
                           seed=int(attrs.get("seed", 0)), size=int(cfg.size or attrs.get("size", 224)),
                           resize=attrs.get("resize", "squash"), fps=float(attrs.get("fps", cfg.fps or 6.0)),
                           keep_frames=cfg.keep_frames, device=cfg.device)
    log(f"featurizing {cfg.cache} first ({backbone}, {fcfg.size}px, {fcfg.fps:g} fps)")
    return featurize(fcfg).path


def _backbone_of(cache: Cache) -> bb.Backbone:
    a = cache.attrs
    weights = weights_arg(a)
    if weights not in ("none", "imagenet") and not os.path.isfile(weights):
        raise bb.WeightsError(f"{cache.path}: its weights file {weights} is gone; put it back to fine-tune from this cache")
    return bb.create_backbone(a["backbone"], weights, int(a.get("seed", 0)))


def _fold_from_ids(data: Sequences, split_ids: dict) -> Fold:
    pos = {s: i for i, s in enumerate(data.ids)}
    missing = [s for k in ("train", "val", "test") for s in split_ids[k] if s not in pos]
    if missing:
        raise CacheError(f"the source lacks {len(missing)} segment(s) of the --from run's split, e.g. {missing[:3]}; "
                         f"fine-tune on the run's cache or one made from the same source")
    return Fold("warm-start split", *(np.array([pos[s] for s in split_ids[k]], dtype=np.int64) for k in ("train", "val", "test")))


# ---------------------------------------------------------------- training

def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def _logits(model: CNNSequence, frames: Frames, data: Sequences, idx: np.ndarray, device, autocast, bs: int) -> torch.Tensor:
    model.eval()
    outs = []
    batches = [idx[a:a + bs] for a in range(0, len(idx), bs)]
    for _, (x, m) in prefetch(batches, lambda b: frames.batch(b, data.rows)):
        with autocast():
            outs.append(model(x.to(device), m.to(device)).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0, len(data.classes))


def finetune(cfg: FinetuneConfig, explicit: set[str] = frozenset(), log=lambda s: None) -> dict:
    """Fine-tune as configured and write the run folder; returns results.json's content."""
    t0 = time.monotonic()
    cfg, ckpt = _resolve(cfg, set(explicit))
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cache_path = _source_cache(cfg, ckpt, log)
    cache = read_cache(cache_path, features=False)
    data = build(cache, cfg.reader(), classes=ckpt["classes"] if ckpt else None, features=torch.zeros(0, 1))
    backbone = _backbone_of(cache)
    if ckpt is not None:
        head, _ = load_checkpoint(Path(cfg.from_run) / CHECKPOINT)
        if head.config["input_dim"] != backbone.entry.feature_dim:
            raise CacheError(f"--from {cfg.from_run}: its model takes {head.config['input_dim']}-dim features but "
                             f"{cache_path} was made with {backbone.entry.name} ({backbone.entry.feature_dim})")
        fold = _fold_from_ids(data, ckpt["split_ids"])
    else:
        torch.manual_seed(cfg.seed)
        head = M.create_model(cfg.model, backbone.entry.feature_dim, len(data.classes), **cfg.model_kwargs())
        folds = make_folds(cfg.split, data.label_names, data.groups, data.keep, test_size=cfg.test_size,
                           val_size=cfg.val_size, seed=cfg.seed, folds=cfg.folds, classes=data.classes)
        fold = folds[0]
    device = resolve_device(cfg.device)
    model = CNNSequence(backbone, head, cfg.channels_last and device.type == "cuda", cfg.checkpointing).to(device)
    trunk_params = set_trainable(model, backbone, str(cfg.unfreeze))
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr}]
    if trunk_params:
        groups.append({"params": trunk_params, "lr": cfg.backbone_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    prec = cfg.precision if cfg.precision != "auto" else (
        ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=prec == "fp16" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=bb.PRECISIONS[prec], enabled=prec != "fp32")

    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    y = data.labels
    weight = None
    if cfg.class_weights == "balanced":
        counts = torch.bincount(y[fold.train], minlength=len(data.classes)).float()
        weight = (counts.sum() / (len(data.classes) * counts.clamp(min=1))).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()
    frames = Frames(cache, data, int(cache.attrs["size"]), cache.attrs.get("resize", "squash"), cfg.decode_timeout)
    gen = torch.Generator().manual_seed(cfg.seed)
    history, best, best_key, best_state, stale, start = [], 0, None, None, 0, 1
    state_cfg = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "epochs", "out", "device", "threads")}
    if cfg.resume and (run / LAST).exists():
        last = torch.load(run / LAST, map_location="cpu", weights_only=False)
        if last["config"] != state_cfg:
            diff = [k for k in state_cfg if last["config"].get(k) != state_cfg[k]]
            raise ValueError(f"--resume: {run} was started with other options ({', '.join(diff)}); use the same ones")
        model.load_state_dict(last["model"])
        opt.load_state_dict(last["optimizer"])
        scaler.load_state_dict(last["scaler"])
        gen.set_state(last["generator"])
        history, best, best_key, best_state, stale = last["history"], last["best"], last["best_key"], last["best_state"], last["stale"]
        start = last["epoch"] + 1
        log(f"resuming after epoch {last['epoch']}")
    elif (run / "results.json").exists():
        (run / "results.json").unlink()
    _json(run / "config.json", asdict(cfg))
    log(f"finetune {backbone.entry.name} (unfreeze {cfg.unfreeze}: {sum(p.numel() for p in trunk_params)} trunk parameters "
        f"trainable) + {head.config['name']}: {len(fold.train)} train / {len(fold.val)} val / {len(fold.test)} test, "
        f"seq_len {data.seq_len} at {data.fps:g} fps, {'frames from the cache' if frames.kept else 'frames decoded from video'}")
    t_train = time.monotonic()
    warm = None
    try:
        def evaluate_parts() -> dict:
            out = {}
            for part in ("val", "test"):
                idx = getattr(fold, part)
                lg = _logits(model, frames, data, idx, device, autocast, cfg.batch_size)
                out[part] = ((float(eval_loss(lg, y[idx])), float((lg.argmax(1) == y[idx]).float().mean()))
                             if len(idx) else (float("nan"), float("nan")))
            return out

        if ckpt is not None and start == 1 and len(fold.val):
            # the warm start is the first candidate: fine-tuning never returns a model worse on validation
            sc = evaluate_parts()
            warm = {"val_loss": sc["val"][0], "val_accuracy": sc["val"][1], "test_loss": sc["test"][0],
                    "test_accuracy": sc["test"][1], "train_loss": float("nan"), "train_accuracy": float("nan")}
            best, best_key = 0, (warm["val_accuracy"], -warm["val_loss"])
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            log(f"warm start: val loss {warm['val_loss']:.4f} acc {warm['val_accuracy']:.3f}")
        elif cfg.resume and start > 1:
            warm = last.get("warm")
        for epoch in range(start, cfg.epochs + 1):
            if best_key is not None and len(fold.val) and stale >= cfg.patience:
                break
            te = time.monotonic()
            train_mode(model, cfg.freeze_bn)
            perm = fold.train[torch.randperm(len(fold.train), generator=gen).numpy()]
            batches = [perm[a:a + cfg.batch_size] for a in range(0, len(perm), cfg.batch_size)]
            tot_loss, tot_ok, n = 0.0, 0, 0
            opt.zero_grad(set_to_none=True)
            for step, (b, (x, m)) in enumerate(prefetch(batches, lambda b: frames.batch(b, data.rows)), start=1):
                if cfg.augment:
                    x = torch.stack([augment_clip(c, gen) for c in x])
                yb = y[b].to(device)
                with autocast():
                    logits = model(x.to(device), m.to(device))
                    loss = loss_fn(logits.float(), yb)
                scaler.scale(loss / cfg.accumulate).backward()
                if step % cfg.accumulate == 0 or step == len(batches):
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                tot_loss += float(loss.detach()) * len(b)
                tot_ok += int((logits.argmax(1) == yb).sum())
                n += len(b)
            scores = evaluate_parts()
            rec = {"epoch": epoch, "train_loss": tot_loss / max(1, n), "train_accuracy": tot_ok / max(1, n),
                   "val_loss": scores["val"][0], "val_accuracy": scores["val"][1],
                   "test_loss": scores["test"][0], "test_accuracy": scores["test"][1], "seconds": time.monotonic() - te}
            history.append(rec)
            key = (rec["val_accuracy"], -rec["val_loss"]) if len(fold.val) else (epoch, 0.0)
            if best_key is None or key > best_key:
                best, best_key, stale = epoch, key, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
            _atomic_save({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scaler": scaler.state_dict(), "generator": gen.get_state(), "history": history, "best": best,
                          "best_key": best_key, "best_state": best_state, "stale": stale, "config": state_cfg,
                          "warm": warm}, run / LAST)
            log(f"epoch {epoch:3d}  train loss {rec['train_loss']:.4f} acc {rec['train_accuracy']:.3f}  val loss "
                f"{rec['val_loss']:.4f} acc {rec['val_accuracy']:.3f}  {rec['seconds']:.1f} s{'  *' if best == epoch else ''}")
        t_train = time.monotonic() - t_train
        model.load_state_dict(best_state)
        write_history(run, history, cfg.plots)
        have = np.nonzero(data.mask[:, 0].numpy())[0]
        probs = np.full((len(data), len(data.classes)), np.nan)
        probs[have] = torch.softmax(_logits(model, frames, data, have, device, autocast, cfg.batch_size), 1).numpy()
    finally:
        frames.close()
    scored = np.zeros(len(data), bool)
    scored[fold.test] = True
    scores = write_scores(run, data, _split_column(len(data), fold, data.keep), probs, scored, cfg.plots)
    b = history[best - 1] if best else warm
    torch.save({"kind": "finetune", "model": {k: v.cpu() for k, v in model.head.state_dict().items()},
                "model_config": model.head.config, "trunk": {k: v.cpu() for k, v in model.trunk.state_dict().items()},
                "backbone": {"name": backbone.entry.name, "weights": cache.attrs.get("weights"), "size": cache.attrs.get("size"),
                             "resize": cache.attrs.get("resize"), "seed": cache.attrs.get("seed", 0)},
                "classes": data.classes, "config": asdict(cfg),
                "reader": {"fps": data.fps, "seq_len": data.seq_len, "offset": cfg.offset, "min_coverage": cfg.min_coverage},
                "cache": _cache_info(cache),
                "split_ids": {k: [data.ids[i] for i in getattr(fold, k)] for k in ("train", "val", "test")}}, run / CHECKPOINT)
    epochs_run = len(history)
    res = _nan_to_none({
        "status": "complete", "mode": "finetune", "config": asdict(cfg), "model": head.config["name"],
        "model_config": head.config, "backbone": backbone.entry.name, "unfreeze": cfg.unfreeze,
        "trainable_trunk_params": sum(p.numel() for p in trunk_params), "params": M.n_params(model),
        "order_aware": M.MODELS[head.config["name"]].order_aware, "classes": data.classes, "fold": fold.name,
        "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test), "fps": data.fps,
        "seq_len": data.seq_len, "seconds": data.seconds, "padded": data.summary()["padded"], "dropped": data.summary()["dropped"],
        "best_epoch": best, "epochs_run": epochs_run, "test_accuracy": scores["accuracy"], "test_loss": b["test_loss"],
        "val_accuracy": b["val_accuracy"], "val_loss": b["val_loss"], "train_accuracy": b["train_accuracy"],
        "train_loss": b["train_loss"], "per_class_accuracy": scores["per_class_accuracy"], "confusion": scores["confusion"],
        "precision": prec, "frames_from": "cache" if frames.kept else "video", "warm_start": cfg.from_run,
        "warm_start_scores": warm,
        "timings": {"train_s": round(t_train, 3), "per_epoch_s": round(float(np.median([h["seconds"] for h in history])), 3),
                    "total_s": round(time.monotonic() - t0, 3)},
        "cache": _cache_info(cache), "device": str(device), "torch": torch.__version__,
    })
    _json(run / "results.json", res)
    return res
