"""Importance of every time step of a sequence for a class, on the sequence model's own inputs (Captum).

The one attribution path of ``featseq explain`` and ``predict --explain``: given the (B, L, D) inputs the model reads
(cached features gathered by the run's window policy, zero at padding) and its mask, :func:`step_attributions` returns
a signed attribution per step for a target class and :func:`normalise` the importance shown to people: the positive
part (evidence *for* the class), normalised per sequence to sum to 1 over its real frames.

Methods (``--method``):

* ``integrated-gradients``: Captum's IntegratedGradients of the class probability from a baseline sequence to the
  input (``--baseline mean``: every frame the training frames' mean, i.e. zero after the model's standardisation,
  "no information"; ``zeros``: raw zero features), summed over feature dimensions per step.
* ``occlusion``: Captum's Occlusion: windows of ``--occlusion-window`` steps replaced by the baseline one at a time;
  a step's attribution is the mean drop of the class probability over the windows that cover it.

Captum is an optional extra (``pip install 'featseq[explain]'``), imported only here, when an explanation is asked
for. Recurrent models' backward pass in eval mode is refused by cuDNN, so cuDNN is off during attribution (the
model stays in eval mode: no dropout, the same outputs as predict).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from featseq.common.errors import UserError

from .config import EXPLAIN_BASELINES as BASELINES, EXPLAIN_METHODS as METHODS


def captum_attr():
    """captum.attr, or UserError naming the extra to install."""
    try:
        import captum.attr
    except ImportError as e:
        raise UserError("explanations need Captum, an optional extra: pip install 'featseq[explain]' "
                        f"(import failed: {e})") from e
    return captum.attr


def _no_cudnn(device: torch.device):
    """cuDNN refuses an RNN's backward in eval mode; attribution runs without it (same results, a little slower)."""
    return torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else contextlib.nullcontext()


def baseline_frame(model: nn.Module, dim: int, kind: str) -> torch.Tensor:
    """(D,) the baseline frame: the model's input mean (a SequenceClassifier's Standardize buffer) or zeros."""
    if kind not in BASELINES:
        raise ValueError(f"--baseline {kind!r}: choose one of {', '.join(BASELINES)}")
    norm = getattr(model, "norm", None)
    if kind == "mean" and norm is not None:
        return norm.mean.detach().float().cpu()
    return torch.zeros(dim)


def step_attributions(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, method: str,
                      device: torch.device, baseline: str = "mean", steps: int = 32, window: int = 3,
                      batch: int = 16) -> np.ndarray:
    """(B, L) signed attribution of each step of ``x`` (B, L, D float, zero at padding; ``mask`` (B, L) bool) to the
    probability of ``targets`` (B,) int; 0 at padding. The model is used in eval mode, as it predicts."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    ca = captum_attr()
    model.eval().to(device)

    def forward(inp, m):
        return torch.softmax(model(inp, m), 1)

    base = baseline_frame(model, x.shape[-1], baseline).to(device)
    out = []
    with _no_cudnn(device):
        for a in range(0, len(x), batch):
            xb = x[a:a + batch].to(device).float()
            mb = mask[a:a + batch].to(device)
            tb = targets[a:a + batch].to(device)
            bb = base.expand_as(xb).masked_fill(~mb.unsqueeze(-1), 0.0).contiguous()  # padding stays padding
            if method == "integrated-gradients":
                attr = ca.IntegratedGradients(forward).attribute(
                    xb, baselines=bb, target=tb, additional_forward_args=(mb,), n_steps=steps,
                    internal_batch_size=max(1, len(xb)) * min(steps, 8))
                per = attr.sum(-1)
            else:
                w = max(1, min(window, xb.shape[1]))
                attr = ca.Occlusion(forward).attribute(
                    xb, sliding_window_shapes=(w, xb.shape[-1]), strides=(1, xb.shape[-1]), baselines=bb, target=tb,
                    additional_forward_args=(mb,))
                per = attr.mean(-1)  # every dimension of a step holds the same value
            out.append(per.masked_fill(~mb, 0.0).detach().float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(mask.shape, np.float32)


def normalise(attr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, L) importance: the positive part of each step's attribution, divided by the sequence's total, so the real
    frames of a sequence sum to 1 (0 at padding). A sequence with no positive evidence at all (its probability is
    the baseline's) is spread evenly over its real frames."""
    mask = np.asarray(mask, bool)
    pos = np.where(mask, np.clip(attr, 0, None), 0.0)
    tot = pos.sum(1, keepdims=True)
    even = mask / np.maximum(1, mask.sum(1, keepdims=True))
    return np.where(tot > 0, pos / np.where(tot > 0, tot, 1), even)


def explain_inputs(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None, method: str,
                   device: torch.device, baseline: str = "mean", steps: int = 32, window: int = 3) -> dict:
    """Probabilities, prediction and importance over time of a batch of model inputs: {"probs" (B, C), "pred" (B,),
    "attr" (B, L) signed for the predicted class, "importance" (B, L), "importance_label" (B, L), NaN rows where the
    label is unknown (< 0) or not given}."""
    model.eval().to(device)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(x[a:a + 64].to(device).float(), mask[a:a + 64].to(device)), 1).cpu()
                           for a in range(0, len(x), 64)]).numpy() if len(x) else np.zeros((0, 0))
    pred = probs.argmax(1) if len(x) else np.zeros(0, np.int64)
    kw = dict(device=device, baseline=baseline, steps=steps, window=window)
    attr = step_attributions(model, x, mask, torch.from_numpy(pred), method, **kw)
    imp = normalise(attr, mask.numpy())
    imp_label = np.full(imp.shape, np.nan)
    if labels is not None:
        y = labels.numpy()
        same = y == pred
        imp_label[same] = imp[same]
        other = np.nonzero((y >= 0) & ~same)[0]
        if len(other):
            a2 = step_attributions(model, x[other], mask[other], labels[other], method, **kw)
            imp_label[other] = normalise(a2, mask[other].numpy())
    return {"probs": probs, "pred": pred, "attr": attr, "importance": imp, "importance_label": imp_label}


def clip_profile(importance: np.ndarray, times: np.ndarray, mask: np.ndarray, start: np.ndarray, end: np.ndarray,
                 bins: int = 20) -> np.ndarray:
    """(B, bins) share of each sequence's importance falling in each 1/bins of its clip (time normalised to the clip:
    0 its start, 1 its end), so clips of any length average together."""
    out = np.zeros((len(importance), bins))
    for i in range(len(importance)):
        m = np.asarray(mask[i], bool)
        span = max(float(end[i] - start[i]), 1e-9)
        pos = np.clip((np.asarray(times[i])[m] - start[i]) / span, 0, 1 - 1e-9)
        np.add.at(out[i], (pos * bins).astype(int), np.asarray(importance[i])[m])
    return out
