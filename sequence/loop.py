"""The one training loop. train, cross-validation and finetune all call :func:`fit`; only the source of a batch's
inputs differs: cached features (:class:`FeatureInputs`) or frames through a CNN (finetune's ``FrameInputs``).

An epoch: a permutation of the training part (seeded), batches through the model with the loss (class
weights, label smoothing), gradient accumulation and autocast when asked; then the validation and test parts
are scored with a plain loss. Model selection and early stopping (:class:`BestEpoch`) use validation only;
the test part is scored after every epoch for monitoring. The loop's whole state can be saved after every
epoch and handed back to continue (finetune's ``last.pt``).

On several ranks (finetune under torchrun, sequence.ddp) the batches are the same global batches, each rank takes
its share of every one, DistributedDataParallel averages the gradients and evaluation is sharded and gathered: the
updates and metrics are those of one process, and the saved state holds nothing per rank.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from .ddp import ONE, Ranks
from .models import all_real
from .splits import Fold


class Inputs(Protocol):
    """Model inputs for sequences given by index."""

    eval_batch: int

    def batches(self, index_batches: list[np.ndarray], rows: torch.Tensor | None = None, train: bool = False,
                seed: tuple[int, int] | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """(indices, x, mask) for each batch of sequence indices; ``rows`` replaces the default frame rows
        (a new draw of random offsets); ``train`` allows augmentation, drawn per sequence from ``seed`` (the run's
        seed and the epoch) and the sequence's index: the same draws whichever rank or batch takes it."""


