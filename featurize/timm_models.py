"""timm models (``--backbone timm:<name>[.<tag>]``): CNNs and the foundation image models (DINOv2, SigLIP / SigLIP2,
CLIP ViTs, EVA), each with its own preprocessing from its pretrained configuration (``pretrained_cfg``: input size,
mean/std, interpolation, crop_pct), not ImageNet-CNN defaults.

A ViT runs at its own input size unless ``--size`` says otherwise; at another size it is built with timm's
``dynamic_img_size=True`` (position embeddings interpolated), and a size that is not a multiple of its patch is refused
before any cache is made. ``--pool`` picks the token (ViTs: token, avg, max, map) or the spatial pooling (CNNs: avg,
max, gem). Weights: 'none' (random), 'imagenet' (timm's default pretrained weights, downloaded from the Hugging Face
hub) or a local state-dict file.
"""
from __future__ import annotations

from torch import nn

from featseq.common.errors import UserError

from .choices import CNN_POOLS, VIT_POOLS
from .pooling import FeatureMapPool, check_choice
from .weightfiles import download_error, did_you_mean, load_into, load_state_dict_file, sha256_file


def _timm():
    try:
        import timm
    except ImportError as e:
        raise ValueError("timm backbones need timm: pip install 'featseq[timm]'") from e
    return timm


def pretrained_cfg(tname: str) -> dict:
    """The pretrained configuration of ``tname`` (a model name, optionally with its .tag), without building it."""
    timm = _timm()
    arch = tname.split(".", 1)[0]
    known = timm.list_models()
    if arch not in known:
        raise ValueError(f"unknown timm model {arch!r}{did_you_mean(arch, known, 'timm:')}; timm.list_models() "
                         f"lists the {len(known)} it knows")
    try:
        cfg = timm.models.get_pretrained_cfg(tname, allow_unregistered=False) if "." in tname else timm.get_pretrained_cfg(arch)
    except RuntimeError:
        cfg = None
    if cfg is None:
        raise ValueError(f"timm model {arch!r} has no pretrained tag {tname.split('.', 1)[1]!r}; "
                         f"timm.list_pretrained('{arch}*') lists them")
    return cfg.to_dict()


def own_size(tname: str) -> int:
    """The model's own input size (pretrained_cfg input_size), which --size defaults to."""
    return own_preprocessing(pretrained_cfg(tname))["size"]


def own_preprocessing(cfg: dict) -> dict:
    """size, interpolation and crop_pct of a pretrained configuration (timm's defaults where it has none)."""
    return {"size": int(cfg.get("input_size", (3, 224, 224))[-1]),
            "interpolation": str(cfg.get("interpolation") or "bilinear"), "crop_pct": float(cfg.get("crop_pct") or 0.875)}


def create(tname: str, weights: str, pool: str, size: int | None) -> tuple[nn.Module, dict, str]:
    """(trunk mapping (N, 3, S, S) to (N, D), the entry's fields, weights sha256) for timm model ``tname``."""
    timm = _timm()
    cfg = pretrained_cfg(tname)
    own = own_preprocessing(cfg)
    native = own["size"]
    kwargs = {}
    if size is not None and size != native:
        kwargs["dynamic_img_size"] = True
    try:
        model = _build(timm, tname, weights, kwargs)
    except TypeError:  # a CNN: any input size works, there is no dynamic_img_size to ask for
        kwargs, model = {}, _build(timm, tname, weights, {})
    head = cfg.get("classifier", "classifier")
    sha = ""
    if weights not in ("none", "imagenet"):
        load_into(model, load_state_dict_file(weights), f"timm:{tname}", head, weights)
        sha = sha256_file(weights)
    vit = isinstance(getattr(model, "global_pool", None), str)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if vit and size is not None and patch is not None:
        p = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        if size % p:
            raise UserError(f"--size {size}: timm:{tname} cuts frames into {p} px patches, so its input size must be a "
                            f"multiple of {p} (e.g. {size // p * p} or {(size // p + 1) * p}; its own is {native})")
    check_choice(f"timm:{tname}", pool, 1, VIT_POOLS if vit else CNN_POOLS, "a ViT" if vit else "a CNN")
    if vit and pool == "map" and getattr(model, "attn_pool", None) is None:
        raise UserError(f"--pool map: timm:{tname} has no attention-pooling head; choose token, avg or max")
    stages = _stages(model)
    if pool == "default":
        model.reset_classifier(0)
    elif vit or pool in ("avg", "max"):
        model.reset_classifier(0, global_pool=pool)
    else:  # gem of a CNN's last feature map
        model.reset_classifier(0)
        model = FeatureMapPool(model, pool)
        stages = tuple(f"model.{s}" if s else "model" for s in stages)
    fields = dict(feature_dim=int(getattr(model, "num_features", 0) or getattr(model, "model").num_features),
                  head=head, stages=stages, mean=tuple(cfg.get("mean")), std=tuple(cfg.get("std")), source="timm",
                  **own)
    return model.eval(), fields, sha


def _build(timm, tname: str, weights: str, kwargs: dict) -> nn.Module:
    if weights == "imagenet":
        try:
            return timm.create_model(tname, pretrained=True, **kwargs)
        except TypeError:
            raise
        except Exception as e:
            raise download_error(f"timm:{tname}", f"the Hugging Face hub ({tname})", e, "pretrained") from e
    return timm.create_model(tname, pretrained=False, **kwargs)


def _stages(model: nn.Module) -> tuple[str, ...]:
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return tuple(f"blocks.{i}" for i in range(len(blocks)))
    return tuple(f["module"] for f in getattr(model, "feature_info", []) if f.get("module")) or ("",)
