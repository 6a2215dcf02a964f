"""End-to-end fine-tuning: the CNN trunk and the sequence model trained together, for final runs.

``featseq finetune SOURCE --from RUN --out RUN2`` warm-starts from a cached-feature run: its sequence
model and options, its exact train/val/test ids, and the backbone and weights of its featurize spec
(recorded in its checkpoint; a seeded random init is rebuilt identically). SOURCE is a feature cache
made with the same featurize settings (the run's own or another; with ``--keep-frames`` it holds the
frames too) or a video source, which is featurized first with the run's settings. The sequences are
selected by the same reader as ``train``; their frames come from the cache's ``/frames`` or from the
same decoder as featurize (featurize.worker, decoding exactly the selected timestamps), prepared in a
background thread while the current batch trains. Training is the one loop of sequence.loop; the run
folder has the same files as ``train`` (sequence.run) plus ``last.pt`` (the loop's state, written
atomically every epoch; ``--resume`` continues after a crash).

Under ``torchrun`` the ranks train one model with DistributedDataParallel (sequence.ddp): each decodes and embeds
its share of every global batch of ``--batch-size`` clips, evaluation is sharded and gathered, and rank 0 alone
writes the run folder. A video SOURCE is featurized in shards, one per rank, and merged by rank 0 first.
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featseq.featurize import backbones as bb
from featseq.featurize.allocator import tune_cpu_allocator
from featseq.featurize.cache import read_cache
from featseq.featurize.precision import resolve_precision
from featseq.common.errors import UserError
from featseq.common.procgroup import rank_device, torchrun_env
from featseq.featurize.shard import after_torchrun
from featseq.featurize.spec import FeatureSpec
from featseq.common.signals import Interrupted

from . import checkpoint
from . import models as M
from . import tracking
from .config import FinetuneConfig, cv_split_problem  # noqa: F401  (FinetuneConfig re-exported)
from .ddp import Ranks, Stopped, lost_peer, ranks
from .frames import FrameInputs, Frames  # noqa: F401  (Frames re-exported: explain, tests)
from .loop import Amp, FitOptions, fit, probabilities
from .reader import Sequences, build
from .run import Run, begin_run, check_run_folder, resolve_run_folder, write_run
from .splits import Fold, choose_split, folds_for

LAST = "last.pt"


# ---------------------------------------------------------------- the joint model

class CNNSequence(nn.Module):
    """uint8 frames (B, T, S, S, 3) + mask (B, T) -> logits: trunk on the real frames, then the sequence model."""

    def __init__(self, backbone: bb.Backbone, head: M.SequenceClassifier, channels_last: bool = True,
                 checkpointing: bool = False):
        super().__init__()
        self.entry = backbone.entry
        # channels_last for the trunk's weights as for its inputs (featurize.backbones.Embedder does both): mixed
        # formats make cuDNN convert every convolution's input or weights
        self.trunk = backbone.trunk.to(memory_format=torch.channels_last) if channels_last else backbone.trunk
        self.head = head
        self.channels_last = channels_last
        self.checkpointing = checkpointing
        self.trunk_trainable = True
        self.compiled = None  # --compile: featurize.compiled.CompiledOrEager over the trunk (compile_trunk)

    def compile_trunk(self, log=lambda s: None) -> None:
        """--compile: the trunk through torch.compile from now on (after SyncBatchNorm and the move to the device).
        The batch dimension is dynamic (a batch's real frames vary in number, and padding them would enter batch
        norm's statistics when it trains): one recompilation, then none."""
        from featseq.featurize.compiled import CompiledOrEager

        self.compiled = CompiledOrEager(self.trunk, log, dynamic=None)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        return (self.compiled or self.trunk)(x)

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        x = bb.preprocess(frames, self.entry, frames.device, self.channels_last)
        if not self.trunk_trainable:
            with torch.no_grad():
                return self._trunk(x).flatten(1)
        if self.checkpointing and self.training:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.trunk, x, use_reentrant=False).flatten(1)
        return self._trunk(x).flatten(1)

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


# ---------------------------------------------------------------- setup

