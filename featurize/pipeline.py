"""featurize: source -> validated segments -> decode worker -> backbone -> HDF5 cache.

One function; its config is featurize/config.py's FeaturizeConfig.
"""
from __future__ import annotations

import json
import os
import platform
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

# torch before decord in any process that may use CUDA (decord issue 293): backbones imports torch.
from . import backbones as bb
from .cache import CacheError, check_identity, now_iso, read_table, string_widths
from .verify import source_changes
from .writer import CacheWriter
from .allocator import tune_cpu_allocator
from .config import FeaturizeConfig
from .clip_embed import ClipEmbedder
from .clips import clip_settings
from .geometry import decode_side, legacy_resize_size
from .preprocessing import older_cache_note, resolve as resolve_preprocessing
from .reconcile import reconcile
from .resume import decoder_for, precision_for
from . import shard as shard_mod
from featseq.common.procgroup import decode_device as decode_device_for, rank_device
from featseq.common.files import replaced
from featseq.common.errors import UserError
from .sources import Segment, SourceError, read_source, validate
from .spec import featurize_command, identity as cache_identity, weights_id
from .messages import CHUNK, DONE, ERROR, START
from .worker import DecodePool, decode_job, default_workers

@dataclass
class FeaturizeResult:
    path: str                # the file written: the cache, or a shard's part file
    total: int
    written: int
    skipped_done: int
    failures: dict[str, str] = field(default_factory=dict)
    frames: int = 0
    seconds: float = 0.0  # the whole call
    stream_seconds: float = 0.0  # decode + embed + write, without validation and model building
    target: str = ""  # the cache (a shard's parts merge into it)
    compile_s: float = 0.0  # --compile: the compilation (the first batch's wait), within the seconds above
    cpu_fallback: dict[str, str] = field(default_factory=dict)  # video -> why NVDEC left it to the CPU decoder

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_frames_per_s(self) -> float:
        """Frames/s of the whole call without the compilation's wait (= frames_per_s without --compile)."""
        busy = self.seconds - self.compile_s
        return self.frames / busy if busy > 0 else 0.0


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", s).strip("-") or "x"


def default_cache_path(cfg: FeaturizeConfig, precision: str, wid: str, clip: tuple[int, int] = (0, 0)) -> str:
    src = Path(cfg.source).resolve()
    name = src.stem if src.is_file() else src.name
    fps = f"{cfg.fps:g}"
    parts = [name, cfg.backbone.replace(":", "-"), wid, f"{cfg.size}px", cfg.resize]
    parts += [f"from{cfg.resize_size}"] if cfg.resize_size != legacy_resize_size(cfg.size, cfg.resize, cfg.crops) else []
    parts += [cfg.interpolation] if cfg.interpolation != "bilinear" else []
    parts += [f"{fps}fps", precision]
    parts += ([f"pool-{cfg.pool}"] if cfg.pool != "default" else []) + ([f"{cfg.crops}crops"] if cfg.crops != 1 else [])
    parts += [f"clips{clip[0]}every{clip[1]}"] if clip[1] else []
    if cfg.dtype != "float16":
        parts.append(cfg.dtype)
    if cfg.keep_frames:
        parts.append("frames")
    return str(Path(cfg.cache_dir) / ("__".join(_slug(p) for p in parts) + ".h5"))


def _versions(decoder: str) -> dict:
    import importlib.metadata as md

    import h5py
    import torch
    import torchvision

    v = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
         "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version, "numpy": np.__version__}
    for name, dist in (("av", ["av"]), ("decord", ["decord", "decord2"]), ("torchcodec", ["torchcodec"]), ("timm", ["timm"])):
        if name in ("av", "timm", decoder):
            for d in dist:
                try:
                    v[name] = f"{md.version(d)} ({d})" if name == "decord" else md.version(d)
                    break
                except md.PackageNotFoundError:
                    pass
    return v


ProgressFn = Callable[[dict], None]


