"""Shared benchmark helpers: machine description, medians, RSS polling, results files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GINGERBREAD = ROOT.parent / "shared" / "data" / "gingerbread" / "segments"


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(open("/proc/meminfo").readline().split()[1]) // 1024 // 1024
    except (OSError, ValueError, IndexError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    import av, decord, h5py, numpy, torchvision  # noqa: E401

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": mem, "gpu": gpu,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "h5py": h5py.__version__, "decord": decord.__version__, "av": av.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}


def median_time(fn, repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of fn() over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def median(xs):
    return statistics.median(xs)


def free_port() -> int:
    """A TCP port free on this machine now (torchrun's --master-port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps({"machine": machine(), **data}, indent=2, default=str))
    return p


def _tree_rss_kb(pid: int, field: str = "VmRSS") -> dict[int, int]:
    """RSS (KiB) of pid and all its descendants; ``field="Pss"``: their proportional set sizes (pages shared between
    processes, such as one memory-mapped file, are counted once in the sum, not once per process)."""
    out, todo = {}, [pid]
    status = "status" if field == "VmRSS" else "smaps_rollup"
    while todo:
        p = todo.pop()
        try:
            for line in open(f"/proc/{p}/{status}"):
                if line.startswith(field + ":"):
                    out[p] = int(line.split()[1])
            for t in os.listdir(f"/proc/{p}/task"):
                try:
                    todo += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
                except OSError:
                    pass
        except OSError:
            pass
    return out


def run_with_peak_rss(cmd: list[str], env: dict | None = None, interval: float = 0.05, pss: bool = True,
                      pss_interval: float = 0.5) -> dict:
    """Run cmd; poll the RSS of its process tree; return peaks (MiB) and the wall time. ``pss``: also their PSS sum,
    every ``pss_interval`` s: reading smaps_rollup walks a process's page tables under its memory map's lock, which
    at gigabytes of RSS costs the polled process time (polled every 0.05 s it made a UCF-101-sized train's epochs
    about 1.5x as long), so a timed command that needs no PSS is run with ``pss=False``."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_tree = peak_main = peak_child = peak_pss = 0
    done = threading.Event()

    def poll():
        nonlocal peak_tree, peak_main, peak_child, peak_pss
        next_pss = 0.0
        while not done.is_set():
            rss = _tree_rss_kb(p.pid)
            if rss:
                peak_tree = max(peak_tree, sum(rss.values()))
                if pss and time.perf_counter() >= next_pss:
                    peak_pss = max(peak_pss, sum(_tree_rss_kb(p.pid, "Pss").values()))
                    next_pss = time.perf_counter() + pss_interval
                peak_main = max(peak_main, rss.get(p.pid, 0))
                peak_child = max([peak_child] + [v for k, v in rss.items() if k != p.pid])
            time.sleep(interval)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = p.communicate()
    done.set()
    th.join()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {err[-2000:]}")
    return {"seconds": time.perf_counter() - t, "peak_tree_mib": peak_tree / 1024, "peak_tree_pss_mib": peak_pss / 1024,
            "peak_main_mib": peak_main / 1024,
            "peak_worker_mib": peak_child / 1024, "stdout": out, "stderr": err[-2000:]}
