"""Sequence classifiers by name: a registry and one factory (names, options and defaults: sequence/catalog.py).

Contract of every model: ``model(x, mask) -> logits`` with x (B, T, D) float, mask (B, T) bool
(True = real frame; padding only at the end), logits (B, n_classes). Padding never changes the
output. Input standardisation (per-dimension mean/std of the training frames) is a buffer inside
the model (:class:`Standardize`), so ``create_model(**checkpoint["model_config"])`` plus the state
dict rebuilds a trained model, and the same model can sit on top of a CNN trunk that produces
(B*T, D) embeddings (reshape to (B, T, D)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from . import catalog
from .catalog import model_option_problems, model_options


@dataclass(frozen=True)
class ModelEntry:
    """A model of the catalog (sequence/catalog.py: its options, their defaults, order awareness) and its builder."""
    name: str
    build: Callable[..., nn.Module]        # build(input_dim, n_classes, **options) -> core module
    options: dict                          # option name -> default
    order_aware: bool
    description: str


_BUILDS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Implement the catalog's model ``name`` (its options and defaults are the catalog's)."""
    catalog.MODELS[name]  # a name the catalog lacks fails here

    def deco(fn):
        _BUILDS[name] = fn
        return fn
    return deco


# ---------------------------------------------------------------- building blocks