def featurize(cfg: FeaturizeConfig, progress: ProgressFn | None = None, log: Callable[[str], None] = lambda s: None,
              segments: list[Segment] | None = None) -> FeaturizeResult:
    """Cache the features of every segment of ``cfg.source``; resumes an existing cache.

    ``segments``: records to featurize instead of reading ``cfg.source`` (then only a name for the
    cache's ``source`` attribute), e.g. the videos handed to predict.
    Raises SourceError (bad source, nothing written), CacheError (lock, mismatched request),
    bb.WeightsError / ValueError (options). Per-video decode failures are returned in
    ``FeaturizeResult.failures`` and also written to ``<cache>.errors.json``.
    """
    cfg.validate()
    cfg = resolve_preprocessing(cfg)  # size, resize, resize size and interpolation: the model's own unless given
    t0 = time.monotonic()
    clip_frames, clip_stride = clip_settings(cfg.backbone, cfg.clip_frames, cfg.clip_stride, cfg.keep_frames,
                                             cfg.crops, cfg.pool)
    if segments is None:
        kind, segments, row_problems = read_source(cfg.source)
        source_id = str(Path(cfg.source).resolve())
    else:
        kind, row_problems, source_id = "records", [], cfg.source
    shard = shard_mod.parse(cfg.shard)
    device = rank_device(cfg.device, bb.resolve_device(cfg.device))  # one GPU per torchrun rank
    sha = bb.sha256_file(cfg.weights) if cfg.weights not in ("none", "imagenet") and os.path.isfile(cfg.weights) else ""
    wid = weights_id(cfg.weights, sha, cfg.seed)
    precision = precision_for(cfg, device, shard, lambda p: default_cache_path(cfg, p, wid, (clip_frames, clip_stride)),
                               log)
    target = cfg.out or default_cache_path(cfg, precision, wid, (clip_frames, clip_stride))
    note = None if cfg.out else older_cache_note(
        cfg, target, lambda c: default_cache_path(c, precision, wid, (clip_frames, clip_stride)))
    if note:
        log(note)
    path = shard_mod.part_path(target, *shard) if shard else target
    decoder = decoder_for(cfg, [path, target])
    identity = cache_identity(backbone=cfg.backbone, weights=wid, weights_sha256=sha, seed=cfg.seed, size=cfg.size,
                              resize=cfg.resize, fps=float(cfg.fps) / (clip_stride or 1), precision=precision, dtype=cfg.dtype,
                              keep_frames=bool(cfg.keep_frames), decoder=decoder, decode_device=cfg.decode_device,
                              pool=cfg.pool, crops=cfg.crops, clip_frames=clip_frames, clip_stride=clip_stride,
                              interpolation=cfg.interpolation, resize_size=cfg.resize_size)
    done: set[str] = set()
    stale: dict[str, str] = {}  # id -> how its video changed since it was cached (re-featurized with --refresh)
    mine: set[str] | None = None  # a shard's segment ids (None: every segment)
    paths = {s.id: s.path for s in segments}
    sound = not row_problems and len(paths) == len(segments)  # else validation refuses the source: change nothing
    if os.path.exists(path):  # refuse a mismatched request, or skip finished work, before probing or building a model
        have, table = read_table(path)
        check_identity(path, have, identity)
        if have.get("source") not in (None, source_id):
            log(f"note: {path} was made from {have.get('source')}; resuming it from {source_id} by segment id")
        done = {x.decode() for x in table["id"]}
        stale = _changed(path, source_changes(table, paths), cfg.refresh, log)
        if sound:
            _reconcile(path, segments, kind != "records" and not shard, log)
        done -= set(stale)
        if shard and "shard_plan" in have:
            mine = {i for i, k in have["shard_plan"].items() if k == shard[0]}
    if shard and os.path.exists(target):  # segments an earlier merge put in the cache itself are done too
        have, table = read_table(target)
        check_identity(target, have, identity)
        if changed := source_changes(table, paths):
            raise SourceChangedError(target, changed, "refresh the merged cache in one process: "
                                     f"{featurize_command(have, target, source=cfg.source)} --shard none --refresh")
        done |= {x.decode() for x in table["id"]}
        if sound:
            _reconcile(target, segments, True, log)
    todo = [s for s in segments if s.id not in done and (mine is None or s.id in mine)]
    total = len(segments) if mine is None else len(mine)
    result = FeaturizeResult(path=path, total=total, written=0, skipped_done=total - len(todo), target=target)
    if not todo and row_problems:
        raise SourceError(cfg.source, row_problems)
    if not todo and (mine is not None or not shard):
        log(f"all {total} segments already cached")
        result.seconds = time.monotonic() - t0
        return result

    plan = None
    workers = cfg.decode_workers or default_workers(cfg.decode_device, device.type)
    decode_on = decode_device_for(cfg.decode_device, device)  # a rank's workers decode on its own GPU
    log(f"decoding with {decoder} on {decode_on if decode_on != 'cpu' else 'the CPU'}, "
        f"{workers} worker process{'es' if workers > 1 else ''}")
    with DecodePool(timeout=cfg.decode_timeout, workers=workers, decoder=decoder,
                    decode_device=decode_on, log=log) as pool:  # the same workers probe, then decode
        t_valid = time.monotonic()
        if shard and mine is None:  # every shard probes every video to make the same balanced plan
            infos, skipped = validate(cfg.source, segments, pool.probe, skip_unreadable=cfg.skip_errors,
                                      problems=row_problems)
            plan = shard_mod.assign(shard_mod.expected_frames(segments, infos, cfg.fps), shard[1])
            mine = {s.id for s in segments if plan[s.id] == shard[0]}
            todo = [s for s in todo if s.id in mine]
            skipped = {i: why for i, why in skipped.items() if i in mine}
            result.total, result.skipped_done = len(mine), len(mine) - len(todo)
            log(f"shard {shard[0]} of {shard[1]}: {len(mine)} of {len(segments)} segments, "
                f"{sum(shard_mod.expected_frames([s for s in segments if s.id in mine], infos, cfg.fps).values())} frames "
                f"-> {path}")
        else:
            infos, skipped = validate(cfg.source, segments, pool.probe, skip_unreadable=cfg.skip_errors,
                                      only={s.id for s in todo}, problems=row_problems)
        log(f"validated {len(segments)} segment(s) of {len({s.path for s in segments})} video(s) in "
            f"{time.monotonic() - t_valid:.1f} s (reading the source and the cache before: {t_valid - t0:.1f} s)")
        rotated = {p: i["rotation"] for p, i in infos.items() if i.get("rotation")}
        for p, deg in list(rotated.items())[:20]:
            log(f"note: {p} asks players to rotate it by {deg} degrees; featseq decodes frames as stored (every "
                f"backend alike), so they reach the CNN unrotated; to featurize them upright, rotate the file first "
                f"(ffmpeg -i IN -c:v libx264 OUT rotates by its metadata)")
        result.failures.update(skipped)
        if device.type == "cpu":
            tune_cpu_allocator()  # once per process, before the CNN's first batch
        backbone = bb.create_backbone(cfg.backbone, cfg.weights, cfg.seed, cfg.pool, cfg.crops, cfg.size)
        if clip_stride and cfg.compile:
            log("note: --compile applies to frame backbones; the clip backbone runs eagerly")
        embed = (ClipEmbedder(backbone, device, precision) if clip_stride
                 else bb.Embedder(backbone, device, precision, cfg.channels_last, compile=cfg.compile,
                                  batch_size=cfg.batch_size, log=log))
        attrs = {
            "source": source_id, "source_kind": kind,
            "weights_path": os.path.abspath(cfg.weights) if cfg.weights not in ("none", "imagenet") else "",
            "mean": list(backbone.entry.mean), "std": list(backbone.entry.std), "created": now_iso(),
            "model_interpolation": backbone.entry.interpolation, "crop_pct": backbone.entry.crop_pct,
            "decode_size": decode_side(cfg.size, cfg.crops, cfg.resize_size, cfg.resize), "frame_fps": float(cfg.fps),
            "versions": _versions(decoder), "config": {**asdict(cfg), "precision": precision, "device": str(device),
                                                  "decoder": decoder, "decode_workers": workers},
            "resize_policy": (f"squash: whole frame resized to {cfg.resize_size}" if cfg.resize == "squash"
                              else f"crop: shorter side resized to {cfg.resize_size}")
            + f" ({cfg.interpolation}), centre crop {cfg.size} x {cfg.size}",
        }
        if shard:
            attrs.update(shard_index=shard[0], shard_count=shard[1], shard_plan=plan)
        rows = [{"id": s.id, "label": s.label, "group": s.group, "path": s.path, "split": s.split} for s in segments]
        with CacheWriter(path, identity, attrs, backbone.entry.feature_dim, string_widths(rows), cfg.dtype,
                         frame_size=cfg.size if cfg.keep_frames else None, drop=set(stale),
                         background=device.type == "cuda") as writer:  # GPU: commits off the feeder's thread

            if writer.dropped:
                log(f"--refresh: removed the {len(writer.dropped)} stale segment(s) from {path}; featurizing them again")
            # another run may have finished some meanwhile
            todo = [s for s in todo if s.id not in skipped and s.id not in writer.done_ids]
            if not writer.holds("split") and any(s.split for s in todo):
                raise CacheError(f"{path} is a format-1 cache, whose segment table has no split column, and the source "
                                 f"gives splits ({cfg.source}); featurize into a new --out to keep them")
            t_start = time.monotonic()
            with host_threads(device):
                _stream(cfg, pool, writer, embed, todo, result, progress, log, t_start, (clip_frames, clip_stride))
            result.stream_seconds = time.monotonic() - t_start
            result.compile_s = getattr(embed, "warmup_s", 0.0)
            if result.compile_s:
                log(f"--compile: compiled the CNN in {result.compile_s:.1f} s (the first batch's wait)")
    result.seconds = time.monotonic() - t0
    _write_error_report(path, result)
    return result


