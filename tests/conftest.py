import atexit
import os
import shutil
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
torch.set_num_threads(min(2, os.cpu_count() or 1))
# the memory-mapped feature copies of the tests' caches (sequence.reader.features_memmap) go to a folder of this run,
# deleted at its end, not to the machine's temp folder (each test's cache has its own path, so its own copy)
MMAP_ROOT = tempfile.mkdtemp(prefix="featseq-test-mmap-")
atexit.register(shutil.rmtree, MMAP_ROOT, True)
os.environ["FEATSEQ_MMAP_DIR"] = MMAP_ROOT
# featurize's default precision follows the CPU (bf16 where it is native): the suite pins it to what a CPU without
# native bf16 does, so its features and tolerances are the same on every CI machine; the tests of the native case
# set it themselves. FEATSEQ_CPU_BF16=1 make test runs the whole suite as such a CPU would.
os.environ.setdefault("FEATSEQ_CPU_BF16", "0")

# plain helpers (paths, CHILD_ENV, featurize_cfg, ...) are in helpers.py; this file holds the fixtures


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic dataset with burned-in frame numbers (64x64, 30 fps), plus one long video."""
    from featseq.featurize.synth import render_dataset

    out = tmp_path_factory.mktemp("synth")
    return render_dataset(out, clips_per_class_per_group=1, groups=2, width=64, height=64, video_fps=30,
                          duration=(3.0, 5.0), seed=1, burn_frame_numbers=True, long_videos=1, long_duration=24.0)


@pytest.fixture(scope="session")
def small_trained(tmp_path_factory):
    """helpers.small_run, made once per session and shared read-only (predict, stream and security tests):
    {"src", "cache", "run", "res"}. Tests write their outputs elsewhere; one that changes the run copies it."""
    from helpers import small_run

    src, cache, run, res = small_run(tmp_path_factory.mktemp("small_run"))
    return {"src": src, "cache": cache, "run": run, "res": res}


@pytest.fixture(scope="session")
def gingerbread_cache(tmp_path_factory):
    """helpers.gingerbread_killed_and_resumed, once per session: test_gingerbread checks the kill and the resume,
    test_sequence_train trains on the finished cache (featurizing the 184 real clips costs the suite about 40 s each
    time). Only where the real clips are (the tests that use it are marked needs_gingerbread)."""
    from helpers import gingerbread_killed_and_resumed

    return gingerbread_killed_and_resumed(tmp_path_factory.mktemp("gingerbread"))
