"""What `pip install featseq` puts on a user's machine: a wheel built from this checkout claims the one top-level
import name featseq, and installed into a clean virtual environment it imports and runs from another folder (the
console script, ``python -m featseq``, README's own-loop example on a cache it featurized itself)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT


def _sources(dst: Path) -> Path:
    """The files a clean clone has (git's list where there is a .git; else the tree without venvs and outputs):
    the wheel is built from a copy, so the build leaves nothing in the checkout."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                 and not {".venv", ".git", "demo", "cache", "__pycache__"} & set(p.relative_to(ROOT).parts)]
    for n in names:
        if (ROOT / n).is_file():
            (dst / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / n, dst / n)
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, python of a clean venv with the wheel installed). The venv has no pip and no site packages of its own;
    featseq's dependencies (torch, h5py ...) come from this interpreter's site-packages as a plain path entry, which
    runs none of its .pth files, so this checkout's editable install is not seen."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = _sources(tmp / "src")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp / "dist").glob("featseq-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "featseq_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return wheel, py


def _run(py, *args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(py), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_claims_only_featseq(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = {n.split("/")[0] for n in names}
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top_level).decode().split() == ["featseq"]
    assert {t for t in top if not t.endswith(".dist-info")} == {"featseq"}
    for must in ("featseq/__main__.py", "featseq/cli.py", "featseq/common/errors.py", "featseq/featurize/cache.py",
                 "featseq/featurize/decoders/pyav_decoder.py", "featseq/sequence/templates/report.html.j2"):
        assert must in names
    # every package of the product (pyproject lists them by hand): a new one left out would be missing from the wheel
    packages = sorted(p.parent.relative_to(ROOT).as_posix() for d in ("common", "featurize", "sequence")
                      for p in (ROOT / d).rglob("__init__.py"))
    assert [p for p in packages if f"featseq/{p}/__init__.py" not in names] == []
    assert "featseq/featurize/interop/import_.py" in names
    assert not [n for n in names if n.startswith(("featseq/tests/", "featseq/bench/"))]


def test_the_installed_wheel_imports_and_runs_from_another_folder(installed, tmp_path):
    _, py = installed
    r = _run(py, "-c", "import importlib.util as u, featseq, featseq.featurize.cache, featseq.sequence.train; "
                       "print(featseq.__file__); print([m for m in ('cli', 'featurize', 'sequence', 'common') "
                       "if u.find_spec(m)])", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    where, stray = r.stdout.splitlines()
    assert "site-packages" in where and str(ROOT) not in where
    assert stray == "[]"  # no generic top-level names
    for cmd in ([py.with_name("featseq"), "--help"], [py, "-m", "featseq", "--help"]):
        r = _run(*cmd, cwd=tmp_path)
        assert r.returncode == 0 and "featurize" in r.stdout and "train" in r.stdout, r.stderr


def test_readme_own_loop_example_runs_on_the_installed_wheel(installed, tmp_path):
    """README's own-loop example as written, but for the cache's name and split, on a cache the installed console
    script featurized."""
    _, py = installed
    featseq = py.with_name("featseq")
    r = _run(featseq, "synth", "data", "--clips", "2", "--groups", "2", "--width", "32", "--height", "32",
             "--min-duration", "3", "--max-duration", "4", "--long-videos", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _run(featseq, "featurize", "data/clips", "--backbone", "resnet18", "--weights", "none", "--size", "32",
             "--fps", "2", "--out", "c.h5", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    code = re.search(r"<!-- own-loop example -->\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    (tmp_path / "own.py").write_text(code.replace('"X.h5"', '"c.h5"').replace('split="ucf101:1"', 'split="group"')
                                     .replace("num_workers=2", "num_workers=0") + "\nprint('loss', float(loss))\n")
    r = _run(py, "own.py", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) > 0