@contextmanager
def host_threads(device):
    """While a GPU runs the CNN, the parent's torch work on the CPU is small (pinned copies); one torch thread keeps
    its pool from spinning beside the decode workers. Restored after (the CPU's CNN keeps torch's threads)."""
    import torch

    before = torch.get_num_threads()
    if device.type == "cuda":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SourceChangedError(UserError):
    """Cached segments whose videos changed since (size or mtime); the message lists them and the fix."""

    def __init__(self, path: str, changed: dict[str, str], fix: str):
        shown = [f"{sid}: {why}" for sid, why in list(changed.items())[:50]]
        more = f"\n  ... and {len(changed) - 50} more" if len(changed) > 50 else ""
        super().__init__(f"{path}: {len(changed)} cached segment(s) have videos that changed since they were featurized "
                         f"(size or modification time differ from those recorded), so their features may be stale:\n  "
                         + "\n  ".join(shown) + more + f"\n  {fix}")
        self.changed = changed


def _reconcile(path: str, segments: list[Segment], whole: bool, log: Callable[[str], None]) -> None:
    """Labels, groups and splits of the cached segments follow the source (featurize.reconcile); ``whole``: the cache
    should hold the whole source, so cached segments it no longer lists are noted."""
    d = reconcile(path, segments, log)
    if whole and d.extra:
        log(f"note: {path} holds {len(d.extra)} segment(s) the source no longer lists (kept, and used by train and "
            f"friends), e.g. {', '.join(d.extra[:5])}; featurize into a new --out for a cache of this source alone")