def all_real(mask: torch.Tensor) -> bool:
    """Is every step real (no padding), so masking can be skipped? Only asked on the CPU: on a GPU the answer would
    wait for the device every batch, and masking all-real steps changes nothing."""
    return mask.device.type == "cpu" and bool(mask.all())


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class Standardize(nn.Module):
    """(x - mean) / std with per-dimension buffers (identity until :meth:`fit`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, frames: torch.Tensor, rows: torch.Tensor | None = None, block_bytes: int = 32 << 20) -> None:
        """Mean and std of (n, D) real (unpadded) training frames, or of the rows ``rows`` of the features table
        ``frames``; read in float32 blocks of ``block_bytes`` whose means and squared deviations are merged in float64
        (Chan et al.'s pairwise update: no catastrophic cancellation of sum(x^2) - n*mean^2), so no float32 copy of the
        training part is made (at UCF-101 size it would be several times the cache) and no float64 one either."""
        idx = torch.arange(len(frames)) if rows is None else rows.reshape(-1)
        block = max(1, block_bytes // (4 * frames.shape[1]))
        n, mean = 0, torch.zeros(frames.shape[1], dtype=torch.float64)
        m2 = torch.zeros_like(mean)
        for a in range(0, len(idx), block):
            x = frames[idx[a:a + block]].float()
            k = len(x)
            bvar, bmean = torch.var_mean(x, 0, correction=0)
            delta = bmean.double() - mean
            mean += delta * (k / (n + k))
            m2 += bvar.double() * k + delta * delta * (n * k / (n + k))
            n += k
        self.mean.copy_(mean)
        self.std.copy_((m2 / max(n, 1)).sqrt().clamp(min=1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv = 1.0 / self.std  # (D,): x * inv - mean * inv is one pass over x where (x - mean) / std is two
        return torch.addcmul(-self.mean * inv, x, inv)


class Pool(nn.Module):
    """Sequence (B, T, H) -> (B, H) respecting the mask: last real step, mean, max or attention."""

    def __init__(self, kind: str, dim: int, bidirectional: bool = False):
        super().__init__()
        self.kind, self.bidirectional = kind, bidirectional
        self.score = nn.Linear(dim, 1) if kind == "attention" else None

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "mean":
            return masked_mean(h, mask)
        if self.kind == "max":
            return h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        if self.kind == "attention":
            s = self.score(h).squeeze(-1).masked_fill(~mask, float("-inf"))
            return (torch.softmax(s, dim=1).unsqueeze(-1) * h).sum(1)
        last = (mask.sum(1) - 1).clamp(min=0)
        fwd = h[torch.arange(len(h), device=h.device), last]
        if not self.bidirectional:
            return fwd
        d = h.shape[-1] // 2  # backward direction: its final state sits at step 0
        return torch.cat([fwd[:, :d], h[:, 0, d:]], dim=-1)


def head(dim: int, n_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_classes))


class SequenceClassifier(nn.Module):
    """Standardize -> zero the padding -> core(x, mask). ``config`` rebuilds it via create_model."""

    def __init__(self, core: nn.Module, input_dim: int, config: dict):
        super().__init__()
        self.norm = Standardize(input_dim)
        self.core = core
        self.config = config

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if not all_real(mask):
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        return self.core(x, mask)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- models

class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], input_dim: int, n_classes: int, hidden: int, layers: int,
                 bidirectional: bool, dropout: float, pooling: str):
        super().__init__()
        self.rnn = cell(input_dim, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional,
                        dropout=dropout if layers > 1 else 0.0)
        out = hidden * (2 if bidirectional else 1)
        self.pool = Pool(pooling, out, bidirectional)
        self.head = head(out, n_classes, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if bool(mask.all()):
            h, _ = self.rnn(x)
        else:  # pack so that neither direction runs over padding
            lengths = mask.sum(1).clamp(min=1).cpu()
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            h, _ = self.rnn(packed)
            h, _ = pad_packed_sequence(h, batch_first=True, total_length=x.shape[1])
        return self.head(self.pool(h, mask))


for _name, _cell in (("lstm", nn.LSTM), ("gru", nn.GRU), ("rnn", nn.RNN)):
    register(_name)(lambda input_dim, n_classes, _cell=_cell, **kw: Recurrent(_cell, input_dim, n_classes, **kw))


@register("conv1d")
class Conv1d(nn.Module):
    def __init__(self, input_dim: int, n_classes: int, hidden: int, layers: int, kernel: int, dropout: float, pooling: str):
        super().__init__()
        if pooling == "last":
            raise ValueError("--pooling last is for recurrent models; conv1d takes mean, max or attention")
        self.convs = nn.ModuleList(nn.Conv1d(input_dim if i == 0 else hidden, hidden, kernel, padding=kernel // 2)
                                   for i in range(layers))
        self.drop = nn.Dropout(dropout)
        self.pool = Pool(pooling, hidden)
        self.head = head(hidden, n_classes, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(1).to(x.dtype)
        h = x.transpose(1, 2)
        for conv in self.convs:
            h = self.drop(torch.relu(conv(h * m)))[..., :x.shape[1]]
        return self.head(self.pool(h.transpose(1, 2), mask))


def sinusoid(t: int, dim: int, device) -> torch.Tensor:
    pos = torch.arange(t, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(t, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


@register("transformer")
class Transformer(nn.Module):
    def __init__(self, input_dim: int, n_classes: int, hidden: int, layers: int, heads: int, dropout: float, pooling: str):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"--hidden ({hidden}) must be divisible by --heads ({heads})")
        if pooling == "last":
            raise ValueError("--pooling last is for recurrent models; transformer takes mean, max or attention")
        self.proj = nn.Linear(input_dim, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pool = Pool(pooling, hidden)
        self.head = head(hidden, n_classes, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + sinusoid(x.shape[1], self.proj.out_features, x.device)
        h = self.encoder(h, src_key_padding_mask=~mask)
        return self.head(self.pool(h, mask))


@register("mlp")
class MeanMLP(nn.Module):
    def __init__(self, input_dim: int, n_classes: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        dims = [input_dim] + [hidden] * layers
        self.body = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout))])
        self.head = nn.Linear(dims[-1], n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(masked_mean(x, mask)))


@register("frame")
class FrameClassifier(MeanMLP):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.head(self.body(x)), mask)


# ---------------------------------------------------------------- the registry and its factory

if set(_BUILDS) != set(catalog.MODELS):
    raise ImportError(f"sequence.models implements {sorted(_BUILDS)}, the catalog names {sorted(catalog.MODELS)}")
MODELS: dict[str, ModelEntry] = {n: ModelEntry(n, _BUILDS[n], dict(s.options), s.order_aware, s.description)
                                 for n, s in catalog.MODELS.items()}


def get_entry(name: str) -> ModelEntry:
    return MODELS[catalog.model_spec(name).name]


def create_model(name: str, input_dim: int, n_classes: int, **kw) -> SequenceClassifier:
    """Build model ``name``; options it does not use are ignored (a sweep may vary them for other models)."""
    entry = get_entry(name)
    opts = model_options(name, **kw)
    problems = model_option_problems(opts)
    if problems:
        raise ValueError("; ".join(problems))
    core = entry.build(input_dim, n_classes, **opts)
    return SequenceClassifier(core, input_dim, {"name": name, "input_dim": input_dim, "n_classes": n_classes, **opts})
