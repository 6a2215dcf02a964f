"""The options of ``featseq cache export`` and ``featseq cache import`` (flags generated from these fields,
featseq.common.options) and the facts every format shares: the format names, the index CSV an export writes beside
its files (the mapping from segment ids to safe file names, read back by import as its manifest), and safe names.
Free of torch and h5py, so the command line starts fast.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import click

from featseq.common.options import option

from ..config import DTYPES

FORMATS = ("video_features", "npy", "h5-per-video", "webdataset")
INDEX_NAME = "featseq_index.csv"  # written by every export; read by import as the default manifest
INDEX_COLUMNS = ("file", "id", "label", "group", "split", "fps", "start", "end")
MANIFEST_REQUIRED = ("file", "label")
H5_NAME = "features.h5"              # h5-per-video: the one file an export writes
H5_TIMESTAMPS = "timestamps"         # h5-per-video: the group of timestamps beside the datasets (one per video)
WDS_FEATURES, WDS_TIMESTAMPS, WDS_META = "features.npy", "timestamps.npy", "json"  # webdataset: a sample's members


def _format_help() -> str:
    return ("video_features: OUT/<feature_type>/<stem>_<feature>.npy, <stem>_timestamps_ms.npy, <stem>_fps.npy; npy: "
            "<stem>.npy and <stem>_timestamps.npy; h5-per-video: one HDF5, a dataset per video; webdataset: tar shards.")


@dataclass
class ExportConfig:
    cache: str
    format: str = option(None, _format_help(), choices=FORMATS)
    out: str = option(None, "Folder to write the files and featseq_index.csv into.")
    feature_type: str | None = option(None, "video_features: the feature-type folder and file key [default: the "
                                            "cache's backbone].", metavar="NAME")
    shard_samples: int = option(1000, "webdataset: segments per tar shard.", type=click.IntRange(1))

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format is required: one of {', '.join(FORMATS)}")
        if not self.out:
            raise ValueError("--out DIR is required: the folder the exported files go to")


@dataclass
class ImportConfig:
    source: str
    format: str = option(None, _format_help(), choices=FORMATS)
    out: str = option(None, "The cache file to write (resumed when it holds an earlier import of the same files).")
    manifest: str | None = option(None, "CSV of file,label[,id,group,split,fps,start,end] (file: the stem, dataset "
                                        "name or sample key) [default: SOURCE/featseq_index.csv when there, else "
                                        "labels from SOURCE/<label>/ folders or the files' own metadata].",
                                  metavar="CSV")
    fps: float | None = option(None, "Rate of the features, for files that do not give one (npy without timestamps, "
                                     "other tools' HDF5) or to declare one rate for files that give several.")
    feature: str | None = option(None, "video_features: which <stem>_<feature>.npy to import when there are several "
                                       "(e.g. rgb or flow of i3d).", metavar="NAME")
    dtype: str | None = option(None, "Storage dtype [default: the files' (float16 or float32), float32 for others].",
                               choices=DTYPES)

    def validate(self) -> None:
        problems = []
        if self.format not in FORMATS:
            problems.append(f"--format is required: one of {', '.join(FORMATS)}")
        if not self.out:
            problems.append("--out CACHE is required: the cache file to write, e.g. cache/imported.h5")
        if self.fps is not None and not self.fps > 0:
            problems.append(f"--fps must be > 0, got {self.fps}")
        if problems:
            raise ValueError("; ".join(problems))


def safe_name(text: str, empty: str = "segment") -> str:
    """``text`` as a file name of letters, digits, '_' and '-' (no dots: webdataset splits keys at the first one)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_") or empty


def safe_names(ids: list[str], reserved: tuple[str, ...] = ()) -> dict[str, str]:
    """id -> :func:`safe_name`, unique without regard to case (file systems that fold case) and none of
    ``reserved``."""
    out, used = {}, {r.casefold() for r in reserved}
    for sid in ids:
        base = safe_name(sid)
        name, k = base, 2
        while name.casefold() in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name.casefold())
        out[sid] = name
    return out