def _changed(path: str, changed: dict[str, str], refresh: bool, log: Callable[[str], None]) -> dict[str, str]:
    """Refuse cached segments whose videos changed, or (``refresh``) return them to be featurized again."""
    if changed and not refresh:
        raise SourceChangedError(path, changed, "Pass --refresh to featurize them again (their old rows are removed), "
                                                "or restore the videos that were cached.")
    for sid, why in changed.items():
        log(f"--refresh: {sid} changed ({why})")
    return changed


GPU_QUEUE = 2  # batches queued on a GPU while the host works: 1 left it idle through commits (issue 31, item 13)


def _stream(cfg: FeaturizeConfig, pool: DecodePool, writer: CacheWriter, embed: bb.Embedder, todo: list,
            result: FeaturizeResult, progress: ProgressFn | None, log: Callable[[str], None], t_start: float,
            clip: tuple[int, int] = (0, 0)) -> None:
    """Decode (workers) -> batches across segment boundaries -> CNN -> publish each segment as it completes.
    ``clip`` (T, stride) of a clip backbone: a segment's frames are held until it is decoded, then embedded as clips.

    With several decode workers segments complete in any order; the cache's segment table is the truth."""
    by_key = dict(enumerate(todo))
    size = decode_side(cfg.size, cfg.crops, cfg.resize_size, cfg.resize)
    jobs = [decode_job(i, s.path, s.start, s.end, cfg.fps, size, cfg.resize, cfg.batch_size, cfg.resize_size,
                       cfg.interpolation) for i, s in by_key.items()]
    total = len(todo) + len(result.failures)
    pending: dict[int, dict] = {}  # segments being decoded/embedded
    batch: list[tuple[int, np.ndarray]] = []

    inflight: list[tuple] = []  # (embedder handle, [(key, frames)]) submitted, oldest first

    def run_batch(flush: bool = False) -> None:
        """Submit the gathered batch (its chunks gathered straight into pinned memory on a GPU); collect every
        submitted batch but the newest ``GPU_QUEUE`` (all when ``flush``), so on a GPU the CNN has batches queued
        while the host gathers the next one and commits finished segments (a burst of commits no longer idles it)."""
        if batch:
            inflight.append((embed.submit([b[1] for b in batch]), [(k, len(fr)) for k, fr in batch]))
            batch.clear()
        while len(inflight) > (GPU_QUEUE if embed.device.type == "cuda" and not flush else 0):
            handle, parts = inflight.pop(0)
            feats, pos = embed.result(handle), 0
            for key, n in parts:
                if key in pending:
                    pending[key]["feats"].append(feats[pos:pos + n])
                pos += n

    def commit_ready() -> None:
        for key in [k for k, st in pending.items() if st["done"] and sum(len(x) for x in st["feats"]) == st["n"]]:
            st = pending.pop(key)
            seg, info = by_key[key], st["info"]
            if st["n"] == 0:
                result.failures[seg.id] = f"{seg.path}: no frame sampled in [{seg.start:g}, {seg.end if seg.end is not None else 'end'})"
                continue
            feats = np.concatenate(st["feats"])
            check_range(feats, cfg.dtype, seg.id, writer.path)
            writer.append({
                "id": seg.id, "label": seg.label, "group": seg.group, "path": seg.path, "split": seg.split,
                "start": seg.start,
                "end": min(seg.end, info["duration"]) if seg.end is not None else info["duration"],
                "video_width": info["width"], "video_height": info["height"], "video_fps": info["fps"],
                "video_duration": info["duration"], "video_frames": info["n_frames"],
                "video_size": info["size_bytes"], "video_mtime": info["mtime"],
            }, feats.astype(cfg.dtype), np.concatenate(st["ts"]),
                np.concatenate(st["frames"]) if cfg.keep_frames else None)
            result.written += 1
            result.frames += st["n"]
            if progress:
                progress({"done": result.written + len(result.failures), "total": total, "frames": result.frames,
                          "elapsed": time.monotonic() - t_start, "segment": seg.id})

    for msg in pool.run(jobs, idle=writer.publish_due):  # held segments wait about CacheWriter.group_seconds at most
        writer.publish_due()
        kind, key = msg.kind, msg.key
        if kind == START:
            pending[key] = {"info": msg.info, "feats": [], "ts": [], "frames": [], "n": 0, "done": False}
        elif kind == CHUNK:
            st = pending[key]
            st["ts"].append(msg.times)
            st["n"] += len(msg.frames)
            if cfg.keep_frames or clip[1]:
                st["frames"].append(msg.frames)
            if clip[1]:
                continue
            batch.append((key, msg.frames))
            if sum(len(b[1]) for b in batch) >= cfg.batch_size:
                run_batch()
                commit_ready()
        elif kind == DONE:
            if msg.fallback and by_key[key].path not in result.cpu_fallback:  # once per video, never silently
                result.cpu_fallback[by_key[key].path] = msg.fallback
                log(f"warning: {by_key[key].path}: NVDEC could not decode it ({msg.fallback}); FFmpeg decoded it on "
                    f"the CPU (slower, and colour-converted as on the CPU)")
            if clip[1]:
                embed.finish(pending[key], *clip)
            pending[key]["done"] = True
            commit_ready()
        elif kind == ERROR:
            pending.pop(key, None)
            batch[:] = [b for b in batch if b[0] != key]
            result.failures[by_key[key].id] = msg.message
            log(f"skipped {by_key[key].id}: {msg.message}")
            commit_ready()
    run_batch(flush=True)
    commit_ready()


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


