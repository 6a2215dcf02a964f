"""The sequence-model commands: train, sweep, evaluate, finetune, predict (files and --stream), compare, report and
run upgrade. Their flags are generated from sequence/config.py's dataclasses (featseq.common.options); each command
builds its config, calls one function, prints the result path last. cli.py adds them to the command group.
"""
from __future__ import annotations

import os
import sys
from dataclasses import fields

import click

from featseq.common.options import config_options

from .config import INHERITED, ExplainConfig, FinetuneConfig, PredictConfig, StreamConfig, TrainConfig

_TRAIN_OPTIONS = config_options(TrainConfig, skip=("cache", "out"), bool_pairs=True)
_LIST_OPTIONS = config_options(TrainConfig, skip=("cache", "out", "overwrite", "track"), as_lists=True)  # sweep, compare
# train's --track, for sweep and compare (one value for all their runs, not a list to sweep)
_TRACK_OPTION = config_options(TrainConfig, skip=tuple(f.name for f in fields(TrainConfig) if f.name != "track"))
# predict --stream's own options, then predict's (stride, threshold, out, device, precision, batch size: both's)
_PREDICT_FIELDS = {f.name for f in fields(PredictConfig)}
_STREAM_OPTIONS = config_options(StreamConfig, skip=("run",) + tuple(_PREDICT_FIELDS))
_PREDICT_OPTIONS = config_options(PredictConfig, skip=("run", "videos"))


def _score(x: float | None) -> str:
    """An accuracy for a summary line; "n/a" where the run has no such part (no val segments in a small split)."""
    return "n/a" if x is None else f"{x:.3f}"


def _threads(n: int | None) -> None:
    """torch's CPU threads for this process (the one place a command sets them)."""
    if n:
        import torch

        torch.set_num_threads(n)


def _log(quiet: bool):
    return (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))


@click.command()
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@_TRAIN_OPTIONS
@click.option("-q", "--quiet", is_flag=True, help="No per-epoch lines.")
def train(cache, out, quiet, **opts):
    """Train one sequence model on a feature CACHE; write a run folder (results.json, plots, predictions, checkpoint)."""
    from featseq.sequence.train import train as run

    cfg = TrainConfig(cache=cache, out=out, **opts)
    _threads(cfg.threads)
    res = run(cfg, log=_log(quiet))
    std = f" ± {res['test_accuracy_std']:.3f} over {res['folds']} folds" if res.get("test_accuracy_std") is not None else ""
    click.echo(f"{cfg.model}: test accuracy {res['test_accuracy']:.3f}{std} "
               f"({res.get('n_test', sum(f['n_test'] for f in res.get('per_fold', [])))} test segments), "
               f"val accuracy {_score(res['val_accuracy'])}, "
               f"best epoch {res['best_epoch']}, seq_len {res['seq_len']} at {res['fps']:g} fps, {res['params']} parameters, "
               f"{res['timings']['total_s']:.1f} s", err=True)
    click.echo(out)


@click.command()
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
@_LIST_OPTIONS
@_TRACK_OPTION
@click.option("-q", "--quiet", is_flag=True, help="No per-variant lines.")
def sweep(cache, out, grid_file, jobs, search, trials, prune, storage, study, search_seed, stale_after, no_resume,
          track, quiet, **opts):
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
                      stale_after=stale_after, track=track)
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


@click.command()
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


@click.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@config_options(FinetuneConfig, skip=("cache", "out"), inherited=INHERITED, bool_pairs=True)
@click.option("-q", "--quiet", is_flag=True, help="No per-epoch lines.")
def finetune(source, out, quiet, **opts):
    """Fine-tune CNN + sequence model end to end on SOURCE (a feature cache, or videos featurized first).

    Options left unset are taken from the --from run (its model, options and split), else train's defaults.
    On several GPUs or nodes: torchrun --nproc-per-node N $(which featseq) finetune ... (DistributedDataParallel;
    --batch-size is the global batch; rank 0 writes the run folder).
    """
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
               f"{_score(res['test_accuracy'])} ({res['n_test']} test segments), val accuracy {_score(res['val_accuracy'])}, "
               f"best epoch {res['best_epoch']}, {res['timings']['per_epoch_s']:.1f} s/epoch", err=True)
    click.echo(out)


# ---------------------------------------------------------------- predict, compare, report