def _source_cache(cfg: FinetuneConfig, spec: FeatureSpec | None, log) -> str:
    """The feature cache to read sequences from; a video source is featurized first with the run's spec (under
    torchrun: one shard per rank, merged by rank 0, as ``torchrun featseq featurize`` does)."""
    if str(cfg.cache).endswith((".h5", ".hdf5")):
        return cfg.cache
    from featseq.featurize.config import FeaturizeConfig
    from featseq.featurize.pipeline import featurize

    env = torchrun_env()
    shard = f"{env[0]}/{env[1]}" if env else None
    if spec is not None:
        fcfg = FeaturizeConfig(source=cfg.cache, **spec.featurize_options(spec.check_weights(f"--from {cfg.from_run}"),
                                                                                 device=cfg.device),
                               keep_frames=cfg.keep_frames, device=cfg.device, decode_timeout=cfg.decode_timeout,
                               shard=shard)
    elif cfg.backbone:  # what is not given takes featurize's defaults
        given = {k: getattr(cfg, k) for k in ("weights", "size", "fps") if getattr(cfg, k) is not None}
        fcfg = FeaturizeConfig(source=cfg.cache, backbone=cfg.backbone, keep_frames=cfg.keep_frames, device=cfg.device,
                               decode_timeout=cfg.decode_timeout, shard=shard, **given)
    else:
        raise UserError("SOURCE is a video source: pass --from RUN or --backbone/--weights/--size/--fps to featurize it")
    log(f"featurizing {cfg.cache} first ({fcfg.backbone}, {fcfg.size}px, {fcfg.fps:g} fps)")
    res = featurize(fcfg)
    if env:
        after_torchrun(res.target, log)
    return res.target


def _fold_from_ids(data: Sequences, split_ids: dict) -> Fold:
    pos = {s: i for i, s in enumerate(data.ids)}
    missing = [s for k in ("train", "val", "test") for s in split_ids[k] if s not in pos]
    if missing:
        raise UserError(f"the source lacks {len(missing)} segment(s) of the --from run's split, e.g. {missing[:3]}; "
                        f"fine-tune on the run's cache or one made from the same source")
    return Fold("warm-start split", *(np.array([pos[s] for s in split_ids[k]], dtype=np.int64) for k in ("train", "val", "test")))


def _resume_state(cfg: FinetuneConfig, run: Path, state_cfg: dict) -> dict | None:
    """The loop state of ``run/last.pt`` to continue from with --resume, else None (a fresh start)."""
    if not (cfg.resume and (run / LAST).exists()):
        return None
    last = checkpoint.load(run / LAST)
    if "best" not in last:
        raise UserError(f"--resume: {run / LAST} was written by an older featseq; rerun without --resume")
    if last["config"] != state_cfg:
        diff = [k for k in state_cfg if last["config"].get(k) != state_cfg[k]]
        raise UserError(f"--resume: {run} was started with other options ({', '.join(diff)}); use the same ones")
    return last


def _stopped(why: str, rk: Ranks, run: Path, finished: int, epochs: int, code: int) -> Stopped:
    """Why this rank stopped and how to go on from the last epoch saved."""
    who = f"rank {rk.rank} of {rk.world}: " if rk.world > 1 else ""
    if finished == 0:
        hint = "no epoch had finished: rerun the same command (with --resume it starts afresh where there is no last.pt)"
    elif rk.world > 1:
        hint = (f"epoch {finished} of {epochs} was the last this rank finished, and rank 0 saves every finished epoch to "
                f"{run / LAST}: rerun the same command with --resume, on any number of ranks, to continue from it")
    else:
        hint = f"{run / LAST} holds epoch {finished} of {epochs}: rerun the same command with --resume to continue"
    return Stopped(f"{who}{why}; {hint}", code)


# ---------------------------------------------------------------- finetune

