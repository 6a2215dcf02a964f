import atexit
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch  # noqa: F401  (torch before decord, always)

ROOT = Path(__file__).resolve().parents[1]

# This checkout is the package featseq (pyproject.toml maps the repository root to it). IMPORT_ROOT is a folder whose
# only entry, featseq, links to the checkout: first on sys.path here and on PYTHONPATH in the processes the tests
# start, it makes them run this checkout's code whichever featseq is installed (a git worktree, another clone).
IMPORT_ROOT = Path(tempfile.mkdtemp(prefix="featseq-import-"))
(IMPORT_ROOT / "featseq").symlink_to(ROOT, target_is_directory=True)
atexit.register(shutil.rmtree, IMPORT_ROOT, True)
sys.path.insert(0, str(IMPORT_ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join([str(IMPORT_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
GINGERBREAD = ROOT.parent / "shared" / "data" / "gingerbread" / "segments"
EFFNET_WEIGHTS = ROOT.parent / "shared" / "weights" / "efficientnet_lite0_timm.pth"

needs_gingerbread = pytest.mark.skipif(
    not GINGERBREAD.is_dir(), reason=f"real Gingerbread clips not found at {GINGERBREAD} (only on the team's machines)")

torch.set_num_threads(min(2, os.cpu_count() or 1))

# the environment of featseq processes the tests start: this checkout's code first (PYTHONPATH, above), and none of
# the torchrun or SLURM variables of the shell that runs pytest
CHILD_ENV = dict(os.environ)
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
    CHILD_ENV.pop(_k, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, *args) -> list[str]:
    """``torchrun --nproc-per-node NPROC featseq ARGS...`` on this machine (a free port; this checkout's cli, with
    cwd=ROOT and env=CHILD_ENV); the test is skipped where torchrun is not installed next to the interpreter."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    return [str(torchrun), "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port",
            str(free_port()), "-m", "featseq", *map(str, args)]


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic dataset with burned-in frame numbers (64x64, 30 fps), plus one long video."""
    from featseq.featurize.synth import render_dataset

    out = tmp_path_factory.mktemp("synth")
    return render_dataset(out, clips_per_class_per_group=1, groups=2, width=64, height=64, video_fps=30,
                          duration=(3.0, 5.0), seed=1, burn_frame_numbers=True, long_videos=1, long_duration=24.0)


def featurize_cfg(source, out, **kw):
    from featseq.featurize.pipeline import FeaturizeConfig

    kw.setdefault("size", 32)
    kw.setdefault("fps", 6.0)
    kw.setdefault("device", "cpu")
    return FeaturizeConfig(source=str(source), out=str(out), **kw)


def clip_folder(clips, root: Path) -> Path:
    """A folder-per-class source ROOT/<label>/<clip> of copies of synthetic ``clips`` (mtimes kept)."""
    import shutil

    for c in clips:
        dst = Path(root) / c["label"] / Path(c["path"]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(c["path"], dst)
    return Path(root)


def published_segments(path) -> int:
    """Segments a (possibly half-written) cache publishes; 0 while it doesn't exist yet."""
    from featseq.featurize.cache import open_read

    try:
        with open_read(path) as f:
            return len(f["segments"])
    except Exception:
        return 0


def small_run(d):
    """A conv1d run on synthetic 32 px clips featurized at 2 fps (8 frames = 4 s windows): (clips root, cache, run)."""
    from featseq.featurize.pipeline import featurize
    from featseq.featurize.synth import render_dataset
    from featseq.sequence.train import TrainConfig, train

    src = render_dataset(d / "v", clips_per_class_per_group=6, groups=4, width=32, height=32, duration=(6, 8),
                         long_videos=0, seed=0)["clips_root"]
    cache = featurize(featurize_cfg(src, d / "c.h5", fps=2.0)).path
    run = d / "run"
    res = train(TrainConfig(cache=cache, out=str(run), model="conv1d", fps=2, seq_len=8, split="group", epochs=40,
                            patience=15, plots=False, device="cpu"))
    return src, cache, str(run), res
