"""featseq command line: a thin click layer. Each command builds a config, calls one function,
prints the result path last. Errors in the user's input exit with code 2 and a clear message."""
from __future__ import annotations

import json
import os
import sys
import time

import click


class Progress:
    """featurize's progress on stderr (tqdm): a live bar on a terminal; a plain line every few seconds in a log."""

    def __init__(self, label: str = "featurize"):
        self.label = label
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.last = 0.0

    def __call__(self, p: dict) -> None:
        from tqdm import tqdm

        rate = f"{p['frames']} frames, {p['frames'] / max(p['elapsed'], 1e-9):.1f} frames/s"
        if self.tty:
            if self.bar is None:
                self.bar = tqdm(total=p["total"], desc=self.label, unit="seg", file=sys.stderr, dynamic_ncols=True)
            self.bar.update(p["done"] - self.bar.n)
            self.bar.set_postfix_str(rate)
            if p["done"] >= p["total"]:
                self.bar.close()
            return
        now = time.monotonic()
        if p["done"] < p["total"] and now - self.last < 5.0:
            return
        self.last = now
        click.echo(tqdm.format_meter(p["done"], p["total"], p["elapsed"], prefix=self.label, unit="seg", postfix=rate,
                                     ncols=120), err=True)


class Main(click.Group):
    """The command group. Errors in what the user asked for (featseq.common.errors.UserError, ValueError from option
    validation, a missing file) and a full disk (featseq.common.files.DiskFullError, a UserError) end as ``error: ...``
    with exit code 2 here, in one place; a decode worker that cannot start ends with exit code 1. SIGTERM and SIGINT
    stop every command cleanly (featseq.common.signals): finished work is kept, exit code 143 or 130."""

    def invoke(self, ctx):
        from featseq.common.signals import Interrupted, on_signals
        from featseq.featurize.worker import WorkerStartError

        try:
            with on_signals():
                return super().invoke(ctx)
        except Interrupted as e:
            click.echo(f"stopped by {e.name}: finished work is kept; rerun the same command to go on", err=True)
            ctx.exit(e.exit_code)
        except (ValueError, FileNotFoundError) as e:  # UserError is a ValueError
            click.echo(f"error: {e}", err=True)
            from featseq.featurize import cache

            if cache.HDF5_WRITE_FAILED:  # HDF5 would crash shutting down after a failed write (files.py)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            ctx.exit(2)
        except WorkerStartError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


def _threads(n: int | None) -> None:
    """torch's CPU threads for this process (the one place a command sets them)."""
    if n:
        import torch

        torch.set_num_threads(n)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="featseq")
def main():
    """featseq: cache per-frame CNN features of video segments once, train sequence models on them."""


@main.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--backbone", default="resnet18", show_default=True, help="resnet18/34/50/101/152, vgg16, efficientnet_b0, mobilenet_v3_large, ... or timm:<name>.")
@click.option("--weights", default="none", show_default=True, help="'none' (seeded random init), 'imagenet' (torchvision/timm default weights) or a state-dict file.")
@click.option("--size", default=224, show_default=True, type=int, help="Input size in pixels (frames become size x size).")
@click.option("--resize", default="squash", show_default=True, type=click.Choice(["squash", "crop"]), help="squash: whole frame resized to size x size; crop: shorter side to size, then centre crop.")
@click.option("--fps", default=6.0, show_default=True, type=float, help="Frames sampled per second of video (read back at 1/2/3/6 fps exactly with the default).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--precision", default=None, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="Autocast precision; auto: fp16 on CUDA, bf16 on a CPU that computes it natively (AVX512-BF16/AMX), "
                   "else fp32 [default: fp16 on CUDA, fp32 on CPU].")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]), help="Storage dtype of the features.")
@click.option("--batch-size", default=64, show_default=True, type=int,
              help="Frames gathered per CNN call (on the CPU it runs them in slices of 16 frames at 224 px: faster there, less memory).")
