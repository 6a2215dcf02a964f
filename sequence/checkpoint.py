"""Checkpoint files (``checkpoint.pt``, finetune's ``last.pt``): tensors and plain data only, loaded weights-only.

Run folders travel (a colleague's best model, a leaderboard copied back from a cluster), so loading one must never
run code from it. A full unpickle can call any Python function a file names, so featseq never does one:

* :func:`save` writes only tensors, dicts, lists, tuples, str, int, float, bool and None (anything else is a bug
  here, refused before the file is written), so every checkpoint featseq writes loads with
  ``torch.load(..., weights_only=True)``.
* :func:`load` reads with ``weights_only=True``, torch's restricted unpickler, which calls no function outside its
  allowlist. A file that needs anything else is refused (:class:`CheckpointRefused`, exit 2), naming the Python
  objects it asks for, before any of them is imported or called.
* :func:`upgrade` (``featseq run upgrade RUN --trust``) is the one way to read a checkpoint that needs more: it
  allows exactly the objects the file names (listed first), converts what it loaded to plain data and writes the
  file again, keeping the original beside it. Only for runs you made yourself: a trusted file runs its code.

Why torch's weights-only format and not safetensors: the checkpoints are nested records (model config, classes,
reader settings, split ids, optimizer and loop state) around state dicts; weights-only ``torch.load`` reads exactly
that, in one file, with no new dependency, and the readers of older runs keep working (their checkpoints already
held plain data).
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from featseq.common.errors import UserError
from featseq.common.files import replaced

PLAIN = (str, int, float, bool, type(None))  # exactly these types: numpy's float64 is a float subclass
FILES = ("checkpoint.pt", "last.pt")   # what featseq writes into a run folder (folds/*/ included)
KEPT = ".pre-upgrade"                  # suffix of the original kept by upgrade
# What an older featseq's checkpoint could name beyond plain data (numpy scalars and arrays in a config, a path, an
# ordered dict), exact names of harmless constructors: upgrade converts files naming only these. Anything else
# (os.system, builtins.eval, any other function) no featseq version wrote: such a file was made to run code, and
# nothing converts it.
FEATSEQ_WROTE = re.compile(r"(numpy\.(_core|core)\.multiarray\.(_reconstruct|scalar)|numpy\.(ndarray|dtype)|"
                           r"numpy\.dtypes\.\w+DType|_codecs\.encode|pathlib\.(Pure)?(Posix|Windows)?Path|"
                           r"collections\.OrderedDict)")


class CheckpointRefused(UserError):
    """A checkpoint that could not be loaded without running code from it."""


def plain_problem(obj, where: str = "checkpoint") -> str | None:
    """Where ``obj`` holds something other than tensors and plain data (``"checkpoint['config']['out']: PosixPath"``),
    or None when it holds none."""
    stack = [(obj, where)]
    while stack:
        o, at = stack.pop()
        if type(o) in PLAIN or isinstance(o, torch.Tensor):
            continue
        if isinstance(o, dict):
            for k, v in o.items():
                if type(k) not in PLAIN:
                    return f"{at}: key of type {type(k).__name__}"
                stack.append((v, f"{at}[{k!r}]"))
        elif isinstance(o, (list, tuple)):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(o))
        else:
            return f"{at}: {type(o).__module__}.{type(o).__qualname__}"
    return None


def save(obj: dict, path: Path) -> None:
    """torch.save of tensors and plain data, atomically. Serialised in memory first: torch's own file writer reports a
    full disk as "unexpected pos", a plain write as the OSError it is (featseq.common.files.DiskFullError naming ``path``).
    """
    problem = plain_problem(obj)
    if problem:  # featseq's own bug: such a file would not load weights-only
        raise TypeError(f"{path}: a checkpoint holds tensors and plain data only; {problem}")
    buf = io.BytesIO()
    torch.save(obj, buf)
    with replaced(Path(path)) as tmp:
        tmp.write_bytes(buf.getbuffer())


def foreign_objects(path: str | os.PathLike) -> list[str]:
    """The Python objects (``module.name``) a checkpoint names beyond what a weights-only load allows, read from the
    file's pickle opcodes without running any of them; [] when it names none (or the file is no torch zip file)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a zip checkpoint (a legacy or damaged file): the load's own error says more
        return []


def alien(names: list[str]) -> list[str]:
    """The names no featseq version put into a checkpoint."""
    return [n for n in names if not FEATSEQ_WROTE.fullmatch(n)]


def _refusal(path, names: list[str], why: str) -> CheckpointRefused:
    what = f"it asks for {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}" if names else why
    head = (f"{path}: refused, it holds more than tensors and plain data ({what}); loading it could run code from the "
            f"file, so featseq does not. ")
    if alien(names):
        return CheckpointRefused(head + f"No featseq version writes {', '.join(alien(names)[:3])}: this file was not "
                                        f"made by featseq; do not use it")
    return CheckpointRefused(head + f"If you made this run yourself with an older featseq, convert it once with "
                                    f"`featseq run upgrade {Path(path).parent} --trust` (README, Security)")


