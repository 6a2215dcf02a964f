"""Weights files: loading a state dict safely (``torch.load(weights_only=True)``), fitting it to a model, its sha256,
and the errors that say what to pass instead. Shared by every backbone family (featurize/backbones.py,
featurize/timm_models.py, featurize/clips.py).
"""
from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from featseq.common.errors import UserError


class WeightsError(UserError):
    """Weights could not be found, downloaded or loaded; the message says what to pass instead."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_state_dict_file(path: str) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"--weights {path}: cannot load it as a PyTorch state dict ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"--weights {path}: expected a dict of parameter name -> tensor")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_into(model: nn.Module, sd: dict, name: str, head: str, path: str) -> None:
    """Load ``sd`` into ``model`` (architecture ``name``), tolerating a classifier ``head`` of another shape."""
    head_prefix = head + "."
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
              if k in own and not k.startswith(head_prefix) and v.shape != own[k].shape]
    if shapes:
        raise WeightsError(f"--weights {path} does not fit {name}: {len(shapes)} tensor(s) of another shape, e.g. "
                           f"{'; '.join(shapes[:3])}; pass a state dict saved from this architecture")
    sd = {k: v for k, v in sd.items() if not (k.startswith(head_prefix) and k in own and v.shape != own[k].shape)}
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head_prefix)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(head_prefix)]
    if missing or unexpected:
        raise WeightsError(
            f"--weights {path} does not fit {name}: {len(missing)} missing key(s) {missing[:4]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:4]}; pass a state dict saved from this architecture"
        )


def download_error(name: str, url: str, err: Exception, what: str = "ImageNet") -> WeightsError:
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    return WeightsError(
        f"--weights imagenet: could not download the {what} weights of {name} from {url} "
        f"({type(err).__name__}: {str(err)[:200]}). Without internet, download that file on another machine "
        f"and pass it with --weights /path/to/{os.path.basename(url) or 'weights.pth'} (or copy it into {hub}); "
        f"--weights none uses random weights."
    )


def did_you_mean(name: str, known: list[str], prefix: str = "") -> str:
    """'; did you mean X or Y?' for the known names closest to a misspelt one ('' when none is close)."""
    import difflib

    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
