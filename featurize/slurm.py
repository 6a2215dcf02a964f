"""featurize --slurm N: the shards of one featurize request as a SLURM job array through submitit (local processes
where there is no SLURM), then the verified merge (featurize/shard.py). Apart from shard.py so that the sharding
that featurize itself uses imports no featurize.
"""
from __future__ import annotations

from typing import Callable

from .pipeline import featurize
from .shard import MergeResult, merge
from featseq.common.errors import UserError


def _run_shard(cfg) -> dict:
    """One array task: featurize one shard (runs in the job's process)."""
    res = featurize(cfg)
    return {"path": res.path, "target": res.target, "written": res.written, "failures": res.failures}


def local_decode_workers(cfg, n: int) -> int:
    """Decode workers for each of ``n`` shard processes run on this machine (submitit's local executor, no SLURM):
    featurize's default for a 1/n share of its CPUs, not each the whole machine's."""
    from featseq.common.cpus import cpu_share

    from .backbones import resolve_device
    from .worker import default_workers

    return default_workers(cfg.decode_device, resolve_device(cfg.device).type, cpu_share(processes=n))


def submit(cfg, n: int, folder: str, params: dict | None = None, log: Callable[[str], None] = lambda s: None) -> MergeResult:
    """Featurize ``cfg`` as ``n`` shard jobs of one job array through submitit (SLURM when ``srun`` is there, local
    processes otherwise), wait for them, and merge. A failed job leaves its part resumable: rerun the same command."""
    from dataclasses import replace

    try:
        import submitit
    except ImportError as e:
        raise UserError("--slurm needs submitit: pip install 'featseq[slurm]' (or pip install submitit)") from e
    executor = submitit.AutoExecutor(folder=folder)
    executor.update_parameters(name="featseq-featurize", slurm_array_parallelism=n, **(params or {}))
    if executor.cluster == "local" and cfg.decode_workers is None:  # n processes on this machine share its CPUs
        cfg = replace(cfg, decode_workers=local_decode_workers(cfg, n))
    jobs = executor.map_array(_run_shard, [replace(cfg, shard=f"{k}/{n}") for k in range(n)])
    log(f"{n} shard job(s) submitted ({executor.cluster}), logs in {folder}: {', '.join(j.job_id for j in jobs[:4])}"
        + (" ..." if n > 4 else ""))
    results, failed = [], []
    for k, job in enumerate(jobs):
        try:
            results.append(job.result())
        except Exception as e:  # submitit.FailedJobError / UncompletedJobError: the shard's part stays resumable
            failed.append(f"shard {k} (job {job.job_id}): {str(e).strip().splitlines()[-1] if str(e).strip() else e}")
    if failed:
        raise UserError(f"{len(failed)} of {n} shard job(s) failed: {'; '.join(failed[:3])}; their parts are kept, rerun "
                        f"the same command to finish them (logs in {folder})")
    log(f"all {n} shards done")
    return merge(results[0]["target"], allow_missing=cfg.skip_errors, log=log)