def finetune(cfg: FinetuneConfig, log=lambda s: None) -> dict | None:
    """Fine-tune as configured and write the run folder; returns results.json's content (None on torchrun ranks
    other than 0, which write nothing).

    Options left at None are inherited from ``cfg.from_run`` (see :class:`FinetuneConfig`). Under torchrun every rank
    calls this with the same config (sequence.ddp). Process-wide settings: the CPU allocator is tuned here when the
    CNN runs on the CPU; threads are the caller's. Raises :class:`sequence.ddp.Stopped` when another rank died or a
    signal stopped it (featseq.common.signals.Interrupted), saying how to resume.
    """
    t0 = time.monotonic()
    tracking.require(cfg.track)  # a tracker that is not installed: refused now
    check_run_folder(cfg.out, cfg.overwrite, cfg.resume)  # a finished run is not replaced without --overwrite
    if cfg.from_run:  # a cross-validation (a sweep's cross-validated variant): its best fold's run
        if why := cv_split_problem(cfg.split):  # asked for; one inherited from such a run is the fold's split
            raise ValueError(why)
        cfg = replace(cfg, from_run=str(resolve_run_folder(cfg.from_run, "--from", log)))
    warm = Run(cfg.from_run, "--from") if cfg.from_run else None
    if warm is not None and warm.kind == "finetune":
        raise UserError(f"--from {cfg.from_run}: that is a finetune run; warm-start from a cached-feature run")
    cfg = cfg.inherit(warm.config if warm else None, warm.ckpt["reader"] if warm else None)
    cfg.validate()
    device = rank_device(cfg.device, bb.resolve_device(cfg.device))  # one GPU per torchrun rank
    world = (torchrun_env() or (0, 1))[1]
    if world > cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch of all {world} ranks: give every rank at "
                        f"least one clip (--batch-size >= {world})")
    if world > 1 and not cfg.freeze_bn and str(cfg.unfreeze) != "0" and device.type != "cuda":
        raise UserError(f"--train-bn on {world} ranks synchronises BatchNorm (SyncBatchNorm), which torch runs on GPUs "
                        f"only; on CPUs keep BatchNorm frozen (--freeze-bn, the default) or train in one process")
    done = {"epoch": 0}  # the last epoch this rank finished, for the message when it is stopped
    with ranks(device, cfg.dist_timeout) as rk:
        try:
            return _finetune(cfg, warm, device, rk, log if rk.main else (lambda s: None), t0, done)
        except Interrupted as e:  # SIGTERM / SIGINT (featseq.common.signals, installed by the CLI)
            why = (f"{e} (torchrun stops every rank when one fails; schedulers send it at a time limit)"
                   if e.name == "SIGTERM" else str(e))
            raise _stopped(why, rk, Path(cfg.out), done["epoch"], cfg.epochs, e.exit_code) from None
        except Exception as e:
            if rk.world > 1 and (what := lost_peer(e)):
                raise _stopped(f"lost another rank ({what})", rk, Path(cfg.out), done["epoch"], cfg.epochs, 1) from e
            raise


