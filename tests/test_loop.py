"""The one training loop (sequence.loop) on tiny cached features: accumulation, selection, early stop, resume."""
import numpy as np
import pytest
import torch

from featseq.sequence import models as M
from featseq.sequence.loop import BestEpoch, FeatureInputs, FitOptions, fit
from featseq.sequence.reader import ReaderConfig, build
from featseq.sequence.splits import Fold


@pytest.fixture(scope="module")
def seqs(tmp_path_factory):
    from featseq.featurize.cache import read_cache
    from helpers import write_fake_cache

    path = write_fake_cache(tmp_path_factory.mktemp("loop") / "c.h5", ["a", "b"] * 12, dim=8, seed=4)
    return build(read_cache(path, dtype=np.float32), ReaderConfig(seq_len=6))


def _fold():
    return Fold("f", np.arange(16), np.arange(16, 20), np.arange(20, 24))


def _fit(seqs, epochs=1, batch_size=8, accumulate=1, resume=None, on_epoch=None, patience=10, fold=None, lr=0.1):
    torch.manual_seed(0)
    model = M.create_model("mlp", 8, 2, hidden=16, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opts = FitOptions(epochs=epochs, batch_size=batch_size, patience=patience, seed=3, accumulate=accumulate)
    res = fit(model, FeatureInputs.of(seqs), seqs, fold or _fold(), opt, opts, torch.device("cpu"), resume=resume,
              on_epoch=on_epoch)
    return model, res


def test_accumulating_two_half_batches_equals_one_full_batch(seqs):
    """--accumulate 2 with batch 4 takes the same optimizer steps as batch 8 (dropout 0, 16 training clips)."""
    a, _ = _fit(seqs, batch_size=8, accumulate=1)
    b, _ = _fit(seqs, batch_size=4, accumulate=2)
    c, _ = _fit(seqs, batch_size=4, accumulate=1)
    for (k, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), k
    assert any(not torch.allclose(x, z, atol=1e-6) for x, z in zip(a.state_dict().values(), c.state_dict().values()))


def test_resume_continues_exactly_where_the_state_was_saved(seqs):
    """4 epochs in one go equal 2 epochs, the saved loop state, then 2 more: weights, history and best epoch."""
    full, res_full = _fit(seqs, epochs=4)
    saved = {}
    _fit(seqs, epochs=2, on_epoch=lambda st: saved.update(st))
    resumed, res = _fit(seqs, epochs=4, resume=saved)
    assert saved["epoch"] == 2
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    for h1, h2 in zip(res.history, res_full.history):
        assert {k: v for k, v in h1.items() if k != "seconds"} == pytest.approx({k: v for k, v in h2.items() if k != "seconds"})
    assert res.best_epoch == res_full.best_epoch
    for x, y in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(x, y)


def test_best_epoch_keeps_the_best_validation_and_stops_after_patience():
    model = torch.nn.Linear(1, 1)
    best = BestEpoch(has_val=True, patience=2)
    assert best.offer(1, 0.9, 0.5, model)
    with torch.no_grad():
        model.weight.fill_(7.0)
    assert best.offer(2, 0.8, 0.5, model)         # same accuracy, lower loss: better
    assert not best.offer(3, 0.1, 0.4, model)     # lower accuracy loses whatever its loss
    assert not best.should_stop()
    assert not best.offer(4, 0.8, 0.5, model)     # an exact tie is not an improvement
    assert best.should_stop() and best.epoch == 2 and float(best.state["weight"]) == 7.0
    no_val = BestEpoch(has_val=False, patience=1)
    for e in range(1, 5):
        assert no_val.offer(e, float("nan"), float("nan"), model)
    assert no_val.epoch == 4 and not no_val.should_stop()


def test_early_stop_after_patience_epochs_without_improvement(seqs):
    """lr 0: every epoch scores exactly like the first, so with patience 2 training stops after epoch 3, best epoch 1;
    the model left is scored like the best epoch."""
    model, res = _fit(seqs, epochs=30, patience=2, lr=0.0)
    assert [h["epoch"] for h in res.history] == [1, 2, 3] and res.best_epoch == 1
    from featseq.sequence.loop import logits

    lg = logits(model, FeatureInputs.of(seqs), _fold().val, torch.device("cpu"))
    assert float((lg.argmax(1) == seqs.labels[_fold().val]).float().mean()) == pytest.approx(res.history[0]["val_accuracy"])


def test_features_stay_on_the_cpu_and_go_to_a_gpu_only_when_they_fit(seqs, monkeypatch):
    """sequence.loop.resident_on: cached features move to a CUDA device for training when they take at most half its
    free memory (torch.cuda.mem_get_info, faked here), never on the CPU; FeatureInputs.of leaves them where they are
    when they do not fit. The move itself runs in tests/test_gpu.py on a GPU machine."""
    from featseq.sequence import loop

    feats = seqs.features  # float32 here: 4 bytes per value
    size = feats.numel() * 4
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * size, 10 * size))
    assert loop.resident_on(cuda, feats)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * size - 4, 10 * size))
    assert not loop.resident_on(cuda, feats)
    assert not loop.resident_on(torch.device("cpu"), feats)
    inputs = FeatureInputs.of(seqs, cuda)  # does not fit: stays on the host, batches are copied per batch
    assert inputs.features.device.type == "cpu" and inputs.features is seqs.features


def test_the_best_epochs_val_and_test_logits_are_reused_for_the_final_probabilities(seqs, monkeypatch):
    """fit keeps the validation and test logits its best epoch scored; probabilities() given them equals a fresh
    forward pass of every segment under the best weights, and runs the model on the other segments only."""
    from featseq.sequence import loop

    model, res = _fit(seqs, epochs=6, lr=0.5)
    assert 1 <= res.best_epoch <= 6 and res.best_logits is not None
    idx, _ = res.best_logits
    assert sorted(idx.tolist()) == list(range(16, 24))  # the validation and test parts of _fold()
    inputs = FeatureInputs.of(seqs)
    fresh = loop.probabilities(model, inputs, seqs.mask, 2, torch.device("cpu"))
    asked = []
    real = loop.logits
    monkeypatch.setattr(loop, "logits", lambda m, i, ix, *a, **k: asked.append(np.asarray(ix)) or real(m, i, ix, *a, **k))
    reused = loop.probabilities(model, inputs, seqs.mask, 2, torch.device("cpu"), known=res.best_logits)
    np.testing.assert_allclose(reused, fresh, atol=1e-6)
    assert sorted(np.concatenate(asked).tolist()) == list(range(16))  # the training part only


def test_a_resumed_fit_keeps_the_best_epochs_logits(seqs):
    """The loop state saved after every epoch holds the best epoch's logits: a resumed fit ends with the same ones."""
    _, full = _fit(seqs, epochs=4, lr=0.5)
    saved = {}
    _fit(seqs, epochs=2, lr=0.5, on_epoch=lambda st: saved.update(st))
    _, res = _fit(seqs, epochs=4, lr=0.5, resume=saved)
    assert res.best_epoch == full.best_epoch
    assert torch.equal(res.best_logits[0], full.best_logits[0]) and torch.allclose(res.best_logits[1], full.best_logits[1])