def load(path: str | os.PathLike) -> dict:
    """A checkpoint's content, loaded weights-only (on the CPU). :class:`CheckpointRefused` for a file that needs more;
    UserError for a file that is no checkpoint at all."""
    try:  # the restricted unpickler imports and calls nothing outside its allowlist
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # it met something it does not allow: name what the file asks for
        raise _refusal(path, foreign_objects(path), f"{str(e).splitlines()[0][:200]}") from e
    except Exception as e:
        raise UserError(f"{path}: cannot load the checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a featseq checkpoint (a dict of its parts)")
    return obj


# ---------------------------------------------------------------- featseq run upgrade

def _plain(o):
    """Trusted content made plain: numpy arrays become tensors, numpy scalars and paths plain values."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if type(o) in PLAIN or isinstance(o, torch.Tensor):
        return o
    if isinstance(o, dict):
        return {_plain(k) if isinstance(k, np.generic) else k if type(k) in PLAIN else str(k): _plain(v)
                for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return type(o)(_plain(v) for v in o)
    if isinstance(o, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(o)) if o.dtype != object else [_plain(v) for v in o.tolist()]
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise UserError(f"cannot convert a {type(o).__module__}.{type(o).__qualname__} to plain data")


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    while module:
        try:
            obj = importlib.import_module(module)
            break
        except ImportError:
            module, _, head = module.rpartition(".")
            attr = f"{head}.{attr}"
    else:
        raise UserError(f"cannot find {name}, which the checkpoint asks for")
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


_ASKED = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")


def _trusted_load(path: Path, names: list[str]):
    """Load with ``names`` allowed, and the classes the file then builds (numpy's dtype classes are named only
    inside the pickle's BUILD steps, not as globals), each one only if featseq could have written it."""
    allowed = list(names)
    for _ in range(32):
        try:
            with torch.serialization.safe_globals([_resolve(n) for n in allowed]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            m = _ASKED.search(str(e))
            name = m and (m.group(1) or m.group(2))
            if not name or name in allowed or alien([name]):
                raise UserError(f"{path}: cannot convert it ({name or str(e).splitlines()[0][:200]} is not something "
                                f"featseq wrote)") from e
            allowed.append(name)
    raise UserError(f"{path}: cannot convert it (it asks for more than {len(allowed)} kinds of object)")


def checkpoints_under(folder: str | os.PathLike) -> list[Path]:
    """Every checkpoint file featseq writes, in a run folder or a folder of runs (a sweep), sorted."""
    root = Path(folder)
    if root.is_file():
        return [root]
    return sorted(p for name in FILES for p in root.rglob(name) if p.is_file())


def upgrade(folder: str | os.PathLike, trust: bool = False, log=lambda s: None) -> dict:
    """Rewrite the checkpoints under ``folder`` that need more than a weights-only load as plain data.

    Without ``trust`` nothing is loaded: the files that need it are listed with the objects they name, and
    UserError says how to go on. With ``trust`` those objects are allowed for that one load (the file's code may
    run: only for runs you made yourself), the content converted (:func:`_plain`), saved, and the original kept as
    ``<file>.pre-upgrade``. Returns {"converted": [...], "already_safe": [...]}.
    """
    files = checkpoints_under(folder)
    if not files:
        raise UserError(f"{folder}: no {' or '.join(FILES)} under it; not a featseq run folder")
    safe, todo = [], []
    for p in files:
        try:
            load(p)
            safe.append(str(p))
        except CheckpointRefused:
            todo.append((p, foreign_objects(p)))
    hostile = [(p, alien(n)) for p, n in todo if alien(n)]
    if hostile:  # not even with --trust: upgrade is for featseq's own older files
        raise CheckpointRefused(
            "not converting: " + "; ".join(f"{p} asks for {', '.join(a)}" for p, a in hostile) +
            ", which no featseq version writes; these files were not made by featseq: do not use them")
    if todo and not trust:
        listing = "; ".join(f"{p} ({', '.join(n) or 'objects a weights-only load refuses'})" for p, n in todo)
        raise CheckpointRefused(
            f"{len(todo)} checkpoint(s) need more than tensors and plain data: {listing}. Converting them loads them "
            f"with the objects they name allowed, which runs whatever those objects do: if you made these runs yourself, "
            f"rerun with --trust")
    done = []
    for p, names in todo:
        log(f"{p}: loading it trusted, allowing {', '.join(names) or 'nothing extra'}")
        obj = _plain(_trusted_load(p, names))
        kept = p.with_name(p.name + KEPT)
        if not kept.exists():  # the first original stays: a second upgrade never replaces it
            shutil.copy2(p, kept)
        save(obj, p)
        load(p)  # the converted file loads weights-only
        done.append(str(p))
        log(f"{p}: converted (the original kept as {kept.name})")
    return {"converted": done, "already_safe": safe}