@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("videos", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@_STREAM_OPTIONS
@_PREDICT_OPTIONS
def predict(run_dir, videos, source, **opts):
    """Classify VIDEO... (whole clips or sliding windows), or a live --stream, with the model of RUN_DIR.

    The videos are featurized with the backbone, weights, size, resize, fps and precision recorded in the
    run's checkpoint (the training cache is not needed). Writes predictions.csv (video, window_start,
    window_end, p_<class>..., predicted, above_threshold) and timeline_<video>.png per video. With --stream,
    windows of the run's length are classified every --stride seconds as the stream plays (RUN_DIR/predict_stream).
    RUN_DIR may be a cross-validation folder (e.g. a cross-validated sweep variant): its best fold by validation
    accuracy is used, and named.
    """
    live = {k: opts.pop(k) for k in list(opts) if k not in _PREDICT_FIELDS}  # --stream's own options
    if live["realtime"] and source is None:
        raise click.UsageError("--realtime plays a --stream FILE at its own rate, as a live source; give --stream FILE "
                               "with it (VIDEO files are featurized as fast as they decode)")
    if source is not None:
        from featseq.sequence.stream import stream

        if videos or opts["window"] is not None or opts["cache"] or opts["explain"]:
            raise click.UsageError("--stream classifies one live source: give no VIDEO, --window, --cache or --explain "
                                   "with it (to explain a recording, predict it as a FILE with --explain)")
        shared = {k: opts[k] for k in ("stride", "threshold", "out", "device", "precision", "compile")}
        res = stream(StreamConfig(run=run_dir, source=source, batch_size=min(opts["batch_size"], StreamConfig.batch_size),
                                  **shared, **live),
                     log=lambda s: click.echo(s, err=True), echo=click.echo)
        lat = res["latency_s"] or {}
        click.echo(f"{res['windows']} window(s), {res['windows_per_s'] or 0:.2f} windows/s; frames: {res['frames_sampled']} "
                   f"sampled, {res['frames_dropped']} dropped; latency p50 {lat.get('p50', 0) * 1000:.0f} ms, p95 "
                   f"{lat.get('p95', 0) * 1000:.0f} ms, max {lat.get('max', 0) * 1000:.0f} ms; stopped: {res['stop']}", err=True)
        click.echo(res["out"], err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # everything is written and the decode worker is stopped: end now, whatever threads torch or PyAV still hold
        os._exit(res["exit_code"])
    if not videos:
        raise click.UsageError("give VIDEO... or --stream SOURCE")
    from featseq.sequence.predict import predict as run

    cfg = PredictConfig(run=run_dir, videos=list(videos), **opts)
    res = run(cfg, log=lambda s: click.echo(s, err=True))
    fps = f"{res['frames_per_s']:.1f} frames/s" if res["frames_per_s"] else "features already cached"
    click.echo(f"{len(res['videos'])} video(s), {res['windows']} window(s): featurize {res['frames_featurized']} frames "
               f"in {res['featurize_s']:.1f} s ({fps}), classify {res['windows_per_s'] or 0:.0f} windows/s", err=True)
    click.echo(res["out"])
    if res["failed"]:
        sys.exit(1)


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@config_options(ExplainConfig, skip=("run",))
def explain(run_dir, **opts):
    """Explain the predictions of RUN_DIR over time: the importance of every frame of each explained segment for the
    predicted and the true class (Captum: integrated gradients or occlusion, on the inputs the model read), and
    Grad-CAM at the most important frames.

    Writes attributions.csv (id, label, predicted, time, importance, importance_label, ...), importance_<id>.png per
    segment, class_importance.png and gradcam_<id>.png into --out (default RUN_DIR/explain). Needs the explain extra:
    pip install 'featseq[explain]'.
    """
    from featseq.sequence.explain import explain as run

    res = run(ExplainConfig(run=run_dir, **opts), log=lambda s: click.echo(s, err=True))
    click.echo(f"explained {res['segments']} segment(s) ({res['correct']} predicted correctly) with "
               f"{res['settings']['method']} in {res['total_s']:.1f} s", err=True)
    click.echo(res["out"])


@click.command()
@click.argument("cache_a", type=click.Path(exists=True, dir_okay=False))
@click.argument("cache_b", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Comparison folder to write.")
@click.option("--seeds", default=3, show_default=True, type=int, help="Train seeds 0..N-1 of every variant on each cache.")
@_LIST_OPTIONS
@_TRACK_OPTION
@click.option("-q", "--quiet", is_flag=True, help="No per-variant lines.")
def compare(cache_a, cache_b, out, seeds, track, quiet, **opts):
    """Compare two caches of the same segments: feature similarity, the same variants trained on each, cross-evaluation.

    Training options take comma lists as in sweep (e.g. --model lstm,conv1d --fps 2); the seed is --seeds.
    """
    from featseq.sequence.compare import CompareConfig, compare as run
    from featseq.sequence.grid import parse_list

    grid = {k: parse_list(k, v) for k, v in opts.items() if v is not None}
    plots = grid.pop("plots", [True])[0]
    grid.pop("threads", None)
    cfg = CompareConfig(cache_a=cache_a, cache_b=cache_b, out=out, grid=grid, seeds=seeds, plots=plots, track=track)
    res = run(cfg, log=_log(quiet))
    click.echo(f"summary: {res['out']}/summary.md", err=True)
    click.echo(res["out"])


@click.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="HTML file [default: FIRST_FOLDER/report.html].")
def report(folders, out):
    """One self-contained HTML page (plots embedded) for run, sweep, compare or predict FOLDERS (one section each)."""
    from featseq.sequence.report import report as run

    click.echo(run(list(folders), out))


@click.group("run")
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
