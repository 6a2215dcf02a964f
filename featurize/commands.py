"""The featurize commands: ``featseq featurize`` (flags generated from featurize/config.py's FeaturizeConfig),
``featseq cache ...`` and ``featseq synth``. Thin: each builds its config, calls one function, prints the result path
last; cli.py adds them to the command group.
"""
from __future__ import annotations

import json
import sys
import time

import click

from featseq.common.options import config_options

from .config import FeaturizeConfig
from .interop.config import ExportConfig, ImportConfig

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



@click.command()
@click.argument("source", type=click.Path(exists=True))
@config_options(FeaturizeConfig, skip=("source",))
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
def featurize(source, slurm_jobs, slurm_partition, slurm_time, slurm_gpus, slurm_cpus, slurm_logs, quiet, **opts):
    """Decode SOURCE's segments, embed frames with a CNN, write an HDF5 cache (resumable).

    SOURCE is a folder-per-class tree ROOT/<label>/<clip>.mp4 (.avi, .mkv, .webm, .mov ...), a CSV manifest
    (path,label[,start,end,group,id,split])
    or the Gingerbread layout ROOT/Pxx/musicYY.mp4.
    """
    from featseq.featurize.pipeline import featurize as run
    from featseq.featurize.shard import after_torchrun
    from featseq.featurize.slurm import submit

    cfg = FeaturizeConfig(source=source, **opts)
    cfg.validate()
    log = lambda s: click.echo(s, err=True)  # noqa: E731
    if slurm_jobs:
        if not cfg.out:
            raise click.UsageError("--slurm needs --out (a path every job and this process agree on)")
        params = {k: v for k, v in {"slurm_partition": slurm_partition, "timeout_min": slurm_time,
                                    "gpus_per_node": slurm_gpus, "cpus_per_task": slurm_cpus}.items() if v is not None}
        merged = submit(cfg, slurm_jobs, slurm_logs or f"{cfg.out}.slurm", params, log)
        log(f"merged {len(merged.parts)} parts: {merged.segments} segments, {merged.mb:.1f} MB in {merged.seconds:.1f} s")
        click.echo(merged.path)
        return
    res = run(cfg, progress=None if quiet else Progress(), log=log)
    merged = None
    if res.path != res.target and cfg.shard == "auto":  # a torchrun rank: wait for the others; rank 0 merges
        merged = after_torchrun(res.target, log, allow_missing=cfg.skip_errors)
        if merged is not None:
            log(f"merged {len(merged.parts)} parts: {merged.segments} segments, {merged.mb:.1f} MB -> {merged.path}")
    fell_back = f", {len(res.cpu_fallback)} video(s) decoded on the CPU (NVDEC fell back)" if res.cpu_fallback else ""
    click.echo(f"{res.written} segment(s) written, {res.skipped_done} already cached, {len(res.failures)} failed"
               f"{fell_back}; "
               f"{res.frames} frames in {res.seconds:.1f} s ({res.frames_per_s:.1f} frames/s"
               + (f"; {res.steady_frames_per_s:.1f} frames/s after the {res.compile_s:.1f} s compilation)"
                  if res.compile_s else ")"), err=True)
    if res.failures:
        click.echo(f"failed segments ({len(res.failures)}), also in {res.path}.errors.json:", err=True)
        for sid, why in res.failures.items():
            click.echo(f"  {sid}: {why}", err=True)
    click.echo(merged.path if merged is not None else res.path)
    if res.failures and not cfg.skip_errors:
        sys.exit(1)


@click.group()
def cache():
    """Inspect, check, merge, export and import feature caches."""


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

    from featseq.featurize.verify import verify

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


@cache.command("export")
@click.argument("cache_path", metavar="CACHE", type=click.Path(exists=True, dir_okay=False))
@config_options(ExportConfig, skip=("cache",))
def cache_export(cache_path, **opts):
    """Write the segments of CACHE in a layout other tools read (--format), one segment at a time, with
    featseq_index.csv (file, id, label, group, split, fps, start, end) beside them; prints the folder."""
    from featseq.featurize.interop.export import export

    res = export(ExportConfig(cache=cache_path, **opts), log=lambda s: click.echo(s, err=True))
    click.echo(f"{res.segments} segment(s), {res.frames} frames in {res.seconds:.1f} s; index {res.index}", err=True)
    click.echo(res.out)


@cache.command("import")
@click.argument("source", type=click.Path(exists=True))
@config_options(ImportConfig, skip=("source",))
def cache_import(source, **opts):
    """Make a featseq cache (--out) of features another tool wrote in SOURCE (a folder, or the .h5/.tar file), with
    labels, groups and splits from --manifest, SOURCE/featseq_index.csv, SOURCE/<label>/ folders or the files' own
    metadata. Every file is checked first; a rerun resumes an interrupted import. Prints the cache path."""
    from featseq.featurize.interop.import_ import import_features

    res = import_features(ImportConfig(source=source, **opts), log=lambda s: click.echo(s, err=True))
    click.echo(f"{res.written} segment(s) imported, {res.skipped_done} already in the cache; {res.frames} frames in "
               f"{res.seconds:.1f} s", err=True)
    click.echo(res.path)


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


@click.command()
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