class FeatureRangeError(UserError):
    """Features that can't be stored as asked (NaN / Inf from the CNN, or beyond float16's range)."""


def check_range(feats: np.ndarray, dtype: str, seg_id: str, path: str) -> None:
    """Refuse features that would be written as NaN or Inf: non-finite from the CNN (an fp16 autocast overflow), or
    finite but beyond float16's +-65504 when stored as float16 (VGG16 or an untrained backbone can reach that)."""
    finite = np.isfinite(feats)
    if not finite.all():
        raise FeatureRangeError(
            f"{path}: segment {seg_id!r}: the backbone gave {int((~finite).sum())} NaN or Inf feature value(s), so "
            f"nothing of it was written (segments before it are kept). With --precision fp16 or bf16 the CNN's "
            f"activations may overflow: featurize with --precision fp32 into a new --out")
    peak = float(np.abs(feats).max()) if feats.size else 0.0
    if dtype == "float16" and peak > FLOAT16_MAX:
        raise FeatureRangeError(
            f"{path}: segment {seg_id!r}: features reach {peak:.4g}, beyond float16's range (+-{FLOAT16_MAX:g}): stored "
            f"as float16 they would become Inf, so nothing of it was written (segments before it are kept). Featurize "
            f"with --dtype float32 into a new --out (a cache keeps one dtype)")


def _write_error_report(path: str, result: FeaturizeResult) -> None:
    report = path + ".errors.json"
    if result.failures:
        with replaced(report) as tmp, open(tmp, "w") as fh:
            json.dump({"cache": path, "failed": result.failures}, fh, indent=2)
    elif os.path.exists(report):
        os.remove(report)
