"""The one GPU check: everything featseq does on CUDA, in one command that fits in a few minutes of a lent machine.

    python bench/gpu_check.py [--out DIR] [--budget-s 480] [--quick]

On a CUDA machine it runs the cuda-marked tests; ResNet-50 backbone-only frames/s (fp16, bf16, eager and
torch.compile); featurize end to end (fp16 and bf16, 1 and N decode workers) with the GPU's utilisation sampled
while it runs; NVDEC (torchcodec on cuda) against CPU decoding at 224p and 720p; two epochs of finetune; a 2-rank
nccl finetune when there are two GPUs; predict --stream with its latency. On a machine without CUDA it says so,
runs the CPU side of the same steps at small sizes (so the script itself stays tested: tests/test_gpu_check.py)
and exits 0. Each step is timed against the budget and skipped (with the reason) when too little is left; a step
that fails is recorded with its error and the rest go on. Writes DIR/gpu_check.json and DIR/gpu_check.md
(DIR: $OUT when set, as on the device machine, else bench/results).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import machine  # noqa: E402

FEATSEQ = [sys.executable, "-m", "featseq"]


class Check:
    """The run's state: device, sizes, budget, the rows of each step."""

    def __init__(self, budget_s: float, quick: bool):
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.quick = quick or not self.cuda
        self.deadline = time.monotonic() + budget_s
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.steps: list[dict] = []
        # sizes: a GPU needs thousands of frames to show its rate; the CPU side only proves the script runs
        self.backbone = "resnet50" if self.cuda else "resnet18"
        self.size = 224 if self.cuda else 64
        self.batch = 128 if self.cuda else 8
        self.workers = max(2, min(8, (os.cpu_count() or 2) // 2)) if self.cuda else 2

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, needs_s: float, fn, *args) -> None:
        t = time.monotonic()
        if self.left() < needs_s:
            self.steps.append({"step": name, "status": "skipped", "why": f"{self.left():.0f} s of the budget left, "
                               f"needs about {needs_s:.0f} s", "rows": []})
            return
        try:
            rows, note = fn(self, *args)
            self.steps.append({"step": name, "status": "ok", "seconds": round(time.monotonic() - t, 1),
                               "rows": rows, **({"note": note} if note else {})})
        except Exception as e:  # one failing step must not hide the others' figures
            self.steps.append({"step": name, "status": "failed", "seconds": round(time.monotonic() - t, 1),
                               "why": f"{type(e).__name__}: {e}"[-2000:], "trace": traceback.format_exc()[-4000:],
                               "rows": []})
        print(f"[{time.monotonic() - t:6.1f} s] {name}: {self.steps[-1]['status']}", flush=True)


def featseq(*args, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(FEATSEQ + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"featseq {' '.join(map(str, args[:2]))} exited {r.returncode}: {r.stderr[-1500:]}")
    return r


class GpuSampler(threading.Thread):
    """nvidia-smi's utilisation of GPU 0 every 0.2 s while a step runs (empty off CUDA or without nvidia-smi)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self._done = threading.Event()

    def run(self):
        smi = shutil.which("nvidia-smi")
        while smi and not self._done.wait(0.2):
            try:
                out = subprocess.run([smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout.strip()
                self.samples.append(float(out))
            except (subprocess.SubprocessError, ValueError):
                pass

    def stop(self) -> dict:
        self._done.set()
        self.join(timeout=2)
        s = self.samples
        return {"gpu_util_mean": round(float(np.mean(s)), 1) if s else None, "gpu_util_max": max(s) if s else None}


# ------------------------------------------------------------------------------------------------- steps

def environment(c: Check):
    from featseq.featurize.decoder import unavailable

    row = {**machine(), "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": c.cuda,
           "gpus": torch.cuda.device_count() if c.cuda else 0,
           "torchcodec_cuda": unavailable("torchcodec", "cuda") or "available"}
    if c.cuda:
        p = torch.cuda.get_device_properties(0)
        row.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   bf16=torch.cuda.is_bf16_supported())
    return [row], None if c.cuda else "no CUDA device here: the CPU side of each step ran, at small sizes"


def cuda_tests(c: Check):
    if not c.cuda:
        return [], "no CUDA device: the cuda-marked tests skip here (they run in the step list on a GPU machine)"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                       cwd=ROOT, capture_output=True, text=True, timeout=max(60.0, c.left() - 240))
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", r.stdout)}
    failed = [ln for ln in r.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return [{**counts, "exit": r.returncode, "failed": failed[:20]}], r.stdout[-3000:] if r.returncode else None


def backbone_only(c: Check):
    from featseq.featurize.backbones import Embedder, create_backbone

    frames = np.random.default_rng(0).integers(0, 255, (c.batch * (8 if c.cuda else 2), c.size, c.size, 3),
                                               dtype=np.uint8)
    precisions = ["fp16", "bf16"] if c.cuda else ["fp32"]
    rows = []
    for precision in precisions:
        for compiled in ([False, True] if not c.quick or c.cuda else [False]):
            # featurize --compile's path: torch.compile with one batch shape, the eager fallback's note in the row
            notes = []
            emb = Embedder(create_backbone(c.backbone, "none", 0), torch.device(c.device), precision, compile=compiled,
                           batch_size=c.batch, log=notes.append)
            t0 = time.perf_counter()
            emb(frames[:c.batch])  # warm-up (and compilation)
            warm = time.perf_counter() - t0
            t = time.perf_counter()
            for i in range(0, len(frames), c.batch):
                emb(frames[i:i + c.batch])
            if c.cuda:
                torch.cuda.synchronize()
            rows.append({"backbone": c.backbone, "size": c.size, "precision": precision, "compiled": compiled,
                         "batch": c.batch, "frames_per_s": round(len(frames) / (time.perf_counter() - t), 1),
                         "warmup_s": round(warm, 1), **({"note": notes[0]} if notes else {})})
    return rows, None


def clips(c: Check) -> Path:
    """Synthetic 224 px clips (64 px on the CPU side), rendered once per check (in this process: `featseq synth`'s
    renderer, without a process start to pay)."""
    from featseq.featurize.synth import render_dataset

    data = c.tmp / "data"
    if not (data / "clips").is_dir():
        n, dur = (4, 20.0) if c.cuda else (1, 3.0)
        render_dataset(data, clips_per_class_per_group=n, groups=2, width=c.size, height=c.size, duration=(dur, dur),
                       long_videos=0)
    return data / "clips"


def featurize(c: Check):
    from featseq.featurize.cache import summary

    src = clips(c)
    rows = []
    backbone_rate = {r["precision"]: r["frames_per_s"] for s in c.steps if s["step"] == "backbone only"
                     for r in s["rows"] if not r["compiled"]}
    for precision in (["fp16", "bf16"] if c.cuda else ["fp32"]):
        for workers in (1, c.workers):
            out = c.tmp / f"f_{precision}_{workers}.h5"
            sampler = GpuSampler()
            sampler.start()
            t = time.perf_counter()
            featseq("featurize", src, "--backbone", c.backbone, "--weights", "none", "--size", c.size, "--fps", 6,
                    "--device", c.device, "--precision", precision, "--decode-workers", workers,
                    "--batch-size", c.batch, "--out", out, "-q", timeout=max(60.0, c.left()))
            seconds = time.perf_counter() - t
            frames = summary(out)["frames"]
            rate = frames / seconds
            rows.append({"precision": precision, "decode_workers": workers, "frames": frames,
                         "seconds": round(seconds, 1), "frames_per_s": round(rate, 1),
                         "vs_backbone_only": round(rate / backbone_rate[precision], 2)
                         if precision in backbone_rate else None, **sampler.stop()})
    return rows, "whole command, process start and model load included"


def decode(c: Check):
    from featseq.featurize.decoder import open_decoder, unavailable
    from featseq.featurize.synth import render_long_video

    rows = []
    heights = (224, 720) if c.cuda else (64,)
    for h in heights:
        w = h * 16 // 9 if h == 720 else h
        path = c.tmp / f"decode_{h}p.mp4"
        render_long_video(str(path), parts=[("ascending", 10.0 if c.cuda else 2.0)], width=w, height=h, video_fps=30,
                          seed=1)
        for backend, device in (("pyav", "cpu"), ("torchcodec", "cuda")):
            if why := unavailable(backend, device):
                rows.append({"video": f"{w}x{h}", "decoder": f"{backend} on {device}", "skipped": why})
                continue
            dec = open_decoder(str(path), size=224, backend=backend, device=device)
            idx = np.arange(dec.info.n_frames)
            t = time.perf_counter()
            n = sum(len(chunk) for chunk in dec.read(idx))
            rows.append({"video": f"{w}x{h}", "decoder": f"{backend} on {device}", "frames": n,
                         "frames_per_s": round(n / (time.perf_counter() - t), 1)})
    return rows, "every frame, resized to 224 px, into this process"


def _run_to_finetune(c: Check) -> tuple[Path, Path]:
    """A small resnet18 cache and an lstm run trained on it: finetune's --from. On the CPU side the featurize step's
    cache is one already (resnet18, 64 px; the run reads it at 2 fps): one featurize process fewer."""
    cache, run = c.tmp / "ft.h5", c.tmp / "ft_run"
    if not c.cuda and (c.tmp / "f_fp32_1.h5").is_file():
        cache = c.tmp / "f_fp32_1.h5"
    if not run.is_dir():
        if not cache.is_file():
            featseq("featurize", clips(c), "--backbone", "resnet18", "--weights", "none", "--size",
                    112 if c.cuda else 64, "--fps", 2, "--device", c.device, "--out", cache, "-q",
                    timeout=max(60.0, c.left()))
        featseq("train", cache, "--model", "lstm", "--fps", 2, "--epochs", 2, "--split", "group", "--out", run, "-q",
                timeout=max(60.0, c.left()))
    return cache, run


def finetune(c: Check):
    cache, run = _run_to_finetune(c)
    rows = []
    epochs = 2 if c.cuda else 1
    t = time.perf_counter()
    featseq("finetune", cache, "--from", run, "--unfreeze", 1, "--epochs", epochs, "--device", c.device,
            "--out", c.tmp / "ft", "-q", timeout=max(60.0, c.left()))
    rows.append({"ranks": 1, "epochs": epochs, "device": c.device, "seconds": round(time.perf_counter() - t, 1)})
    if c.cuda and torch.cuda.device_count() >= 2:
        torchrun = Path(sys.executable).with_name("torchrun")
        t = time.perf_counter()
        r = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "featseq", "finetune", str(cache), "--from",
                            str(run), "--unfreeze", "1", "--epochs", str(epochs), "--device", "cuda", "--out",
                            str(c.tmp / "ft_ddp"), "-q"], capture_output=True, text=True, timeout=max(60.0, c.left()))
        if r.returncode:
            raise RuntimeError(f"2-rank nccl finetune exited {r.returncode}: {r.stderr[-1500:]}")
        rows.append({"ranks": 2, "epochs": epochs, "device": "cuda (nccl)", "seconds": round(time.perf_counter() - t, 1)})
    return rows, None if len(rows) > 1 or not c.cuda else "one GPU: the 2-rank nccl finetune needs two"


def stream(c: Check):
    from featseq.featurize.synth import render_long_video

    _, run = _run_to_finetune(c)
    video = c.tmp / "stream.mp4"
    half = 6.0 if c.cuda else 2.0
    render_long_video(str(video), parts=[("ascending", half), ("descending", half)], width=c.size, height=c.size,
                      video_fps=30, seed=2)
    out = c.tmp / "stream_out"
    featseq("predict", run, "--stream", video, "--realtime", "--stride", 1, "--device", c.device, "--out", out,
            "--no-plots", timeout=max(60.0, c.left()))
    res = json.loads((out / "predict.json").read_text())
    return [{"device": c.device, **{f"latency_{k}_ms": round(v * 1000, 1) for k, v in res["latency_s"].items()}}], None


# ------------------------------------------------------------------ issue 31: what only a GPU can settle
# Each named check states its expected outcome; "ok" is whether the machine showed it (None: could not run here).

def _tf32_off(c: Check):
    """fp32 on CUDA is fp32 (TF32 off): ResNet-18 features within 1e-3 of the CPU's (with TF32: up to 5.6e-3)."""
    from featseq.featurize.backbones import Embedder, create_backbone

    x = np.random.default_rng(0).integers(0, 255, (16, 112, 112, 3), dtype=np.uint8)
    gpu = Embedder(create_backbone("resnet18", "none", 0), torch.device("cuda"), "fp32")(x)
    cpu = Embedder(create_backbone("resnet18", "none", 0), torch.device("cpu"), "fp32")(x)
    diff = float(np.abs(gpu - cpu).max())
    return f"max |gpu - cpu| = {diff:.2e}, cudnn.allow_tf32 = {torch.backends.cudnn.allow_tf32}", diff < 1e-3


def _bf16_default(c: Check):
    """The CUDA default is bf16 (compute capability >= 8): random-init ResNet-101 stays finite in bf16, overflows in
    fp16 (activations peak at 4.8e5 in fp32)."""
    from featseq.featurize.backbones import Embedder, create_backbone
    from featseq.featurize.precision import resolve_precision

    x = np.random.default_rng(0).integers(0, 255, (8, 224, 224, 3), dtype=np.uint8)
    bb = create_backbone("resnet101", "none", 0)
    finite = {p: bool(np.isfinite(Embedder(bb, torch.device("cuda"), p)(x)).all()) for p in ("fp16", "bf16")}
    default = resolve_precision(None, torch.device("cuda"))
    return f"default {default}; finite: {finite}", finite["bf16"] and default == (
        "bf16" if torch.cuda.get_device_capability(0)[0] >= 8 else "fp16")


def _empty_batch(c: Check):
    """An empty batch on CUDA gives (0, D) features (it recursed forever)."""
    from featseq.featurize.backbones import Embedder, create_backbone

    out = Embedder(create_backbone("resnet18", "none", 0), torch.device("cuda"), "bf16")(np.zeros((0, 64, 64, 3), np.uint8))
    return f"shape {out.shape}", out.shape == (0, 512)


def _rank_gpu(c: Check):
    """Under torchrun, rank_device makes the rank's GPU current; NVDEC workers decode on cuda:N, not cuda:0."""
    from featseq.common.procgroup import rank_device

    n = torch.cuda.device_count()
    dev = rank_device("cuda", torch.device("cuda"), {"LOCAL_RANK": str(n - 1), "LOCAL_WORLD_SIZE": str(n)})
    seen = [f"rank {n - 1} of {n}: {dev}, current cuda:{torch.cuda.current_device()}"]
    ok = torch.cuda.current_device() == n - 1
    from featseq.featurize.decoder import open_decoder, unavailable

    if n >= 2 and not unavailable("torchcodec", "cuda"):
        from featseq.featurize.decoders.torchcodec_decoder import write_probe_clip

        dec = open_decoder(write_probe_clip(str(c.tmp / "rank.mp4")), size=64, backend="torchcodec", device="cuda:1")
        seen.append(f"torchcodec on cuda:1 decodes on {dec._dev}")
        ok = ok and dec._dev == torch.device("cuda", 1) and sum(len(f) for f in dec.read(np.arange(8))) == 8
    torch.cuda.set_device(0)
    return "; ".join(seen), ok


def _fp16_scaler(c: Check):
    """The fp16 GradScaler is enabled on CUDA and steps (resuming an fp32 state into it: tests/test_gpu_paths.py)."""
    from featseq.sequence.loop import Amp

    amp = Amp(torch.device("cuda"), "fp16")
    model = torch.nn.Linear(8, 2).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with amp.autocast():
        loss = model(torch.randn(4, 8, device="cuda")).float().sum()
    amp.scaler.scale(loss).backward()
    amp.scaler.step(opt)
    amp.scaler.update()
    return f"scaler enabled {amp.scaler.is_enabled()}, scale {amp.scaler.get_scale():g}", amp.scaler.is_enabled()


def _nvdec_speed(c: Check):
    """NVDEC at 720p beats one CPU worker (item 4: with a blocking copy per chunk it may not; at 224p the CPU is
    expected to win)."""
    rows = {(r["video"], r["decoder"]): r for s in c.steps if s["step"] == "decode: NVDEC vs CPU" for r in s["rows"]}
    gpu, cpu = rows.get(("1280x720", "torchcodec on cuda"), {}), rows.get(("1280x720", "pyav on cpu"), {})
    if "frames_per_s" not in gpu or "frames_per_s" not in cpu:
        return f"not measured ({gpu.get('skipped', 'no 720p row')})", None
    return f"720p: NVDEC {gpu['frames_per_s']} vs pyav {cpu['frames_per_s']} frames/s", gpu["frames_per_s"] > cpu["frames_per_s"]


def _nvdec_fallback(c: Check):
    """A 32x32 H.264 clip (below NVDEC's smallest frame) is decoded by FFmpeg on the CPU and the decoder says so with
    torchcodec's reason (featurize warns once per video and counts them in its summary); the 256 px probe clip is
    not (its reason is ''). A torchcodec without VideoDecoder.cpu_fallback reports '' for both: ok is None then."""
    from featseq.featurize.decoder import open_decoder, unavailable
    from featseq.featurize.decoders.torchcodec_decoder import write_probe_clip

    if why := unavailable("torchcodec", "cuda"):
        return why, None
    got = {}
    for size in (32, 256):
        dec = open_decoder(write_probe_clip(str(c.tmp / f"fb{size}.mp4"), size=size), size=32, backend="torchcodec",
                           device="cuda")
        sum(len(f) for f in dec.read(np.arange(8)))
        got[size] = dec.fallback
    has = hasattr(dec._dec, "cpu_fallback")
    return f"fallback reasons {got}; cpu_fallback status {'present' if has else 'absent'}", \
        (bool(got[32]) and not got[256]) if has else None


def _nvdec_reuse(c: Check):
    """One NVDEC decoder serves a video's segments (a worker keeps it open, featurize/keep_open.py) and opens in
    approximate mode, without torchcodec's scan, on a constant-rate video: 4 segments of the 720p clip, 1 opening."""
    from featseq.featurize.decoder import unavailable
    from featseq.featurize.keep_open import OpenDecoders

    path = c.tmp / "decode_720p.mp4"
    if (why := unavailable("torchcodec", "cuda")) or not path.exists():
        return why or "no 720p clip (the decode step did not run)", None
    kept = OpenDecoders("torchcodec", "cuda:0")
    for k in range(4):
        dec = kept.open(str(path), 224, "squash")
        sum(len(f) for f in dec.read(np.arange(k * 30, k * 30 + 30, 3)))
        kept.keep(dec)
    kept.close()
    return f"{kept.opened} opening(s), seek mode {dec.seek_mode}", kept.opened == 1 and dec.seek_mode == "approximate"


def _nvdec_workers(c: Check):
    """The default of 4 NVDEC decode workers per GPU (worker.default_workers) delivers at least 0.9 of 7 workers'
    decode-only frames/s on 720p segments (an H100/H200 has 7 NVDEC engines); below that, raise the default."""
    from featseq.featurize.decoder import unavailable
    from featseq.featurize.messages import CHUNK
    from featseq.featurize.worker import DecodePool, decode_job

    path = c.tmp / "decode_720p.mp4"
    if (why := unavailable("torchcodec", "cuda")) or not path.exists():
        return why or "no 720p clip (the decode step did not run)", None
    jobs = [decode_job(k, str(path), k * 1.25, (k + 1) * 1.25, 30.0, 224, "squash", 32) for k in range(8)] * 4
    rate = {}
    for n in (2, 4, 7):
        with DecodePool(workers=n, decoder="torchcodec", decode_device="cuda:0") as pool:
            pool.probe([str(path)])  # the workers started and demuxed the video before the clock
            t, frames = time.perf_counter(), 0
            for msg in pool.run(jobs):
                frames += len(msg.frames) if msg.kind == CHUNK else 0
            rate[n] = round(frames / (time.perf_counter() - t), 1)
    return f"720p decode-only frames/s by workers: {rate}", rate[4] >= 0.9 * rate[7]


def _commits_off_the_gpu_path(c: Check):
    """Committing many short segments does not starve the GPU: featurize of 3-frame segments runs at least 0.7 of
    the frames/s of whole 20 s clips (segments are committed on a writer thread, h5py releasing the GIL while it
    writes, bench/h5_gil_bench.py, and two batches stay queued on the GPU)."""
    import csv

    from featseq.featurize.decoder import video_info

    src = clips(c)
    videos = sorted(str(p) for p in Path(src).rglob("*.mp4"))
    manifest = c.tmp / "short.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "start", "end", "id"])
        for v in videos:
            for k in range(int(video_info(v).duration / 0.5)):
                w.writerow([v, Path(v).parent.name, k * 0.5, k * 0.5 + 0.5, f"{Path(v).stem}_{k}"])
    from featseq.featurize.config import FeaturizeConfig
    from featseq.featurize.pipeline import featurize as run

    rate = {}
    for name, source in (("whole clips", src), ("3-frame segments", manifest)):  # frames/s of decode+embed+write
        res = run(FeaturizeConfig(source=str(source), backbone=c.backbone, size=c.size, fps=6.0, device=c.device,
                                  batch_size=c.batch, decode_workers=c.workers, out=str(c.tmp / f"commits_{name[0]}.h5")))
        rate[name] = round(res.frames / res.stream_seconds, 1)
    return f"frames/s while streaming: {rate}", rate["3-frame segments"] >= 0.7 * rate["whole clips"]


def _nvdec_probe(c: Check):
    """torchcodec decodes a tiny clip on the GPU, or --decode-device cuda is refused naming why (a CPU-only wheel, an
    FFmpeg without NVDEC) instead of every video failing in the workers."""
    from featseq.featurize.decoder import unavailable

    why = unavailable("torchcodec", "cuda")
    return why or "available", None if why and "not installed" in why else why is None or "GPU" in why


NAMED_CHECKS = [("nvdec probe", _nvdec_probe.__doc__, _nvdec_probe),
                ("fp32 without TF32", _tf32_off.__doc__, _tf32_off), ("bf16 default", _bf16_default.__doc__, _bf16_default),
                ("empty batch", _empty_batch.__doc__, _empty_batch), ("rank GPU", _rank_gpu.__doc__, _rank_gpu),
                ("fp16 GradScaler", _fp16_scaler.__doc__, _fp16_scaler), ("NVDEC vs CPU 720p", _nvdec_speed.__doc__, _nvdec_speed),
                ("NVDEC fallback", _nvdec_fallback.__doc__, _nvdec_fallback),
                ("NVDEC decoder reuse", _nvdec_reuse.__doc__, _nvdec_reuse),
                ("NVDEC workers", _nvdec_workers.__doc__, _nvdec_workers),
                ("commits off the GPU's path", _commits_off_the_gpu_path.__doc__, _commits_off_the_gpu_path)]


def expectations(c: Check):
    rows = []
    for name, expected, fn in NAMED_CHECKS:
        row = {"check": name, "expected": " ".join(expected.split())}
        if not c.cuda:
            rows.append({**row, "observed": "needs CUDA", "ok": None})
            continue
        try:
            observed, ok = fn(c)
        except Exception as e:  # one check's failure is its row
            observed, ok = f"{type(e).__name__}: {str(e)[:300]}", False
        rows.append({**row, "observed": observed, "ok": ok})
    return rows, None if c.cuda else "no CUDA: each check is listed with its expected outcome"


STEPS = [("environment", 5, environment), ("cuda-marked tests", 60, cuda_tests), ("backbone only", 20, backbone_only),
         ("featurize", 40, featurize), ("decode: NVDEC vs CPU", 15, decode), ("finetune", 40, finetune),
         ("predict --stream", 30, stream), ("named checks (issue 31)", 60, expectations)]


def markdown(c: Check) -> str:
    lines = [f"# GPU check ({'CUDA: ' + torch.cuda.get_device_name(0) if c.cuda else 'no CUDA: the CPU side'})", ""]
    for s in c.steps:
        lines.append(f"## {s['step']}: {s['status']}" + (f" ({s['seconds']} s)" if "seconds" in s else ""))
        if s.get("why"):
            lines.append(f"\n{s['why'].splitlines()[0]}")
        if s.get("note"):
            lines.append(f"\n{s['note'].splitlines()[0]}")
        rows = s["rows"]
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting steps past this many seconds")
    ap.add_argument("--quick", action="store_true", help="small sizes even on CUDA (a smoke test of the script)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c = Check(args.budget_s, args.quick)
    try:
        for name, needs, fn in STEPS:
            c.step(name, needs, fn)
    finally:
        shutil.rmtree(c.tmp, ignore_errors=True)
    (out / "gpu_check.json").write_text(json.dumps({"cuda": c.cuda, "steps": c.steps}, indent=1))
    (out / "gpu_check.md").write_text(markdown(c))
    print(markdown(c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