class FeatureInputs:
    """Cached features: x (B, L, D) gathered from one (frames, D) tensor by a (N, L) rows table, zero at padding."""

    # one evaluation batch as float32: bounded, whatever the feature size and length. 16 MiB on the CPU: at UCF-101
    # size (35 x 2048) that is 58 sequences, and with glibc keeping freed blocks (train tunes it) an epoch and the tail
    # were faster than with 64 MiB batches at glibc's default, at the same peak (bench/train_allocator_bench.py,
    # bench/NOTES.md); 64 MiB when the features live on a GPU, where fewer, larger batches pay (not measured there)
    eval_bytes = 16 << 20
    eval_bytes_cuda = 64 << 20

    def __init__(self, features: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor):
        self.features, self.rows, self.mask = features, rows, mask
        per_sequence = 4 * max(1, rows.shape[1] if rows.ndim > 1 else 1) * max(1, features.shape[1] if features.ndim > 1 else 1)
        budget = self.eval_bytes_cuda if features.device.type == "cuda" else self.eval_bytes
        self.eval_batch = int(min(1024, max(16, budget // per_sequence)))

    @classmethod
    def of(cls, data, device: torch.device | None = None) -> "FeatureInputs":
        """For a :class:`sequence.reader.Sequences`. On a CUDA ``device`` the features (in the cache's dtype), rows and
        mask move there once when they fit (:func:`resident_on`), and every batch is gathered on the GPU: no gather on
        the host and no host-to-device copy per batch."""
        f, r, m = data.features, data.rows, data.mask
        if device is not None and resident_on(device, f):
            f, r, m = f.to(device), r.to(device), m.to(device)
        return cls(f, r, m)

    def batches(self, index_batches, rows=None, train=False, seed=None):
        table = self.rows if rows is None else rows.to(self.rows.device)
        for b in index_batches:
            bt = torch.as_tensor(b).to(self.rows.device)
            m = self.mask[bt]
            # features are kept in the cache's dtype: one float32 batch at a time, zeroed at padding in place
            x = self.features[table[bt]].float()
            yield b, x if all_real(m) else x.mul_(m.unsqueeze(-1)), m


RESIDENT_SHARE = 0.5  # features move to the GPU when they take at most this share of its free memory


def resident_on(device: torch.device, features: torch.Tensor) -> bool:
    """Should ``features`` live on ``device`` for training? On CUDA when they take at most :data:`RESIDENT_SHARE` of
    its free memory now (the model, activations and other workers of a sweep sharing the GPU need the rest); on the
    CPU they are already where the model is."""
    if device.type != "cuda" or features.device == device:
        return False
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's cache: free to torch
    return features.numel() * features.element_size() <= RESIDENT_SHARE * free


class Amp:
    """Autocast and gradient scaling for a precision on a device (fp32: both off)."""

    def __init__(self, device: torch.device, precision: str = "fp32"):
        from featseq.featurize.backbones import DTYPES

        self.device, self.precision = device, precision
        self.dtype = DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


@torch.no_grad()
def logits(model: nn.Module, inputs: Inputs, idx: np.ndarray, device: torch.device, amp: Amp | None = None,
           n_classes: int | None = None, ranks: Ranks = ONE) -> torch.Tensor:
    """Logits (len(idx), C) in eval mode, in chunks of ``inputs.eval_batch``; on several ranks each computes its
    share of ``idx`` and every rank gets them all, in order."""
    model.eval()
    ctx = amp.autocast if amp is not None else contextlib.nullcontext
    step = inputs.eval_batch
    mine = ranks.share(idx)
    out = []
    for _, x, m in inputs.batches([mine[a:a + step] for a in range(0, len(mine), step)]):
        with ctx():
            out.append(model(x.to(device), m.to(device)).float().cpu())
    return ranks.gather(torch.cat(out) if out else torch.zeros(0, n_classes or 0))


def probabilities(model: nn.Module, inputs: Inputs, mask: torch.Tensor | np.ndarray, n_classes: int, device: torch.device,
                  amp: Amp | None = None, ranks: Ranks = ONE,
                  known: tuple[torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
    """Softmax (N, C) of every sequence with at least one frame (mask[:, 0]); NaN rows for the others. ``known``:
    (indices, logits) the model already gave (:attr:`FitResult.best_logits`: the best epoch scored its validation
    and test parts with these very weights), which are not computed again."""
    first = np.asarray(mask)[:, 0].copy()
    probs = np.full((len(first), n_classes), np.nan)
    if known is not None and len(known[0]):
        idx = known[0].numpy()
        probs[idx] = torch.softmax(known[1].float(), 1).numpy()
        first[idx] = False
    have = np.nonzero(first)[0]
    if len(have):
        probs[have] = torch.softmax(logits(model, inputs, have, device, amp, n_classes, ranks), 1).numpy()
    return probs


class BestEpoch:
    """Model selection and early stopping: the best validation accuracy, ties to the lower validation loss; without a
    validation part every epoch is the best so far (the last one is kept) and there is no early stop."""

    def __init__(self, has_val: bool, patience: int):
        self.has_val, self.patience = has_val, patience
        self.epoch, self.key, self.state, self.stale = 0, None, None, 0
        self.logits: tuple[torch.Tensor, torch.Tensor] | None = None  # (indices, logits) the best weights scored

    def offer(self, epoch: int, val_loss: float, val_acc: float, model: nn.Module,
              logits: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
        """Keep ``model``'s weights, and the ``logits`` (indices, logits) they gave, if this epoch is the best so
        far; returns whether it is."""
        key = (val_acc, -val_loss) if self.has_val else (epoch, 0.0)
        if self.key is not None and key <= self.key:
            self.stale += 1
            return False
        self.epoch, self.key, self.stale, self.logits = epoch, key, 0, logits
        self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return True

    def should_stop(self) -> bool:
        return self.has_val and self.key is not None and self.stale >= self.patience

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "key": self.key, "state": self.state, "stale": self.stale, "logits": self.logits}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.key, self.state, self.stale = d["epoch"], d["key"], d["state"], d["stale"]
        self.logits = d.get("logits")  # a state saved before they were kept: computed again at the end


@dataclass
class FitOptions:
    epochs: int
    batch_size: int
    patience: int
    seed: int = 0
    class_weights: str = "none"
    label_smoothing: float = 0.0
    accumulate: int = 1
    offset: str = "start"           # "random": a new draw of window offsets every epoch (from seed and epoch)

    @classmethod
    def of(cls, cfg) -> "FitOptions":
        """From a TrainConfig or FinetuneConfig."""
        return cls(epochs=cfg.epochs, batch_size=cfg.batch_size, patience=cfg.patience, seed=cfg.seed,
                   class_weights=cfg.class_weights, label_smoothing=cfg.label_smoothing,
                   accumulate=getattr(cfg, "accumulate", 1), offset=cfg.offset)


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int                 # 0: the starting weights (a warm start) stayed the best
    start_scores: dict | None       # scores of the starting weights when they were a candidate
    train_s: float
    best_logits: tuple[torch.Tensor, torch.Tensor] | None = None  # (indices, logits) of the validation and test
    #                                 parts under the best weights, as scored in their epoch (for probabilities)


def fit(model: nn.Module, inputs: Inputs, data, fold: Fold, opt: torch.optim.Optimizer, opts: FitOptions,
        device: torch.device, *, amp: Amp | None = None, train_mode: Callable[[], None] | None = None,
        start_is_candidate: bool = False, resume: dict | None = None, on_epoch: Callable[[dict], None] | None = None,
        log: Callable[[str], None] = lambda s: None, ranks: Ranks = ONE) -> FitResult:
    """Train ``model`` on fold.train, select on fold.val, monitor fold.test; leaves the best epoch's weights in it.

    ``data``: the :class:`sequence.reader.Sequences` (labels, classes; random offsets are redrawn from it).
    ``train_mode``: puts the model in training mode (default ``model.train()``; finetune keeps frozen parts in
    eval mode). ``start_is_candidate``: score the starting weights first and keep them unless an epoch beats
    them on validation (a warm start). ``resume``: a state handed to ``on_epoch`` earlier, to continue after.
    ``ranks``: this process's share of the work when several train together (sequence.ddp); ``opts.batch_size``
    is the global batch, whatever their number. ``on_epoch`` is called on every rank with the same state.
    """
    amp = amp or Amp(device)
    train_mode = train_mode or model.train
    y = data.labels
    n_classes = len(data.classes)
    weight = None
    if opts.class_weights == "balanced":
        counts = torch.bincount(y[fold.train], minlength=n_classes).float()
        weight = (counts.sum() / (n_classes * counts.clamp(min=1))).to(device)
    # per-clip losses, summed and divided by the whole batch's count (or class weight): the mean of one process,
    # also when the batch is spread over ranks (DDP averages over ranks: hence the factor world)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=opts.label_smoothing, reduction="none")
    clip_weight = weight.cpu() if weight is not None else torch.ones(n_classes)
    eval_loss = nn.CrossEntropyLoss()  # plain loss for comparable curves
    gen = torch.Generator().manual_seed(opts.seed)
    best = BestEpoch(len(fold.val) > 0, opts.patience)
    history: list[dict] = []
    start_scores, start = None, 1

    def score(idx: np.ndarray) -> tuple[float, float]:
        if len(idx) == 0:
            return float("nan"), float("nan")
        lg = logits(model, inputs, idx, device, amp, n_classes, ranks)
        scored.append((torch.as_tensor(idx), lg))
        return float(eval_loss(lg, y[idx])), float((lg.argmax(1) == y[idx]).float().mean())

    def scored_logits() -> tuple[torch.Tensor, torch.Tensor] | None:
        """(indices, logits) of what score() computed since the last call."""
        got = scored[:]
        scored.clear()
        return (torch.cat([i for i, _ in got]), torch.cat([g for _, g in got])) if got else None

    scored: list[tuple[torch.Tensor, torch.Tensor]] = []

    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if amp.scaler.is_enabled() and resume.get("scaler"):  # an fp16 state into an fp16 scaler; else a fresh scale
            amp.scaler.load_state_dict(resume["scaler"])  # (precision auto may resolve otherwise on another machine)
        gen.set_state(resume["generator"])
        best.load_state_dict(resume["best"])
        history, start_scores, start = resume["history"], resume.get("start_scores"), resume["epoch"] + 1
        log(f"resuming after epoch {resume['epoch']}")
    elif start_is_candidate and len(fold.val):
        (vl, va), (tl, ta) = score(fold.val), score(fold.test)
        start_scores = {"val_loss": vl, "val_accuracy": va, "test_loss": tl, "test_accuracy": ta,
                        "train_loss": float("nan"), "train_accuracy": float("nan")}
        best.offer(0, vl, va, model, scored_logits())
        log(f"start: val loss {vl:.4f} acc {va:.3f}")
    net = ranks.wrap(model, device)  # after a resume's weights are in: DDP starts every rank from rank 0's
    t_train = time.monotonic()
    for epoch in range(start, opts.epochs + 1):
        if best.should_stop():
            log(f"early stop: no validation improvement for {opts.patience} epochs; best epoch {best.epoch}")
            break
        t0 = time.monotonic()
        rows = data.resample("random", np.random.default_rng((opts.seed, epoch))) if opts.offset == "random" else None
        train_mode()
        perm = fold.train[torch.randperm(len(fold.train), generator=gen).numpy()]
        batches = [perm[a:a + opts.batch_size] for a in range(0, len(perm), opts.batch_size)]
        shares = [ranks.share(b) for b in batches]
        # running totals stay on the device: float()/int() per step would wait for the GPU every batch
        tot_loss = torch.zeros((), dtype=torch.float64, device=device)
        tot_correct = torch.zeros((), dtype=torch.int64, device=device)
        opt.zero_grad(set_to_none=True)
        # a rank with no share of a batch runs its first clip with weight 0: every rank joins every averaging
        feed = [s if len(s) else b[:1] for s, b in zip(shares, batches)]
        for step, (b, x, m) in enumerate(inputs.batches(feed, rows, train=True, seed=(opts.seed, epoch)), start=1):
            mine = len(shares[step - 1]) > 0
            yb = y[b].to(device)
            scale = ranks.world / float(clip_weight[y[batches[step - 1]]].sum()) if mine else 0.0
            sync = step % opts.accumulate == 0 or step == len(batches)
            with contextlib.nullcontext() if sync else ranks.no_sync(net):
                with amp.autocast():
                    out = net(x.to(device, non_blocking=True), m.to(device, non_blocking=True))
                    loss = loss_fn(out.float(), yb).sum() * scale
                amp.scaler.scale(loss / opts.accumulate).backward()
            if sync:
                amp.scaler.step(opt)
                amp.scaler.update()
                opt.zero_grad(set_to_none=True)
            if mine:  # the batch's mean loss is the sum over ranks of loss / world
                tot_loss += loss.detach().double() * (len(batches[step - 1]) / ranks.world)
                tot_correct += (out.argmax(1) == yb).sum()
        tot_loss, tot_correct = ranks.sum([float(tot_loss), int(tot_correct)])  # one wait per epoch
        n = len(perm)
        (val_loss, val_acc), (test_loss, test_acc) = score(fold.val), score(fold.test)
        rec = {"epoch": epoch, "train_loss": tot_loss / max(1, n), "train_accuracy": tot_correct / max(1, n),
               "val_loss": val_loss, "val_accuracy": val_acc, "test_loss": test_loss, "test_accuracy": test_acc,
               "seconds": time.monotonic() - t0}
        history.append(rec)
        improved = best.offer(epoch, val_loss, val_acc, model, scored_logits())
        log(f"epoch {epoch:3d}  train loss {rec['train_loss']:.4f} acc {rec['train_accuracy']:.3f}  "
            f"val loss {val_loss:.4f} acc {val_acc:.3f}  {rec['seconds']:.1f} s{'  *' if improved else ''}")
        if on_epoch is not None:
            on_epoch({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                      "scaler": amp.scaler.state_dict(), "generator": gen.get_state(), "history": history,
                      "best": best.state_dict(), "start_scores": start_scores})
    if best.state is not None:
        model.load_state_dict(best.state)
    return FitResult(history=history, best_epoch=best.epoch, start_scores=start_scores,
                     train_s=time.monotonic() - t_train, best_logits=best.logits if best.state is not None else None)
