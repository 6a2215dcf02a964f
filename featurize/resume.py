"""What a featurize run takes from the cache it resumes when its command leaves a setting unset: the decoder
(backends scale pixels differently) and the precision (auto's choice differs between machines). An explicit flag is
what was asked for: the cache's identity check refuses one that differs (featurize.cache.check_identity)."""
from __future__ import annotations

import os

from . import shard as shard_mod
from .cache import read_attrs
from .config import FeaturizeConfig
from .decoder import resolve_decoder
from .decoders import LEGACY_DECODER
from .precision import PRECISIONS, emulated, reproduce_precision, resolve_precision


def decoder_for(cfg: FeaturizeConfig, caches: list[str]) -> str:
    """The backend to decode with: --decoder auto resumes a cache with the decoder that made it (decord for a cache
    that records none), since backends scale pixels differently; an explicit --decoder must match (identity)."""
    if cfg.decoder == "auto":
        for p in caches:
            if os.path.exists(p):
                return resolve_decoder(read_attrs(p).get("decoder") or LEGACY_DECODER, cfg.decode_device)
    return resolve_decoder(cfg.decoder, cfg.decode_device)


def precision_for(cfg: FeaturizeConfig, device, shard, path_of, log) -> str:
    """The precision to featurize in. An explicit --precision as asked. Unset: the precision of the cache this run
    resumes (--out, or the default path under any precision, with its shard's part), so one command resumes one cache
    on machines whose default differs (a bf16-native CPU and an AVX2 one, a GPU); else auto's choice here.
    ``path_of(precision)``: the default cache path of ``cfg`` at that precision."""
    here = resolve_precision(cfg.precision, device)
    made = here
    if cfg.precision is None:
        targets = [cfg.out] if cfg.out else [path_of(p) for p in dict.fromkeys((here,) + PRECISIONS)]
        for t in targets:
            found = [p for p in ([shard_mod.part_path(t, *shard)] if shard else []) + [t] if os.path.exists(p)]
            if found:
                made = read_attrs(found[0]).get("precision") or "fp32"  # a cache written before precision was recorded: fp32
                made = made if made in PRECISIONS else here  # an imported cache: its identity check says what differs
                break
        if made != here:
            log(f"note: resuming {found[0]}, made in {made}: featurizing in {made} (auto's choice here is {here}; "
                f"--precision {here} with another --out makes a {here} cache)")
    if cfg.precision is not None and emulated(made, device):
        log("warning: --precision bf16 is emulated on this CPU (no AVX512-BF16/AMX): several times slower than "
            "fp32 (BENCHMARKS.md); --precision auto picks fp32 here")
    elif reproduce_precision(made, device) != made:  # a resumed half-precision cache this CPU computes slowly
        log(f"warning: {made} is slow on this CPU (emulated, several times slower than fp32: BENCHMARKS.md), but "
            f"this cache was made in {made}, so resuming it continues in {made}; for speed here, start another "
            f"cache with --precision fp32 and another --out")
    return made