@click.option("--no-channels-last", is_flag=True, help="Keep NCHW memory format.")
@click.option("--out", default=None, help="Cache file [default: cache/<source>__<backbone>__<weights>__<size>px__<resize>__<fps>fps__<precision>.h5].")
@click.option("--cache-dir", default="cache", show_default=True, help="Folder of default cache paths.")
@click.option("--skip-errors", is_flag=True, help="Skip missing, unreadable and undecodable videos (listed, also in <cache>.errors.json) and exit 0.")
@click.option("--keep-frames", is_flag=True, help="Also store the resized uint8 frames (lzf-compressed) for finetune.")
@click.option("--decode-timeout", default=60.0, show_default=True, type=float, help="Seconds without a frame before a decoder is declared hung, killed and its video skipped.")
@click.option("--decoder", default="auto", show_default=True, type=click.Choice(["auto", "pyav", "decord", "torchcodec"]),
              help="Video decoder. auto: pyav on the CPU (torchcodec with --decode-device cuda); resuming a cache, the "
                   "decoder that made it.")
@click.option("--decode-device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="Where frames are decoded: cuda decodes on the GPU (NVDEC) with --decoder torchcodec.")
@click.option("--decode-workers", default=None, type=click.IntRange(1), metavar="N",
              help="Decoder processes feeding the CNN [default: cores - 1 when the CNN runs on CUDA, 2 when decoding "
                   "on CUDA, 2 when the CNN shares the CPU (1 on one core)].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --weights none.")
@click.option("--refresh", is_flag=True,
              help="Featurize again the cached segments whose video changed since (size or mtime differ from those "
                   "recorded); without it such a cache is refused, listing them.")
@click.option("--shard", default="auto", show_default=True,
              help="K/N: featurize shard K of N (0-based) into <out>.part-K-of-N.h5, then `featseq cache merge`; auto: "
                   "K/N from torchrun (RANK/WORLD_SIZE; rank 0 merges) or a SLURM array, else the whole source; none.")
@click.option("--slurm", "slurm_jobs", default=None, type=click.IntRange(1), metavar="N",
              help="Submit N shard jobs as one SLURM job array through submitit (local processes where there is no "
                   "SLURM), wait, then merge. Needs the slurm extra.")
@click.option("--slurm-partition", default=None, help="--slurm: the partition.")
@click.option("--slurm-time", default=240, show_default=True, type=int, help="--slurm: time limit per job, minutes.")
@click.option("--slurm-gpus", default=None, type=int, help="--slurm: GPUs per job.")
@click.option("--slurm-cpus", default=None, type=int, help="--slurm: CPUs per job.")
@click.option("--slurm-logs", default=None, type=click.Path(file_okay=False),
              help="--slurm: folder of job files and logs (shared with the nodes) [default: <out>.slurm/].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def featurize(source, backbone, weights, size, resize, fps, device, precision, dtype, batch_size, no_channels_last,
              out, cache_dir, skip_errors, keep_frames, decode_timeout, decoder, decode_device, decode_workers, seed, refresh,
              shard, slurm_jobs, slurm_partition,
              slurm_time, slurm_gpus, slurm_cpus, slurm_logs, quiet):
    """Decode SOURCE's segments, embed frames with a CNN, write an HDF5 cache (resumable).

    SOURCE is a folder-per-class tree ROOT/<label>/<clip>.mp4 (.avi, .mkv, .webm, .mov ...), a CSV manifest
    (path,label[,start,end,group,id,split])
    or the Gingerbread layout ROOT/Pxx/musicYY.mp4.
    """
    from featseq.featurize.pipeline import FeaturizeConfig, featurize as run
    from featseq.featurize.shard import after_torchrun, submit

    cfg = FeaturizeConfig(source=source, backbone=backbone, weights=weights, size=size, resize=resize, fps=fps,
                          device=device, precision=precision, dtype=dtype, batch_size=batch_size,
                          channels_last=not no_channels_last, out=out, cache_dir=cache_dir, skip_errors=skip_errors,
                          keep_frames=keep_frames, decode_timeout=decode_timeout, decoder=decoder,
                          decode_device=decode_device, decode_workers=decode_workers, seed=seed, shard=shard,
                          refresh=refresh)
    cfg.validate()
    log = lambda s: click.echo(s, err=True)  # noqa: E731
    if slurm_jobs:
        if not out:
            raise click.UsageError("--slurm needs --out (a path every job and this process agree on)")
        params = {k: v for k, v in {"slurm_partition": slurm_partition, "timeout_min": slurm_time,
                                    "gpus_per_node": slurm_gpus, "cpus_per_task": slurm_cpus}.items() if v is not None}
        merged = submit(cfg, slurm_jobs, slurm_logs or f"{out}.slurm", params, log)
        log(f"merged {len(merged.parts)} parts: {merged.segments} segments, {merged.mb:.1f} MB in {merged.seconds:.1f} s")
        click.echo(merged.path)
        return
    res = run(cfg, progress=None if quiet else Progress(), log=log)
    merged = None
    if res.path != res.target and shard == "auto":  # a torchrun rank: wait for the others; rank 0 merges
        merged = after_torchrun(res.target, log, allow_missing=skip_errors)
        if merged is not None:
            log(f"merged {len(merged.parts)} parts: {merged.segments} segments, {merged.mb:.1f} MB -> {merged.path}")
    click.echo(f"{res.written} segment(s) written, {res.skipped_done} already cached, {len(res.failures)} failed; "
               f"{res.frames} frames in {res.seconds:.1f} s ({res.frames_per_s:.1f} frames/s)", err=True)
    if res.failures:
        click.echo(f"failed segments ({len(res.failures)}), also in {res.path}.errors.json:", err=True)
        for sid, why in res.failures.items():
            click.echo(f"  {sid}: {why}", err=True)
    click.echo(merged.path if merged is not None else res.path)
    if res.failures and not skip_errors:
        sys.exit(1)


@main.group()
def cache():
    """Inspect and merge feature caches."""


@cache.command("merge")
@click.argument("target", type=click.Path(dir_okay=False))
@click.argument("parts", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--allow-missing", is_flag=True, help="Merge even when segments of the source are in no part (listed).")
def cache_merge(target, parts, allow_missing):
    """Merge shard parts (featurize --shard K/N) into the cache TARGET [default PARTS: TARGET's .part-K-of-N.h5 files].

    Refuses parts of another request or another N, ids in two parts and segments no part holds; copies and verifies
    every segment, writes under a temporary name and renames. Merging again, or after a crash, is safe.
    """
    from featseq.featurize.shard import merge

    res = merge(target, list(parts) or None, allow_missing=allow_missing, log=lambda s: click.echo(s, err=True))
    click.echo(f"{len(res.parts)} parts: {res.copied} segment(s) copied, {res.kept} already in {target}, "
               f"{len(res.missing)} missing; {res.segments} segments, {res.mb:.1f} MB in {res.seconds:.1f} s", err=True)
    click.echo(res.path)


@cache.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--sources", is_flag=True, help="Also check that every segment's video is there, unchanged (size, mtime).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def cache_verify(file, sources, as_json):
    """Read a cache FILE back whole and check it: chunk checksums, the segment table, timestamps, finite features
    (and with --sources the videos). Exit 0 when all is well, 1 with the list of what is wrong."""
    from dataclasses import asdict

    from featseq.featurize.cache import verify

    v = verify(file, sources=sources)
    if as_json:
        click.echo(json.dumps({**asdict(v), "ok": v.ok}))
    else:
        for note in v.notes:
            click.echo(f"note: {note}", err=True)
        for p in v.problems:
            click.echo(p)
        click.echo(f"{file}: {v.segments} segments, {v.frames} frames read back"
                   f"{' with checksums' if v.checksums else ''}: "
                   + ("OK" if v.ok else f"{len(v.problems)} problem(s)"), err=True)
    if not v.ok:
        sys.exit(1)


@cache.command("check")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.argument("source", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def cache_check(file, source, as_json):
    """Check a cache FILE against SOURCE (a manifest, folder or Gingerbread layout) by segment id: labels, groups and
    splits that differ, segments not cached, cached segments SOURCE no longer lists, videos that changed. Exit 0 when
    they agree, 1 with the list and the featurize command that updates the cache."""
    from featseq.featurize.reconcile import check

    r = check(file, source)
    if as_json:
        click.echo(json.dumps(r))
    else:
        for sid, cols in r["changed"].items():
            click.echo(f"{sid}: " + ", ".join(f"{k} {old!r} in the cache, {new!r} in the source" for k, (old, new) in cols.items()))
        for what, ids in (("not cached", r["missing"]), ("cached, not in the source", r["extra"])):
            for sid in ids:
                click.echo(f"{sid}: {what}")
        for sid, why in r["videos_changed"].items():
            click.echo(f"{sid}: its video changed since it was featurized: {why}")
        n = len(r["changed"]) + len(r["missing"]) + len(r["extra"]) + len(r["videos_changed"])
        click.echo(f"{file}: {r['cached']} cached segments, {r['segments']} in {source}: "
                   + ("they agree" if r["ok"] else f"{n} difference(s)"), err=True)
        if r["fix"]:
            click.echo(f"to update the cache (labels, groups and splits in place; missing segments featurized): {r['fix']}",
                       err=True)
    if not r["ok"]:
        sys.exit(1)


@cache.command("list")
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path())
def cache_list(cache_dir):
    """A table of the caches under --cache-dir."""
    from featseq.featurize.cache import list_caches

    rows = list_caches(cache_dir)
    if not rows:
        click.echo(f"no caches in {cache_dir}")
        return
    head = ("file", "backbone", "weights", "fps", "size", "segments", "frames", "MB")
    table = [head] + [
        (r["path"], "ERROR", r["error"][:60], "", "", "", "", "") if "error" in r else
        (r["path"], r["backbone"], r["weights"], f"{r['fps']:g}", str(r["size"]), str(r["segments"]), str(r["frames"]), f"{r['mb']:.1f}")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


@cache.command("info")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def cache_info(file, as_json):
    """Attributes, segment/frame counts, class, group and split counts of a cache FILE."""
    from featseq.featurize.cache import summary

    s = summary(file)
    if as_json:
        click.echo(json.dumps(s, default=str))
        return
    click.echo(f"{s['path']}: {s['segments']} segments, {s['frames']} frames, feature_dim {s['feature_dim']}, "
               f"{s['fps']:g} fps, {s['mb']:.1f} MB")
    click.echo(f"classes ({len(s['classes'])}): " + ", ".join(f"{k} {v}" for k, v in s["classes"].items()))
    click.echo(f"groups: {s['groups']}")
    click.echo("splits: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()))
    click.echo("attributes:")
    for k, v in s["attrs"].items():
        click.echo(f"  {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--clips", "clips_per_class_per_group", default=2, show_default=True, help="Clips per class per group.")
@click.option("--groups", default=4, show_default=True)
@click.option("--width", default=64, show_default=True)
@click.option("--height", default=64, show_default=True)
@click.option("--video-fps", default=30, show_default=True)
@click.option("--min-duration", default=6.0, show_default=True)
@click.option("--max-duration", default=9.0, show_default=True)
@click.option("--long-videos", default=1, show_default=True, help="Long videos with a CSV of labelled segments.")
@click.option("--long-duration", default=40.0, show_default=True)
@click.option("--burn-frame-numbers", is_flag=True, help="Burn each frame's index into its top rows (for exactness tests).")
@click.option("--container", default="mp4", show_default=True, type=click.Choice(["mp4", "avi", "mkv", "webm", "mov"]),
              help="Container of the clips: avi holds MPEG-4 Part 2 (Xvid, like UCF-101 and HMDB-51), webm VP9, "
                   "the others H.264.")
@click.option("--seed", default=0, show_default=True)
def synth(out_dir, clips_per_class_per_group, groups, width, height, video_fps, min_duration, max_duration,
          long_videos, long_duration, burn_frame_numbers, container, seed):
    """Render a small labelled synthetic dataset (classes differ only in temporal order); a rerun keeps the videos
    already rendered as they are (mtimes too), rendering only missing or different ones."""
    from featseq.featurize.synth import render_dataset

    res = render_dataset(out_dir, clips_per_class_per_group=clips_per_class_per_group, groups=groups, width=width,
                         height=height, video_fps=video_fps, duration=(min_duration, max_duration), seed=seed,
                         burn_frame_numbers=burn_frame_numbers, long_videos=long_videos, long_duration=long_duration,
                         container=f".{container}")
    click.echo(f"{len(res['clips'])} clips in {res['clips_root']} of {len(res['classes'])} classes ({', '.join(res['classes'])})"
               + (f"; long-video segments in {res['long_csv']}" if res.get("long_csv") else ""), err=True)
    click.echo(res["clips_root"])



# ---------------------------------------------------------------- sequence models on a cache

# flags whose name is not simply --field-name
_FLAGS = {"from_run": "--from", "freeze_bn": "--freeze-bn/--train-bn"}
_CHOICES = {"precision": ["auto", "fp32", "fp16", "bf16"]}


def _config_options(config_name: str, as_lists: bool = False):
    """click options for every field of a config dataclass of sequence.config but cache and out (help in
    OPTION_HELP), with the dataclass's defaults: the CLI and the Python API agree. A None default of a field
    finetune inherits means "the --from run's". as_lists: comma lists (sweep, compare)."""
    import dataclasses
    import typing

    from featseq.sequence import config as C

    config_cls = getattr(C, config_name)
    hints = typing.get_type_hints(config_cls)
    inherits = config_cls is C.FinetuneConfig
    decos = []
    for f in dataclasses.fields(config_cls):
        if f.name in ("cache", "out") or (as_lists and f.name == "overwrite"):  # sweep/compare own their run folders
            continue
        flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        args = typing.get_args(hints[f.name])
        base = next((a for a in args if a is not type(None)), hints[f.name]) if args else hints[f.name]
        help_ = C.OPTION_HELP[f.name]
        text, _, said = help_.partition(" [default: ")  # a default the help says itself: shown once, in its place
        text, said = text.rstrip("."), said.rstrip(".").removesuffix("]")
        if as_lists:
            shown = "none" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
            decos.append(click.option(flag, f.name, default=None, metavar="V[,V...]",
                                      help=f"{text}. Comma list to sweep [default: {said or shown}]."))
            continue
        inherited = inherits and f.name in C.INHERITED
        if inherited:
            fallback = said or "train's"
            help_ = f"{text}. [default: the --from run's, else {fallback}]"
        if base is bool:
            if "/" not in flag:
                flag = f"{flag}/--no-{flag[2:]}"
            decos.append(click.option(flag, f.name, default=f.default, show_default=not inherited, help=help_))
        else:
            kind = click.Choice(_CHOICES[f.name]) if f.name in _CHOICES else base
            decos.append(click.option(flag, f.name, default=f.default, type=kind,
                                      show_default=f.default is not None, help=help_))

    def apply(fn):
        for d in reversed(decos):
            fn = d(fn)
        return fn
    return apply


def _log(quiet: bool):
    return (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))


@main.command()
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@_config_options("TrainConfig")
@click.option("-q", "--quiet", is_flag=True, help="No per-epoch lines.")
def train(cache, out, quiet, **opts):
    """Train one sequence model on a feature CACHE; write a run folder (results.json, plots, predictions, checkpoint)."""
    from featseq.sequence.config import TrainConfig
    from featseq.sequence.train import train as run

    cfg = TrainConfig(cache=cache, out=out, **opts)
    _threads(cfg.threads)
    res = run(cfg, log=_log(quiet))
    std = f" ± {res['test_accuracy_std']:.3f} over {res['folds']} folds" if res.get("test_accuracy_std") is not None else ""
    click.echo(f"{cfg.model}: test accuracy {res['test_accuracy']:.3f}{std} "
               f"({res.get('n_test', sum(f['n_test'] for f in res.get('per_fold', [])))} test segments), "
               f"val accuracy {res['val_accuracy'] if res['val_accuracy'] is not None else float('nan'):.3f}, "
               f"best epoch {res['best_epoch']}, seq_len {res['seq_len']} at {res['fps']:g} fps, {res['params']} parameters, "
               f"{res['timings']['total_s']:.1f} s", err=True)
    click.echo(out)


@main.command()
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sweep folder (one run folder per variant).")
@click.option("--grid", "grid_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML file: option = value or [values]; command-line lists win.")
@click.option("--jobs", default=1, show_default=True, type=int,
              help="Worker processes here (more workers anywhere: run the same command elsewhere on the same study).")
@click.option("--search", default="grid", show_default=True, type=click.Choice(["grid", "random", "tpe"]),
              help="grid: every combination of the lists; random or tpe (Optuna's TPE): --trials draws over lists and "
                   "ranges such as --lr 1e-4..1e-2:log or --hidden 64..512:log:int.")
@click.option("--trials", default=None, type=int, help="Trials of a random or tpe search (all workers together).")
@click.option("--prune", default="none", show_default=True, type=click.Choice(["none", "median", "hyperband"]),
              help="Stop trials whose validation accuracy is unpromising after an epoch (Optuna's pruners).")
@click.option("--storage", default=None,
              help="Optuna storage URL (sqlite:///sweep.db, postgresql://...) [default: a journal file OUT/study.journal].")
@click.option("--study", default="featseq-sweep", show_default=True, help="Study name in the storage.")
@click.option("--search-seed", default=0, show_default=True, type=int, help="Seed of the random / TPE sampler.")
@click.option("--stale-after", default=600.0, show_default=True, type=float,
              help="Seconds without an epoch after which a running trial of a dead worker on another host is failed.")
@click.option("--no-resume", is_flag=True, help="Start the study afresh and retrain variants that already finished.")
@_config_options("TrainConfig", as_lists=True)
@click.option("-q", "--quiet", is_flag=True, help="No per-variant lines.")
def sweep(cache, out, grid_file, jobs, search, trials, prune, storage, study, search_seed, stale_after, no_resume,
          quiet, **opts):
    """Search sequence models on CACHE with an Optuna study: a grid, random or TPE search, with pruning and any number
    of workers; write DIR/<variant>/ runs and a leaderboard.

    Example: featseq sweep CACHE --out S --model lstm,gru,rnn --hidden 128,256 --layers 1,2 --bidirectional false,true
    """
    from featseq.sequence.grid import SweepConfig, load_grid, parse_list
    from featseq.sequence.sweep import sweep as run

    grid = load_grid(grid_file) if grid_file else {}
    grid.update({k: parse_list(k, v) for k, v in opts.items() if v is not None})
    threads = grid.pop("threads", [None])
    cfg = SweepConfig(cache=cache, out=out, grid=grid, jobs=jobs, threads=threads[0], resume=not no_resume,
                      search=search, trials=trials, prune=prune, storage=storage, study=study, seed=search_seed,
                      stale_after=stale_after)
    if jobs == 1:
        _threads(cfg.threads)  # the workers of --jobs N set their own
    res = run(cfg, log=_log(quiet))
    click.echo(res["paths"]["table"])
    bad = [r for r in res["rows"] if r["status"] in ("error", "missing")]
    click.echo(f"{res['variants']} variants ({res['trained']} trained, {res['pruned']} pruned, {res['skipped']} already "
               f"done" + (f", {len(bad)} FAILED" if bad else "") + f") in {res['seconds']:.1f} s", err=True)
    click.echo(f"leaderboard: {res['paths']['md']}  {res['paths']['csv']}\nplot: {res['paths']['plot']}", err=True)
    click.echo(out)
    if bad:
        sys.exit(1)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--cache", "cache_path", type=click.Path(exists=True, dir_okay=False),
              help="Another cache with the same feature dimension [default: the run's own cache].")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output folder [default: RUN_DIR/eval_<cache name>].")
@click.option("--device", default="auto", show_default=True)
@click.option("--score-all", is_flag=True,
              help="Also score the segments whose ids the run trained or validated on (skipped by default).")
def evaluate(run_dir, cache_path, out, device, score_all):
    """Re-score the saved model of RUN_DIR on its cache or on --cache OTHER.

    Segments whose ids the run trained or validated on are skipped, and counted (another cache whose ids match
    the run's, e.g. cuts of long videos named like the clips, can have all its segments skipped); --score-all
    scores them too. Exit 1 when no segment was scored.
    """
    from featseq.sequence.train import evaluate as run

    res = run(run_dir, cache_path, out=out, device=device, score_all=score_all)
    acc, sk = res["test_accuracy"], res["n_skipped"]
    skipped = (f"; skipped {sk['train'] + sk['val']} segment(s) whose ids the run trained on ({sk['train']}, train) or "
               f"validated on ({sk['val']}, val): --score-all scores them too" if sk["train"] + sk["val"] else "")
    unknown = f"; {res['unknown_label']} with labels the model does not know" if res["unknown_label"] else ""
    if not res["n_scored"]:
        click.echo(f"no segment scored{skipped}{unknown}", err=True)
        click.echo(res["out"])
        sys.exit(1)
    click.echo(f"accuracy {acc:.3f} on {res['n_scored']} scored segments{skipped}{unknown}", err=True)
    click.echo(res["out"])


@main.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@_config_options("FinetuneConfig")
@click.option("-q", "--quiet", is_flag=True, help="No per-epoch lines.")
def finetune(source, out, quiet, **opts):
    """Fine-tune CNN + sequence model end to end on SOURCE (a feature cache, or videos featurized first).

    Options left unset are taken from the --from run (its model, options and split), else train's defaults.
    On several GPUs or nodes: torchrun --nproc-per-node N $(which featseq) finetune ... (DistributedDataParallel;
    --batch-size is the global batch; rank 0 writes the run folder).
    """
    from featseq.sequence.config import FinetuneConfig
    from featseq.sequence.ddp import Stopped
    from featseq.sequence.finetune import finetune as run

    cfg = FinetuneConfig(cache=source, out=out, **opts)
    _threads(cfg.threads)

    try:  # a lost rank, or SIGTERM/SIGINT (featseq.common.signals), end as Stopped saying how to resume
        res = run(cfg, log=_log(quiet))
    except Stopped as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.code)
    if res is None:  # a torchrun rank other than 0: rank 0 writes and reports
        return
    click.echo(f"finetune {res['backbone']} + {res['model']} (unfreeze {res['unfreeze']}): test accuracy "
               f"{res['test_accuracy']:.3f} ({res['n_test']} test segments), val accuracy {res['val_accuracy']:.3f}, "
               f"best epoch {res['best_epoch']}, {res['timings']['per_epoch_s']:.1f} s/epoch", err=True)
    click.echo(out)


# ---------------------------------------------------------------- predict, compare, report

@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("videos", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--stream", "stream_source", default=None, metavar="SOURCE",
              help="Classify a live stream instead of VIDEO files: /dev/videoN, rtsp://, http://, udp://..., - (a "
                   "container on standard input) or a file; one line per window on stdout.")
@click.option("--realtime", is_flag=True, help="--stream FILE: play the file at its own rate (as a live source).")
@click.option("--positive-windows", default=0, show_default=True, type=click.IntRange(0),
              help="--stream: print an alert when this many consecutive windows predict one class at p >= --threshold (0: off).")
@click.option("--stall-timeout", default=10.0, show_default=True, type=float,
              help="--stream: stop (exit 1, predictions kept) when the source sends nothing for this many seconds.")
@click.option("--save-features", default=None, type=click.Path(dir_okay=False),
              help="--stream: also write every embedded frame's stream time and features to this .npz file.")
@click.option("--window", default=None, type=float, help="Sliding window length in seconds [default: the whole video is one window].")
@click.option("--stride", default=None, type=float, help="Seconds between window starts [default: --window].")
@click.option("--threshold", default=0.5, show_default=True, type=float, help="Probability the predicted class must reach (above_threshold column).")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output folder [default: RUN_DIR/predict].")
@click.option("--cache", "cache_file", default=None, type=click.Path(dir_okay=False),
              help="Keep the videos' per-frame features in this .h5 file (resumed on the next call) [default: a temporary file].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--precision", default=None, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="Autocast precision of the CNN [default: the run's, as its features were made].")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Frames per backbone batch.")
@click.option("--no-plots", is_flag=True, help="No timeline plots.")
def predict(run_dir, videos, stream_source, realtime, positive_windows, stall_timeout, save_features, window, stride,
            threshold, out, cache_file, device, precision, batch_size, no_plots):
    """Classify VIDEO... (whole clips or sliding windows), or a live --stream, with the model of RUN_DIR.

    The videos are featurized with the backbone, weights, size, resize, fps and precision recorded in the
    run's checkpoint (the training cache is not needed). Writes predictions.csv (video, window_start,
    window_end, p_<class>..., predicted, above_threshold) and timeline_<video>.png per video. With --stream,
    windows of the run's length are classified every --stride seconds as the stream plays (RUN_DIR/predict_stream).
    RUN_DIR may be a cross-validation folder (e.g. a cross-validated sweep variant): its best fold by validation
    accuracy is used, and named.
    """
    if realtime and stream_source is None:
        raise click.UsageError("--realtime plays a --stream FILE at its own rate, as a live source; give --stream FILE "
                               "with it (VIDEO files are featurized as fast as they decode)")
    if stream_source is not None:
        from featseq.sequence.stream import StreamConfig, stream

        if videos or window is not None or cache_file:
            raise click.UsageError("--stream classifies one live source: give no VIDEO, --window or --cache with it")
        res = stream(StreamConfig(run=run_dir, source=stream_source, stride=stride, threshold=threshold,
                                  positive_windows=positive_windows, realtime=realtime, stall_timeout=stall_timeout,
                                  out=out, device=device, precision=precision, batch_size=min(batch_size, 16),
                                  save_features=save_features),
                     log=lambda s: click.echo(s, err=True), echo=click.echo)
        lat = res["latency_s"] or {}
        click.echo(f"{res['windows']} window(s), {res['windows_per_s'] or 0:.2f} windows/s; frames: {res['frames_sampled']} "
                   f"sampled, {res['frames_dropped']} dropped; latency p50 {lat.get('p50', 0) * 1000:.0f} ms, p95 "
                   f"{lat.get('p95', 0) * 1000:.0f} ms, max {lat.get('max', 0) * 1000:.0f} ms; stopped: {res['stop']}", err=True)
        click.echo(res["out"], err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # the reader thread may still be blocked reading the source (a stalled pipe holds stdin's lock): end now,
        # everything is written
        os._exit(res["exit_code"])
    if not videos:
        raise click.UsageError("give VIDEO... or --stream SOURCE")
    from featseq.sequence.predict import PredictConfig, predict as run

    cfg = PredictConfig(run=run_dir, videos=list(videos), window=window, stride=stride, threshold=threshold, out=out,
                        cache=cache_file, device=device, precision=precision, batch_size=batch_size, plots=not no_plots)
    res = run(cfg, log=lambda s: click.echo(s, err=True))
    fps = f"{res['frames_per_s']:.1f} frames/s" if res["frames_per_s"] else "features already cached"
    click.echo(f"{len(res['videos'])} video(s), {res['windows']} window(s): featurize {res['frames_featurized']} frames "
               f"in {res['featurize_s']:.1f} s ({fps}), classify {res['windows_per_s'] or 0:.0f} windows/s", err=True)
    click.echo(res["out"])
    if res["failed"]:
        sys.exit(1)


@main.command()
@click.argument("cache_a", type=click.Path(exists=True, dir_okay=False))
@click.argument("cache_b", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Comparison folder to write.")
@click.option("--seeds", default=3, show_default=True, type=int, help="Train seeds 0..N-1 of every variant on each cache.")
@_config_options("TrainConfig", as_lists=True)
@click.option("-q", "--quiet", is_flag=True, help="No per-variant lines.")
def compare(cache_a, cache_b, out, seeds, quiet, **opts):
    """Compare two caches of the same segments: feature similarity, the same variants trained on each, cross-evaluation.

    Training options take comma lists as in sweep (e.g. --model lstm,conv1d --fps 2); the seed is --seeds.
    """
    from featseq.sequence.compare import CompareConfig, compare as run
    from featseq.sequence.grid import parse_list

    grid = {k: parse_list(k, v) for k, v in opts.items() if v is not None}
    plots = grid.pop("plots", [True])[0]
    grid.pop("threads", None)
    cfg = CompareConfig(cache_a=cache_a, cache_b=cache_b, out=out, grid=grid, seeds=seeds, plots=plots)
    res = run(cfg, log=_log(quiet))
    click.echo(f"summary: {res['out']}/summary.md", err=True)
    click.echo(res["out"])


@main.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="HTML file [default: FIRST_FOLDER/report.html].")
def report(folders, out):
    """One self-contained HTML page (plots embedded) for run, sweep, compare or predict FOLDERS (one section each)."""
    from featseq.sequence.report import report as run

    click.echo(run(list(folders), out))


@main.group("run")
def run_group():
    """Maintain run folders."""


@run_group.command("upgrade")
@click.argument("folder", type=click.Path(exists=True))
@click.option("--trust", is_flag=True,
              help="Load the checkpoints that need it in full, which runs any code they carry: only for runs you made yourself.")
def run_upgrade(folder, trust):
    """Convert the checkpoints of a run FOLDER (or a folder of runs) written by an older featseq to tensors and plain
    data, so that they load weights-only. Only for runs you made yourself.

    featseq loads every checkpoint weights-only and refuses one that needs more (it could run code from the file).
    Without --trust this lists the checkpoints that need converting and the Python objects each asks for, loading
    none; with --trust it converts them and keeps each original as FILE.pre-upgrade.
    """
    from featseq.sequence.checkpoint import upgrade

    res = upgrade(folder, trust=trust, log=lambda s: click.echo(s, err=True))
    click.echo(f"{len(res['converted'])} checkpoint(s) converted, {len(res['already_safe'])} already plain data",
               err=True)
    click.echo(folder)


if __name__ == "__main__":
    main()
