"""Train one sequence model on a feature cache and write a run folder (sequence.run); re-score a saved run.

``train`` builds the sequences (sequence.reader), the split (sequence.splits) and the model
(sequence.models), fits it with the one training loop (sequence.loop) and writes the run folder with the
one writer (sequence.run.write_run). Cross-validation splits write one run folder per fold under
``folds/`` and, at the top, the mean and std over folds and the out-of-fold predictions.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from featseq.featurize.allocator import tune_cpu_allocator
from featseq.featurize.backbones import resolve_device
from featseq.featurize.cache import Cache
from featseq.common.errors import UserError
from featseq.featurize.spec import FeatureSpec

from . import models as M
from . import tracking
from .config import TrainConfig
from .loop import FeatureInputs, FitOptions, fit, probabilities
from .reader import Sequences, build, load_features
from .results import cv_results, eval_results
from .run import Run, begin_run, check_run_folder, resolve_run_folder, write_run, write_scores
from .splits import Fold, choose_split, folds_for, split_entry


def train_fold(cfg: TrainConfig, data: Sequences, fold: Fold, run: Path, cache: Cache, spec: FeatureSpec,
               device: torch.device, log=lambda s: None, on_epoch=None, started: float | None = None,
               load_s: float | None = None) -> tuple[dict, np.ndarray]:
    """Fit one model on one fold and write its run folder; returns (results, probabilities of every segment).
    ``started``, ``load_s``: the run's start and loading time, for its results' timings (not a fold's).

    Initialisation and dropout draw from torch's RNG seeded by ``cfg.seed`` inside a fork of it: the caller's
    RNG state is left as it was."""
    t_setup = time.monotonic()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        model = M.create_model(cfg.model, data.features.shape[1], len(data.classes), **cfg.model_kwargs())
        if cfg.standardize and len(fold.train):
            m = data.mask[fold.train]
            model.norm.fit(data.features, data.rows[fold.train][m])
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        inputs = FeatureInputs.of(data, device)
        setup_s = time.monotonic() - t_setup
        result = fit(model, inputs, data, fold, opt, FitOptions.of(cfg), device, log=log, on_epoch=on_epoch)
        t_score = time.monotonic()
        wanted = data.mask
        if not cfg.score_train:  # only what the best epoch scored (validation, test): training rows stay empty
            wanted = data.mask.clone()
            wanted[torch.as_tensor(fold.train, dtype=torch.long)] = False
        probs = probabilities(model, inputs, wanted, len(data.classes), device, known=result.best_logits)
        score_s = time.monotonic() - t_score
    res, _ = write_run(run, cfg=cfg, data=data, fold=fold, head=model, fit=result, probs=probs,
                       spec=spec, cache=cache, device=device, started=started, load_s=load_s, setup_s=setup_s,
                       score_s=score_s)
    return res, probs


def train(cfg: TrainConfig, log=lambda s: None, data: tuple[Cache, torch.Tensor] | None = None,
          on_epoch=None, nest: tracking.Nest | None = None) -> dict:
    """Train as configured and write the run folder ``cfg.out``; returns results.json's content.

    ``data``: the cache and its features (in its dtype) already loaded (:func:`sequence.reader.load_features`), when
    many runs share one cache (a sweep). ``on_epoch(state)``: called after every epoch with the training loop's
    state (``state["history"][-1]`` is the epoch's record; an exception it raises stops the run, e.g. a pruned
    sweep trial), in every fold of a cross-validation. Process-wide settings (threads) are the caller's.
    ``cfg.track``: the trackers the run reports to (sequence.tracking), after its folder is ready; ``nest``: the
    larger run it is part of (a sweep's trial, a compare's run).
    Raises ValueError for invalid options, CacheError/ReaderError for caches that cannot serve the
    request, SplitError for impossible splits -- all before any training.
    """
    cfg.validate()
    tracking.require(cfg.track)  # a tracker that is not installed: refused now
    check_run_folder(cfg.out, cfg.overwrite)  # a finished run is not replaced without --overwrite: refused now
    t0 = time.monotonic()
    cache, feats = data if data is not None else load_features(cfg.cache)
    spec = FeatureSpec.from_attrs(cache.attrs)  # a cache featurize did not write is refused now, not after training
    seqs = build(cache, cfg.reader(), features=feats)
    M.create_model(cfg.model, seqs.features.shape[1], max(2, len(seqs.classes)), **cfg.model_kwargs())  # option errors now
    cfg = choose_split(cfg, seqs.groups, seqs.keep, log, labels=seqs.label_names, ids=seqs.ids)  # --split auto
    folds = folds_for(cfg, seqs, cache, log)
    if len(seqs.classes) < 2:
        raise UserError(f"{cfg.cache}: only one class ({', '.join(seqs.classes)}) among the usable segments; "
                        f"classification needs at least 2")
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        tune_cpu_allocator()  # glibc keeps freed batch buffers: per batch no mapping, faulting and zeroing afresh
    t_load = time.monotonic() - t0
    # results.json is written last, so its presence means "complete"; an old run's files (folds/ of a
    # cross-validation, predictions...) are deleted before a new run is written into its folder
    run, _ = begin_run(cfg.out, asdict(cfg), cfg.overwrite, log=log)
    with tracking.tracked(cfg.track, run, asdict(cfg), nest=nest) as tracker:
        if not split_entry(cfg.split).cv:
            log(f"{cfg.model}: {len(folds[0].train)} train / {len(folds[0].val)} val / {len(folds[0].test)} test "
                f"segments, seq_len {seqs.seq_len} at {seqs.fps:g} fps")
            res, _ = train_fold(cfg, seqs, folds[0], run, cache, spec, device, log,
                                tracking.chain(tracker.epoch(), on_epoch), started=t0, load_s=t_load)
        else:
            res = _cross_validate(cfg, seqs, folds, run, cache, spec, device, log,
                                  lambda fold: tracking.chain(tracker.epoch(f"{fold}/"), on_epoch), started=t0,
                                  load_s=t_load)
        tracker.finish(res, tracking.run_files(run))
    return res


def _cross_validate(cfg, data, folds, run, cache, spec, device, log, on_epoch=lambda fold: None, started=0.0,
                    load_s=0.0) -> dict:
    """``on_epoch(fold name)``: the training loop's on_epoch for that fold."""
    per_fold = []
    probs_oof = np.full((len(data), len(data.classes)), np.nan)
    for fold in folds:
        log(f"{fold.name}: {len(fold.train)} train / {len(fold.val)} val / {len(fold.test)} test")
        r, probs = train_fold(cfg, data, fold, run / "folds" / fold.name, cache, spec, device,
                              on_epoch=on_epoch(fold.name))
        probs_oof[fold.test] = probs[fold.test]
        per_fold.append(r)
        log(f"{fold.name}: test accuracy {r['test_accuracy']:.3f}")
    split = np.where(data.keep, "test", "dropped").astype(object)
    scored = np.zeros(len(data), bool)
    for f in folds:
        scored[f.test] = True
    scores = write_scores(run, data, split, probs_oof, scored, cfg.plots, title="out-of-fold")
    res = cv_results(cfg=cfg, data=data, per_fold=per_fold, scores=scores, cache=cache, device=device,
                     timings={"load_s": round(load_s, 3), "total_s": round(time.monotonic() - started, 3)})
    res.write(run)
    return res.content


# ---------------------------------------------------------------- evaluate

def evaluate(run_dir: str, cache_path: str | None = None, out: str | None = None, device: str = "auto",
             plots: bool = True, score_all: bool = False) -> dict:
    """Re-score a saved run on its own cache or on another one with the same feature dimension.

    Segments whose id the run trained or validated on keep that split and are skipped (counted in ``n_skipped``
    per part: another cache whose ids match the run's, e.g. long-video cuts named like the clips, can have every
    segment skipped), unless ``score_all``; every other segment with a label the model knows is scored. Writes
    ``out`` (default ``RUN_DIR/eval_<cache name>``): results.json (sequence.results.eval_results), predictions.csv,
    per-class files, confusion.png.
    """
    run = Run(resolve_run_folder(run_dir))  # a cross-validation: its best fold
    path = cache_path or run.cache_path
    cache, feats = load_features(path)
    data = run.sequences(cache, feats)
    t0 = time.monotonic()
    probs = run.probabilities(data, resolve_device(device))
    split = np.where(data.keep, "test", "dropped").astype(object)
    for name in ("train", "val"):
        ids = set(run.split_ids[name])
        split[[i for i, s in enumerate(data.ids) if s in ids]] = name
    y = data.labels.numpy()
    seen = np.isin(split, ["train", "val"])
    scored = ((split == "test") | (seen & score_all)) & (y >= 0)
    skipped = {name: 0 if score_all else int((split == name).sum()) for name in ("train", "val")}
    dest = Path(out) if out else Path(run_dir) / f"eval_{Path(path).stem}"
    dest.mkdir(parents=True, exist_ok=True)
    scores = write_scores(dest, data, split, probs, scored, plots, title=f"evaluate: {Path(path).name}")
    counts = {"unknown_label": int(((split == "test") & (y < 0)).sum()),
              "n_train_ids_seen": int((split == "train").sum()), "n_skipped": skipped}
    res = eval_results(run=str(run_dir), cache=cache, same_cache=os.path.abspath(path) == run.cache_path, data=data,
                       scores=scores, counts=counts, score_all=score_all, seconds=time.monotonic() - t0, out=str(dest))
    res.write(dest)
    return res.content