def _finetune(cfg: FinetuneConfig, warm: Run | None, device: torch.device, rk: Ranks, log, t0: float,
              done: dict) -> dict | None:
    cache_path = _source_cache(cfg, warm.spec if warm else None, log)
    cache = read_cache(cache_path, features=False)
    spec = FeatureSpec.from_attrs(cache.attrs)
    if spec.clip_stride:
        raise UserError(f"{cache_path}: its features are clips of {spec.clip_frames} frames ({spec.backbone}); finetune "
                        f"trains a frame backbone on kept frames, one image at a time, and cannot train a clip backbone "
                        f"yet: train on the cached clip features (featseq train) instead")
    if spec.crops != 1:
        raise UserError(f"{cache_path}: its features average {spec.crops} crops of each frame (--crops {spec.crops}); "
                        f"finetune trains on one view per frame, so featurize with --crops 1 --keep-frames to fine-tune")
    if warm is not None and (diff := warm.spec.same_features(spec)):
        raise UserError(f"{cache_path} was not featurized like the --from run's features ({'; '.join(diff)}); "
                        f"fine-tune on the run's cache, or pass a video source to featurize it with the run's settings")
    data = build(cache, cfg.reader(), classes=warm.classes if warm else None)
    if device.type == "cpu":
        tune_cpu_allocator()
    backbone = bb.create_backbone(spec.backbone, spec.check_weights(cache_path), spec.seed, spec.pool, size=spec.size)
    if warm is None:  # --split auto: chosen from the cache's groups, as train chooses (with --from: the run's ids)
        cfg = choose_split(cfg, data.groups, data.keep, log, labels=data.label_names, ids=data.ids)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        if warm is not None:
            head, fold = warm.model, _fold_from_ids(data, warm.split_ids)
        else:
            head = M.create_model(cfg.model, backbone.entry.feature_dim, len(data.classes), **cfg.model_kwargs())
            fold = folds_for(cfg, data, cache, log)[0]
        model = CNNSequence(backbone, head, cfg.channels_last and device.type == "cuda", cfg.checkpointing)
        trunk_params = set_trainable(model, backbone, str(cfg.unfreeze))
        if rk.world > 1 and not cfg.freeze_bn and model.trunk_trainable:  # the same parameters, synchronised stats
            model.trunk = nn.SyncBatchNorm.convert_sync_batchnorm(model.trunk)
        if rk.world > 1:
            torch.manual_seed(cfg.seed + rk.rank)  # dropout: each rank its own masks, deterministic from --seed
        model = model.to(device)
        if cfg.compile:
            model.compile_trunk(log)
        groups = [{"params": list(model.head.parameters()), "lr": cfg.lr}]
        if trunk_params:
            groups.append({"params": trunk_params, "lr": cfg.backbone_lr})
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        prec = resolve_precision(cfg.precision, device)
        bb.cuda_math(prec, device)  # fp32 on CUDA without TF32, as featurize
        amp = Amp(device, prec)
        run = Path(cfg.out)
        state_cfg = {k: v for k, v in asdict(cfg).items()
                     if k not in ("resume", "overwrite", "epochs", "out", "device", "threads", "dist_timeout", "track",
                                  "decode_workers", "compile")}

        def prepare() -> dict | None:  # rank 0: the run folder, and the state to resume from
            # an old run's files go first; --resume keeps them
            return begin_run(run, asdict(cfg), cfg.overwrite, cfg.resume, log,
                             check=lambda r: _resume_state(cfg, r, state_cfg))[1]

        resume = rk.on_main(prepare)
        done["epoch"] = resume["epoch"] if resume else 0
        # rank 0 reports; --resume goes on in the run's MLflow run (RUN/tracking.json)
        tracker = tracking.open_run(cfg.track if rk.main else "none", run, asdict(cfg), resume=cfg.resume)
        log_epoch = tracker.epoch()

        def on_epoch(state: dict) -> None:
            done["epoch"] = state["epoch"]
            if rk.main:
                checkpoint.save({**state, "config": state_cfg}, run / LAST)
                log_epoch(state)

        frames = Frames(cache, data, spec, cfg.decode_timeout, device, cfg.decode_workers)
        log(f"finetune {backbone.entry.name} (unfreeze {cfg.unfreeze}: {sum(p.numel() for p in trunk_params)} trunk "
            f"parameters trainable) + {head.config['name']}: {len(fold.train)} train / {len(fold.val)} val / "
            f"{len(fold.test)} test, seq_len {data.seq_len} at {data.fps:g} fps, "
            f"{'frames from the cache' if frames.kept else 'frames decoded from video'}"
            + (f"; {rk.world} ranks ({rk.backend}), global batch {cfg.batch_size}" if rk.world > 1 else ""))
        per_rank = -(-cfg.batch_size // rk.world)  # clips of a training batch on one rank, at most
        inputs = FrameInputs(frames, per_rank, cfg.augment)
        try:
            result = fit(model, inputs, data, fold, opt, FitOptions.of(cfg), device, amp=amp,
                         train_mode=lambda: train_mode(model, cfg.freeze_bn), start_is_candidate=warm is not None,
                         resume=resume, on_epoch=on_epoch, log=log, ranks=rk)
            probs = probabilities(model, inputs, data.mask, len(data.classes), device, amp, rk, result.best_logits)
        except BaseException as e:
            tracker.end(e)
            raise
        finally:
            frames.close()
    if not rk.main:
        return None
    with tracker:
        res, _ = write_run(
            run, cfg=cfg, data=data, fold=fold, head=model.head, fit=result, probs=probs, spec=spec, cache=cache,
            device=device, kind="finetune",
            extra_checkpoint={"trunk": {k: v.cpu() for k, v in model.trunk.state_dict().items()}},
            extra_results={"mode": "finetune", "backbone": backbone.entry.name, "unfreeze": cfg.unfreeze,
                           "trainable_trunk_params": sum(p.numel() for p in trunk_params), "params": M.n_params(model),
                           "precision": prec, "frames_from": "cache" if frames.kept else "video",
                           "warm_start": cfg.from_run, "warm_start_scores": result.start_scores,
                           "ranks": rk.world, "backend": rk.backend or None,
                           "batch_per_rank": per_rank}, started=t0)
        tracker.finish(res, tracking.run_files(run))
    return res
